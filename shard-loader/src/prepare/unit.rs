//! One unit of work: its input files read in order, tokenized on every thread of the pool,
//! written to its own train and validation shards.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use kiln_proto::manifest::{ShardInfo, Split};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::input::{self, InputFile, Record};
use super::merge::{self, Io, UnitRecord};
use super::{PrepareError, PrepareOptions, Progress};
use crate::shard::{ShardSummary, ShardWriter};
use crate::tokenizer::Tokenizer;

/// Text handed to the tokenizer threads at a time.
const BATCH_BYTES: usize = 8 << 20;
const BATCH_DOCUMENTS: usize = 8192;

pub(crate) struct UnitContext<'a> {
    pub options: &'a PrepareOptions,
    pub tokenizer: &'a Tokenizer,
    pub io: &'a Io<'a>,
    pub pool: &'a rayon::ThreadPool,
    pub plan_sha: &'a str,
    pub progress: &'a Progress,
}

pub(crate) fn shard_info(path: String, s: ShardSummary) -> ShardInfo {
    ShardInfo {
        path,
        documents: s.documents,
        tokens: s.tokens,
        row_groups: s.row_groups,
        row_group_tokens: s.row_group_tokens,
        row_group_sha256: s.row_group_sha256,
        bytes: s.bytes,
        sha256: s.sha256,
    }
}

/// One split's shards of one unit as they are written.
struct SplitWriter<'a> {
    /// `train-UUUUU` or `validation-UUUUU`.
    stem: String,
    io: &'a Io<'a>,
    staging: &'a Path,
    shard_tokens: u64,
    row_group_tokens: usize,
    current: Option<(String, ShardWriter)>,
    current_tokens: u64,
    split: Split,
}

impl<'a> SplitWriter<'a> {
    fn push(&mut self, doc_id: u64, tokens: &[u32]) -> Result<(), PrepareError> {
        let (_, writer) = match self.current.as_mut() {
            Some(w) => w,
            None => {
                let name = format!("{}-{:05}.parquet", self.stem, self.split.shards.len());
                let path = self.io.local_path(&name, self.staging);
                let writer = ShardWriter::create(&path, self.row_group_tokens)?;
                self.current.insert((name, writer))
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

    fn close_shard(&mut self) -> Result<(), PrepareError> {
        if let Some((name, w)) = self.current.take() {
            let summary = w.finish()?;
            self.io
                .publish(&name, &self.io.local_path(&name, self.staging))?;
            self.split.shards.push(shard_info(name, summary));
            self.current_tokens = 0;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Split, PrepareError> {
        self.close_shard()?;
        Ok(self.split)
    }
}

type Encoded = Result<Vec<u32>, crate::tokenizer::TokenizerError>;

/// What the reader thread found besides documents.
#[derive(Default)]
struct ReadCounts {
    skipped_documents: u64,
    skipped_files: u64,
}

/// Tokenizes unit `u` (its `files`) into its shards and returns its record.
pub(crate) fn run(
    ctx: &UnitContext,
    u: usize,
    files: &[InputFile],
) -> Result<UnitRecord, PrepareError> {
    let options = ctx.options;
    let staging = tempfile::tempdir().map_err(|source| PrepareError::Write {
        path: std::env::temp_dir(),
        source,
    })?;
    if let Some(dir) = &ctx.io.location.local_dir {
        std::fs::create_dir_all(dir).map_err(|source| PrepareError::Write {
            path: dir.clone(),
            source,
        })?;
    }
    let writer = |split: &str| SplitWriter {
        stem: format!("{split}-{u:05}"),
        io: ctx.io,
        staging: staging.path(),
        shard_tokens: options.shard_tokens.max(1),
        row_group_tokens: options.row_group_tokens.max(1),
        current: None,
        current_tokens: 0,
        split: Split::default(),
    };
    let mut train = writer("train");
    let mut validation = writer("validation");
    let every = merge::every(options.val_fraction);
    let dedup = options.dedup == super::Dedup::Exact;
    let eos = ctx.tokenizer.eos_id();
    let base = (u as u64) << 32;
    let mut seen: HashSet<[u8; 16]> = HashSet::new();
    let mut hashes: Vec<u8> = Vec::new();
    let mut duplicates = 0u64;

    // A reader thread decodes the files in order while the pool tokenizes the last batch.
    let (tx, rx) = mpsc::sync_channel::<Vec<(u64, String)>>(2);
    let counts = std::thread::scope(|scope| -> Result<ReadCounts, PrepareError> {
        let reader = scope.spawn(move || read_unit(ctx, files, &tx));

        let consumed = (|| -> Result<(), PrepareError> {
            for batch in rx.iter() {
                let encoded: Vec<(Option<[u8; 16]>, Encoded)> = ctx.pool.install(|| {
                    batch
                        .par_iter()
                        .map(|(_, text)| {
                            let hash = dedup.then(|| {
                                let d = Sha256::digest(text.as_bytes());
                                let mut h = [0u8; 16];
                                h.copy_from_slice(&d[..16]);
                                h
                            });
                            (hash, ctx.tokenizer.encode(text))
                        })
                        .collect()
                });
                let mut text_bytes = 0;
                for ((index, text), (hash, tokens)) in batch.iter().zip(encoded) {
                    text_bytes += text.len() as u64;
                    let mut tokens = tokens?;
                    tokens.push(eos);
                    let id = base | index;
                    if let Some(h) = hash {
                        if !seen.insert(h) {
                            duplicates += 1;
                            continue;
                        }
                        hashes.extend_from_slice(&id.to_le_bytes());
                        hashes.extend_from_slice(&h);
                    }
                    let split = if index % every == every - 1 {
                        &mut validation
                    } else {
                        &mut train
                    };
                    split.push(id, &tokens)?;
                    ctx.progress.documents.fetch_add(1, Ordering::Relaxed);
                    ctx.progress
                        .tokens
                        .fetch_add(tokens.len() as u64, Ordering::Relaxed);
                }
                ctx.progress
                    .text_bytes
                    .fetch_add(text_bytes, Ordering::Relaxed);
                ctx.progress.update();
            }
            Ok(())
        })();
        // On a tokenizer or write error, stop the reader (its next send fails) first.
        drop(rx);
        let read = reader
            .join()
            .map_err(|_| PrepareError::Runtime("the input reader panicked".into()))?;
        consumed?;
        read
    })?;

    let train = train.finish()?;
    let validation = validation.finish()?;
    if dedup {
        ctx.io.write(&merge::hashes_name(u), hashes)?;
    }
    Ok(UnitRecord {
        plan: ctx.plan_sha.to_owned(),
        unit: u as u64,
        input_files: files.len() as u64,
        input_bytes: files.iter().map(|f| f.size).sum(),
        train,
        validation,
        skipped_documents: counts.skipped_documents,
        skipped_files: counts.skipped_files,
        duplicates_removed: duplicates,
    })
}

/// The reader thread of [`run`]: decodes the unit's files in order and sends their documents,
/// numbered within the unit, in batches of about [`BATCH_BYTES`].
fn read_unit(
    ctx: &UnitContext,
    files: &[InputFile],
    tx: &mpsc::SyncSender<Vec<(u64, String)>>,
) -> Result<ReadCounts, PrepareError> {
    let options = ctx.options;
    let rt = ctx.io.rt;
    let mut counts = ReadCounts::default();
    let mut batch = Vec::new();
    let mut batch_bytes = 0usize;
    let mut index = 0u64;
    for file in files {
        let mut sink = |record: Record| -> Result<(), PrepareError> {
            match record {
                Record::Doc(text) => {
                    batch_bytes += text.len();
                    batch.push((index, text));
                    index += 1;
                    if batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_DOCUMENTS {
                        batch_bytes = 0;
                        tx.send(std::mem::take(&mut batch)).map_err(|_| stopped())?;
                    }
                    Ok(())
                }
                Record::Bad { row, message } if options.skip_bad => {
                    tracing::warn!("skipping {}: {row}: {message}", file.name);
                    counts.skipped_documents += 1;
                    Ok(())
                }
                Record::Bad { row, message } => Err(PrepareError::BadDocument {
                    name: file.name.clone(),
                    row,
                    message,
                }),
            }
        };
        match input::read_file(file, &options.text_key, rt, &ctx.progress.bytes, &mut sink) {
            Ok(()) => {}
            Err(PrepareError::Input { name, message }) if options.skip_bad => {
                tracing::warn!("skipping {name}: {message}");
                counts.skipped_files += 1;
            }
            Err(e) => return Err(e),
        }
    }
    if index >= 1 << 32 {
        return Err(input::file_err(
            &files[0],
            "a unit holds more than 2^32 documents; split the file",
        ));
    }
    if !batch.is_empty() {
        tx.send(batch).map_err(|_| stopped())?;
    }
    Ok(counts)
}

fn stopped() -> PrepareError {
    PrepareError::Runtime("tokenization stopped".into())
}
