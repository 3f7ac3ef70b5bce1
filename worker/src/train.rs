//! `kiln train`: the single-process training loop.
//!
//! Each optimizer step takes global samples `step * batch_size ..` from the seeded sequence
//! order, runs `batch_size / micro_batch_size` forward/backward passes, adds each pass's
//! gradients into the flat gradient buffer, clips the global norm, and applies AdamW at the
//! scheduled rate. Every `log_every` steps it reports loss, learning rate, gradient norm,
//! tokens/s and MFU; every `eval_every` steps (and after the last) the validation loss. The
//! final weights are written as a Hugging Face directory under `output.dir/model`, and every
//! report is appended to `output.dir/metrics.jsonl`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kiln_proto::job::JobConfig;
use kiln_shard_loader::dataset::{DatasetError, SplitName};
use kiln_shard_loader::mixture::MixtureLoader;
use kiln_shard_loader::{LoaderOptions, ShardError, TokenDataset};
use serde::Serialize;
use serde_json::json;
use tch::Tensor;

use kiln_checkpoint::{CheckpointError, CheckpointStore, Manifest, Mesh};

use crate::checkpoint::{self, CommitGate, Saver, SaverOptions};
use crate::collective::tcp::rendezvous_timeout;
use crate::collective::{CollectiveError, ParallelDims, ProcessGroups, ReduceOp};
use crate::config::{ConfigError, LlamaConfig};
use crate::device::{self, DeviceError};
use crate::eval::{evaluate, EvalError};
use crate::hf::{self, HfError, SaveOptions};
use crate::model::{DecayPolicy, Llama};
use crate::optim::{AdamW, AdamWConfig, LrSchedule, ScheduleKind};
use crate::parallel::{train_step, DataParallel};
use kiln_shard_loader::order::{DataCursor, LedgerEntry};

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
    #[error(
        "the dataset {dir} uses token ids up to {dataset_vocab} ({tokenizer}) but the model's vocab_size is {model_vocab}; set model.vocab_size to at least {dataset_vocab}"
    )]
    VocabTooSmall {
        dir: String,
        tokenizer: String,
        dataset_vocab: u32,
        model_vocab: i64,
    },
    #[error(
        "the mixture's datasets {first} and {other} use different tokenizers (vocabulary size or end-of-document id differ)"
    )]
    MixedTokenizers { first: String, other: String },
    #[error("{0}")]
    Precision(String),
    #[error("train.seq_len {seq_len} exceeds the model's max_seq_len {max}")]
    SeqTooLong { seq_len: i64, max: i64 },
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
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("rank", &self.rank)
            .field("peers", &self.peers)
            .field("resume", &self.resume)
            .field("commit_gate", &self.commit_gate.is_some())
            .finish()
    }
}

impl Launch {
    pub fn world_size(&self) -> usize {
        self.peers.len().max(1)
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

/// What the loop reports as it goes.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Start {
        /// The job's name.
        job: String,
        params: i64,
        world: usize,
        dp: usize,
        tp: usize,
        zero1: bool,
        device: String,
        /// Whether the forward pass ran under bf16 autocast (read back from libtorch).
        bf16: bool,
        /// The dtype a linear layer computes in for this run, read back from libtorch:
        /// `bf16` or `fp32`.
        precision: String,
        flops_per_token: f64,
        peak_flops: f64,
        train_sequences: usize,
        validation_sequences: usize,
    },
    Step {
        step: i64,
        steps: i64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_s: f64,
        mfu: f64,
        step_s: f64,
        /// Share of the window's wall time spent waiting for data.
        data_wait: f64,
        /// Share of the window's wall time spent waiting, after backward, for gradient
        /// communication that did not overlap with it.
        collective_wait: f64,
        /// Where a step's time went, in seconds per step over the window.
        phases: Phases,
        /// Steps in the window this report covers.
        window_steps: i64,
        /// When the window ended, in seconds since the Unix epoch.
        time: f64,
    },
    Eval {
        step: i64,
        val_loss: f64,
        tokens: u64,
    },
    Saved {
        path: PathBuf,
    },
    /// Training continues from a checkpoint (`step` steps done); `rejected` lists newer
    /// checkpoints that could not be used, and why.
    Resumed {
        step: i64,
        from: String,
        rejected: Vec<String>,
    },
    /// A checkpoint was committed. `pause_s`: how long training was held for it.
    Checkpoint {
        step: i64,
        url: String,
        pause_s: f64,
        save_s: f64,
        /// Bytes rank 0 wrote (each rank writes about as much).
        bytes: u64,
        deleted: Vec<u64>,
    },
}

/// Seconds per step by phase, averaged over a log window. Apart from `checkpoint`, they add up
/// to about `step_s` (the rest is the loss all-reduce, the ledger and logging); the snapshot
/// part of `checkpoint` is left out of `step_s` and tokens/s, so that those measure training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Phases {
    /// Waiting for the loader's next batch.
    pub data_wait: f64,
    /// Forward passes, the loss included.
    pub forward: f64,
    /// Backward passes (the gradient all-reduce overlaps with them).
    pub backward: f64,
    /// Waiting after backward for gradient communication still in flight.
    pub collective: f64,
    /// Clipping, AdamW and the ZeRO-1 gather.
    pub optimizer: f64,
    /// Training held by checkpoints: the snapshot of a save, and a step waiting for the
    /// previous save to finish reading the weights.
    pub checkpoint: f64,
}

impl Phases {
    fn add(&mut self, other: &Phases) {
        self.data_wait += other.data_wait;
        self.forward += other.forward;
        self.backward += other.backward;
        self.collective += other.collective;
        self.optimizer += other.optimizer;
        self.checkpoint += other.checkpoint;
    }

    fn scaled(&self, k: f64) -> Phases {
        Phases {
            data_wait: self.data_wait * k,
            forward: self.forward * k,
            backward: self.backward * k,
            collective: self.collective * k,
            optimizer: self.optimizer * k,
            checkpoint: self.checkpoint * k,
        }
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
pub const KILN_META: &str = "kiln.json";

/// Trains `job` as rank `launch.rank` of `launch.world_size()` processes. Only global rank 0
/// writes the metrics log, the ledger and the model; every rank reports its events.
pub fn train(
    job: &JobConfig,
    launch: &Launch,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Summary, TrainError> {
    let t = &job.train;
    if t.threads > 0 {
        tch::set_num_threads(t.threads as i32);
    }
    let world = launch.world_size();
    let dims = ParallelDims::new(0, job.parallel.tp, world)?;
    let (dp, leader) = (dims.dp, launch.rank == 0);
    // Everything that can be checked alone is checked before waiting for the other ranks.
    let accum = job
        .accumulation_steps_at(dp as i64)
        .ok_or(TrainError::Batch {
            batch: t.batch_size,
            dp,
            micro: job.micro_batch_size(),
        })?;
    let config = match &job.model.init_from {
        Some(dir) => hf::load_config(dir)?,
        None => LlamaConfig::from_spec(&job.model)?,
    };
    Llama::check_tensor_parallel(&config, dims.tp)?;
    let device = device::resolve_device_for_rank(&t.device, launch.local_rank())?;
    let groups = if world == 1 {
        ProcessGroups::single()
    } else {
        ProcessGroups::tcp(launch.rank, &launch.peers, dims, rendezvous_timeout())?
    };
    // On GPUs, NCCL carries the data- and tensor-parallel traffic.
    let groups = match device {
        tch::Device::Cuda(ordinal) if world > 1 => groups.with_nccl(ordinal)?,
        _ => groups,
    };
    let dp_rank = groups.dp_rank();
    let bf16 = device::resolve_bf16(&t.precision, device);
    // What the run reports is what libtorch computes in, read back, not the setting.
    let compute = crate::precision::checked(bf16, device).map_err(TrainError::Precision)?;
    let sources = job.data.sources();
    let datasets = sources
        .iter()
        .map(|s| TokenDataset::open(&s.path))
        .collect::<Result<Vec<_>, _>>()?;
    let dataset = &datasets[0];
    let manifest = dataset.manifest().clone();
    for (source, other) in sources.iter().zip(&datasets).skip(1) {
        let m = other.manifest();
        if (m.vocab_size, m.eos_id) != (manifest.vocab_size, manifest.eos_id) {
            return Err(TrainError::MixedTokenizers {
                first: sources[0].path.clone(),
                other: source.path.clone(),
            });
        }
    }

    let model = Llama::new_parallel(&config, decay_policy(job), device, groups.tp.clone())?;
    match &job.model.init_from {
        Some(dir) => hf::load_weights(&model, dir)?,
        None => model.init(t.seed),
    }
    if i64::from(manifest.vocab_size) > config.vocab_size {
        return Err(TrainError::VocabTooSmall {
            dir: sources[0].path.clone(),
            tokenizer: manifest.tokenizer.kind.clone(),
            dataset_vocab: manifest.vocab_size,
            model_vocab: config.vocab_size,
        });
    }
    if t.seq_len > config.max_seq_len {
        return Err(TrainError::SeqTooLong {
            seq_len: t.seq_len,
            max: config.max_seq_len,
        });
    }
    let options = LoaderOptions {
        seq_len: t.seq_len as u64,
        seed: t.seed,
        shuffle: true,
        shuffle_window: job.data.shuffle_window,
        memory_cap_bytes: job.data.memory_cap_mb << 20,
        concurrency: 8,
        prefetch_samples: 2 * t.batch_size as u64,
    };
    let weights: Vec<f64> = sources.iter().map(|s| s.weight).collect();
    // Each source streams its own order: give each its own seed.
    let loaders = |split: SplitName, options: &LoaderOptions| {
        datasets
            .iter()
            .enumerate()
            .map(|(d, ds)| {
                let seed = if d == 0 {
                    options.seed
                } else {
                    options.seed ^ ((d as u64) << 32)
                };
                ds.loader(
                    split,
                    LoaderOptions {
                        seed,
                        ..options.clone()
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let mut train_data = MixtureLoader::new(loaders(SplitName::Train, &options)?, &weights, t.seed);
    let has_validation = datasets.iter().all(|d| d.manifest().validation.tokens > 0);
    let mut val_data = if t.eval_every > 0 && has_validation {
        let options = LoaderOptions {
            shuffle: false,
            prefetch_samples: (t.eval_batches * job.micro_batch_size()) as u64,
            ..options
        };
        Some(MixtureLoader::new(
            loaders(SplitName::Validation, &options)?,
            &weights,
            t.seed,
        ))
    } else {
        None
    };

    let o = &job.optimizer;
    let mut sync = DataParallel::new(
        &model,
        groups.clone(),
        job.parallel.bucket_mb,
        job.parallel.zero1,
    );
    let mut optimizer = AdamW::sharded(
        AdamWConfig {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        },
        &model.params,
        sync.optimizer_ranges(model.params.numel()),
    );
    let mesh = Mesh {
        world,
        dp,
        tp: dims.tp,
        zero1: job.parallel.zero1,
    };
    let data_id = datasets
        .iter()
        .map(TokenDataset::fingerprint)
        .collect::<Vec<_>>()
        .join(",");
    let ck = &job.checkpoint;
    let mut resumed = None;
    if let Some(which) = &launch.resume {
        let _span = tracing::info_span!("checkpoint.load", kiln.resume = %which).entered();
        let r = resume(
            job,
            which,
            &config,
            &data_id,
            &model,
            &mut optimizer,
            &groups,
        )?;
        resumed = Some(r);
    }
    let start_step = resumed.as_ref().map_or(0, |r| r.step);
    let mut ledger_hash = resumed.as_ref().map_or(0, |r| r.ledger_hash);
    let mut saver = if ck.every > 0 {
        Some(
            Saver::new(
                CheckpointStore::open(&job.checkpoint_dir())?.with_fsync(ck.fsync),
                SaverOptions {
                    rank: launch.rank,
                    mesh,
                    dp_rank,
                    tp_rank: groups.tp_rank(),
                    asynchronous: ck.asynchronous,
                    keep_last: ck.keep_last,
                    keep_every: ck.keep_every as u64,
                },
            )
            .with_host_budget((ck.host_buffer_mb > 0).then_some(ck.host_buffer_mb << 20))
            .with_gate(launch.commit_gate.clone()),
        )
    } else {
        None
    };

    // Only the leader writes; the other ranks' logs go nowhere. A resumed run keeps what
    // the logs say up to its checkpoint and continues them.
    let sink =
        |name: &str, keep: &dyn Fn(i64) -> bool| -> Result<(PathBuf, Box<dyn Write>), TrainError> {
            let path = job.output.dir.join(name);
            if !leader {
                return Ok((path, Box::new(std::io::sink())));
            }
            let write_err = |source| TrainError::Write {
                path: path.clone(),
                source,
            };
            let kept = match (&resumed, std::fs::read_to_string(&path)) {
                (Some(_), Ok(text)) => text
                    .lines()
                    .filter(|l| {
                        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
                        v.get("step")
                            .and_then(serde_json::Value::as_i64)
                            .is_none_or(keep)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect::<String>(),
                _ => String::new(),
            };
            let mut file = File::create(&path).map_err(write_err)?;
            file.write_all(kept.as_bytes()).map_err(write_err)?;
            Ok((path, Box::new(file)))
        };
    if leader {
        std::fs::create_dir_all(&job.output.dir).map_err(|source| TrainError::Write {
            path: job.output.dir.clone(),
            source,
        })?;
    }
    // Metrics name the steps done (1-based), the ledger the step index (0-based).
    let (metrics_path, mut metrics) = sink(METRICS_LOG, &|s| s <= start_step)?;
    let (ledger_path, mut ledger) = sink("ledger.jsonl", &|s| s < start_step)?;
    // Every rank reports its events (a supervisor follows each rank's steps); only the
    // leader's go to the metrics log.
    // The leader also copies the log into the store, beside the checkpoints.
    let mut run_log = leader.then(|| {
        let store = match &saver {
            Some(s) => Ok(s.store().clone()),
            None => CheckpointStore::open(&job.checkpoint_dir()),
        };
        RunLog::new(store, metrics_path.clone())
    });
    let mut emit = |event: Event| -> Result<(), TrainError> {
        if leader {
            let line = serde_json::to_string(&event).unwrap_or_default();
            writeln!(metrics, "{line}").map_err(|source| TrainError::Write {
                path: metrics_path.clone(),
                source,
            })?;
        }
        if let Some(log) = run_log.as_mut() {
            log.after(&event);
        }
        on_event(&event);
        Ok(())
    };

    let peak_flops = match t.peak_tflops {
        Some(tflops) => tflops * 1e12,
        None => device::measure_matmul_flops(device, compute),
    };
    let flops_per_token = config.flops_per_token(t.seq_len);
    emit(Event::Start {
        job: job.name.clone(),
        params: config.num_params(),
        world,
        dp,
        tp: dims.tp,
        zero1: job.parallel.zero1,
        device: format!("{device:?}"),
        bf16: compute == crate::precision::AUTOCAST_KIND,
        precision: crate::precision::kind_name(compute).to_owned(),
        flops_per_token,
        peak_flops,
        train_sequences: train_data.len(),
        validation_sequences: val_data.as_ref().map_or(0, MixtureLoader::len),
    })?;

    if let Some(r) = resumed.take() {
        emit(Event::Resumed {
            step: r.step,
            from: r.from,
            rejected: r.rejected,
        })?;
    }
    let schedule = LrSchedule {
        lr: o.lr,
        min_lr_ratio: o.min_lr_ratio,
        warmup_steps: o.warmup_steps,
        total_steps: t.steps,
        kind: ScheduleKind::parse(&o.schedule).unwrap_or(ScheduleKind::Cosine),
    };
    let micro = job.micro_batch_size() as usize;
    let eval_sequences = (t.eval_batches as usize) * micro;
    let mut summary = Summary::default();
    let mut window_start = Instant::now();
    let mut window_tokens = 0usize;
    let mut window_collective_wait = 0.0f64;
    let mut window_phases = Phases::default();

    let mut pause_s = 0.0f64;
    for step in start_step..t.steps {
        let _step_span = tracing::info_span!("step", kiln.step = step + 1).entered();
        let lr = schedule.at(step);
        let mut batches = Vec::with_capacity(accum as usize);
        let mut hash = 0u64;
        let data_span = tracing::info_span!("data").entered();
        let data_start = Instant::now();
        for m in 0..accum {
            // Micro-batch m of every data-parallel rank together covers dp * micro consecutive
            // samples: the same samples, in the same order, whatever dp is.
            let first = (step * t.batch_size) as u64
                + (m as u64 * dp as u64 + dp_rank as u64) * micro as u64;
            let batch = train_data.batch(first, micro)?;
            hash = hash.wrapping_add(batch.hash);
            let shape = [micro as i64, t.seq_len];
            let inputs = Tensor::from_slice(&batch.inputs)
                .view(shape)
                .to_device(device);
            let targets = Tensor::from_slice(&batch.targets)
                .view(shape)
                .to_device(device);
            batches.push((inputs, targets));
        }
        let data_s = data_start.elapsed().as_secs_f64();
        drop(data_span);
        // The step's hash is the wrapping sum over all its samples, whichever rank read them.
        let hash_sum = Tensor::from_slice(&[hash as i64]).to_device(device);
        groups.dp.all_reduce(&hash_sum, ReduceOp::Sum)?;
        let entry = LedgerEntry {
            step: step as u64,
            first_sample: (step * t.batch_size) as u64,
            samples: t.batch_size as u64,
            hash: hash_sum.int64_value(&[0]) as u64,
        };
        ledger_hash = ledger_hash.wrapping_add(entry.hash);
        let line = serde_json::to_string(&entry).unwrap_or_default();
        writeln!(ledger, "{line}").map_err(|source| TrainError::Write {
            path: ledger_path.clone(),
            source,
        })?;
        let stats = train_step(
            &model,
            &mut optimizer,
            &mut sync,
            &batches,
            lr,
            o.grad_clip,
            bf16,
            &mut || {
                if let Some(s) = saver.as_mut() {
                    pause_s += s.fence();
                }
            },
        )?;
        let (loss_sum, grad_norm) = (stats.loss, stats.grad_norm);
        window_collective_wait += stats.collective_wait_s;
        window_phases.add(&Phases {
            data_wait: data_s,
            forward: stats.forward_s,
            backward: stats.backward_s,
            collective: stats.collective_wait_s,
            optimizer: stats.optimizer_s,
            checkpoint: stats.held_s,
        });
        if !loss_sum.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                loss: loss_sum,
            });
        }
        summary.losses.push(loss_sum);
        window_tokens += (t.batch_size * t.seq_len) as usize;

        let last = step + 1 == t.steps;
        if (step + 1) % t.log_every == 0 || last {
            device::sync(device);
            let elapsed = window_start.elapsed().as_secs_f64();
            let wait = train_data.take_wait().as_secs_f64();
            summary.train_s += elapsed;
            summary.data_wait_s += wait;
            let tokens_per_s = window_tokens as f64 / elapsed;
            let steps_in_window = window_tokens / (t.batch_size * t.seq_len) as usize;
            emit(Event::Step {
                step: step + 1,
                steps: t.steps,
                loss: loss_sum,
                lr,
                grad_norm,
                tokens_per_s,
                // Global tokens over every rank's device.
                mfu: tokens_per_s * flops_per_token / (peak_flops * world as f64),
                step_s: elapsed / steps_in_window.max(1) as f64,
                data_wait: wait / elapsed,
                collective_wait: window_collective_wait / elapsed,
                phases: window_phases.scaled(1.0 / steps_in_window.max(1) as f64),
                window_steps: steps_in_window as i64,
                time: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            })?;
            window_tokens = 0;
            window_collective_wait = 0.0;
            window_phases = Phases::default();
            window_start = Instant::now();
        }
        if let Some(s) = saver.as_mut() {
            if let Some(done) = s.poll()? {
                emit(checkpoint_event(done, std::mem::take(&mut pause_s)))?;
            }
            if (step + 1) % ck.every == 0 || last {
                let state = json!({
                    "steps": step + 1,
                    "optimizer_step": optimizer.step,
                    "lr_next": schedule.at(step + 1),
                    "data_cursor": DataCursor {
                        next_sample: ((step + 1) * t.batch_size) as u64,
                        seed: t.seed,
                        seq_len: t.seq_len as u64,
                        shuffle_window: job.data.shuffle_window,
                        dataset: data_id.clone(),
                    },
                    "ledger": { "steps": step + 1, "hash": ledger_hash },
                    "model": config.to_hf_json(None),
                    "batch_size": t.batch_size,
                    "meta": manifest_meta(dataset),
                    "eos_id": manifest.eos_id,
                    "job": job,
                });
                let (previous, held) =
                    tracing::info_span!("checkpoint.snapshot", kiln.step = step + 1)
                        .in_scope(|| s.save((step + 1) as u64, &model, &optimizer, state))?;
                window_phases.checkpoint += held;
                if let Some(done) = previous {
                    emit(checkpoint_event(done, std::mem::take(&mut pause_s)))?;
                }
                pause_s += held;
                // Saving does not count against training throughput.
                window_start += std::time::Duration::from_secs_f64(held);
            }
        }
        let due = t.eval_every > 0 && ((step + 1) % t.eval_every == 0 || last);
        if let (true, Some(val)) = (due, val_data.as_mut()) {
            let eval_start = Instant::now();
            let _eval_span = tracing::info_span!("evaluate", kiln.step = step + 1).entered();
            let r = evaluate(&model, val, micro, Some(eval_sequences), bf16)?;
            summary.val_losses.push((step + 1, r.loss));
            emit(Event::Eval {
                step: step + 1,
                val_loss: r.loss,
                tokens: r.tokens,
            })?;
            // Evaluation time does not count against training throughput.
            window_start += eval_start.elapsed();
            // A save that finished meanwhile is reported now, not a step later.
            if let Some(s) = saver.as_mut() {
                if let Some(done) = s.poll()? {
                    emit(checkpoint_event(done, std::mem::take(&mut pause_s)))?;
                }
            }
        }
    }

    if let Some(s) = saver.as_mut() {
        if let Some(done) = s.wait()? {
            emit(checkpoint_event(done, std::mem::take(&mut pause_s)))?;
        }
    }
    let cursor = DataCursor {
        next_sample: (t.steps * t.batch_size) as u64,
        seed: t.seed,
        seq_len: t.seq_len as u64,
        shuffle_window: job.data.shuffle_window,
        dataset: data_id.clone(),
    };
    let model_dir = job.output.dir.join("model");
    let mut meta = manifest_meta(dataset);
    meta["data_cursor"] = serde_json::to_value(&cursor).unwrap_or_default();
    if groups.tp.size() > 1 {
        // Every tensor-parallel group gathers (collectives need all members); the leader
        // writes.
        let whole = Llama::new(&config, decay_policy(job), tch::Device::Cpu);
        for i in 0..model.params.entries().len() {
            let full = model.full_param(i)?;
            whole.params.set(i, &full);
        }
        if leader {
            save_model(&whole, &model_dir, &meta, manifest.eos_id)?;
        }
    } else if leader {
        save_model(&model, &model_dir, &meta, manifest.eos_id)?;
    }
    groups.world.barrier()?;
    summary.cursor = Some(cursor);
    emit(Event::Saved {
        path: model_dir.clone(),
    })?;
    summary.model_dir = model_dir;
    Ok(summary)
}

/// The name of the run's metrics log, in `output.dir` and in the checkpoint directory.
pub const METRICS_LOG: &str = "metrics.jsonl";

/// Copies the local metrics log to the checkpoint store, so that the run's record does not
/// depend on the machine that ran rank 0 (nor on a telemetry collector): at most every 30 s
/// on a step, at every checkpoint, and at the end. A store that refuses is reported once;
/// training goes on.
struct RunLog {
    store: Option<CheckpointStore>,
    local: PathBuf,
    last: Option<Instant>,
    warned: bool,
}

impl RunLog {
    fn new(store: Result<CheckpointStore, CheckpointError>, local: PathBuf) -> RunLog {
        let store = store
            .map_err(|e| tracing::warn!("the metrics log stays local only: {e}"))
            .ok();
        RunLog {
            store,
            local,
            last: None,
            warned: false,
        }
    }

    fn after(&mut self, event: &Event) {
        let due = match event {
            Event::Step { .. } => self.last.is_none_or(|t| t.elapsed().as_secs() >= 30),
            Event::Checkpoint { .. } | Event::Saved { .. } => true,
            _ => false,
        };
        let Some(store) = self.store.as_ref().filter(|_| due) else {
            return;
        };
        self.last = Some(Instant::now());
        let result = std::fs::read(&self.local)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                store
                    .put_file(METRICS_LOG, bytes)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            if !self.warned {
                tracing::warn!("cannot copy the metrics log to the store: {e}");
                self.warned = true;
            }
        }
    }
}

fn checkpoint_event(done: checkpoint::Saved, pause_s: f64) -> Event {
    Event::Checkpoint {
        step: done.step as i64,
        url: done.committed.unwrap_or_default(),
        pause_s,
        save_s: done.upload_s,
        bytes: done.bytes,
        deleted: done.deleted,
    }
}

/// Where a resumed run starts.
struct Resumed {
    step: i64,
    ledger_hash: u64,
    from: String,
    rejected: Vec<String>,
}

/// Finds the checkpoint `which` names and loads it into `model` and `optimizer`. With
/// `latest`, a checkpoint any rank cannot use is skipped for the one before it (the ranks
/// agree on which); a checkpoint named explicitly must load.
fn resume(
    job: &JobConfig,
    which: &str,
    config: &LlamaConfig,
    data_id: &str,
    model: &Llama,
    optimizer: &mut AdamW,
    groups: &ProcessGroups,
) -> Result<Resumed, TrainError> {
    let (store, step) = match which {
        "latest" => (CheckpointStore::open(&job.checkpoint_dir())?, None),
        name if kiln_checkpoint::layout::parse_step_dir(name).is_some() => (
            CheckpointStore::open(&job.checkpoint_dir())?,
            kiln_checkpoint::layout::parse_step_dir(name),
        ),
        url => {
            let trimmed = url.trim_end_matches('/');
            match trimmed.rsplit_once('/') {
                Some((root, last)) if kiln_checkpoint::layout::parse_step_dir(last).is_some() => (
                    CheckpointStore::open(root)?,
                    kiln_checkpoint::layout::parse_step_dir(last),
                ),
                _ => (CheckpointStore::open(trimmed)?, None),
            }
        }
    };
    let candidates = match step {
        Some(n) => vec![store.manifest(n)?],
        None => store.committed()?,
    };
    let fresh = Resumed {
        step: 0,
        ledger_hash: 0,
        from: format!("nothing: no checkpoint under {} yet", store.url()),
        rejected: Vec::new(),
    };
    if candidates.is_empty() {
        return Ok(fresh);
    }
    let mut rejected = Vec::new();
    for m in &candidates {
        let outcome = compatible(job, config, data_id, m)
            .and_then(|()| checkpoint::load(&store, m, model, optimizer).map_err(TrainError::from));
        // The highest rank that failed, plus one; 0 when every rank loaded it.
        let failed = match &outcome {
            Ok(()) => 0,
            Err(_) => groups.rank as i64 + 1,
        };
        let flag = Tensor::from_slice(&[failed]);
        groups.world.all_reduce(&flag, ReduceOp::Max)?;
        let worst = flag.int64_value(&[0]);
        let name = store.display(m.step, "");
        if worst == 0 {
            let state = &m.train_state;
            optimizer.step = state["optimizer_step"].as_i64().unwrap_or(0);
            return Ok(Resumed {
                step: state["steps"].as_i64().unwrap_or(m.step as i64),
                ledger_hash: state["ledger"]["hash"].as_u64().unwrap_or(0),
                from: name,
                rejected,
            });
        }
        let why = match outcome {
            Err(e) => e.to_string(),
            Ok(()) => format!("rank {} could not load it (see its output)", worst - 1),
        };
        tracing::warn!("checkpoint {name} rejected: {why}");
        if step.is_some() {
            return Err(TrainError::Resume(why));
        }
        rejected.push(format!("{name}: {why}"));
    }
    Err(TrainError::Resume(format!(
        "no usable checkpoint under {}: {}",
        store.url(),
        rejected.join("; ")
    )))
}

/// Refuses a checkpoint of another model, data stream or batch.
fn compatible(
    job: &JobConfig,
    config: &LlamaConfig,
    data_id: &str,
    m: &Manifest,
) -> Result<(), TrainError> {
    let s = &m.train_state;
    let t = &job.train;
    let differ = |what: &str, theirs: String, ours: String| {
        Err(TrainError::Resume(format!(
            "checkpoint step-{} was written by a run with {what} {theirs}; this job has {ours}",
            m.step
        )))
    };
    if s["model"] != config.to_hf_json(None) {
        return differ(
            "another model shape:",
            s["model"].to_string(),
            config.to_hf_json(None).to_string(),
        );
    }
    if s["batch_size"].as_i64() != Some(t.batch_size) {
        return differ(
            "train.batch_size",
            s["batch_size"].to_string(),
            t.batch_size.to_string(),
        );
    }
    let c = &s["data_cursor"];
    if c["seq_len"].as_i64() != Some(t.seq_len) {
        return differ(
            "train.seq_len",
            c["seq_len"].to_string(),
            t.seq_len.to_string(),
        );
    }
    if c["seed"].as_u64() != Some(t.seed) {
        return differ("train.seed", c["seed"].to_string(), t.seed.to_string());
    }
    if c["shuffle_window"].as_u64() != Some(job.data.shuffle_window) {
        return differ(
            "data.shuffle_window",
            c["shuffle_window"].to_string(),
            job.data.shuffle_window.to_string(),
        );
    }
    if c["dataset"].as_str() != Some(data_id) {
        return differ("other data:", c["dataset"].to_string(), data_id.to_string());
    }
    if s["steps"].as_i64().unwrap_or(0) > t.steps {
        return differ(
            "more steps done:",
            s["steps"].to_string(),
            format!("train.steps = {}", t.steps),
        );
    }
    Ok(())
}

fn decay_policy(job: &JobConfig) -> DecayPolicy {
    DecayPolicy {
        embeddings: job.optimizer.decay_embeddings,
        norms: job.optimizer.decay_norms,
    }
}

fn manifest_meta(dataset: &TokenDataset) -> serde_json::Value {
    let m = dataset.manifest();
    json!({
        "tokenizer": m.tokenizer.kind,
        "tokenizer_sha256": m.tokenizer.sha256,
        "eos_id": m.eos_id,
        "dataset": dataset.url(),
    })
}

/// Writes the weights (fp32) and Kiln's sidecar with the tokenizer the model was trained with.
fn save_model(
    model: &Llama,
    dir: &Path,
    meta: &serde_json::Value,
    eos_id: u32,
) -> Result<(), TrainError> {
    let options = SaveOptions {
        eos_id: Some(eos_id),
        ..SaveOptions::default()
    };
    hf::save(model, dir, &options)?;
    let path = dir.join(KILN_META);
    let text = serde_json::to_string_pretty(meta).unwrap_or_default();
    std::fs::write(&path, text).map_err(|source| TrainError::Write { path, source })
}
