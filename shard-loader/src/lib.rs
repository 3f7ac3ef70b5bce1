//! Kiln's data path: text in, training sequences out.
//!
//! - [`tokenizer`]: the tokenizers `kiln prepare` offers (tiktoken's GPT-2, cl100k and o200k,
//!   offline, or a local Hugging Face `tokenizer.json`).
//! - [`prepare`]: text or JSONL files to Parquet token shards plus a manifest.
//! - [`shard`]: the shard schema, its writer and its checked reader.
//! - [`dataset`]: a prepared dataset opened for training: verified shards packed into
//!   fixed-length sequences in a deterministic, seeded order.
//!
//! Architecture invariant: this crate knows nothing of the model or of libtorch; it hands out
//! plain token ids.

pub mod dataset;
pub mod prepare;
pub mod shard;
pub mod tokenizer;

mod rng;

pub use dataset::{Batch, SequenceSampler, TokenDataset};
pub use shard::ShardError;
pub use tokenizer::Tokenizer;
