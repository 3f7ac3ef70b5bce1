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

mod decide;
mod job;
mod tally;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_proto::control::{ring_neighbours, Assignment, Command, Reply, WorkerReport, WorkerState};
use serde::{Deserialize, Serialize};

use decide::fail_generation;
pub use decide::stragglers;
use job::{log, sanitize, set_phase};
pub use job::{Job, JobSpec, LogEntry, Phase};
use tally::{standing, RankIndex, Tally};

/// How many failures in a row (without a new checkpoint committed between them) fail a job.
pub const DEFAULT_MAX_RESTARTS: u32 = 5;
/// Finished jobs are kept a week ...
pub const DEFAULT_RETAIN_FINISHED_S: f64 = 7.0 * 24.0 * 3600.0;
/// ... and at most this many of them.
pub const DEFAULT_RETAIN_FINISHED_JOBS: usize = 100;

/// A registered worker. Not persisted: after a restart, workers register again.
#[derive(Debug, Clone)]
pub struct Worker {
    pub id: String,
    pub host: String,
    /// Where its process keeps snapshots in memory (`RegisterRequest.memory_addr`); empty:
    /// nowhere.
    pub memory_addr: String,
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

    /// Not running and offering a ring address: a job could give it a rank unless another
    /// live job holds it.
    fn idle(&self) -> bool {
        self.available() && self.report.ready_addr.is_some()
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
    /// A finished job stays in the state (for `kiln status` and `kiln logs`) this long
    /// after it finished ...
    pub retain_finished_s: f64,
    /// ... and only the newest this many finished jobs stay at all.
    pub retain_finished_jobs: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            heartbeat_timeout_s: 10.0,
            max_restarts: DEFAULT_MAX_RESTARTS,
            straggler_factor: 1.5,
            straggler_grace_s: 10.0,
            evict_stragglers_after_s: None,
            retain_finished_s: DEFAULT_RETAIN_FINISHED_S,
            retain_finished_jobs: DEFAULT_RETAIN_FINISHED_JOBS,
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
    /// Another unfinished job writes where this one would.
    #[error("{0}")]
    OutputInUse(String),
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
    changes: Changes,
    /// Derived from the above, kept up to date so that a heartbeat costs O(log world): the
    /// rank each worker holds, each job's tally of its generation's reports, and how many
    /// workers are [`Worker::idle`].
    index: RankIndex,
    tallies: HashMap<String, Tally>,
    idle: usize,
    /// Per job, what its workers' commands were last computed from (see [`Machine::woken`]).
    signals: HashMap<String, Signal>,
}

/// What the commands of a job's workers depend on besides their own reports: whether its
/// ranks are wanted, which generation, and which checkpoint step rank 0 may commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Signal {
    live: bool,
    generation: u64,
    commit_step: u64,
}

impl Signal {
    fn of(job: Option<&Job>) -> Signal {
        job.map_or(Signal::default(), |j| Signal {
            live: j.phase.live(),
            generation: j.generation,
            commit_step: j.commit_step,
        })
    }
}

/// Workers whose heartbeat reply may have changed since the last [`Machine::woken`]: a
/// coordinator that holds heartbeats (a long poll) answers these at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Woken {
    /// Jobs whose generation started, ended or stopped being wanted: every worker that runs
    /// or was given one of their ranks.
    pub jobs: BTreeSet<String>,
    /// Workers holding rank 0 of a job with a new step to commit.
    pub workers: BTreeSet<String>,
}

impl Woken {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.workers.is_empty()
    }
}

/// What changed in the persisted state since the last [`Machine::take_changes`]: what the
/// state store writes, and nothing else.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    /// `next_job` moved (a submission).
    pub head: bool,
    /// Jobs whose record changed, new ones included.
    pub jobs: BTreeSet<String>,
    /// Finished jobs dropped from the state after their retention.
    pub dropped: BTreeSet<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.head && self.jobs.is_empty() && self.dropped.is_empty()
    }

    fn job(&mut self, id: &str) {
        if !self.jobs.contains(id) {
            self.jobs.insert(id.to_owned());
        }
    }
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
                m.index.assign(&job);
                for (rank, id) in job.ranks.iter().enumerate() {
                    m.workers.insert(
                        id.clone(),
                        Worker {
                            id: id.clone(),
                            host: String::new(),
                            memory_addr: String::new(),
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
            if job.phase.finished() && job.finished_unix_s == 0.0 {
                // Written before the finish time was kept: its last entry is its end.
                job.finished_unix_s = job.log.last().map_or(now, |e| e.unix_s);
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

    /// What changed in the persisted state since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Who may be told something new since the last call: the jobs among those changed since
    /// the last [`Machine::take_changes`] (so call this first) whose [`Signal`] moved. Costs
    /// O(jobs changed).
    pub fn woken(&mut self) -> Woken {
        let mut woken = Woken::default();
        for id in self.changes.jobs.iter().chain(&self.changes.dropped) {
            let now = Signal::of(self.jobs.get(id));
            let before = self.signals.get(id).copied().unwrap_or_default();
            if now == before {
                continue;
            }
            if self.jobs.contains_key(id) {
                self.signals.insert(id.clone(), now);
            } else {
                self.signals.remove(id);
            }
            if (now.live, now.generation) == (before.live, before.generation) {
                // Only the step to commit moved: rank 0 alone is told.
                if let Some(w) = self.jobs.get(id).and_then(|j| j.ranks.first()) {
                    woken.workers.insert(w.clone());
                }
            } else {
                woken.jobs.insert(id.clone());
            }
        }
        woken
    }

    /// Whether `worker`'s reply may be among those `woken` changed.
    pub fn concerns(&self, worker: &str, woken: &Woken) -> bool {
        woken.workers.contains(worker)
            || self.workers.get(worker).is_some_and(|w| {
                woken.jobs.contains(&w.report.job_id)
                    || self
                        .index
                        .job_of(worker)
                        .is_some_and(|j| woken.jobs.contains(j))
            })
    }

    /// Drops finished jobs past their retention: those finished more than
    /// [`Policy::retain_finished_s`] ago, and all but the newest
    /// [`Policy::retain_finished_jobs`]. The state therefore holds the unfinished jobs and at
    /// most that many finished ones, whatever the number ever submitted.
    fn compact(&mut self, now: f64) {
        let mut finished: Vec<(f64, &str)> = self
            .jobs
            .values()
            .filter(|j| j.phase.finished())
            .map(|j| (j.finished_unix_s, j.id.as_str()))
            .collect();
        let keep = self.policy.retain_finished_jobs;
        if finished.len() <= keep
            && finished
                .iter()
                .all(|(t, _)| now - t <= self.policy.retain_finished_s)
        {
            return;
        }
        // Newest first; ties by id, so the choice does not depend on the map's order.
        finished.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| b.1.cmp(a.1)));
        let drop: Vec<String> = finished
            .iter()
            .enumerate()
            .filter(|(i, (t, _))| *i >= keep || now - t > self.policy.retain_finished_s)
            .map(|(_, (_, id))| (*id).to_owned())
            .collect();
        for id in drop {
            self.jobs.remove(&id);
            self.changes.jobs.remove(&id);
            self.changes.dropped.insert(id);
        }
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
        // One writer per output: two runs into one directory tear each other's logs and
        // checkpoints.
        let sharing: Vec<(&Job, &str, &str)> = self
            .jobs
            .values()
            .filter(|j| !j.phase.finished())
            .filter_map(|j| {
                spec.shared_output(&j.spec)
                    .map(|(mine, theirs)| (j, mine, theirs))
            })
            .collect();
        if let Some(&(job, mine, theirs)) = sharing.first().filter(|_| !spec.queue) {
            let place = if mine == theirs {
                format!("{mine} is also where job {} writes", job.id)
            } else {
                format!("{mine} overlaps {theirs}, where job {} writes", job.id)
            };
            return Err(Refusal::OutputInUse(format!(
                "{place} ({}): two runs would write into one place; stop it first \
                 (kiln stop {}), give this job another output.dir or checkpoint.dir, or \
                 submit it with --queue to start it once that job has ended",
                job.phase.name(),
                job.id
            )));
        }
        // Queued: behind every unfinished job that writes there, in submission order.
        let waits_for: BTreeSet<String> = sharing.iter().map(|(j, _, _)| j.id.clone()).collect();
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
            finished_unix_s: 0.0,
            waits_for,
            run: format!("job {id} of coordinator {}", self.epoch),
            holders: Vec::new(),
            best_step: 0,
        };
        let queued = if job.waits_for.is_empty() {
            String::new()
        } else {
            let ids: Vec<&str> = job.waits_for.iter().map(String::as_str).collect();
            format!(", queued behind {}", ids.join(", "))
        };
        log(
            &mut job,
            now,
            Phase::Pending,
            format!("submitted for {workers} workers{queued}"),
        );
        self.jobs.insert(id.clone(), job);
        self.changes.head = true;
        self.changes.job(&id);
        self.decide_job(&id, now, true);
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
        self.changes.job(job_id);
        self.decide_job(job_id, now, true);
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
        self.changes.job(job_id);
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
        let worker = Worker {
            id: id.clone(),
            host,
            memory_addr: String::new(),
            report,
            last_seen: now,
            placeholder: false,
            straggling_since: None,
            straggler_reported: false,
        };
        self.idle += usize::from(worker.idle());
        // Still running a rank it was given (before this coordinator restarted, or before it
        // was given up): that rank counts as running again, so no next generation starts
        // beside it.
        let r = &worker.report;
        if self.jobs.get(&r.job_id).is_some_and(|j| {
            j.generation == r.generation && j.ranks.get(r.rank as usize) == Some(&id)
        }) {
            self.index
                .insert(&id, &r.job_id, r.generation, r.rank as usize);
        }
        if let Some(old) = self.workers.insert(id.clone(), worker) {
            self.idle -= usize::from(old.idle());
        }
        self.moved(&id, true, now);
        id
    }

    /// `worker` was added, removed or reported something that can move a job: its rank's
    /// tally is brought up to date and its job decided, then (`freed`: it may have become
    /// free) the jobs waiting for workers. O(log world) unless a job forms.
    fn moved(&mut self, worker: &str, freed: bool, now: f64) {
        let job = self.index.get(worker, &self.jobs).map(|(job, rank)| {
            if let Some(t) = self
                .tallies
                .get_mut(&job.id)
                .filter(|t| t.generation == job.generation)
            {
                t.set(rank, standing(job, rank, &self.workers));
            }
            job.id.clone()
        });
        if let Some(job) = &job {
            self.decide_job(job, now, false);
        }
        if freed {
            let waiting: Vec<String> = self
                .jobs
                .values()
                .filter(|j| matches!(j.phase, Phase::Pending | Phase::Recovering))
                .filter(|j| Some(&j.id) != job.as_ref())
                .map(|j| j.id.clone())
                .collect();
            for id in waiting {
                self.decide_job(&id, now, false);
            }
        }
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
            || r.ready_addr != report.ready_addr
            || r.error != report.error;
        let was_idle = w.idle();
        w.report = report;
        w.last_seen = now;
        let idle = w.idle();
        self.idle = self.idle + usize::from(idle) - usize::from(was_idle);
        if moves {
            self.moved(worker_id, idle && !was_idle, now);
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
            self.idle -= usize::from(w.idle());
            let held = self
                .index
                .get(&id, &self.jobs)
                .filter(|(job, _)| job.phase.live())
                .map(|(job, rank)| (job.id.clone(), rank));
            if let Some((job_id, rank)) = held {
                let what = if w.placeholder {
                    "did not come back after the coordinator restarted"
                } else {
                    "stopped sending heartbeats"
                };
                let job = self.jobs.get_mut(&job_id).expect("indexed");
                fail_generation(
                    job,
                    self.policy.max_restarts,
                    now,
                    format!("worker {id} (rank {rank}) {what} ({timeout:.0} s)"),
                );
                self.changes.job(&job_id);
            }
            // Its rank (of a live job or one recovering) now counts as gone.
            self.moved(&id, false, now);
            self.index.forget(&id);
        }
        self.decide(now);
        self.compact(now);
    }

    fn job_mut(&mut self, job_id: &str) -> Result<&mut Job, Refusal> {
        self.jobs
            .get_mut(job_id)
            .ok_or_else(|| Refusal::UnknownJob(job_id.to_owned()))
    }

    /// The ranks of `job_id`'s generation reported as stragglers (as of the last tick).
    pub fn stragglers_of(&self, job_id: &str) -> Vec<u32> {
        self.tallies
            .get(job_id)
            .map(|t| t.stragglers.clone())
            .unwrap_or_default()
    }

    /// Where rank `rank` of `job` sends its snapshots (`to`), or where it looks for them:
    /// the snapshot addresses of the workers [`Job::holders`] names that are registered.
    fn memory_addrs(&self, job: &Job, rank: usize, to: bool) -> Vec<String> {
        let Some(held) = job.holders.get(rank) else {
            return Vec::new();
        };
        let n = match (to, job.ranks.len()) {
            (false, _) => held.len(),
            (true, 1) => 1,
            (true, _) => 2,
        };
        held.iter()
            .take(n)
            .filter_map(|id| self.workers.get(id))
            .filter(|w| !w.placeholder && !w.memory_addr.is_empty())
            .map(|w| w.memory_addr.clone())
            .collect()
    }

    /// A registered worker's snapshot address (`RegisterRequest.memory_addr`).
    pub fn set_memory_addr(&mut self, worker_id: &str, addr: String) {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.memory_addr = addr;
        }
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
        // Given a rank it has not started or finished yet: run it. The assignment carries the
        // addresses of its ring neighbours only, so its size does not grow with the world.
        if let Some((job, rank)) = self.index.get(worker_id, &self.jobs) {
            if job.phase.live() && r.finished(&job.id, job.generation).is_none() {
                let world = job.ranks.len() as u32;
                let peers = ring_neighbours(rank as u32, world, job.spec.tp, job.spec.shard)
                    .into_iter()
                    .map(|r| (r, job.peers[r as usize].clone()))
                    .collect();
                return Reply {
                    command: Command::Run(Assignment {
                        job_id: job.id.clone(),
                        generation: job.generation,
                        rank: rank as u32,
                        world_size: world,
                        peers,
                        job_toml: job.spec.toml.clone(),
                        resume: "latest".into(),
                        run: job.run(),
                        memory_to: self.memory_addrs(job, rank, true),
                        memory_from: self.memory_addrs(job, rank, false),
                    }),
                    commit_step: 0,
                };
            }
        }
        Reply {
            command: Command::Wait,
            commit_step: 0,
        }
    }
}

#[cfg(test)]
mod tests;
