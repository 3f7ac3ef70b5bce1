//! Kiln's data path: text in, training sequences out.
//!
//! - [`tokenizer`]: the tokenizers `kiln prepare` offers (tiktoken's GPT-2, cl100k and o200k,
//!   offline, or a local Hugging Face `tokenizer.json`).
//! - [`prepare`]: text or JSONL files to Parquet token shards plus a manifest.
//! - [`shard`]: the shard schema, its writer and its checked reader.
//! - [`order`]: the global sample order, a pure function of block sizes, sequence length
//!   and seed; rank slices, the resume cursor and the data ledger.
//! - [`loader`]: the streaming loader: row groups fetched by byte range, decoded off the IO
//!   runtime, prefetched within a memory cap.
//! - [`dataset`]: a prepared dataset opened from a store: loaders, verification, stats.
//! - [`index`]: a manifest for Parquet token files written by other tools.
//! - [`mixture`]: several datasets read as one weighted, deterministic stream.
//!
//! Architecture invariant: this crate knows nothing of the model or of libtorch; it hands out
//! plain token ids.

pub mod dataset;
pub mod index;
pub mod loader;
pub mod mixture;
pub mod order;
pub mod prepare;
pub mod shard;
pub mod tokenizer;

mod rng;

pub use dataset::{Batch, TokenDataset};
pub use loader::{LoaderOptions, StreamingLoader};
pub use shard::ShardError;
pub use tokenizer::Tokenizer;
