//! The step loop: each step reads its micro-batches, records them in the ledger, runs
//! forward, backward and the optimizer, and then, when due, reports the log window, saves a
//! checkpoint and evaluates. After the last step the final weights are written.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_proto::job::JobConfig;
use kiln_proto::run::{DataCursor, LedgerMark, TrainState};
use kiln_shard_loader::order::LedgerEntry;
use tch::Tensor;

use super::log::{Emitter, Ledger};
use super::setup::{manifest_meta, Setup};
use super::{Event, Phases, Summary, TrainError, KILN_META};
use crate::checkpoint::Saver;
use crate::collective::ReduceOp;
use crate::device;
use crate::eval::evaluate;
use crate::hf::{self, SaveOptions};
use crate::memory::MemoryTier;
use crate::optim::LrSchedule;
use crate::parallel::train_step;

/// The steps since the last report.
struct Window {
    start: Instant,
    tokens: usize,
    collective_wait: f64,
    phases: Phases,
}

impl Window {
    fn new() -> Window {
        Window {
            start: Instant::now(),
            tokens: 0,
            collective_wait: 0.0,
            phases: Phases::default(),
        }
    }
}

/// A run in progress: its setup, where its record goes, and what it has measured so far.
pub(super) struct Trainer<'a> {
    pub job: &'a JobConfig,
    pub run: Setup,
    pub saver: Option<Saver>,
    /// Snapshots in workers' memory (`checkpoint.memory_every`).
    pub memory: Option<MemoryTier>,
    pub log: Emitter<'a>,
    pub ledger: Ledger,
    /// The wrapping sum of the ledger's step hashes.
    pub ledger_hash: u64,
    pub schedule: LrSchedule,
    pub flops_per_token: f64,
    pub peak_flops: f64,
    pub summary: Summary,
    window: Window,
    /// Training held by checkpoints since the last checkpoint event.
    pause_s: f64,
}

impl<'a> Trainer<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        job: &'a JobConfig,
        run: Setup,
        (saver, memory): (Option<Saver>, Option<MemoryTier>),
        log: Emitter<'a>,
        ledger: Ledger,
        ledger_hash: u64,
        schedule: LrSchedule,
        flops_per_token: f64,
        peak_flops: f64,
    ) -> Trainer<'a> {
        Trainer {
            job,
            run,
            saver,
            memory,
            log,
            ledger,
            ledger_hash,
            schedule,
            flops_per_token,
            peak_flops,
            summary: Summary::default(),
            window: Window::new(),
            pause_s: 0.0,
        }
    }

    fn micro(&self) -> usize {
        self.job.micro_batch_size() as usize
    }

    /// Where the data stream stands after `steps` steps.
    fn cursor(&self, steps: i64) -> DataCursor {
        let t = &self.job.train;
        DataCursor {
            next_sample: (steps * t.batch_size) as u64,
            seed: t.seed,
            seq_len: t.seq_len as u64,
            shuffle_window: self.job.data.shuffle_window,
            dataset: self.run.data_id.clone(),
        }
    }

    /// Runs step `step` (0-based) and what is due after it.
    pub fn step(&mut self, step: i64) -> Result<(), TrainError> {
        let _step_span = tracing::info_span!("step", kiln.step = step + 1).entered();
        let job = self.job;
        let t = &job.train;
        let lr = self.schedule.at(step);
        let (batches, hash, data_s) = self.read_batches(step)?;
        self.record_in_ledger(step, hash)?;
        let (saver, memory, pause_s) = (&mut self.saver, &mut self.memory, &mut self.pause_s);
        let stats = train_step(
            &self.run.model,
            &mut self.run.optimizer,
            &mut self.run.sync,
            &batches,
            lr,
            job.optimizer.grad_clip,
            self.run.bf16,
            &mut || {
                if let Some(s) = saver.as_mut() {
                    *pause_s += s.fence();
                }
                if let Some(m) = memory.as_mut() {
                    *pause_s += m.fence();
                }
            },
        )?;
        let (loss_sum, grad_norm) = (stats.loss, stats.grad_norm);
        self.window.collective_wait += stats.collective_wait_s;
        self.window.phases.add(&Phases {
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
        self.summary.losses.push(loss_sum);
        self.window.tokens += (t.batch_size * t.seq_len) as usize;

        let last = step + 1 == t.steps;
        if (step + 1) % t.log_every == 0 || last {
            self.report_window(step, loss_sum, lr, grad_norm)?;
        }
        self.checkpoint(step, last)?;
        let due = t.eval_every > 0 && ((step + 1) % t.eval_every == 0 || last);
        if due {
            self.evaluate(step)?;
        }
        Ok(())
    }

    /// Reads this rank's micro-batches of step `step` onto the device: the batches, the
    /// wrapping sum of their sample hashes, and the seconds it took.
    fn read_batches(&mut self, step: i64) -> Result<StepBatches, TrainError> {
        let job = self.job;
        let t = &job.train;
        let (micro, dp, dp_rank) = (self.micro(), self.run.dims.dp, self.run.dp_rank);
        let mut batches = Vec::with_capacity(self.run.accum as usize);
        let mut hash = 0u64;
        let _data_span = tracing::info_span!("data").entered();
        let data_start = Instant::now();
        for m in 0..self.run.accum {
            // Micro-batch m of every data-parallel rank together covers dp * micro consecutive
            // samples: the same samples, in the same order, whatever dp is.
            let first = (step * t.batch_size) as u64
                + (m as u64 * dp as u64 + dp_rank as u64) * micro as u64;
            let batch = self.run.train_data.batch(first, micro)?;
            hash = hash.wrapping_add(batch.hash);
            let shape = [micro as i64, t.seq_len];
            let inputs = Tensor::from_slice(&batch.inputs)
                .view(shape)
                .to_device(self.run.device);
            let targets = Tensor::from_slice(&batch.targets)
                .view(shape)
                .to_device(self.run.device);
            batches.push((inputs, targets));
        }
        Ok((batches, hash, data_start.elapsed().as_secs_f64()))
    }

    /// Adds step `step` to the ledger. The step's hash is the wrapping sum over all its
    /// samples, whichever rank read them.
    fn record_in_ledger(&mut self, step: i64, hash: u64) -> Result<(), TrainError> {
        let job = self.job;
        let t = &job.train;
        let hash_sum = Tensor::from_slice(&[hash as i64]).to_device(self.run.device);
        self.run.groups.dp.all_reduce(&hash_sum, ReduceOp::Sum)?;
        let entry = LedgerEntry {
            step: step as u64,
            first_sample: (step * t.batch_size) as u64,
            samples: t.batch_size as u64,
            hash: hash_sum.int64_value(&[0]) as u64,
        };
        self.ledger_hash = self.ledger_hash.wrapping_add(entry.hash);
        self.ledger.append(&entry)
    }

    /// Reports the window that ends with step `step`, and starts the next.
    fn report_window(
        &mut self,
        step: i64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
    ) -> Result<(), TrainError> {
        let job = self.job;
        let t = &job.train;
        device::sync(self.run.device);
        let w = std::mem::replace(&mut self.window, Window::new());
        let elapsed = w.start.elapsed().as_secs_f64();
        let wait = self.run.train_data.take_wait().as_secs_f64();
        self.summary.train_s += elapsed;
        self.summary.data_wait_s += wait;
        let tokens_per_s = w.tokens as f64 / elapsed;
        let steps_in_window = w.tokens / (t.batch_size * t.seq_len) as usize;
        let world = self.run.world as f64;
        let event = Event::Step {
            step: step + 1,
            steps: t.steps,
            loss,
            lr,
            grad_norm,
            tokens_per_s,
            // Global tokens over every rank's device.
            mfu: tokens_per_s * self.flops_per_token / (self.peak_flops * world),
            step_s: elapsed / steps_in_window.max(1) as f64,
            data_wait: wait / elapsed,
            collective_wait: w.collective_wait / elapsed,
            phases: w.phases.scaled(1.0 / steps_in_window.max(1) as f64),
            window_steps: steps_in_window as i64,
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        };
        let emitted = self.log.emit(event);
        // The next window starts once this one is reported.
        self.window.start = Instant::now();
        emitted
    }

    /// Reports a save that finished meanwhile, and saves after step `step` when one is due;
    /// snapshots into workers' memory when one is due.
    fn checkpoint(&mut self, step: i64, last: bool) -> Result<(), TrainError> {
        self.snapshot(step, last)?;
        let Some(s) = self.saver.as_mut() else {
            return Ok(());
        };
        if let Some(done) = s.poll()? {
            let pause_s = std::mem::take(&mut self.pause_s);
            self.log.checkpoint(done, pause_s)?;
        }
        if !((step + 1) % self.job.checkpoint.every == 0 || last) {
            return Ok(());
        }
        let state = self.state(step + 1);
        let run = &self.run;
        let Some(s) = self.saver.as_mut() else {
            return Ok(());
        };
        let (previous, held) = tracing::info_span!("checkpoint.snapshot", kiln.step = step + 1)
            .in_scope(|| s.save((step + 1) as u64, &run.model, &run.optimizer, state))?;
        if let Some(done) = previous {
            let pause_s = std::mem::take(&mut self.pause_s);
            self.log.checkpoint(done, pause_s)?;
        }
        self.held_by_checkpoint(held);
        Ok(())
    }

    /// Copies the state after step `step` into a snapshot for workers' memory when one is due
    /// (not after the last step: the final checkpoint goes to the store).
    fn snapshot(&mut self, step: i64, last: bool) -> Result<(), TrainError> {
        if last || !self.memory.as_ref().is_some_and(|m| m.due(step + 1)) {
            return Ok(());
        }
        let state = self.state(step + 1);
        let run = &self.run;
        let Some(m) = self.memory.as_mut() else {
            return Ok(());
        };
        let held = tracing::info_span!("checkpoint.memory", kiln.step = step + 1)
            .in_scope(|| m.snapshot(step + 1, &run.model, &run.optimizer, state))
            .map_err(TrainError::Snapshot)?;
        self.held_by_checkpoint(held);
        Ok(())
    }

    /// Counts `held` seconds training waited for a save or a snapshot: in the step's phases
    /// and the next checkpoint event's pause, and not against training throughput.
    fn held_by_checkpoint(&mut self, held: f64) {
        self.window.phases.checkpoint += held;
        self.pause_s += held;
        self.window.start += Duration::from_secs_f64(held);
    }

    /// The training state a checkpoint after `steps` steps records, as its manifest holds it.
    fn state(&self, steps: i64) -> serde_json::Value {
        let run = &self.run;
        TrainState {
            steps: Some(steps),
            optimizer_step: run.optimizer.step,
            lr_next: self.schedule.at(steps),
            data_cursor: Some(self.cursor(steps)),
            ledger: LedgerMark {
                steps,
                hash: self.ledger_hash,
            },
            model: run.config.to_hf_json(None),
            batch_size: Some(self.job.train.batch_size),
            meta: manifest_meta(run.dataset()),
            eos_id: Some(run.manifest.eos_id),
            job: serde_json::to_value(self.job).unwrap_or_default(),
        }
        .to_value()
    }

    /// Measures the validation loss after step `step`, when the run has validation data.
    fn evaluate(&mut self, step: i64) -> Result<(), TrainError> {
        let (micro, bf16) = (self.micro(), self.run.bf16);
        let eval_sequences = (self.job.train.eval_batches as usize) * micro;
        let Some(val) = self.run.val_data.as_mut() else {
            return Ok(());
        };
        let eval_start = Instant::now();
        let _eval_span = tracing::info_span!("evaluate", kiln.step = step + 1).entered();
        let r = evaluate(&self.run.model, val, micro, Some(eval_sequences), bf16)?;
        self.summary.val_losses.push((step + 1, r.loss));
        self.log.emit(Event::Eval {
            step: step + 1,
            val_loss: r.loss,
            tokens: r.tokens,
        })?;
        // Evaluation time does not count against training throughput.
        self.window.start += eval_start.elapsed();
        // A save that finished meanwhile is reported now, not a step later.
        if let Some(s) = self.saver.as_mut() {
            if let Some(done) = s.poll()? {
                let pause_s = std::mem::take(&mut self.pause_s);
                self.log.checkpoint(done, pause_s)?;
            }
        }
        Ok(())
    }

    /// After the last step: waits for the last save and writes the final weights (gathered
    /// from the tensor-parallel ranks) with Kiln's sidecar.
    pub fn finish(mut self) -> Result<Summary, TrainError> {
        if let Some(s) = self.saver.as_mut() {
            if let Some(done) = s.wait()? {
                let pause_s = std::mem::take(&mut self.pause_s);
                self.log.checkpoint(done, pause_s)?;
            }
        }
        let run = &self.run;
        let cursor = self.cursor(self.job.train.steps);
        let model_dir = self.job.output.dir.join("model");
        let mut meta = manifest_meta(run.dataset());
        meta["data_cursor"] = serde_json::to_value(&cursor).unwrap_or_default();
        let eos_id = run.manifest.eos_id;
        let params = &run.model.params;
        let options = SaveOptions {
            eos_id: Some(eos_id),
            ..SaveOptions::default()
        };
        if run.groups.tp.size() > 1 || params.sharding().is_some() {
            // Every rank gathers (collectives need all members): fully sharded, a segment at a
            // time from the data-parallel group, then a parameter at a time from the
            // tensor-parallel group. The leader alone writes each whole parameter as it
            // comes, holding one at a time.
            let mut out = match run.leader {
                true => {
                    let tensors: Vec<(String, Vec<u64>)> = params
                        .entries()
                        .iter()
                        .map(|e| {
                            let shape = e.spec.full_shape().iter().map(|&d| d as u64).collect();
                            (e.spec.name.clone(), shape)
                        })
                        .collect();
                    Some(hf::HfWriter::create(
                        &model_dir,
                        &run.config,
                        &options,
                        &tensors,
                    )?)
                }
                false => None,
            };
            // Parameters are laid out in segment order, so this is the order declared.
            for s in 0..params.segments().len() {
                params.gather(s)?;
                for (i, e) in params.entries().iter().enumerate() {
                    if e.spec.segment != s {
                        continue;
                    }
                    let full = run.model.full_param(i)?;
                    if let Some(out) = out.as_mut() {
                        out.write_tensor(&full)?;
                    }
                }
                params.release(s);
            }
            if let Some(out) = out {
                out.finish()?;
                write_meta(&model_dir, &meta)?;
            }
        } else if run.leader {
            hf::save(&run.model, &model_dir, &options)?;
            write_meta(&model_dir, &meta)?;
        }
        run.groups.world.barrier()?;
        self.summary.cursor = Some(cursor);
        self.log.emit(Event::Saved {
            path: model_dir.clone(),
        })?;
        self.summary.model_dir = model_dir;
        Ok(self.summary)
    }
}

/// A step's micro-batches (inputs, targets), the wrapping sum of their sample hashes, and
/// the seconds reading them took.
type StepBatches = (Vec<(Tensor, Tensor)>, u64, f64);

/// Writes Kiln's sidecar next to the weights: the tokenizer the model was trained with.
fn write_meta(dir: &Path, meta: &serde_json::Value) -> Result<(), TrainError> {
    let path = dir.join(KILN_META);
    let text = serde_json::to_string_pretty(meta).unwrap_or_default();
    std::fs::write(&path, text).map_err(|source| TrainError::Write { path, source })
}
