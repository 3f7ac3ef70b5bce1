//! The coordinator's decisions, as pure functions of its state, what arrives, and the time
//! (`now`, seconds, passed in). Nothing here does IO: the service feeds requests in, writes
//! [`Machine::persisted`] to the state store when [`Machine::take_dirty`] says so, and
//! sends back what the functions return.
//!
//! A job moves through [`Phase`]s:
//!
//! ```text
//! pending --(enough workers)--> rendezvous --(every rank running)--> running
//! running --(every rank wrote step N's shard)--> checkpointing --(rank 0 committed N)--> running
//! running/checkpointing --(a rank failed or went silent)--> recovering --> rendezvous
//! running --(committed, and the worker count should change)--> rendezvous (re-formed)
//! running --(every rank succeeded)--> completed
//! any --(kiln stop)--> stopped;  recovering --(too many failures in a row)--> failed
//! ```
//!
//! Each rendezvous starts a new *generation*: the workers it picks get ranks, the job's
//! ring addresses and `resume = latest`, so a re-formed job continues from its newest
//! committed checkpoint at the new size.

use std::collections::{BTreeMap, BTreeSet};

use kiln_proto::control::{Assignment, Command, Reply, WorkerReport, WorkerState};
use serde::{Deserialize, Serialize};

/// How many failures in a row (without a new checkpoint committed between them) fail a job.
pub const DEFAULT_MAX_RESTARTS: u32 = 5;
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
    fn live(self) -> bool {
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
    pub batch_size: u64,
    pub micro_batch_size: u64,
    pub steps: u64,
    /// 0 when the job writes no checkpoints (it can then neither recover nor re-form).
    pub checkpoint_every: u64,
    pub min_workers: u32,
    /// 0: no upper bound.
    pub max_workers: u32,
}

impl JobSpec {
    /// Whether `world` workers can run this job: whole tensor-parallel groups, and a batch
    /// that splits evenly over the data-parallel ranks' micro-batches.
    pub fn fits(&self, world: u32) -> bool {
        if world == 0 || !world.is_multiple_of(self.tp) {
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
            return Err(format!(
                "{workers} workers cannot run this job: it needs a multiple of parallel.tp = {} whose data-parallel size divides train.batch_size = {} in micro-batches of {}",
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
}

/// The ranks whose compute time per step is over `factor` times the median of all ranks
/// (and at least `min_gap_s` over it): the stragglers. Pure, for the tests and the bench.
pub fn stragglers(compute_s: &[(u32, f64)], factor: f64, min_gap_s: f64) -> Vec<u32> {
    if compute_s.len() < 2 {
        return Vec::new();
    }
    let mut times: Vec<f64> = compute_s.iter().map(|(_, t)| *t).collect();
    times.sort_by(f64::total_cmp);
    // The lower median: with two ranks, the faster one is the reference.
    let median = times[(times.len() - 1) / 2];
    compute_s
        .iter()
        .filter(|(_, t)| *t > median * factor && *t - median >= min_gap_s)
        .map(|(r, _)| *r)
        .collect()
}

/// A registered worker. Not persisted: after a restart, workers register again.
#[derive(Debug, Clone)]
pub struct Worker {
    pub id: String,
    pub host: String,
    pub report: WorkerReport,
    pub last_seen: f64,
    /// A stand-in made at restart for a worker the persisted state names; it has not
    /// registered again yet.
    pub placeholder: bool,
    /// Since when this worker has been flagged a straggler (while running).
    pub straggling_since: Option<f64>,
    /// Whether the job's log says so (after [`Policy::straggler_grace_s`]).
    pub straggler_reported: bool,
}

impl Worker {
    fn available(&self) -> bool {
        !self.placeholder && self.report.state != WorkerState::Running
    }

    /// Whether `job` could give it a rank now: not running, offering a ring address, not
    /// held by another live job (`busy`), and not evicted from this one.
    fn free_for(&self, job: &Job, busy: &BTreeSet<String>) -> bool {
        self.available()
            && self.report.ready_addr.is_some()
            && !busy.contains(&self.id)
            && !job.excluded.contains(&self.id)
    }
}

/// Tunables of the decisions.
#[derive(Debug, Clone)]
pub struct Policy {
    /// A worker not heard from for this long is gone.
    pub heartbeat_timeout_s: f64,
    pub max_restarts: u32,
    /// Straggler: compute time over `straggler_factor` x the median.
    pub straggler_factor: f64,
    /// How long a rank must straggle before it is reported.
    pub straggler_grace_s: f64,
    /// Evict a worker that straggles for this long (and re-form without it); `None`:
    /// report only.
    pub evict_stragglers_after_s: Option<f64>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            heartbeat_timeout_s: 10.0,
            max_restarts: DEFAULT_MAX_RESTARTS,
            straggler_factor: 1.5,
            straggler_grace_s: 10.0,
            evict_stragglers_after_s: None,
        }
    }
}

/// Refusals of client or worker requests, mapped to gRPC codes by the service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no job {0:?}")]
    UnknownJob(String),
    #[error("unknown worker {0:?}: register again")]
    UnknownWorker(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Finished(String),
}

/// Everything the coordinator knows.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub policy: Policy,
    pub jobs: BTreeMap<String, Job>,
    pub workers: BTreeMap<String, Worker>,
    pub next_job: u64,
    /// Distinguishes this coordinator's worker ids from an earlier one's.
    pub epoch: String,
    next_worker: u64,
    dirty: bool,
}

/// What the state store holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub next_job: u64,
    pub jobs: Vec<Job>,
}

impl Machine {
    pub fn new(policy: Policy, epoch: String) -> Self {
        Machine {
            policy,
            epoch,
            ..Machine::default()
        }
    }

    /// A coordinator restarted on persisted state. Workers the live jobs name get
    /// placeholders (as if just heard from, running what they were given), so that
    /// they are given a heartbeat timeout to come back before their job recovers.
    pub fn restore(policy: Policy, epoch: String, state: Persisted, now: f64) -> Self {
        let mut m = Machine::new(policy, epoch);
        m.next_job = state.next_job;
        for mut job in state.jobs {
            if job.phase.live() {
                for (rank, id) in job.ranks.iter().enumerate() {
                    m.workers.insert(
                        id.clone(),
                        Worker {
                            id: id.clone(),
                            host: String::new(),
                            report: WorkerReport {
                                state: WorkerState::Running,
                                job_id: job.id.clone(),
                                generation: job.generation,
                                rank: rank as u32,
                                ..WorkerReport::default()
                            },
                            last_seen: now,
                            placeholder: true,
                            straggling_since: None,
                            straggler_reported: false,
                        },
                    );
                }
            }
            let phase = job.phase;
            log(
                &mut job,
                now,
                phase,
                "coordinator restarted; waiting for the workers to report".into(),
            );
            m.jobs.insert(job.id.clone(), job);
        }
        m
    }

    pub fn persisted(&self) -> Persisted {
        Persisted {
            next_job: self.next_job,
            jobs: self.jobs.values().cloned().collect(),
        }
    }

    /// Whether persisted state changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub fn submit(&mut self, spec: JobSpec, workers: u32, now: f64) -> Result<String, Refusal> {
        if spec.tp == 0 || spec.micro_batch_size == 0 {
            return Err(Refusal::Invalid(
                "parallel.tp and the micro-batch must be at least 1".into(),
            ));
        }
        if spec.max_workers > 0 && spec.min_workers > spec.max_workers {
            return Err(Refusal::Invalid(format!(
                "min_workers {} is above max_workers {}",
                spec.min_workers, spec.max_workers
            )));
        }
        spec.check_workers(workers).map_err(Refusal::Invalid)?;
        self.next_job += 1;
        let id = format!("{}-{}", sanitize(&spec.name), self.next_job);
        let mut job = Job {
            id: id.clone(),
            spec,
            phase: Phase::Pending,
            desired: workers,
            generation: 0,
            ranks: Vec::new(),
            peers: Vec::new(),
            commit_step: 0,
            committed_step: 0,
            failures_in_row: 0,
            restarts: 0,
            message: String::new(),
            excluded: BTreeSet::new(),
            log: Vec::new(),
            next_seq: 0,
        };
        log(
            &mut job,
            now,
            Phase::Pending,
            format!("submitted for {workers} workers"),
        );
        self.jobs.insert(id.clone(), job);
        self.dirty = true;
        self.decide(now);
        Ok(id)
    }

    pub fn scale(&mut self, job_id: &str, workers: u32, now: f64) -> Result<String, Refusal> {
        let job = self.job_mut(job_id)?;
        if job.phase.finished() {
            return Err(Refusal::Finished(format!(
                "job {job_id} is {}",
                job.phase.name()
            )));
        }
        job.spec.check_workers(workers).map_err(Refusal::Invalid)?;
        if job.spec.checkpoint_every == 0 && job.generation > 0 {
            return Err(Refusal::Invalid(format!(
                "job {job_id} writes no checkpoints (checkpoint.every = 0), so it cannot change size while it runs"
            )));
        }
        let before = job.desired;
        job.desired = workers;
        let message = if job.generation == 0 {
            format!("workers {before} -> {workers}")
        } else {
            format!("workers {before} -> {workers}, at the next checkpoint")
        };
        let phase = job.phase;
        log(job, now, phase, message.clone());
        self.dirty = true;
        self.decide(now);
        Ok(message)
    }

    pub fn stop(&mut self, job_id: &str, now: f64) -> Result<String, Refusal> {
        let job = self.job_mut(job_id)?;
        if job.phase.finished() {
            return Err(Refusal::Finished(format!(
                "job {job_id} is already {}",
                job.phase.name()
            )));
        }
        set_phase(job, now, Phase::Stopped, "stopped by the user".into());
        self.dirty = true;
        Ok(format!("job {job_id} stopped"))
    }

    /// A worker registers (again). With `previous_id` it keeps its id when that id is
    /// free or only a placeholder, so a running generation is picked up where it is.
    pub fn register(
        &mut self,
        host: String,
        previous_id: &str,
        report: WorkerReport,
        now: f64,
    ) -> String {
        let reuse = !previous_id.is_empty()
            && self
                .workers
                .get(previous_id)
                .is_none_or(|w| w.placeholder || w.host == host);
        let id = if reuse {
            previous_id.to_owned()
        } else {
            self.next_worker += 1;
            format!("w{}-{}", self.epoch, self.next_worker)
        };
        self.workers.insert(
            id.clone(),
            Worker {
                id: id.clone(),
                host,
                report,
                last_seen: now,
                placeholder: false,
                straggling_since: None,
                straggler_reported: false,
            },
        );
        self.decide(now);
        id
    }

    /// A worker's heartbeat: record what it says, decide, and tell it what to do.
    pub fn heartbeat(
        &mut self,
        worker_id: &str,
        report: WorkerReport,
        now: f64,
    ) -> Result<Reply, Refusal> {
        let w = self
            .workers
            .get_mut(worker_id)
            .filter(|w| !w.placeholder)
            .ok_or_else(|| Refusal::UnknownWorker(worker_id.to_owned()))?;
        // Only a change of what it runs, of its checkpoint progress or of its address can
        // move a job: a heartbeat that only updates its step costs O(1). (Stragglers and
        // timeouts are looked at on every tick.)
        let r = &w.report;
        let moves = r.state != report.state
            || r.job_id != report.job_id
            || r.generation != report.generation
            || r.checkpoint_written != report.checkpoint_written
            || r.checkpoint_committed != report.checkpoint_committed
            || r.ready_addr != report.ready_addr;
        w.report = report;
        w.last_seen = now;
        if moves {
            self.decide(now);
        }
        Ok(self.command_for(worker_id))
    }

    /// Forgets workers not heard from within the timeout, and decides.
    pub fn tick(&mut self, now: f64) {
        let timeout = self.policy.heartbeat_timeout_s;
        let gone: Vec<String> = self
            .workers
            .values()
            .filter(|w| now - w.last_seen > timeout)
            .map(|w| w.id.clone())
            .collect();
        for id in gone {
            let w = self.workers.remove(&id).expect("listed above");
            for job in self.jobs.values_mut() {
                if job.phase.live() && job.ranks.contains(&id) {
                    let rank = job.ranks.iter().position(|r| *r == id).unwrap_or(0);
                    let what = if w.placeholder {
                        "did not come back after the coordinator restarted"
                    } else {
                        "stopped sending heartbeats"
                    };
                    fail_generation(
                        job,
                        self.policy.max_restarts,
                        now,
                        format!("worker {id} (rank {rank}) {what} ({timeout:.0} s)"),
                    );
                    self.dirty = true;
                }
            }
        }
        self.decide(now);
    }

    fn job_mut(&mut self, job_id: &str) -> Result<&mut Job, Refusal> {
        self.jobs
            .get_mut(job_id)
            .ok_or_else(|| Refusal::UnknownJob(job_id.to_owned()))
    }

    /// What `worker_id` should do now.
    pub fn command_for(&self, worker_id: &str) -> Reply {
        let Some(w) = self.workers.get(worker_id) else {
            return Reply {
                command: Command::Wait,
                commit_step: 0,
            };
        };
        let r = &w.report;
        // Running something that is no longer wanted: abort it.
        if r.state == WorkerState::Running {
            let wanted = self.jobs.get(&r.job_id).is_some_and(|j| {
                j.phase.live()
                    && j.generation == r.generation
                    && j.ranks.get(r.rank as usize) == Some(&w.id)
            });
            if !wanted {
                let why = match self.jobs.get(&r.job_id) {
                    Some(j) if j.phase.finished() => format!("job {} is {}", j.id, j.phase.name()),
                    Some(j) if j.generation != r.generation => {
                        format!("job {} moved on to generation {}", j.id, j.generation)
                    }
                    Some(j) => format!("job {} is {}", j.id, j.phase.name()),
                    None => format!("no job {}", r.job_id),
                };
                return Reply {
                    command: Command::Abort(why),
                    commit_step: 0,
                };
            }
            let job = &self.jobs[&r.job_id];
            let commit_step = if r.rank == 0 && job.commit_step > r.checkpoint_committed {
                job.commit_step
            } else {
                0
            };
            return Reply {
                command: Command::Wait,
                commit_step,
            };
        }
        // Given a rank it has not started or finished yet: run it.
        for job in self.jobs.values() {
            if !job.phase.live() {
                continue;
            }
            if let Some(rank) = job.ranks.iter().position(|id| *id == w.id) {
                if r.finished(&job.id, job.generation).is_none() {
                    return Reply {
                        command: Command::Run(Assignment {
                            job_id: job.id.clone(),
                            generation: job.generation,
                            rank: rank as u32,
                            peers: job.peers.clone(),
                            job_toml: job.spec.toml.clone(),
                            resume: "latest".into(),
                        }),
                        commit_step: 0,
                    };
                }
            }
        }
        Reply {
            command: Command::Wait,
            commit_step: 0,
        }
    }

    /// Moves every job as far as what the workers report allows.
    fn decide(&mut self, now: f64) {
        let ids: Vec<String> = self.jobs.keys().cloned().collect();
        for id in ids {
            self.decide_job(&id, now);
        }
    }

    fn decide_job(&mut self, id: &str, now: f64) {
        let policy = self.policy.clone();
        let busy = self.busy_elsewhere(id);
        let workers = &mut self.workers;
        let job = self.jobs.get_mut(id).expect("a job of the map");
        let before = (
            job.phase,
            job.generation,
            job.commit_step,
            job.committed_step,
        );
        match job.phase {
            Phase::Completed | Phase::Failed | Phase::Stopped => {}
            Phase::Pending | Phase::Recovering => {
                try_form(job, workers, now, &busy);
            }
            Phase::Rendezvous | Phase::Running | Phase::Checkpointing => {
                decide_running(job, workers, &policy, now, &busy);
            }
        }
        let job = &self.jobs[id];
        if before
            != (
                job.phase,
                job.generation,
                job.commit_step,
                job.committed_step,
            )
        {
            self.dirty = true;
        }
    }

    /// Workers held by other live jobs (a worker serves one job at a time).
    fn busy_elsewhere(&self, except: &str) -> BTreeSet<String> {
        self.jobs
            .values()
            .filter(|j| j.id != except && j.phase.live())
            .flat_map(|j| j.ranks.iter().cloned())
            .collect()
    }
}

/// Starts a new generation of `job` if its previous one has stopped everywhere and enough
/// workers are free.
fn try_form(
    job: &mut Job,
    workers: &mut BTreeMap<String, Worker>,
    now: f64,
    busy: &BTreeSet<String>,
) {
    // The old generation must be gone before a new one starts: no rank of it may still
    // write a checkpoint or hold its ring port.
    let old_running = job
        .ranks
        .iter()
        .filter(|id| {
            workers
                .get(*id)
                .is_some_and(|w| w.report.runs(&job.id, job.generation))
        })
        .count();
    if old_running > 0 {
        set_message(
            job,
            format!(
                "waiting for {old_running} workers of generation {} to stop",
                job.generation
            ),
        );
        return;
    }
    let free: Vec<&Worker> = workers.values().filter(|w| w.free_for(job, busy)).collect();
    // A job's first generation waits for all the workers it asked for; a recovery
    // continues on fewer (down to min_workers) rather than wait.
    let planned = job
        .spec
        .plan_world(free.len(), job.desired)
        .filter(|&w| job.generation > 0 || w == job.desired);
    let Some(world) = planned else {
        let need = if job.generation == 0 {
            job.desired
        } else {
            (job.spec.min_workers.max(1)..=job.desired)
                .find(|&w| job.spec.fits(w))
                .unwrap_or(job.desired)
        };
        set_message(
            job,
            format!(
                "waiting for workers: {} free, at least {need} needed",
                free.len()
            ),
        );
        return;
    };
    // Prefer the workers of the previous generation (their data is warm), then by id.
    let mut chosen: Vec<&Worker> = free;
    chosen.sort_by_key(|w| {
        (
            job.ranks
                .iter()
                .position(|id| *id == w.id)
                .unwrap_or(usize::MAX),
            w.id.clone(),
        )
    });
    chosen.truncate(world as usize);
    job.ranks = chosen.iter().map(|w| w.id.clone()).collect();
    job.peers = chosen
        .iter()
        .map(|w| w.report.ready_addr.clone().unwrap_or_default())
        .collect();
    job.generation += 1;
    job.commit_step = job.committed_step;
    let dp = world / job.spec.tp;
    let message = format!(
        "generation {}: {world} workers (dp {dp} x tp {}), from {}",
        job.generation,
        job.spec.tp,
        if job.committed_step > 0 {
            format!(
                "the newest checkpoint (step {} or later)",
                job.committed_step
            )
        } else {
            "the newest checkpoint, if any".into()
        }
    );
    set_phase(job, now, Phase::Rendezvous, message);
}

/// Follows a live generation: completion, failures, the checkpoint commit, stragglers,
/// and a re-form at a committed checkpoint when the worker count should change.
fn decide_running(
    job: &mut Job,
    workers: &mut BTreeMap<String, Worker>,
    policy: &Policy,
    now: f64,
    busy: &BTreeSet<String>,
) {
    let g = job.generation;
    let mut running = 0;
    let mut succeeded = 0;
    let mut failed: Option<String> = None;
    for (rank, id) in job.ranks.iter().enumerate() {
        let Some(w) = workers.get(id) else {
            failed.get_or_insert(format!("worker {id} (rank {rank}) is gone"));
            continue;
        };
        match w.report.finished(&job.id, g) {
            Some(WorkerState::Succeeded) => succeeded += 1,
            Some(_) => {
                let error = w.report.error.trim();
                failed.get_or_insert(format!(
                    "rank {rank} (worker {id}) failed: {}",
                    if error.is_empty() {
                        "no message"
                    } else {
                        error
                    }
                ));
            }
            None if w.report.runs(&job.id, g) => running += 1,
            // Started, then stopped without saying how (its agent killed the process).
            None if job.phase != Phase::Rendezvous
                && w.report.job_id == job.id
                && w.report.generation == g =>
            {
                failed.get_or_insert(format!("rank {rank} (worker {id}) stopped running"));
            }
            None => {}
        }
    }
    if let Some(why) = failed {
        fail_generation(job, policy.max_restarts, now, why);
        return;
    }
    let world = job.ranks.len();
    if succeeded == world {
        job.committed_step = job.committed_step.max(job.commit_step);
        set_phase(
            job,
            now,
            Phase::Completed,
            format!("completed {} steps", job.spec.steps),
        );
        return;
    }
    if job.phase == Phase::Rendezvous && running + succeeded == world {
        set_phase(
            job,
            now,
            Phase::Running,
            format!("all {world} ranks running"),
        );
    }
    // Phase one of the commit: every rank has written its shard of the same step.
    let reports: Vec<&WorkerReport> = job
        .ranks
        .iter()
        .filter_map(|id| workers.get(id))
        .map(|w| &w.report)
        .filter(|r| r.job_id == job.id && r.generation == g)
        .collect();
    if reports.len() == world {
        let written = reports
            .iter()
            .map(|r| r.checkpoint_written)
            .min()
            .unwrap_or(0);
        if written > job.commit_step {
            job.commit_step = written;
            set_phase(
                job,
                now,
                Phase::Checkpointing,
                format!("every rank wrote step {written}: committing"),
            );
        }
        let committed = reports
            .iter()
            .find(|r| r.rank == 0)
            .map_or(0, |r| r.checkpoint_committed);
        if committed > job.committed_step {
            job.committed_step = committed;
            job.failures_in_row = 0;
            set_phase(
                job,
                now,
                Phase::Running,
                format!("checkpoint step {committed} committed"),
            );
            // A committed checkpoint is where the job may change size.
            let free = workers.values().filter(|w| w.free_for(job, busy)).count();
            let target = job.spec.plan_world(world + free, job.desired);
            if let Some(target) = target.filter(|&t| t as usize != world) {
                set_phase(
                    job,
                    now,
                    Phase::Recovering,
                    format!("re-forming at step {committed}: {world} -> {target} workers"),
                );
                return;
            }
        }
    }
    // Stragglers, from the compute time each rank reports.
    let times: Vec<(u32, f64)> = reports
        .iter()
        .filter(|r| r.state == WorkerState::Running)
        .filter_map(|r| r.progress.map(|p| (r.rank, p.compute_s)))
        .collect();
    if times.len() == world {
        let slow = stragglers(&times, policy.straggler_factor, 0.01);
        for (rank, id) in job.ranks.clone().iter().enumerate() {
            let Some(w) = workers.get_mut(id) else {
                continue;
            };
            if slow.contains(&(rank as u32)) {
                let since = *w.straggling_since.get_or_insert(now);
                // Reported once it has lasted (a noisy step is not a straggler).
                if now - since >= policy.straggler_grace_s && !w.straggler_reported {
                    w.straggler_reported = true;
                    let phase = job.phase;
                    log(
                        job,
                        now,
                        phase,
                        format!("rank {rank} (worker {id}) is a straggler"),
                    );
                }
                if let Some(after) = policy.evict_stragglers_after_s {
                    if now - since >= after {
                        job.excluded.insert(id.clone());
                        fail_generation(
                            job,
                            policy.max_restarts,
                            now,
                            format!(
                                "rank {rank} (worker {id}) straggled for {after:.0} s: evicted"
                            ),
                        );
                        return;
                    }
                }
            } else {
                w.straggling_since = None;
                w.straggler_reported = false;
            }
        }
    }
}

/// The generation failed: recover from the newest checkpoint, or fail the job after too
/// many failures in a row.
fn fail_generation(job: &mut Job, max_restarts: u32, now: f64, why: String) {
    job.failures_in_row += 1;
    job.restarts += 1;
    if job.spec.checkpoint_every == 0 && job.committed_step == 0 && job.failures_in_row > 1 {
        set_phase(
            job,
            now,
            Phase::Failed,
            format!("{why}; giving up (the job writes no checkpoints and failed twice)"),
        );
        return;
    }
    if job.failures_in_row > max_restarts {
        set_phase(
            job,
            now,
            Phase::Failed,
            format!(
                "{why}; giving up after {} failures in a row",
                job.failures_in_row
            ),
        );
        return;
    }
    set_phase(
        job,
        now,
        Phase::Recovering,
        format!("{why}; recovering from the newest checkpoint"),
    );
}

fn set_phase(job: &mut Job, now: f64, phase: Phase, message: String) {
    job.phase = phase;
    log(job, now, phase, message.clone());
    job.message = message;
}

/// What a job waits for, after the reason it is waiting (its last phase change).
fn set_message(job: &mut Job, waiting: String) {
    job.message = match job.log.last() {
        Some(last) => format!("{} ({waiting})", last.message),
        None => waiting,
    };
}

fn log(job: &mut Job, now: f64, phase: Phase, message: String) {
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

fn sanitize(name: &str) -> String {
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

#[cfg(test)]
#[path = "machine_tests/mod.rs"]
mod tests;
