//! Where a run's record goes: the metrics log (`metrics.jsonl`, one [`Event`] per line) and
//! the sample ledger (`ledger.jsonl`) in `output.dir`, both written by rank 0 only; the copy
//! of the metrics log in the checkpoint store ([`LogUpload`]); and the caller's event callback,
//! which every rank reports to.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use kiln_checkpoint::{CheckpointError, CheckpointStore};
use kiln_proto::job::JobConfig;
use kiln_shard_loader::order::LedgerEntry;

use super::{Event, TrainError, METRICS_LOG};
use crate::checkpoint;

/// The sample ledger's name, in `output.dir`.
const LEDGER: &str = "ledger.jsonl";

/// Opens the log `name` in `output.dir`. Only the leader writes; the other ranks' logs go
/// nowhere. A resumed run keeps the lines whose `step` passes `keep` (and those without one)
/// and continues the log.
fn sink(
    job: &JobConfig,
    leader: bool,
    resumed: bool,
    name: &str,
    keep: &dyn Fn(i64) -> bool,
) -> Result<(PathBuf, Box<dyn Write>), TrainError> {
    let path = job.output.dir.join(name);
    if !leader {
        return Ok((path, Box::new(std::io::sink())));
    }
    let write_err = |source| TrainError::Write {
        path: path.clone(),
        source,
    };
    let kept = match (resumed, std::fs::read_to_string(&path)) {
        (true, Ok(text)) => text
            .lines()
            .filter(|l| {
                // Both logs name their steps `step`; the ledger's lines are not events.
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
}

/// Creates `output.dir` on the leader.
pub(super) fn create_output_dir(job: &JobConfig, leader: bool) -> Result<(), TrainError> {
    if leader {
        std::fs::create_dir_all(&job.output.dir).map_err(|source| TrainError::Write {
            path: job.output.dir.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The metrics log and the event callback: every event goes to both (the log on the leader
/// only), and the leader's log is copied to the store now and then.
pub(super) struct Emitter<'a> {
    leader: bool,
    path: PathBuf,
    metrics: Box<dyn Write>,
    run_log: Option<LogUpload>,
    on_event: &'a mut dyn FnMut(&Event),
}

impl<'a> Emitter<'a> {
    /// Opens the metrics log; a resumed run keeps it up to its checkpoint's `start_step`.
    /// `store`: where the leader copies the log (the checkpoint store).
    pub fn open(
        job: &JobConfig,
        leader: bool,
        resumed: bool,
        start_step: i64,
        store: impl FnOnce() -> Result<CheckpointStore, CheckpointError>,
        on_event: &'a mut dyn FnMut(&Event),
    ) -> Result<Emitter<'a>, TrainError> {
        // Metrics name the steps done (1-based).
        let (path, metrics) = sink(job, leader, resumed, METRICS_LOG, &|s| s <= start_step)?;
        Ok(Emitter {
            leader,
            run_log: leader.then(|| LogUpload::new(store(), path.clone())),
            path,
            metrics,
            on_event,
        })
    }

    /// Logs `event` (on the leader) and reports it.
    pub fn emit(&mut self, event: Event) -> Result<(), TrainError> {
        if self.leader {
            let line = event.to_line();
            writeln!(self.metrics, "{line}").map_err(|source| TrainError::Write {
                path: self.path.clone(),
                source,
            })?;
        }
        if let Some(log) = self.run_log.as_mut() {
            log.after(&event);
        }
        (self.on_event)(&event);
        Ok(())
    }

    /// Reports a save that finished, with the time training was held for it.
    pub fn checkpoint(&mut self, done: checkpoint::Saved, pause_s: f64) -> Result<(), TrainError> {
        self.emit(Event::Checkpoint {
            step: done.step as i64,
            url: done.committed.unwrap_or_default(),
            pause_s,
            save_s: done.upload_s,
            bytes: done.bytes,
            deleted: done.deleted,
        })
    }
}

/// The sample ledger: which samples each step read (rank 0 writes it).
pub(super) struct Ledger {
    path: PathBuf,
    out: Box<dyn Write>,
}

impl Ledger {
    /// Opens the ledger; a resumed run keeps it up to its checkpoint's `start_step`.
    pub fn open(
        job: &JobConfig,
        leader: bool,
        resumed: bool,
        start_step: i64,
    ) -> Result<Ledger, TrainError> {
        // The ledger names the step index (0-based).
        let (path, out) = sink(job, leader, resumed, LEDGER, &|s| s < start_step)?;
        Ok(Ledger { path, out })
    }

    pub fn append(&mut self, entry: &LedgerEntry) -> Result<(), TrainError> {
        let line = serde_json::to_string(entry).unwrap_or_default();
        writeln!(self.out, "{line}").map_err(|source| TrainError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Copies the local metrics log to the checkpoint store, so that the run's record does not
/// depend on the machine that ran rank 0 (nor on a telemetry collector): at most every 30 s
/// on a step, at every checkpoint, and at the end. A store that refuses is reported once;
/// training goes on.
struct LogUpload {
    store: Option<CheckpointStore>,
    local: PathBuf,
    last: Option<Instant>,
    warned: bool,
}

impl LogUpload {
    fn new(store: Result<CheckpointStore, CheckpointError>, local: PathBuf) -> LogUpload {
        let store = store
            .map_err(|e| tracing::warn!("the metrics log stays local only: {e}"))
            .ok();
        LogUpload {
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
