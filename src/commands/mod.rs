//! `kiln`'s commands, one module per family. Each module's `Commands` is flattened into the
//! top-level command list; its `run` parses nothing further and calls the libraries.
//!
//! - [`data`]: `prepare`, `data stats|verify|merge|index`.
//! - [`train`]: `train` (one rank of a run).
//! - [`plan`]: `plan` (a job's memory and speed per rank, and the meshes that fit).
//! - [`agent`]: `worker` and `local` (the processes that take ranks from a coordinator).
//! - [`model`]: `doctor`, `sample`, `eval`, `export`.
//! - [`checkpoint`]: `checkpoint list|verify`.
//!
//! The control plane (`coordinator`, `submit`, `status`, `scale`, `stop`, `logs`,
//! `report`) is `kiln_control::ControlCommand`.

pub mod agent;
pub mod checkpoint;
pub mod data;
pub mod model;
pub mod plan;
pub mod train;
