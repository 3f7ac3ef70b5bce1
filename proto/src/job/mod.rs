//! The job file: what to train, on which data, for how long.
//!
//! Parsing rejects unknown keys and wrong types with the line and column of the offence;
//! [`JobConfig::validate`] then checks the values against each other. See the README's
//! "Job file" section for every key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod check;

use check::{fail, Check};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot read job file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid job file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid job file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// A name for the run, used in logs and output paths.
    #[serde(default = "default_name")]
    pub name: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub train: TrainSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub parallel: ParallelSpec,
    pub output: OutputSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
}

/// The model shape: a preset, optionally with fields overridden, or a full explicit shape
/// (`preset = "custom"` is implied when no preset is named).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub preset: Option<String>,
    pub vocab_size: Option<i64>,
    pub dim: Option<i64>,
    pub n_layers: Option<i64>,
    pub n_heads: Option<i64>,
    pub n_kv_heads: Option<i64>,
    pub head_dim: Option<i64>,
    pub ffn_dim: Option<i64>,
    pub norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub max_seq_len: Option<i64>,
    pub tie_embeddings: Option<bool>,
    /// Start from these weights (a Hugging Face Llama directory) instead of a random init.
    pub init_from: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// The dataset written by `kiln prepare`: a directory, or a store URL (`s3://`,
    /// `az://`, `gs://`, `file://`, `memory://`). Either this or `sources`.
    pub path: Option<String>,
    /// A mixture: several datasets, each with a weight (its share of every step's samples).
    #[serde(default)]
    pub sources: Vec<SourceSpec>,
    /// Decoded tokens the loader keeps in memory (current and prefetched blocks), in MiB.
    #[serde(default = "default_memory_cap_mb")]
    pub memory_cap_mb: u64,
    /// Sequences per window of the local shuffle.
    #[serde(default = "default_shuffle_window")]
    pub shuffle_window: u64,
}

/// One dataset of a mixture.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub path: String,
    pub weight: f64,
}

impl DataSpec {
    /// The datasets and their weights: `path` alone is one source of weight 1.
    pub fn sources(&self) -> Vec<SourceSpec> {
        match &self.path {
            Some(path) => vec![SourceSpec {
                path: path.clone(),
                weight: 1.0,
            }],
            None => self.sources.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Tokens per training sequence.
    pub seq_len: i64,
    /// Sequences per optimizer step.
    pub batch_size: i64,
    /// Sequences per forward/backward pass; `batch_size / micro_batch_size` micro-batches
    /// are accumulated per step. Defaults to `batch_size` (no accumulation).
    pub micro_batch_size: Option<i64>,
    pub steps: i64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `auto` (bf16 autocast on CUDA, fp32 on CPU), `fp32` or `bf16`.
    #[serde(default = "default_precision")]
    pub precision: String,
    /// Intra-op CPU threads for libtorch; 0 keeps libtorch's default.
    #[serde(default)]
    pub threads: i64,
    #[serde(default = "default_log_every")]
    pub log_every: i64,
    /// Evaluate on the validation split every N steps (and after the last); 0 disables.
    #[serde(default = "default_eval_every")]
    pub eval_every: i64,
    /// Validation batches per evaluation (of `micro_batch_size` sequences).
    #[serde(default = "default_eval_batches")]
    pub eval_batches: i64,
    /// The peak of one device in TFLOP/s (e.g. 989 for an H100's dense bf16), which MFU is
    /// measured against. Default: what a large matmul reaches on the device, measured at
    /// start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_tflops: Option<f64>,
    /// Activation checkpointing: which activations the forward pass drops and the backward
    /// pass recomputes. `none` (the default), `mlp` (each block's MLP half: its widest
    /// tensors) or `block` (whole blocks, keeping only each block's input).
    #[serde(default = "default_activation_checkpointing")]
    pub activation_checkpointing: String,
}

/// Every field has a default, so `[optimizer]` may name only what it changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSpec {
    pub lr: f64,
    /// The floor the decay ends at, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    pub warmup_steps: i64,
    /// `cosine`, `linear` or `constant` after warmup.
    pub schedule: String,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Apply weight decay to embeddings (and a tied output head) too.
    pub decay_embeddings: bool,
    /// Apply weight decay to RMSNorm gains too.
    pub decay_norms: bool,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec {
            lr: 3e-4,
            min_lr_ratio: 0.1,
            warmup_steps: 0,
            schedule: "cosine".into(),
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            decay_embeddings: false,
            decay_norms: false,
            grad_clip: 1.0,
        }
    }
}

/// How the ranks of a multi-process run split the work. Data parallelism takes whatever the
/// world size leaves: `dp = world / tp`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelSpec {
    /// Tensor-parallel ranks per model replica (Megatron-style); must divide the heads, the
    /// key/value heads and the MLP width.
    pub tp: usize,
    /// Shard AdamW's state across the data-parallel ranks (ZeRO stage 1): gradients are
    /// reduce-scattered, each rank updates its slice, parameters are all-gathered.
    pub zero1: bool,
    /// Fully sharded data parallelism (ZeRO stage 3, as FSDP): parameters, gradients and
    /// AdamW state live only as each data-parallel rank's shard; a block's parameters are
    /// gathered for its forward and backward passes and its gradients reduce-scattered as
    /// soon as its backward returns. Excludes `zero1`, which it contains.
    pub fsdp: bool,
    /// With `fsdp`: shard within groups of this many data-parallel ranks (neighbours in rank
    /// order, so one node's ranks) and replicate across the `dp / shard` groups (hybrid
    /// sharding, HSDP: `dp = replicate x shard`). Gathers and reduce-scatters stay inside a
    /// group; each gradient chunk is then averaged across the replicas. 0: one group of all
    /// the data-parallel ranks.
    pub shard: usize,
    /// With `fsdp`: free a block's gathered parameters right after its forward pass and
    /// gather them again for its backward (PyTorch FSDP's default), so about two blocks are
    /// whole at a time. `false` keeps them from the forward to the backward pass: one gather
    /// less per block and micro-batch, every block whole at the end of the forward pass.
    /// Under `activation_checkpointing = "block"` they are freed after the forward anyway.
    pub reshard_after_forward: bool,
    /// Gradients are all-reduced in buckets of about this many MiB, each as soon as backward
    /// has finished with it.
    pub bucket_mb: f64,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        ParallelSpec {
            tp: 1,
            zero1: false,
            fsdp: false,
            shard: 0,
            reshard_after_forward: true,
            bucket_mb: 25.0,
        }
    }
}

/// Sharded checkpoints of the whole training state (weights, optimizer, schedule, data
/// position), from which `kiln train --resume` continues exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Save after every this many steps and after the last one; 0 never saves.
    pub every: i64,
    /// Where: a path or store URL (`s3://bucket/run/checkpoints`, ...). Default:
    /// `output.dir/checkpoints`.
    pub dir: Option<String>,
    /// Keep the newest this many committed checkpoints...
    pub keep_last: usize,
    /// ...and every checkpoint whose step is a multiple of this (0: none).
    pub keep_every: i64,
    /// Copy the state to host memory and upload in the background while training goes on
    /// (`false`: training waits until the checkpoint is committed).
    #[serde(rename = "async")]
    pub asynchronous: bool,
    /// Host memory a save may hold at once, in MiB (copied from the state and not yet
    /// uploaded; at least one 32 MiB upload part). 0: as much as this rank's state, so that
    /// training waits only for a memory copy; less bounds memory, and training then waits
    /// for the upload of what does not fit.
    pub host_buffer_mb: u64,
    /// On a local directory, flush every checkpoint object to disk before it counts as
    /// written (a committed checkpoint then survives a machine crash; without it, a crash
    /// can damage the newest checkpoint, which resume then detects and skips).
    pub fsync: bool,
    /// Under a coordinator, also snapshot the whole state into host memory after every this
    /// many steps: each rank's snapshot is kept by its own host's worker and by a peer's, and
    /// a job that loses ranks resumes from the newest step every rank still finds there when
    /// that is newer than the newest checkpoint in the store. 0: off. Needs `every` (the store
    /// checkpoint is what survives losing a rank together with its peer); not with `fsdp`.
    pub memory_every: i64,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            every: 0,
            dir: None,
            keep_last: 3,
            keep_every: 0,
            asynchronous: true,
            host_buffer_mb: 0,
            fsync: false,
            memory_every: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Directory for the final weights (a Hugging Face Llama directory) and the metrics log.
    pub dir: PathBuf,
}

fn default_name() -> String {
    "kiln".into()
}
fn default_memory_cap_mb() -> u64 {
    512
}
fn default_shuffle_window() -> u64 {
    4096
}
fn default_seed() -> u64 {
    1234
}
fn default_device() -> String {
    "auto".into()
}
fn default_precision() -> String {
    "auto".into()
}
fn default_activation_checkpointing() -> String {
    "none".into()
}
fn default_log_every() -> i64 {
    10
}
fn default_eval_every() -> i64 {
    100
}
fn default_eval_batches() -> i64 {
    8
}

impl JobConfig {
    /// Reads, parses and validates a job file. Relative paths inside it are resolved against
    /// the job file's directory.
    pub fn load(path: &Path) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut job = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        job.resolve_paths(base);
        job.validate(path)?;
        Ok(job)
    }

    /// Parses job-file text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, JobError> {
        toml::from_str(text).map_err(|e| JobError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(text, &e),
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = crate::path::lexical_join(base, p);
            }
        };
        let resolve_url = |url: &mut String| {
            if !url.contains("://") {
                let mut p = PathBuf::from(&*url);
                resolve(&mut p);
                *url = p.to_string_lossy().into_owned();
            }
        };
        if let Some(path) = self.data.path.as_mut() {
            resolve_url(path);
        }
        for source in &mut self.data.sources {
            resolve_url(&mut source.path);
        }
        resolve(&mut self.output.dir);
        if let Some(dir) = self.checkpoint.dir.as_mut() {
            resolve_url(dir);
        }
        if let Some(p) = self.model.init_from.as_mut() {
            resolve(p);
        }
    }

    /// Where checkpoints go: `checkpoint.dir`, or `output.dir/checkpoints`.
    pub fn checkpoint_dir(&self) -> String {
        match &self.checkpoint.dir {
            Some(dir) => dir.clone(),
            None => self
                .output
                .dir
                .join("checkpoints")
                .to_string_lossy()
                .into_owned(),
        }
    }

    /// Micro-batch size, defaulting to the whole batch.
    pub fn micro_batch_size(&self) -> i64 {
        self.train.micro_batch_size.unwrap_or(self.train.batch_size)
    }

    /// Micro-batches accumulated per optimizer step.
    pub fn accumulation_steps(&self) -> i64 {
        self.train.batch_size / self.micro_batch_size()
    }

    /// Micro-batches each data-parallel rank accumulates per step with `dp` ranks, or `None`
    /// when `dp * micro_batch_size` does not divide `batch_size`.
    pub fn accumulation_steps_at(&self, dp: i64) -> Option<i64> {
        let per_pass = dp * self.micro_batch_size();
        (per_pass > 0 && self.train.batch_size % per_pass == 0)
            .then(|| self.train.batch_size / per_pass)
    }

    /// Checks values against each other; `path` only names the file in errors. The checks
    /// run in this order, and the first that fails is the one reported.
    pub fn validate(&self, path: &Path) -> Result<(), JobError> {
        self.check_batch()
            .and_then(|()| self.checkpoint.check())
            .and_then(|()| self.parallel.check())
            .and_then(|()| self.check_memory())
            .and_then(|()| self.train.check_schedule())
            .and_then(|()| self.data.check())
            .and_then(|()| self.train.check_runtime())
            .and_then(|()| self.optimizer.check())
            .map_err(|(key, message)| JobError::Invalid {
                path: path.to_owned(),
                key,
                message,
            })
    }

    /// Sequence length, batch and micro-batch.
    fn check_batch(&self) -> Check {
        let t = &self.train;
        if t.seq_len < 2 {
            return fail(
                "train.seq_len",
                format!("must be at least 2, got {}", t.seq_len),
            );
        }
        if t.batch_size < 1 {
            return fail(
                "train.batch_size",
                format!("must be at least 1, got {}", t.batch_size),
            );
        }
        let mb = self.micro_batch_size();
        if mb < 1 || t.batch_size % mb != 0 {
            return fail(
                "train.micro_batch_size",
                format!("must divide train.batch_size ({}), got {mb}", t.batch_size),
            );
        }
        Ok(())
    }
}

/// Renders a TOML error as "line L, column C: what", so the user can find it without the
/// multi-line snippet the toml crate prints.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim_end_matches('\n').to_owned();
    match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("line {line}, column {column}: {what}")
        }
        None => what,
    }
}

/// One-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
