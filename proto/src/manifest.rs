//! The dataset manifest: `manifest.json` at the root of a dataset written by `kiln prepare`.
//!
//! It names the tokenizer, the vocabulary size and the end-of-document id, and lists every
//! Parquet shard of each split with its document and token counts and a SHA-256 checksum.
//! Readers trust nothing that the manifest does not vouch for.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The value of [`DatasetManifest::format`].
pub const FORMAT: &str = "kiln-token-shards";
/// The version this build writes and reads.
pub const VERSION: u32 = 1;
/// The file name of the manifest inside a dataset directory.
pub const FILE_NAME: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("no dataset at {dir}: {file} is missing; run `kiln prepare` to create one")]
    Missing { dir: PathBuf, file: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid dataset manifest: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetManifest {
    pub format: String,
    pub version: u32,
    pub tokenizer: TokenizerInfo,
    /// Number of token ids the tokenizer can produce; every token is below it.
    pub vocab_size: u32,
    /// The id appended after each document.
    pub eos_id: u32,
    /// Name of the list column that holds each document's tokens.
    pub token_column: String,
    pub train: Split,
    pub validation: Split,
    /// How `kiln prepare` made the dataset; absent from datasets indexed from other tools'
    /// files and from those written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<Prepared>,
}

/// What `kiln prepare` read and left out. Nothing here depends on how many machines
/// (`--parts`) tokenized the inputs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Prepared {
    /// Input files read (after expanding directories and patterns).
    pub input_files: u64,
    /// Their size in bytes, as stored (compressed where they are).
    pub input_bytes: u64,
    /// Units of work the inputs were split into (each has its own shards).
    pub units: u64,
    /// Documents left out as unreadable (`--skip-bad-documents`): a null or non-string
    /// text, a malformed JSON line.
    pub skipped_documents: u64,
    /// Files left out as unreadable (`--skip-bad-documents`).
    pub skipped_files: u64,
    /// `exact` when identical documents were kept once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<String>,
    /// Documents removed as exact duplicates of an earlier one.
    pub duplicates_removed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    /// `gpt2`, `cl100k_base`, `o200k_base` or `huggingface`.
    pub kind: String,
    /// For `huggingface`: the SHA-256 of the `tokenizer.json` used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// Path relative to the dataset directory.
    pub path: String,
    pub documents: u64,
    pub tokens: u64,
    pub row_groups: u64,
    /// Tokens in each row group, in file order (they sum to `tokens`): the block sizes the
    /// global sample order is computed from without opening any shard.
    pub row_group_tokens: Vec<u64>,
    /// Lowercase hex SHA-256 of each row group's byte range (from its first column chunk's
    /// first page to its last column chunk's end): the loader checks every block it reads.
    pub row_group_sha256: Vec<String>,
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
}

impl DatasetManifest {
    /// Reads `DIR/manifest.json` and checks its format and version.
    pub fn load(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing {
                    dir: dir.to_owned(),
                    file: path,
                })
            }
            Err(source) => return Err(ManifestError::Read { path, source }),
        };
        Self::parse(&text, &path)
    }

    /// Parses and checks manifest text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let invalid = |message: String| ManifestError::Invalid {
            path: path.to_owned(),
            message,
        };
        let m: DatasetManifest = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if m.format != FORMAT {
            return Err(invalid(format!(
                "format is {:?}, expected {FORMAT:?}",
                m.format
            )));
        }
        if m.version != VERSION {
            return Err(invalid(format!(
                "version {} is not supported by this build (it reads version {VERSION})",
                m.version
            )));
        }
        if m.eos_id >= m.vocab_size {
            return Err(invalid(format!(
                "eos_id {} is not below vocab_size {}",
                m.eos_id, m.vocab_size
            )));
        }
        for split in [&m.train, &m.validation] {
            for s in &split.shards {
                if s.row_group_tokens.len() as u64 != s.row_groups
                    || s.row_group_sha256.len() as u64 != s.row_groups
                    || s.row_group_tokens.iter().sum::<u64>() != s.tokens
                {
                    return Err(invalid(format!(
                        "shard {:?}: row_group_tokens or row_group_sha256 does not match row_groups and tokens",
                        s.path
                    )));
                }
                let p = Path::new(&s.path);
                if p.is_absolute() || p.components().any(|c| c.as_os_str() == "..") {
                    return Err(invalid(format!(
                        "shard path {:?} must be relative and stay inside the dataset",
                        s.path
                    )));
                }
            }
        }
        Ok(m)
    }

    pub fn to_json(&self) -> String {
        // A manifest is plain data; serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// A dataset whose token ids a model's vocabulary does not cover.
#[derive(Debug, thiserror::Error)]
#[error(
    "the dataset {dir} uses token ids up to {dataset_vocab} ({tokenizer}) but the model's vocab_size is {model_vocab}; set model.vocab_size to at least {dataset_vocab}"
)]
pub struct VocabTooSmall {
    pub dir: String,
    pub tokenizer: String,
    pub dataset_vocab: u32,
    pub model_vocab: i64,
}

/// Refuses a model whose vocabulary is smaller than the dataset's (`dir`: the dataset's URL,
/// for the message).
pub fn check_vocab(
    dir: &str,
    manifest: &DatasetManifest,
    model_vocab: i64,
) -> Result<(), VocabTooSmall> {
    if i64::from(manifest.vocab_size) > model_vocab {
        return Err(VocabTooSmall {
            dir: dir.to_owned(),
            tokenizer: manifest.tokenizer.kind.clone(),
            dataset_vocab: manifest.vocab_size,
            model_vocab,
        });
    }
    Ok(())
}
