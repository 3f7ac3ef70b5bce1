//! How jobs move: each decision looks at what the workers report and moves a job on
//! (forming a generation, following a running one through its checkpoint commits to
//! completion, failing it on a lost or slow rank).

use std::collections::{BTreeMap, HashMap};

use super::job::{log, memory_peers, set_message, set_phase, Job, Phase, HOLDERS};
use super::tally::{RankIndex, Standing, Tally};
use super::{Machine, Policy, Worker};

impl Machine {
    /// Moves every job as far as what the workers report allows, stragglers included.
    pub(super) fn decide(&mut self, now: f64) {
        let ids: Vec<String> = self.jobs.keys().cloned().collect();
        for id in ids {
            self.decide_job(&id, now, true);
        }
    }

    /// Moves job `id` as far as its tally allows: O(log world), or O(workers) when it forms
    /// a generation. `full` also looks at stragglers (a pass over the world, made on the
    /// coordinator's tick rather than per heartbeat) and says exactly how many workers a
    /// waiting job has.
    pub(super) fn decide_job(&mut self, id: &str, now: f64, full: bool) {
        // Taken out of the map while it is decided: the jobs left are the others, whose
        // ranks are busy for it.
        let Some(mut job) = self.jobs.remove(id) else {
            return;
        };
        let stale = self
            .tallies
            .get(id)
            .is_none_or(|t| t.generation != job.generation);
        if stale && !job.ranks.is_empty() {
            self.tallies
                .insert(id.to_owned(), Tally::new(&job, &self.workers));
        }
        let before = (
            job.phase,
            job.generation,
            job.commit_step,
            job.committed_step,
        );
        if job.phase == Phase::Recovering {
            self.drop_abandoned(&mut job, now);
        }
        let mut pool = Pool {
            workers: &mut self.workers,
            index: &self.index,
            others: &self.jobs,
            idle: self.idle,
        };
        match job.phase {
            Phase::Completed | Phase::Failed | Phase::Stopped => {}
            Phase::Pending | Phase::Recovering => {
                let tally = self.tallies.get(id);
                if try_form(&mut job, &pool, tally, now, full) {
                    self.index.assign(&job);
                    self.tallies
                        .insert(id.to_owned(), Tally::new(&job, &self.workers));
                }
            }
            Phase::Rendezvous | Phase::Running | Phase::Checkpointing => {
                if let Some(tally) = self.tallies.get(id) {
                    decide_running(&mut job, &mut pool, tally, &self.policy, now, full);
                }
            }
        }
        if full && job.phase.live() {
            // Kept for `Status`, which must not pass over the world under the lock.
            if let Some(t) = self.tallies.get_mut(id) {
                t.stragglers = job
                    .ranks
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| self.workers.get(*w).is_some_and(|w| w.straggler_reported))
                    .map(|(rank, _)| rank as u32)
                    .collect();
            }
        }
        let after = (
            job.phase,
            job.generation,
            job.commit_step,
            job.committed_step,
        );
        if job.phase.finished() {
            self.tallies.remove(id);
        }
        self.jobs.insert(id.to_owned(), job);
        if before != after {
            self.changes.job(id);
        }
    }
}

impl Machine {
    /// Forgets the workers of `job`'s failed generation whose rank every ring neighbour
    /// reported gone ([`Tally::abandoned`]) while the worker itself still says it runs: the
    /// next generation need not wait out their heartbeat timeout. A worker wrongly given up
    /// registers again at its next heartbeat.
    fn drop_abandoned(&mut self, job: &mut Job, now: f64) {
        let Some(tally) = self.tallies.get_mut(&job.id) else {
            return;
        };
        for rank in tally.abandoned(job.spec.tp, job.spec.shard) {
            let id = job.ranks[rank].clone();
            if let Some(w) = self.workers.remove(&id) {
                self.idle -= usize::from(w.idle());
            }
            self.index.forget(&id);
            tally.set(rank, (Standing::Gone, None));
            let phase = job.phase;
            log(
                job,
                now,
                phase,
                format!(
                    "worker {id} (rank {rank}) given up: every rank connected to it lost it, \
                     and it has not reported since"
                ),
            );
        }
    }
}

/// The workers as one job's decision sees them.
struct Pool<'a> {
    workers: &'a mut BTreeMap<String, Worker>,
    index: &'a RankIndex,
    /// The other jobs.
    others: &'a BTreeMap<String, Job>,
    /// How many workers are idle (an upper bound of those free for a job).
    idle: usize,
}

impl Pool<'_> {
    /// Whether `job` could give `w` a rank now: idle, not held by another live job, and not
    /// evicted from this one.
    fn free_for(&self, w: &Worker, job: &Job) -> bool {
        w.idle() && !job.excluded.contains(&w.id) && !self.index.busy(&w.id, self.others)
    }

    fn free(&self, job: &Job) -> Vec<&Worker> {
        self.workers
            .values()
            .filter(|w| self.free_for(w, job))
            .collect()
    }
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

/// Starts a new generation of `job` if its previous one has stopped everywhere and enough
/// workers are free; returns whether it did.
fn try_form(job: &mut Job, pool: &Pool<'_>, tally: Option<&Tally>, now: f64, full: bool) -> bool {
    // Queued behind jobs writing where it writes: not before each has ended.
    if job.generation == 0 {
        let ahead = job.waits_for.iter().find_map(|id| {
            pool.others
                .get(id)
                .filter(|j| !j.phase.finished())
                .map(|j| (id, j.phase.name()))
        });
        if let Some((id, phase)) = ahead {
            set_message(
                job,
                format!("queued: job {id} ({phase}) writes where this job writes"),
            );
            return false;
        }
    }
    // The old generation must be gone before a new one starts: no rank of it may still
    // write a checkpoint or hold its ring port.
    let old_running = tally.map_or(0, |t| t.running);
    if old_running > 0 {
        set_message(
            job,
            format!(
                "waiting for {old_running} workers of generation {} to stop",
                job.generation
            ),
        );
        return false;
    }
    // A job's first generation waits for all the workers it asked for; a recovery
    // continues on fewer (down to min_workers) rather than wait.
    let need = if job.generation == 0 {
        job.desired
    } else {
        (job.spec.min_workers.max(1)..=job.desired)
            .find(|&w| job.spec.fits(w))
            .unwrap_or(job.desired)
    };
    // Too few idle workers, let alone free ones: no pass over the pool (the tick's full
    // decision says how many are free).
    if !full && pool.idle < need as usize {
        return false;
    }
    let free = pool.free(job);
    let planned = job
        .spec
        .plan_world(free.len(), job.desired)
        .filter(|&w| job.generation > 0 || w == job.desired);
    let Some(world) = planned else {
        set_message(
            job,
            format!(
                "waiting for workers: {} free, at least {need} needed",
                free.len()
            ),
        );
        return false;
    };
    // Prefer the workers of the previous generation (their data is warm), then by id.
    let previous: HashMap<&str, usize> = job
        .ranks
        .iter()
        .enumerate()
        .map(|(rank, id)| (id.as_str(), rank))
        .collect();
    let mut chosen: Vec<&Worker> = free;
    chosen.sort_by_key(|w| {
        (
            previous.get(w.id.as_str()).copied().unwrap_or(usize::MAX),
            w.id.clone(),
        )
    });
    chosen.truncate(world as usize);
    let ranks: Vec<String> = chosen.iter().map(|w| w.id.clone()).collect();
    if job.spec.memory_every > 0 {
        let hosts: Vec<&str> = chosen.iter().map(|w| w.host.as_str()).collect();
        // A rank's earlier snapshots are of its rank at this world size only.
        let earlier = if job.holders.len() == ranks.len() {
            std::mem::take(&mut job.holders)
        } else {
            Vec::new()
        };
        job.holders = (0..ranks.len())
            .map(|r| {
                let mut held = memory_peers(r, &ranks, &hosts);
                for id in earlier.get(r).into_iter().flatten() {
                    if !held.contains(id) {
                        held.push(id.clone());
                    }
                }
                held.truncate(HOLDERS);
                held
            })
            .collect();
    }
    job.ranks = ranks;
    job.peers = chosen
        .iter()
        .map(|w| w.report.ready_addr.clone().unwrap_or_default())
        .collect();
    job.generation += 1;
    job.commit_step = job.committed_step;
    let dp = world / job.spec.tp;
    let from = match (job.committed_step, job.spec.memory_every > 0) {
        (0, false) => "the newest checkpoint, if any".to_owned(),
        (0, true) => "the newest checkpoint or snapshot in workers' memory, if any".to_owned(),
        (step, false) => format!("the newest checkpoint (step {step} or later)"),
        (step, true) => format!(
            "the newest checkpoint (step {step} or later) or a newer snapshot in workers' memory"
        ),
    };
    let message = format!(
        "generation {}: {world} workers (dp {dp} x tp {}), from {from}",
        job.generation, job.spec.tp,
    );
    set_phase(job, now, Phase::Rendezvous, message);
    true
}

/// Follows a live generation from its tally: completion, failures, the checkpoint commit,
/// and a re-form at a committed checkpoint when the worker count should change; with
/// `full`, stragglers.
fn decide_running(
    job: &mut Job,
    pool: &mut Pool<'_>,
    tally: &Tally,
    policy: &Policy,
    now: f64,
    full: bool,
) {
    if let Some(why) = tally.first_failure(job, job.phase == Phase::Rendezvous) {
        fail_generation(job, policy.max_restarts, now, why);
        return;
    }
    let world = job.ranks.len();
    if tally.succeeded == world {
        job.committed_step = job.committed_step.max(job.commit_step);
        set_phase(
            job,
            now,
            Phase::Completed,
            format!("completed {} steps", job.spec.steps),
        );
        return;
    }
    if job.phase == Phase::Rendezvous && tally.running + tally.succeeded == world {
        set_phase(
            job,
            now,
            Phase::Running,
            format!("all {world} ranks running"),
        );
    }
    if let Some(written) = tally.written_by_all() {
        if advance_commit(job, written, pool, now) {
            return;
        }
    }
    if !full {
        return;
    }
    // Stragglers, from the compute time each rank reports.
    let g = job.generation;
    let times: Vec<(u32, f64)> = job
        .ranks
        .iter()
        .filter_map(|id| pool.workers.get(id))
        .map(|w| &w.report)
        .filter(|r| r.runs(&job.id, g))
        .filter_map(|r| r.progress.map(|p| (r.rank, p.compute_s)))
        .collect();
    if times.len() == world {
        watch_stragglers(job, pool.workers, policy, now, &times);
    }
}

/// The two-phase checkpoint commit: phase one once every rank has written its object of the
/// same step (`written`), then rank 0's commit. A committed checkpoint is where the job may
/// change size: returns whether it re-forms.
fn advance_commit(job: &mut Job, written: u64, pool: &Pool<'_>, now: f64) -> bool {
    let world = job.ranks.len();
    if written > job.commit_step {
        job.commit_step = written;
        set_phase(
            job,
            now,
            Phase::Checkpointing,
            format!("every rank wrote step {written}: committing"),
        );
    }
    let leader = job
        .ranks
        .first()
        .and_then(|id| pool.workers.get(id))
        .map(|w| &w.report)
        .filter(|r| r.job_id == job.id && r.generation == job.generation);
    // With snapshots in memory, training past every step reached before keeps its progress
    // without a store checkpoint: the failures before it are no longer in a row.
    let step = leader
        .and_then(|r| r.progress.as_ref())
        .map_or(0, |p| p.step);
    if job.spec.memory_every > 0 && step >= job.best_step + job.spec.memory_every {
        job.best_step = step;
        job.failures_in_row = 0;
    }
    let committed = leader.map_or(0, |r| r.checkpoint_committed);
    if committed > job.committed_step {
        job.committed_step = committed;
        job.failures_in_row = 0;
        set_phase(
            job,
            now,
            Phase::Running,
            format!("checkpoint step {committed} committed"),
        );
        let free = pool
            .workers
            .values()
            .filter(|w| pool.free_for(w, job))
            .count();
        let target = job.spec.plan_world(world + free, job.desired);
        if let Some(target) = target.filter(|&t| t as usize != world) {
            set_phase(
                job,
                now,
                Phase::Recovering,
                format!("re-forming at step {committed}: {world} -> {target} workers"),
            );
            return true;
        }
    }
    false
}

/// Flags the ranks whose compute time (`times`, one per rank) makes them stragglers,
/// reports those that straggle past the grace period, and evicts one that straggles past
/// [`Policy::evict_stragglers_after_s`] (failing the generation, to re-form without it).
fn watch_stragglers(
    job: &mut Job,
    workers: &mut BTreeMap<String, Worker>,
    policy: &Policy,
    now: f64,
    times: &[(u32, f64)],
) {
    let slow = stragglers(times, policy.straggler_factor, 0.01);
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
                        format!("rank {rank} (worker {id}) straggled for {after:.0} s: evicted"),
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

/// The generation failed: recover from the newest checkpoint, or fail the job after too
/// many failures in a row.
pub(super) fn fail_generation(job: &mut Job, max_restarts: u32, now: f64, why: String) {
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
        format!(
            "{why}; recovering from the newest checkpoint{}",
            if job.spec.memory_every > 0 {
                " or snapshot in memory"
            } else {
                ""
            }
        ),
    );
}
