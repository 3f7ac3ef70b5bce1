//! The contract between Kiln's processes and the files they share.
//!
//! - [`job`]: the TOML job file a user writes (`kiln train JOB.toml`), parsed and validated
//!   before any work starts.
//! - [`manifest`]: the JSON manifest that describes a tokenized dataset of Parquet shards.
//!
//! This crate does no IO beyond reading and writing these two documents, and knows nothing of
//! libtorch, Parquet or the network.

pub mod job;
pub mod manifest;
