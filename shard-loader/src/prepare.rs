//! `kiln prepare`: text or JSONL files to a dataset of Parquet token shards.
//!
//! Inputs are files, directories (every `.txt`, `.md`, `.jsonl` below them) or glob patterns,
//! visited in sorted order. A plain-text file is one document; each line of a `.jsonl` file
//! is one document, its text under `text_key`. Each document is tokenized (in parallel,
//! order kept), EOS appended, and written to the train split, except every k-th document
//! (k = round(1 / val_fraction)), which goes to the validation split. Shards are cut at
//! about `shard_tokens` tokens; the manifest is written last, so a directory with a manifest
//! is a complete dataset.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use kiln_proto::manifest::{self, Manifest, ShardInfo, Split, TokenizerInfo};
use object_store::ObjectStoreExt;
use rayon::prelude::*;

use crate::shard::{ShardError, ShardWriter};
use crate::store::{self, StoreError, StoreLocation};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub inputs: Vec<String>,
    /// A directory or store URL (see [`crate::store`]).
    pub output: String,
    pub tokenizer: String,
    pub eos_token: Option<String>,
    pub text_key: String,
    pub val_fraction: f64,
    pub shard_tokens: u64,
    /// Tokens per row group, the unit the loader fetches.
    pub row_group_tokens: usize,
    pub force: bool,
    pub progress: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            inputs: Vec::new(),
            output: String::new(),
            tokenizer: "gpt2".into(),
            eos_token: None,
            text_key: "text".into(),
            val_fraction: 0.05,
            shard_tokens: 100_000_000,
            row_group_tokens: crate::shard::ROW_GROUP_TOKENS,
            force: false,
            progress: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("no input files match {0:?}")]
    NoInputs(Vec<String>),
    #[error("{0}: no such file or directory, and no file matches it as a pattern")]
    Missing(String),
    #[error("invalid glob pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("--val-fraction must be in [0, 0.5], got {0}")]
    ValFraction(f64),
    #[error(
        "the validation split would be empty: {documents} documents with --val-fraction {fraction} (every {every}th document); give more documents or a larger fraction, or 0 for no validation"
    )]
    EmptyValidation {
        documents: u64,
        fraction: f64,
        every: u64,
    },
    #[error("{0} already holds a dataset; pass --force to replace it")]
    Exists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot upload {name}: {message}")]
    Upload { name: String, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Expands inputs to a sorted, de-duplicated list of files.
pub fn collect_inputs(inputs: &[String]) -> Result<Vec<PathBuf>, PrepareError> {
    let mut files = Vec::new();
    for input in inputs {
        let path = Path::new(input);
        if path.is_dir() {
            walk(path, &mut files)?;
        } else if path.is_file() {
            files.push(path.to_owned());
        } else {
            let paths = glob::glob(input).map_err(|e| PrepareError::Pattern {
                pattern: input.clone(),
                message: e.to_string(),
            })?;
            let before = files.len();
            files.extend(paths.filter_map(Result::ok).filter(|p| p.is_file()));
            // A mistyped path must not silently shrink the dataset.
            if files.len() == before {
                return Err(PrepareError::Missing(input.clone()));
            }
        }
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(PrepareError::NoInputs(inputs.to_vec()));
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PrepareError> {
    let read_err = |source| PrepareError::Read {
        path: dir.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("txt" | "md" | "jsonl")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

fn read_documents(path: &Path, text_key: &str) -> Result<Vec<String>, PrepareError> {
    let bytes = std::fs::read(path).map_err(|source| PrepareError::Read {
        path: path.to_owned(),
        source,
    })?;
    // Gutenberg and other old corpora are not always valid UTF-8: replace, never fail.
    let text = String::from_utf8_lossy(&bytes);
    if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        return Ok(vec![text.into_owned()]);
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let jsonl_err = |message: String| PrepareError::Jsonl {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| jsonl_err(e.to_string()))?;
        match value.get(text_key) {
            Some(serde_json::Value::String(s)) => docs.push(s.clone()),
            Some(other) => {
                return Err(jsonl_err(format!(
                    "field {text_key:?} is {}, expected a string",
                    json_kind(other)
                )))
            }
            None => return Err(jsonl_err(format!("no field {text_key:?}"))),
        }
    }
    Ok(docs)
}

fn upload_err(location: &StoreLocation, name: &str, e: object_store::Error) -> PrepareError {
    PrepareError::Upload {
        name: location.display(name),
        message: e.to_string(),
    }
}

/// Streams a local file to the store in 8 MiB parts (a multipart upload where the store
/// has them), so large shards never sit in memory whole.
async fn upload(location: &StoreLocation, name: &str, local: &Path) -> Result<(), PrepareError> {
    use tokio::io::AsyncReadExt;
    let read_err = |source| PrepareError::Read {
        path: local.to_owned(),
        source,
    };
    let upload = location
        .store
        .put_multipart(&location.child(name))
        .await
        .map_err(|e| upload_err(location, name, e))?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, 8 << 20);
    let mut file = tokio::fs::File::open(local).await.map_err(read_err)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await.map_err(read_err)?;
        if n == 0 {
            break;
        }
        writer
            .wait_for_capacity(4)
            .await
            .map_err(|e| upload_err(location, name, e))?;
        writer.write(&buf[..n]);
    }
    writer
        .finish()
        .await
        .map_err(|e| upload_err(location, name, e))?;
    Ok(())
}

/// What a JSON value is, for error messages: "a string", "an array", ...
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One split's shards as they are written.
struct SplitWriter {
    name: &'static str,
    dir: PathBuf,
    shard_tokens: u64,
    row_group_tokens: usize,
    current: Option<ShardWriter>,
    current_tokens: u64,
    split: Split,
}

impl SplitWriter {
    fn new(name: &'static str, dir: &Path, shard_tokens: u64, row_group_tokens: usize) -> Self {
        SplitWriter {
            name,
            dir: dir.to_owned(),
            shard_tokens,
            row_group_tokens,
            current: None,
            current_tokens: 0,
            split: Split::default(),
        }
    }

    fn push(&mut self, doc_id: u64, tokens: &[u32]) -> Result<(), PrepareError> {
        let writer = match self.current.as_mut() {
            Some(w) => w,
            None => {
                let name = self.shard_name(self.split.shards.len());
                self.current.insert(ShardWriter::create(
                    &self.dir.join(name),
                    self.row_group_tokens,
                )?)
            }
        };
        writer.push(doc_id, tokens)?;
        self.current_tokens += tokens.len() as u64;
        self.split.documents += 1;
        self.split.tokens += tokens.len() as u64;
        if self.current_tokens >= self.shard_tokens {
            self.close_shard()?;
        }
        Ok(())
    }

    fn shard_name(&self, index: usize) -> String {
        format!("{}-{index:05}.parquet", self.name)
    }

    fn close_shard(&mut self) -> Result<(), PrepareError> {
        if let Some(w) = self.current.take() {
            let s = w.finish()?;
            self.split.shards.push(ShardInfo {
                path: self.shard_name(self.split.shards.len()),
                documents: s.documents,
                tokens: s.tokens,
                row_groups: s.row_groups,
                row_group_tokens: s.row_group_tokens,
                row_group_sha256: s.row_group_sha256,
                bytes: s.bytes,
                sha256: s.sha256,
            });
            self.current_tokens = 0;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Split, PrepareError> {
        self.close_shard()?;
        Ok(self.split)
    }
}

/// Tokenizes the inputs into `options.output` and returns the manifest it wrote.
pub fn prepare(options: &PrepareOptions) -> Result<Manifest, PrepareError> {
    if !(0.0..=0.5).contains(&options.val_fraction) {
        return Err(PrepareError::ValFraction(options.val_fraction));
    }
    let tokenizer = Tokenizer::load(&options.tokenizer, options.eos_token.as_deref())?;
    let files = collect_inputs(&options.inputs)?;
    let location = store::open(&options.output)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PrepareError::Upload {
            name: options.output.clone(),
            message: e.to_string(),
        })?;
    let manifest_key = location.child(manifest::FILE_NAME);
    let exists = runtime.block_on(location.store.head(&manifest_key));
    match exists {
        Ok(_) if !options.force => return Err(PrepareError::Exists(options.output.clone())),
        Ok(_) => {
            // A dataset is complete only once its manifest exists: remove the old one first.
            runtime
                .block_on(location.store.delete(&manifest_key))
                .map_err(|e| upload_err(&location, manifest::FILE_NAME, e))?;
        }
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(upload_err(&location, manifest::FILE_NAME, e)),
    }
    // Shards are written to the local directory itself, or staged in a temporary one and
    // uploaded to a remote store.
    let staging;
    let out: &Path = match &location.local_dir {
        Some(dir) => dir,
        None => {
            staging = tempfile::tempdir().map_err(|source| PrepareError::Write {
                path: std::env::temp_dir(),
                source,
            })?;
            staging.path()
        }
    };
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| PrepareError::Write { path, source }
    };
    std::fs::create_dir_all(out).map_err(write_err(out))?;

    let every = if options.val_fraction > 0.0 {
        (1.0 / options.val_fraction).round().max(2.0) as u64
    } else {
        u64::MAX
    };
    let total_bytes: u64 = files
        .iter()
        .map(|f| f.metadata().map_or(0, |m| m.len()))
        .sum();
    let bar = if options.progress {
        ProgressBar::new(total_bytes)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} tokenizing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );

    let mut train = SplitWriter::new(
        "train",
        out,
        options.shard_tokens.max(1),
        options.row_group_tokens.max(1),
    );
    let mut validation = SplitWriter::new(
        "validation",
        out,
        options.shard_tokens.max(1),
        options.row_group_tokens.max(1),
    );
    let mut doc_id = 0u64;
    let eos = tokenizer.eos_id();
    // Files are read and tokenized in groups of about 64 MiB so memory stays bounded.
    let mut group: Vec<&PathBuf> = Vec::new();
    let mut group_bytes = 0u64;
    let flush = |group: &mut Vec<&PathBuf>,
                 doc_id: &mut u64,
                 train: &mut SplitWriter,
                 validation: &mut SplitWriter|
     -> Result<(), PrepareError> {
        let docs: Vec<String> = group
            .iter()
            .map(|p| read_documents(p, &options.text_key))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        let encoded: Vec<Vec<u32>> = docs
            .par_iter()
            .map(|d| {
                let r = tokenizer.encode(d).map(|mut t| {
                    t.push(eos);
                    t
                });
                bar.inc(d.len() as u64);
                r
            })
            .collect::<Result<_, _>>()?;
        for tokens in encoded {
            let split = if *doc_id % every == every - 1 {
                &mut *validation
            } else {
                &mut *train
            };
            split.push(*doc_id, &tokens)?;
            *doc_id += 1;
        }
        group.clear();
        Ok(())
    };
    for file in &files {
        group_bytes += file.metadata().map_or(0, |m| m.len());
        group.push(file);
        if group_bytes >= 64 << 20 {
            flush(&mut group, &mut doc_id, &mut train, &mut validation)?;
            group_bytes = 0;
        }
    }
    flush(&mut group, &mut doc_id, &mut train, &mut validation)?;
    bar.finish_and_clear();

    let train = train.finish()?;
    let validation = validation.finish()?;
    if options.val_fraction > 0.0 && validation.documents == 0 {
        return Err(PrepareError::EmptyValidation {
            documents: doc_id,
            fraction: options.val_fraction,
            every,
        });
    }
    let manifest = Manifest {
        format: manifest::FORMAT.into(),
        version: manifest::VERSION,
        tokenizer: TokenizerInfo {
            kind: tokenizer.kind().into(),
            sha256: tokenizer.sha256().map(str::to_owned),
        },
        vocab_size: tokenizer.vocab_size(),
        eos_id: eos,
        token_column: "tokens".into(),
        train,
        validation,
    };
    if location.local_dir.is_none() {
        for shard in manifest
            .train
            .shards
            .iter()
            .chain(&manifest.validation.shards)
        {
            let local = out.join(&shard.path);
            runtime.block_on(upload(&location, &shard.path, &local))?;
        }
    }
    let manifest_path = out.join(manifest::FILE_NAME);
    let tmp = out.join(format!("{}.tmp", manifest::FILE_NAME));
    std::fs::write(&tmp, manifest.to_json()).map_err(write_err(&tmp))?;
    if location.local_dir.is_some() {
        std::fs::rename(&tmp, &manifest_path).map_err(write_err(&manifest_path))?;
    } else {
        let body = bytes::Bytes::from(manifest.to_json());
        runtime
            .block_on(location.store.put(&manifest_key, body.into()))
            .map_err(|e| upload_err(&location, manifest::FILE_NAME, e))?;
    }
    Ok(manifest)
}
