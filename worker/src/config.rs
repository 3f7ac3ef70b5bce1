//! The model's shape, from the contract crate ([`kiln_proto::model`]): the trainer and the
//! coordinator (which checks a submitted job's model) read a job's model section the same way.

pub use kiln_proto::model::*;
