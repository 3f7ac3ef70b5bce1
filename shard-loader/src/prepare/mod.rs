//! `kiln prepare`: a text corpus, where it lives, to a dataset of Parquet token shards.
//!
//! Inputs (see [`input`]) are local paths or store URLs: files, directories or glob
//! patterns of Parquet (a text column), JSONL (plain, gzip, zstd) or plain-text files. They
//! are sorted by name and cut into *units*: consecutive files of about `unit_bytes` together
//! (a larger file is a unit of its own). The cut depends on the inputs alone, never on how
//! many machines tokenize them, and each unit is tokenized into shards of its own:
//! `train-UUUUU-SSSSS.parquet` and `validation-UUUUU-SSSSS.parquet`. Document `i` of unit `u`
//! (counting every document read, in file order) has id `u * 2^32 + i` and goes to the
//! validation split when `i % k == k - 1` (k = round(1 / val_fraction)).
//!
//! Part `I` of `N` (`--part I --parts N`) tokenizes the units `u` with `u % N == I`. When a
//! unit's shards are complete it is recorded in `parts/unit-UUUUU.json`; a part started again
//! with the same arguments skips recorded units, so a killed run continues where it stopped.
//! The *merge* writes `manifest.json` from the records, in unit order, once every unit is
//! recorded: the part that finds them all when it finishes does it (or `kiln data merge`).
//! So the manifest, and with it the training order, is the same whatever `N` was, and a
//! directory with a manifest is a complete dataset.
//!
//! Exact deduplication (`--dedup exact`) keeps the first of identical documents (by SHA-256
//! of the text) in unit order: a unit drops repeats of its own documents as it writes them,
//! and the merge drops documents that repeat an earlier unit's, rewriting the shards that
//! held them (`...-SSSSS.dedup.parquet`).

mod input;
mod merge;
mod unit;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use kiln_proto::manifest::{self, DatasetManifest};
use sha2::{Digest, Sha256};

use crate::shard::ShardError;
use crate::tokenizer::{hex, Tokenizer, TokenizerError};
use kiln_store::{self as store, StoreError};

pub use merge::merge;

/// Units are cut after about this many input bytes unless told otherwise.
pub const UNIT_BYTES: u64 = 64 << 20;

/// Whether identical documents are kept once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dedup {
    #[default]
    None,
    Exact,
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Local paths or store URLs: files, directories (prefixes) or glob patterns.
    pub inputs: Vec<String>,
    /// A directory or store URL (see [`crate::store`]).
    pub output: String,
    pub tokenizer: String,
    pub eos_token: Option<String>,
    /// The JSON field or Parquet column that holds each document's text.
    pub text_key: String,
    pub val_fraction: f64,
    pub shard_tokens: u64,
    /// Tokens per row group, the unit the loader fetches.
    pub row_group_tokens: usize,
    /// Input bytes per unit of work (see the module documentation).
    pub unit_bytes: u64,
    /// This machine's share: part `part` (from 0) of `parts`.
    pub part: u32,
    pub parts: u32,
    /// Count and leave out unreadable documents and files instead of stopping. (Not part of
    /// the plan: a unit finished without it had nothing to skip.)
    pub skip_bad: bool,
    pub dedup: Dedup,
    /// Write the manifest when this part finds every unit finished.
    pub merge: bool,
    /// Tokenizer threads; `None` for every core.
    pub threads: Option<usize>,
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
            unit_bytes: UNIT_BYTES,
            part: 0,
            parts: 1,
            skip_bad: false,
            dedup: Dedup::None,
            merge: true,
            threads: None,
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
    #[error("{0}: no such file, directory or object, and nothing matches it as a pattern")]
    Missing(String),
    #[error("invalid glob pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {name}: {message}; pass --skip-bad-documents to count and skip unreadable files")]
    Input { name: String, message: String },
    #[error(
        "{name}: {row}: {message}; pass --skip-bad-documents to count and skip such documents"
    )]
    BadDocument {
        name: String,
        row: String,
        message: String,
    },
    #[error("--val-fraction must be in [0, 0.5], got {0}")]
    ValFraction(f64),
    #[error("--part {part} is not below --parts {parts}")]
    Part { part: u32, parts: u32 },
    #[error(
        "the validation split would be empty: {documents} documents in {units} units with --val-fraction {fraction} (every {every}th document of each unit); give more documents, a larger fraction or larger units (--unit-bytes), or 0 for no validation"
    )]
    EmptyValidation {
        documents: u64,
        units: u64,
        fraction: f64,
        every: u64,
    },
    #[error("{0} already holds a dataset; pass --force to replace it")]
    Exists(String),
    #[error(
        "{output} holds a preparation started with other inputs or options ({difference}); run again with the same ones to continue it, or pass --force to start over"
    )]
    PlanMismatch { output: String, difference: String },
    #[error(
        "{output}: {missing} of {units} units are not finished yet ({first}); run the parts that tokenize them (unit u belongs to part u % parts), then merge"
    )]
    Incomplete {
        output: String,
        missing: usize,
        units: usize,
        first: String,
    },
    #[error("{output} has no preparation to merge: {name} is missing")]
    NoPlan { output: String, name: String },
    #[error("{name} is not a valid record: {message}")]
    Record { name: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot upload {name}: {message}")]
    Upload { name: String, message: String },
    #[error("cannot reach {name}: {message}")]
    Reach { name: String, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Runtime(String),
}

/// What one `prepare` call did.
#[derive(Debug, Clone)]
pub struct PrepareSummary {
    pub part: u32,
    pub parts: u32,
    /// Units in the whole dataset, and those of this part tokenized now or found finished.
    pub units: usize,
    pub units_done: usize,
    pub units_resumed: usize,
    pub documents: u64,
    pub tokens: u64,
    /// Bytes of text tokenized, and of input files read (as stored).
    pub text_bytes: u64,
    pub input_bytes: u64,
    pub seconds: f64,
    pub threads: usize,
    /// The manifest, when this call wrote it (the merge).
    pub manifest: Option<DatasetManifest>,
    /// Why the merge was left to another part or to `kiln data merge`.
    pub merge_note: Option<String>,
}

/// A dataset's identity: the SHA-256 of its manifest (which holds every shard's checksum).
pub fn fingerprint(manifest: &DatasetManifest) -> String {
    hex(&Sha256::digest(manifest.to_json().as_bytes()))
}

/// Runs `f` on a tokio runtime's handle (a one-thread runtime: the store clients' IO).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, PrepareError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| PrepareError::Runtime(format!("cannot start the IO runtime: {e}")))
}

/// Progress of one part: stored bytes consumed, documents, tokens.
pub(crate) struct Progress {
    pub bar: ProgressBar,
    pub bytes: Arc<AtomicU64>,
    pub documents: AtomicU64,
    pub tokens: AtomicU64,
    pub text_bytes: AtomicU64,
    start: Instant,
    /// Without a terminal (a batch job's log), a plain line every [`LOG_EVERY`] instead.
    log_lines: bool,
    last_line: std::sync::Mutex<Instant>,
    total_bytes: u64,
}

const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Progress {
    fn new(total_bytes: u64, visible: bool, label: String) -> Self {
        let bar = if visible {
            ProgressBar::new(total_bytes)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix} [{bar:25}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(label);
        use std::io::IsTerminal;
        Progress {
            log_lines: visible && !std::io::stderr().is_terminal(),
            last_line: std::sync::Mutex::new(Instant::now()),
            total_bytes,
            bar,
            bytes: Arc::new(AtomicU64::new(0)),
            documents: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            text_bytes: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// Redraws the bar: position in stored bytes, documents and tokens per second.
    pub fn update(&self) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let docs = self.documents.load(Ordering::Relaxed);
        let tokens = self.tokens.load(Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let message = format!(
            "{} docs ({}/s), {} tokens ({}/s)",
            human(docs as f64),
            human(docs as f64 / secs),
            human(tokens as f64),
            human(tokens as f64 / secs)
        );
        if self.log_lines {
            let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= LOG_EVERY {
                *last = Instant::now();
                eprintln!(
                    "{}: {}B of {}B read ({:.0}%, {}B/s), {message}",
                    self.bar.prefix(),
                    human(bytes as f64),
                    human(self.total_bytes as f64),
                    100.0 * bytes as f64 / self.total_bytes.max(1) as f64,
                    human(bytes as f64 / secs),
                );
            }
        }
        self.bar.set_position(bytes);
        self.bar.set_message(message);
    }
}

/// 1234567 -> "1.23M".
pub fn human(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2}G", x / 1e9),
        x if x >= 1e6 => format!("{:.2}M", x / 1e6),
        x if x >= 1e4 => format!("{:.1}k", x / 1e3),
        x => format!("{x:.0}"),
    }
}

/// Tokenizes this part's units of the inputs into `options.output`, and writes the manifest
/// when every unit is finished (unless `options.merge` is off).
pub fn prepare(options: &PrepareOptions) -> Result<PrepareSummary, PrepareError> {
    let started = Instant::now();
    if !(0.0..=0.5).contains(&options.val_fraction) {
        return Err(PrepareError::ValFraction(options.val_fraction));
    }
    if options.parts == 0 || options.part >= options.parts {
        return Err(PrepareError::Part {
            part: options.part,
            parts: options.parts,
        });
    }
    let tokenizer = Tokenizer::load(&options.tokenizer, options.eos_token.as_deref())?;
    let runtime = runtime()?;
    let rt = runtime.handle();
    let files = input::collect(&options.inputs, rt)?;
    let location = store::open(&options.output)?;
    let io = merge::Io::new(&location, rt);

    if io.exists(manifest::FILE_NAME)? {
        if !options.force {
            return Err(PrepareError::Exists(options.output.clone()));
        }
        // A dataset is complete only once its manifest exists: remove the old one first.
        io.delete(manifest::FILE_NAME)?;
    }
    if options.force && options.parts == 1 {
        // Starting over alone: a merge lock left by a killed run holds nothing.
        io.delete(merge::LOCK)?;
    }
    let plan = merge::Plan::new(options, &tokenizer, &files);
    let plan_sha = plan.sha256();
    match io.read_json::<merge::Plan>(merge::PLAN)? {
        // A plan none of whose units finished is replaced: nothing of it would be lost.
        Some(old) if old != plan && !options.force && merge::any_finished(&io, &old)? => {
            return Err(PrepareError::PlanMismatch {
                output: options.output.clone(),
                difference: old.difference(&plan),
            })
        }
        Some(old) if old == plan => {}
        _ => io.write(merge::PLAN, plan.to_json().into_bytes())?,
    }

    let threads = options
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| PrepareError::Runtime(format!("cannot start {threads} threads: {e}")))?;

    let mine: Vec<usize> = (0..plan.units.len())
        .filter(|u| u % options.parts as usize == options.part as usize)
        .collect();
    let mut todo = Vec::new();
    let mut resumed = 0;
    for &u in &mine {
        match io.read_json::<merge::UnitRecord>(&merge::unit_name(u))? {
            Some(r) if r.plan == plan_sha && !options.force => resumed += 1,
            _ => todo.push(u),
        }
    }
    let unit_files = plan.unit_files(&files);
    let total: u64 = todo
        .iter()
        .flat_map(|&u| unit_files[u].iter())
        .map(|f| f.size)
        .sum();
    let label = if options.parts > 1 {
        format!("part {} of {}", options.part, options.parts)
    } else {
        "tokenizing".into()
    };
    let progress = Progress::new(total, options.progress, label);
    let ctx = unit::UnitContext {
        options,
        tokenizer: &tokenizer,
        io: &io,
        pool: &pool,
        plan_sha: &plan_sha,
        progress: &progress,
    };
    for &u in &todo {
        let record = unit::run(&ctx, u, unit_files[u])?;
        io.write(&merge::unit_name(u), record.to_json().into_bytes())?;
    }
    progress.update();
    progress.bar.finish_and_clear();

    let mut summary = PrepareSummary {
        part: options.part,
        parts: options.parts,
        units: plan.units.len(),
        units_done: todo.len(),
        units_resumed: resumed,
        documents: progress.documents.load(Ordering::Relaxed),
        tokens: progress.tokens.load(Ordering::Relaxed),
        text_bytes: progress.text_bytes.load(Ordering::Relaxed),
        input_bytes: total,
        seconds: 0.0,
        threads,
        manifest: None,
        merge_note: None,
    };
    if options.merge {
        match merge::merge_if_complete(&io, &plan, &plan_sha, options.progress)? {
            Ok(m) => summary.manifest = Some(m),
            Err(note) => summary.merge_note = Some(note),
        }
    } else {
        summary.merge_note = Some("not merged (--no-merge)".into());
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

#[cfg(test)]
mod tests;
