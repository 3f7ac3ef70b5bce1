//! Kiln's training engine on libtorch (through tch).
//!
//! - [`collective`]: all-reduce and friends over a TCP ring or NCCL; the `dp x tp` mesh.
//! - [`doctor`]: `kiln doctor`, what this machine gives Kiln, read back and measured.
//! - [`config`]: model shapes, presets, parameter and FLOP counts, Hugging Face configs.
//! - [`cuda`]: the CUDA driver's contexts, streams and events, for NCCL and checkpoint copies.
//! - [`parallel`]: data parallelism (bucketed, overlapped all-reduce; ZeRO-1) and one step.
//! - [`params`]: parameters and gradients as views into flat buffers.
//! - [`precision`]: bf16 autocast with its dtype set explicitly, on CUDA and the CPU.
//! - [`storage`]: a tensor's memory freed and refilled under its views (fully sharded).
//! - [`model`]: the Llama 3 transformer.
//! - [`optim`]: AdamW, gradient clipping, learning-rate schedules.
//! - [`hf`]: Hugging Face checkpoint directories in and out.
//! - [`train`]: the single-process training loop of `kiln train`.
//! - [`supervised`]: a training process run by `kiln worker`'s agent, over stdin/stdout.
//! - [`meta`]: `kiln.json` beside a model's weights; the model-vs-dataset vocabulary check.
//! - [`metrics`]: a rank's OpenTelemetry metrics, from the loop's events.
//! - [`generate`] and [`eval`]: sampling text and measuring loss.
//!
//! Architecture invariant: nothing here knows about gRPC or the coordinator; a coordinated
//! run only adds a [`checkpoint::CommitGate`] and line-based stdio ([`supervised`]).

pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod cuda;
pub mod device;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod fsdp;
pub mod generate;
pub mod hf;
pub mod memory;
pub mod meta;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod plan;
pub mod precision;
pub mod storage;
pub mod supervised;
pub mod train;
