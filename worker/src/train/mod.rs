//! `kiln train`: the single-process training loop.
//!
//! Each optimizer step takes global samples `step * batch_size ..` from the seeded sequence
//! order, runs `batch_size / micro_batch_size` forward/backward passes, adds each pass's
//! gradients into the flat gradient buffer, clips the global norm, and applies AdamW at the
//! scheduled rate. Every `log_every` steps it reports loss, learning rate, gradient norm,
//! tokens/s and MFU; every `eval_every` steps (and after the last) the validation loss. The
//! final weights are written as a Hugging Face directory under `output.dir/model`, and every
//! report is appended to `output.dir/metrics.jsonl`.
//!
//! This module holds the entry point and its types; `setup` builds the mesh, model,
//! datasets and optimizer, `resume` continues from a checkpoint, `steps` runs the step
//! loop, evaluation and saves, and `log` writes the run's record. The record's types
//! ([`Event`], [`Phases`], the checkpoints' training state) are `kiln_proto::run`'s.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_checkpoint::{CheckpointError, CheckpointStore};
use kiln_proto::job::JobConfig;
use kiln_shard_loader::dataset::DatasetError;
use kiln_shard_loader::order::DataCursor;
use kiln_shard_loader::ShardError;
use kiln_store::owner::OwnerTimes;

use crate::checkpoint::{CommitGate, Saver, SaverOptions};
use crate::collective::CollectiveError;
use crate::config::ConfigError;
use crate::device::{self, DeviceError};
use crate::eval::EvalError;
use crate::hf::HfError;
use crate::memory::MemoryTier;
use crate::optim::{LrSchedule, ScheduleKind};

mod log;
mod resume;
mod setup;
mod steps;

/// What the loop reports as it goes, and where a step's time went.
pub use kiln_proto::run::{Event, Phases};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Data(#[from] DatasetError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Hf(#[from] HfError),
    /// What the coordinator also checks at submit (`kiln_proto::preflight`).
    #[error(transparent)]
    Unrunnable(#[from] kiln_proto::preflight::Unrunnable),
    #[error("{0}")]
    Precision(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the loss became {loss} at step {step}; lower optimizer.lr or check the data")]
    NonFinite { step: i64, loss: f64 },
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(
        "train.batch_size {batch} is not a multiple of {dp} data-parallel ranks x train.micro_batch_size {micro}"
    )]
    Batch { batch: i64, dp: usize, micro: i64 },
    #[error("launch: {0}")]
    Launch(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("snapshot in memory: {0}")]
    Snapshot(String),
}

/// Where this process sits in a multi-process run: its global rank and every rank's
/// `host:port` (`peers[r]` is where rank `r` listens). One process alone by default.
#[derive(Clone, Default)]
pub struct Launch {
    pub rank: usize,
    pub peers: Vec<String>,
    /// Continue from a checkpoint: `latest` (the newest valid one under the job's checkpoint
    /// directory, or a fresh start when there is none yet), `step-N`, or a checkpoint's URL.
    pub resume: Option<String>,
    /// Checkpoint commits go through a coordinator (see [`CommitGate`]).
    pub commit_gate: Option<Arc<dyn CommitGate>>,
    /// The run this rank belongs to, as the checkpoint directory's claim names it (a
    /// coordinator gives each job its own); empty: see [`Launch::run_name`].
    pub run: String,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("rank", &self.rank)
            .field("peers", &self.peers)
            .field("resume", &self.resume)
            .field("commit_gate", &self.commit_gate.is_some())
            .field("run", &self.run)
            .finish()
    }
}

impl Launch {
    pub fn world_size(&self) -> usize {
        self.peers.len().max(1)
    }

    /// The run's name in its checkpoint directory's claim: as given, else one that all
    /// ranks of a hand-started run derive alike (from rank 0's address), or this process
    /// when it is the only rank.
    pub fn run_name(&self) -> String {
        if !self.run.is_empty() {
            self.run.clone()
        } else if self.world_size() == 1 {
            format!(
                "kiln train, pid {} on {}",
                std::process::id(),
                kiln_store::owner::hostname()
            )
        } else {
            format!("kiln train with rank 0 at {}", self.peers[0])
        }
    }

    /// This rank's index among the ranks of its host, which picks its GPU: `LOCAL_RANK` when
    /// the launcher sets it, else the global rank (ranks of a host numbered from 0).
    pub fn local_rank(&self) -> Option<usize> {
        if self.world_size() == 1 {
            return None;
        }
        let from_env = std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.parse().ok());
        Some(from_env.unwrap_or(self.rank))
    }
}

/// The outcome of a run: every step's training loss, and the validation losses.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub losses: Vec<f64>,
    pub val_losses: Vec<(i64, f64)>,
    pub model_dir: PathBuf,
    /// Seconds of training (evaluation excluded) and of that, waiting for data.
    pub train_s: f64,
    pub data_wait_s: f64,
    /// Where the data stream continues.
    pub cursor: Option<DataCursor>,
}

/// Sidecar written next to the weights so `kiln sample` finds the tokenizer.
pub use crate::meta::KILN_META;

/// The name of the run's metrics log, in `output.dir` and in the checkpoint directory.
pub const METRICS_LOG: &str = "metrics.jsonl";

/// Trains `job` as rank `launch.rank` of `launch.world_size()` processes. Only global rank 0
/// writes the metrics log, the ledger and the model; every rank reports its events.
pub fn train(
    job: &JobConfig,
    launch: &Launch,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Summary, TrainError> {
    let t = &job.train;
    let ck = &job.checkpoint;
    // One run per checkpoint directory: claimed before anything is written, by every rank.
    let ck_store = CheckpointStore::open(&job.checkpoint_dir())?;
    let claim = ck_store.claim(&launch.run_name(), launch.rank == 0, OwnerTimes::from_env())?;
    let mut run = setup::Setup::new(job, launch)?;
    let memory = MemoryTier::new(ck.memory_every, launch.run_name(), launch.rank, run.mesh);
    if memory.as_ref().is_some_and(|m| !m.kept()) {
        eprintln!(
            "warning: rank {}: checkpoint.memory_every is set, but no worker keeps this rank's \
             snapshots (kiln worker processes of a coordinator keep them, unless started with \
             --memory-budget-mb 0): only the store's checkpoints count",
            launch.rank
        );
    }
    let mut resumed = None;
    if let Some(which) = &launch.resume {
        let _span = tracing::info_span!("checkpoint.load", kiln.resume = %which).entered();
        let target = resume::Target {
            job,
            config: &run.config,
            data_id: &run.data_id,
            model: &run.model,
            groups: &run.groups,
        };
        let r = resume::resume(which, &target, &mut run.optimizer, memory.as_ref())?;
        resumed = Some(r);
    }
    let start_step = resumed.as_ref().map_or(0, |r| r.step);
    let ledger_hash = resumed.as_ref().map_or(0, |r| r.ledger_hash);
    let saver = if ck.every > 0 {
        let options = SaverOptions {
            rank: launch.rank,
            mesh: run.mesh,
            dp_rank: run.dp_rank,
            tp_rank: run.groups.tp_rank(),
            asynchronous: ck.asynchronous,
            keep_last: ck.keep_last,
            keep_every: ck.keep_every as u64,
        };
        Some(
            Saver::new(ck_store.clone().with_fsync(ck.fsync), options)
                .with_host_budget((ck.host_buffer_mb > 0).then_some(ck.host_buffer_mb << 20))
                .with_gate(launch.commit_gate.clone()),
        )
    } else {
        None
    };

    // Every rank reports its events (a supervisor follows each rank's steps); only the
    // leader's go to the metrics log, and the leader also copies the log into the store,
    // beside the checkpoints. A resumed run keeps what the logs say up to its checkpoint and
    // continues them.
    log::create_output_dir(job, run.leader)?;
    let store = || match &saver {
        Some(s) => Ok(s.store().clone()),
        None => Ok::<_, CheckpointError>(ck_store.clone()),
    };
    let mut emit = log::Emitter::open(
        job,
        run.leader,
        resumed.is_some(),
        start_step,
        store,
        on_event,
    )?;
    let ledger = log::Ledger::open(job, run.leader, resumed.is_some(), start_step)?;

    let peak_flops = match t.peak_tflops {
        Some(tflops) => tflops * 1e12,
        None => device::measure_matmul_flops(run.device, run.compute),
    };
    let flops_per_token = run.config.flops_per_token(t.seq_len);
    emit.emit(Event::Start {
        job: job.name.clone(),
        params: run.config.num_params(),
        world: run.world,
        dp: run.dims.dp,
        tp: run.dims.tp,
        zero1: job.parallel.zero1,
        fsdp: run.model.params.sharding().is_some(),
        shard: run.model.params.sharding().map_or(0, |s| {
            if s.replica.size() > 1 {
                s.group.size()
            } else {
                0
            }
        }),
        activation_checkpointing: run.model.recompute.name().to_owned(),
        device: format!("{:?}", run.device),
        bf16: run.compute == crate::precision::AUTOCAST_KIND,
        precision: crate::precision::kind_name(run.compute).to_owned(),
        flops_per_token,
        peak_flops,
        train_sequences: run.train_data.len(),
        validation_sequences: run
            .val_data
            .as_ref()
            .map_or(0, kiln_shard_loader::mixture::MixtureLoader::len),
    })?;
    if let Some(r) = resumed.take() {
        emit.emit(Event::Resumed {
            step: r.step,
            from: r.from,
            rejected: r.rejected,
        })?;
    }
    let o = &job.optimizer;
    let schedule = LrSchedule {
        lr: o.lr,
        min_lr_ratio: o.min_lr_ratio,
        warmup_steps: o.warmup_steps,
        total_steps: t.steps,
        kind: ScheduleKind::parse(&o.schedule).unwrap_or(ScheduleKind::Cosine),
    };
    let mut trainer = steps::Trainer::new(
        job,
        run,
        (saver, memory),
        emit,
        ledger,
        ledger_hash,
        schedule,
        flops_per_token,
        peak_flops,
    );
    for step in start_step..t.steps {
        claim.check()?;
        trainer.step(step)?;
    }
    let summary = trainer.finish()?;
    claim.release()?;
    Ok(summary)
}
