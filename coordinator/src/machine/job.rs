//! A job as the coordinator keeps it: its [`Phase`]s, what it needs of the worker pool
//! ([`JobSpec`]), and its log of phase changes and events.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Log entries kept per job.
const LOG_CAP: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pending,
    Rendezvous,
    Running,
    Checkpointing,
    Recovering,
    Completed,
    Failed,
    Stopped,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Rendezvous => "rendezvous",
            Phase::Running => "running",
            Phase::Checkpointing => "checkpointing",
            Phase::Recovering => "recovering",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Stopped => "stopped",
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Stopped)
    }

    /// Phases in which a generation's ranks are (or are being) started.
    pub(super) fn live(self) -> bool {
        matches!(
            self,
            Phase::Rendezvous | Phase::Running | Phase::Checkpointing
        )
    }
}

/// What a job needs of the worker pool, taken from its job file at submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    /// The job file as the workers receive it (paths resolved).
    pub toml: String,
    pub tp: u32,
    /// Hybrid sharding's group size (`parallel.shard`): the data-parallel size must be a
    /// multiple of it. 0: none.
    #[serde(default)]
    pub shard: u32,
    pub batch_size: u64,
    pub micro_batch_size: u64,
    pub steps: u64,
    /// 0 when the job writes no checkpoints (it can then neither recover nor re-form).
    pub checkpoint_every: u64,
    /// `checkpoint.memory_every`: the job's ranks also keep snapshots in workers' host
    /// memory (0: they do not).
    #[serde(default)]
    pub memory_every: u64,
    pub min_workers: u32,
    /// 0: no upper bound.
    pub max_workers: u32,
    /// Where the job writes (its output directory and its checkpoint location, lexically
    /// normalized): no two unfinished jobs may share one or have one inside the other.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Wait behind an unfinished job that writes where this one would, instead of being
    /// refused.
    #[serde(default)]
    pub queue: bool,
}

impl JobSpec {
    /// The first of this job's outputs that is, contains or lies inside one of `other`'s,
    /// with that one.
    pub fn shared_output<'a>(&'a self, other: &'a JobSpec) -> Option<(&'a str, &'a str)> {
        let inside = |a: &str, b: &str| {
            a == b
                || a.strip_prefix(b)
                    .is_some_and(|rest| rest.starts_with('/') || b.ends_with('/'))
        };
        self.outputs.iter().find_map(|mine| {
            other
                .outputs
                .iter()
                .find(|theirs| inside(mine, theirs) || inside(theirs, mine))
                .map(|theirs| (mine.as_str(), theirs.as_str()))
        })
    }

    /// Whether `world` workers can run this job: whole tensor-parallel groups, whole shard
    /// groups with hybrid sharding, and a batch that splits evenly over the data-parallel
    /// ranks' micro-batches.
    pub fn fits(&self, world: u32) -> bool {
        if world == 0 || !world.is_multiple_of(self.tp) {
            return false;
        }
        if self.shard > 0 && !(world / self.tp).is_multiple_of(self.shard) {
            return false;
        }
        let dp = u64::from(world / self.tp);
        self.batch_size.is_multiple_of(dp * self.micro_batch_size)
    }

    /// The largest world of at most `available` and `desired` workers (and within
    /// min/max) that [`fits`](Self::fits), if any.
    pub fn plan_world(&self, available: usize, desired: u32) -> Option<u32> {
        let mut cap = desired.min(available.min(u32::MAX as usize) as u32);
        if self.max_workers > 0 {
            cap = cap.min(self.max_workers);
        }
        (self.min_workers.max(1)..=cap)
            .rev()
            .find(|&w| self.fits(w))
    }

    /// Why `workers` cannot be asked for, if it cannot.
    pub fn check_workers(&self, workers: u32) -> Result<(), String> {
        if workers == 0 {
            return Err("the worker count must be at least 1".into());
        }
        if workers < self.min_workers {
            return Err(format!(
                "{workers} workers is below the job's minimum of {}",
                self.min_workers
            ));
        }
        if self.max_workers > 0 && workers > self.max_workers {
            return Err(format!(
                "{workers} workers is above the job's maximum of {}",
                self.max_workers
            ));
        }
        if !self.fits(workers) {
            let shard = if self.shard > 0 {
                format!(", a multiple of parallel.shard = {}", self.shard)
            } else {
                String::new()
            };
            return Err(format!(
                "{workers} workers cannot run this job: it needs a multiple of parallel.tp = {} whose data-parallel size{shard} divides train.batch_size = {} in micro-batches of {}",
                self.tp, self.batch_size, self.micro_batch_size
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    pub unix_s: f64,
    pub message: String,
    pub phase: Phase,
}

/// A job, as persisted: everything here survives a coordinator restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub phase: Phase,
    pub desired: u32,
    pub generation: u64,
    /// The current generation's workers, in rank order, and their ring addresses.
    pub ranks: Vec<String>,
    pub peers: Vec<String>,
    /// The newest checkpoint step the coordinator decided to commit (phase two sent to
    /// rank 0), and the newest rank 0 reported committed.
    pub commit_step: u64,
    pub committed_step: u64,
    /// Failures since the last checkpoint committed; and in all.
    pub failures_in_row: u32,
    pub restarts: u32,
    pub message: String,
    /// Workers this job no longer picks (evicted stragglers).
    #[serde(default)]
    pub excluded: BTreeSet<String>,
    pub log: Vec<LogEntry>,
    pub next_seq: u64,
    /// When it finished (completed, failed or was stopped); 0 while it has not.
    #[serde(default)]
    pub finished_unix_s: f64,
    /// The unfinished jobs that wrote where this one writes when it was submitted (queued):
    /// its first generation waits until each has ended.
    #[serde(default)]
    pub waits_for: BTreeSet<String>,
    /// Names this job in its checkpoint directory's claim (`owner.json`), for its ranks and
    /// for other coordinators: unique to this submission. Empty in records written before it
    /// was kept: see [`Job::run`].
    #[serde(default)]
    pub run: String,
    /// With snapshots in memory: for each rank, the workers that were sent its snapshots in
    /// the generations before this one, newest first (at most [`HOLDERS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Vec<String>>,
    /// With snapshots in memory: the furthest step rank 0 has reported.
    #[serde(default)]
    pub best_step: u64,
}

/// How many holders of a rank's snapshots a job remembers: the two of this generation and
/// the two of each of the two before (in case the last failed before its first snapshot).
pub const HOLDERS: usize = 6;

/// Where rank `rank` of a generation of `world` ranks on `workers` sends its snapshots: its
/// own worker, and the next rank's worker on another host (`hosts` gives each worker's), or
/// the next rank's when every rank is on one host.
pub fn memory_peers(rank: usize, workers: &[String], hosts: &[&str]) -> Vec<String> {
    let world = workers.len();
    let mut to = vec![workers[rank].clone()];
    let other = (1..world)
        .map(|d| (rank + d) % world)
        .find(|&r| hosts[r] != hosts[rank])
        .or((world > 1).then_some((rank + 1) % world));
    if let Some(r) = other {
        if workers[r] != workers[rank] {
            to.push(workers[r].clone());
        }
    }
    to
}

impl Job {
    /// What this job's ranks name their run in the checkpoint directory's claim.
    pub fn run(&self) -> String {
        if self.run.is_empty() {
            format!("job {}", self.id)
        } else {
            self.run.clone()
        }
    }
}

pub(super) fn set_phase(job: &mut Job, now: f64, phase: Phase, message: String) {
    job.phase = phase;
    if phase.finished() {
        job.finished_unix_s = now;
    }
    log(job, now, phase, message.clone());
    job.message = message;
}

/// What a job waits for, after the reason it is waiting (its last phase change).
pub(super) fn set_message(job: &mut Job, waiting: String) {
    job.message = match job.log.last() {
        Some(last) => format!("{} ({waiting})", last.message),
        None => waiting,
    };
}

pub(super) fn log(job: &mut Job, now: f64, phase: Phase, message: String) {
    job.log.push(LogEntry {
        seq: job.next_seq,
        unix_s: now,
        message,
        phase,
    });
    job.next_seq += 1;
    if job.log.len() > LOG_CAP {
        let extra = job.log.len() - LOG_CAP;
        job.log.drain(..extra);
    }
}

pub(super) fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() {
        "job".into()
    } else {
        s
    }
}
