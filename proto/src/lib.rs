//! The contract between Kiln's processes and the files they share.
//!
//! - [`job`]: the TOML job file a user writes (`kiln train JOB.toml`), parsed and validated
//!   before any work starts.
//! - [`manifest`]: the JSON manifest that describes a tokenized dataset of Parquet shards.
//! - [`path`]: the one lexical path normalizer (`.` and `..` without the file system);
//!   [`json`]: how messages name JSON values.
//! - [`rpc`]: the coordinator's gRPC service (`proto/kiln.proto`), generated at build time
//!   without `protoc`, with [`codec`]'s error codes; [`control`]: its messages as checked Kiln types; [`client`]: how a
//!   worker or a client connects (token, TLS).
//! - [`run`]: a training run's record: the events it logs, the phases of a step, and the
//!   state its checkpoints carry.
//!
//! Apart from [`client`]'s connection, this crate does no IO beyond reading and writing
//! these documents, and knows nothing of libtorch or Parquet.

pub mod client;
pub mod codec;
pub mod control;
pub mod job;
pub mod json;
pub mod manifest;
pub mod model;
pub mod path;
pub mod preflight;
pub mod run;

/// The generated gRPC types and services. Only the coordinator's service and the clients
/// touch them; everything else uses [`control`].
#[allow(clippy::all, missing_docs)]
pub mod rpc {
    tonic::include_proto!("kiln.v1");
}
