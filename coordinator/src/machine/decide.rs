//! How jobs move: each decision looks at what the workers report and moves a job on
//! (forming a generation, following a running one through its checkpoint commits to
//! completion, failing it on a lost or slow rank).

use std::collections::{BTreeMap, BTreeSet};

use kiln_proto::control::{WorkerReport, WorkerState};

use super::job::{log, set_message, set_phase, Job, Phase};
use super::{Machine, Policy, Worker};

impl Machine {
    /// Moves every job as far as what the workers report allows.
    pub(super) fn decide(&mut self, now: f64) {
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
            self.changes.job(id);
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
    let ranks = rank_states(job, workers);
    if let Some(why) = ranks.failed {
        fail_generation(job, policy.max_restarts, now, why);
        return;
    }
    let world = job.ranks.len();
    if ranks.succeeded == world {
        job.committed_step = job.committed_step.max(job.commit_step);
        set_phase(
            job,
            now,
            Phase::Completed,
            format!("completed {} steps", job.spec.steps),
        );
        return;
    }
    if job.phase == Phase::Rendezvous && ranks.running + ranks.succeeded == world {
        set_phase(
            job,
            now,
            Phase::Running,
            format!("all {world} ranks running"),
        );
    }
    let g = job.generation;
    let reports: Vec<&WorkerReport> = job
        .ranks
        .iter()
        .filter_map(|id| workers.get(id))
        .map(|w| &w.report)
        .filter(|r| r.job_id == job.id && r.generation == g)
        .collect();
    if reports.len() == world && advance_commit(job, &reports, workers, now, busy) {
        return;
    }
    // Stragglers, from the compute time each rank reports.
    let times: Vec<(u32, f64)> = reports
        .iter()
        .filter(|r| r.state == WorkerState::Running)
        .filter_map(|r| r.progress.map(|p| (r.rank, p.compute_s)))
        .collect();
    if times.len() == world {
        watch_stragglers(job, workers, policy, now, &times);
    }
}

/// What the ranks of a live generation report.
struct RankStates {
    running: usize,
    succeeded: usize,
    /// The first failure found, in rank order.
    failed: Option<String>,
}

/// Counts the ranks of `job`'s generation that run and that succeeded, and finds the first
/// that failed, is gone, or stopped without saying how.
fn rank_states(job: &Job, workers: &BTreeMap<String, Worker>) -> RankStates {
    let g = job.generation;
    let mut states = RankStates {
        running: 0,
        succeeded: 0,
        failed: None,
    };
    for (rank, id) in job.ranks.iter().enumerate() {
        let Some(w) = workers.get(id) else {
            states
                .failed
                .get_or_insert(format!("worker {id} (rank {rank}) is gone"));
            continue;
        };
        match w.report.finished(&job.id, g) {
            Some(WorkerState::Succeeded) => states.succeeded += 1,
            Some(_) => {
                let error = w.report.error.trim();
                states.failed.get_or_insert(format!(
                    "rank {rank} (worker {id}) failed: {}",
                    if error.is_empty() {
                        "no message"
                    } else {
                        error
                    }
                ));
            }
            None if w.report.runs(&job.id, g) => states.running += 1,
            // Started, then stopped without saying how (its agent killed the process).
            None if job.phase != Phase::Rendezvous
                && w.report.job_id == job.id
                && w.report.generation == g =>
            {
                states
                    .failed
                    .get_or_insert(format!("rank {rank} (worker {id}) stopped running"));
            }
            None => {}
        }
    }
    states
}

/// The two-phase checkpoint commit, from every rank's report of the current generation:
/// phase one once every rank has written its object of the same step, then rank 0's commit.
/// A committed checkpoint is where the job may change size: returns whether it re-forms.
fn advance_commit(
    job: &mut Job,
    reports: &[&WorkerReport],
    workers: &BTreeMap<String, Worker>,
    now: f64,
    busy: &BTreeSet<String>,
) -> bool {
    let world = job.ranks.len();
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
        let free = workers.values().filter(|w| w.free_for(job, busy)).count();
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
        format!("{why}; recovering from the newest checkpoint"),
    );
}
