//! A prepared dataset on an object store, opened for reading.
//!
//! [`TokenDataset::open`] reads the manifest from the store; [`TokenDataset::loader`] opens
//! a [`StreamingLoader`] over one split; [`TokenDataset::verify`] re-reads every shard whole,
//! checking its SHA-256, its counts and every token id; [`TokenDataset::stats`] summarizes.

use std::sync::Arc;

use kiln_proto::manifest::{DatasetManifest, ManifestError, Split};
use object_store::ObjectStoreExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::loader::{LoaderOptions, StreamingLoader};
use crate::shard::{read_parquet, ShardError};
use crate::tokenizer::hex;
use kiln_store::{self as store, StoreError, StoreLocation};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("cannot start the IO runtime: {0}")]
    Runtime(String),
    #[error("{0} already holds a dataset; pass --force to replace its manifest")]
    Exists(String),
    #[error("no .parquet files under {0}")]
    NoParquet(String),
    #[error(
        "the {split} split of {url} has {tokens} tokens, too few for one sequence of {seq_len} tokens"
    )]
    TooSmall {
        url: String,
        split: &'static str,
        tokens: u64,
        seq_len: u64,
    },
}

/// Which part of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitName {
    Train,
    Validation,
}

impl SplitName {
    pub fn as_str(self) -> &'static str {
        match self {
            SplitName::Train => "train",
            SplitName::Validation => "validation",
        }
    }
}

/// One batch: `inputs[b * seq_len + t]` predicts `targets[b * seq_len + t]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    /// The global sample index of each row.
    pub samples: Vec<u64>,
    /// Wrapping sum of the samples' ledger hashes (see `order::sample_hash`).
    pub hash: u64,
}

impl Batch {
    /// An empty batch with room for `batch_size` rows of `seq_len` tokens.
    pub fn with_capacity(batch_size: usize, seq_len: usize) -> Self {
        Batch {
            batch_size,
            seq_len,
            inputs: Vec::with_capacity(batch_size * seq_len),
            targets: Vec::with_capacity(batch_size * seq_len),
            samples: Vec::with_capacity(batch_size),
            hash: 0,
        }
    }
}

pub struct TokenDataset {
    location: StoreLocation,
    manifest: DatasetManifest,
    runtime: Arc<tokio::runtime::Runtime>,
}

/// What `kiln data stats` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub url: String,
    pub tokenizer: String,
    pub vocab_size: u32,
    pub eos_id: u32,
    /// The SHA-256 of the manifest: equal fingerprints, equal datasets.
    pub fingerprint: String,
    /// What `kiln prepare` read and left out, when it made the dataset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prepared: Option<kiln_proto::manifest::Prepared>,
    pub splits: Vec<SplitStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitStats {
    pub split: &'static str,
    pub shards: usize,
    pub documents: u64,
    pub tokens: u64,
    pub row_groups: u64,
    pub bytes: u64,
    /// Per shard: path, documents, tokens, row groups, bytes, and whether the object is
    /// present with the recorded size.
    pub shard_checks: Vec<ShardCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShardCheck {
    pub path: String,
    pub documents: u64,
    pub tokens: u64,
    pub row_groups: u64,
    pub bytes: u64,
    /// `ok`, `missing`, or what is wrong.
    pub status: String,
}

impl TokenDataset {
    /// Opens the dataset at a URL or path (see [`crate::store`]).
    pub fn open(url: &str) -> Result<Self, DatasetError> {
        let location = store::open(url)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiln-io")
            .enable_all()
            .build()
            .map_err(|e| DatasetError::Runtime(e.to_string()))?;
        let manifest = runtime.block_on(location.dataset_manifest())?;
        Ok(TokenDataset {
            location,
            manifest,
            runtime: Arc::new(runtime),
        })
    }

    pub fn manifest(&self) -> &DatasetManifest {
        &self.manifest
    }

    pub fn url(&self) -> &str {
        &self.location.url
    }

    /// SHA-256 over the shard checksums: identifies the data a cursor belongs to.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for s in self
            .manifest
            .train
            .shards
            .iter()
            .chain(&self.manifest.validation.shards)
        {
            h.update(s.sha256.as_bytes());
        }
        hex(&h.finalize())
    }

    fn split(&self, name: SplitName) -> &Split {
        match name {
            SplitName::Train => &self.manifest.train,
            SplitName::Validation => &self.manifest.validation,
        }
    }

    /// A streaming loader over a split; an error names the split when it is too small.
    pub fn loader(
        &self,
        name: SplitName,
        options: LoaderOptions,
    ) -> Result<StreamingLoader, DatasetError> {
        let seq_len = options.seq_len;
        StreamingLoader::open(
            self.runtime.clone(),
            &self.location,
            &self.manifest,
            name,
            options,
        )?
        .ok_or_else(|| DatasetError::TooSmall {
            url: self.location.url.clone(),
            split: name.as_str(),
            tokens: self.split(name).tokens,
            seq_len,
        })
    }

    /// Every token of a split, documents in manifest order, each shard checked whole.
    pub fn read_split(&self, name: SplitName) -> Result<Vec<u32>, DatasetError> {
        let m = &self.manifest;
        let mut tokens = Vec::with_capacity(self.split(name).tokens as usize);
        for shard in &self.split(name).shards {
            let display = self.location.display(&shard.path);
            let path = self.location.child(&shard.path);
            let got = self
                .runtime
                .block_on(async { self.location.store.get(&path).await?.bytes().await });
            let bytes = match got {
                Ok(b) => b,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(ShardError::Missing {
                        path: display.into(),
                    }
                    .into())
                }
                Err(e) => {
                    return Err(ShardError::Store {
                        path: display,
                        message: e.to_string(),
                    }
                    .into())
                }
            };
            let sha256 = hex(&Sha256::digest(&bytes));
            if sha256 != shard.sha256 {
                return Err(ShardError::Checksum {
                    path: display.into(),
                    expected: shard.sha256.clone(),
                    actual: format!("{sha256} ({} bytes)", bytes.len()),
                }
                .into());
            }
            let got = read_parquet(bytes, &display, &m.token_column, m.vocab_size)?;
            let counts = [
                ("documents", shard.documents, got.doc_ids.len() as u64),
                ("tokens", shard.tokens, got.tokens.len() as u64),
            ];
            for (field, expected, actual) in counts {
                if expected != actual {
                    return Err(ShardError::CountMismatch {
                        path: display.into(),
                        field,
                        expected,
                        actual,
                    }
                    .into());
                }
            }
            tokens.extend_from_slice(&got.tokens);
        }
        Ok(tokens)
    }

    /// Re-reads every shard of both splits: checksums, counts and token ranges.
    pub fn verify(&self) -> Result<(), DatasetError> {
        for name in [SplitName::Train, SplitName::Validation] {
            self.read_split(name)?;
        }
        Ok(())
    }

    /// Counts from the manifest, and whether each shard is present with its recorded size.
    pub fn stats(&self) -> Stats {
        let m = &self.manifest;
        let splits = [SplitName::Train, SplitName::Validation]
            .into_iter()
            .map(|name| {
                let split = self.split(name);
                let shard_checks = split
                    .shards
                    .iter()
                    .map(|s| {
                        let head = self
                            .runtime
                            .block_on(self.location.store.head(&self.location.child(&s.path)));
                        let status = match head {
                            Ok(meta) if meta.size == s.bytes => "ok".to_owned(),
                            Ok(meta) => format!("size {} differs from the manifest", meta.size),
                            Err(object_store::Error::NotFound { .. }) => "missing".to_owned(),
                            Err(e) => format!("unreachable: {e}"),
                        };
                        ShardCheck {
                            path: s.path.clone(),
                            documents: s.documents,
                            tokens: s.tokens,
                            row_groups: s.row_groups,
                            bytes: s.bytes,
                            status,
                        }
                    })
                    .collect();
                SplitStats {
                    split: name.as_str(),
                    shards: split.shards.len(),
                    documents: split.documents,
                    tokens: split.tokens,
                    row_groups: split.shards.iter().map(|s| s.row_groups).sum(),
                    bytes: split.shards.iter().map(|s| s.bytes).sum(),
                    shard_checks,
                }
            })
            .collect();
        Stats {
            url: self.location.url.clone(),
            tokenizer: m.tokenizer.kind.clone(),
            vocab_size: m.vocab_size,
            eos_id: m.eos_id,
            fingerprint: crate::prepare::fingerprint(m),
            prepared: m.prepared.clone(),
            splits,
        }
    }
}
