//! Kiln's sharded checkpoints: each rank writes what it owns as one safetensors object
//! under `ROOT/step-N/`, confirms it, and the checkpoint exists once the manifest that lists
//! every rank's pieces is written, last. Any layout reads back at any other: a reader asks
//! for regions (a box of a tensor and a range of its elements) and gets exactly those bytes.
//!
//! Knows nothing of libtorch or of the model; tensors are bytes with a dtype and a shape.
//! The format is specified in `ARCHITECTURE.md` and versioned by [`layout::VERSION`].

pub mod layout;
pub mod snapshot;
pub mod store;

pub use layout::{CheckpointManifest, Dtype, Mesh, ObjectInfo, Piece, Region, TensorInfo};
pub use store::{CheckpointStore, Claim, Listed, RankObjectWriter, Strays, Verified};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] kiln_store::StoreError),
    #[error("{object}: {message}")]
    Io { object: String, message: String },
    #[error("{checkpoint} has no manifest: it was never committed")]
    NoManifest { checkpoint: String },
    #[error("{object} is not a valid checkpoint manifest: {message}")]
    Invalid { object: String, message: String },
    #[error("{object} is damaged: {message}")]
    Damaged { object: String, message: String },
    #[error("{checkpoint}: cannot read {tensor}: {message}")]
    Uncovered {
        checkpoint: String,
        tensor: String,
        message: String,
    },
    #[error(
        "{dir} is being written by another run, {run}, which renewed its claim within {expire_s} s: two runs would mix their checkpoints and logs there; stop that run, or give this job another checkpoint.dir (and output.dir)"
    )]
    Owned {
        dir: String,
        /// The run, and the process keeping its claim ([`kiln_store::owner::Owner::describe`]).
        run: String,
        expire_s: f64,
    },
    #[error(
        "{dir} was taken over by another run, {run}, while this one trained: stopping, so that the two do not mix their checkpoints"
    )]
    TakenOver { dir: String, run: String },
    #[error(
        "{checkpoint}: ranks {ranks:?} did not confirm their shards within {secs} s; not committed"
    )]
    Unconfirmed {
        checkpoint: String,
        ranks: Vec<usize>,
        secs: u64,
    },
}
