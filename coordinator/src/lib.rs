//! Kiln's coordinator: it accepts jobs, registers workers, forms each job's mesh and hands
//! out the rendezvous, watches heartbeats, drives the two-phase checkpoint commit, and
//! brings a job back from its newest committed checkpoint when a worker fails or the
//! worker count changes.
//!
//! - [`machine`]: every decision, as pure functions of the state (unit-tested).
//! - [`state`]: the state kept in an object store with conditional puts.
//! - [`service`]: the gRPC service around them (token check, field validation).
//! - [`agent`]: the worker side (`kiln worker`): heartbeats, and one supervised training
//!   process per assignment.
//! - [`observe`]: job-level metrics (Prometheus endpoint, OTLP) and recovery spans.
//! - [`ops`]: the client commands (`kiln submit`, `status`, `scale`, `stop`, `logs`,
//!   `local`).

pub mod agent;
pub mod lease;
pub mod machine;
pub mod observe;
pub mod ops;
pub mod preflight;
pub mod service;
pub mod state;
