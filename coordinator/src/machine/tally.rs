//! What the ranks of a job's generation report, kept up to date one rank at a time, so that a
//! heartbeat that changes one rank's state costs O(log world) rather than a pass over the
//! world: how many run and succeeded, which failed or stopped, and the newest checkpoint step
//! every rank has written.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_proto::control::{gone_rank, ring_neighbours, WorkerState};

use super::job::Job;
use super::Worker;

/// How one rank's worker stands in its job's generation.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Standing {
    /// Its report is about something else: not started yet, or another job.
    Elsewhere,
    Running,
    Succeeded,
    /// Failed, with its error.
    Failed(String),
    /// Reported this generation, and now neither runs it nor finished it (its agent killed
    /// the process).
    Stopped,
    /// No such worker any more.
    Gone,
}

/// One rank: its standing, and the checkpoint step it wrote when its report is about this
/// job's generation.
type Rank = (Standing, Option<u64>);

/// The tally of one generation of one job.
#[derive(Debug, Clone, Default)]
pub(super) struct Tally {
    pub generation: u64,
    ranks: Vec<Rank>,
    pub running: usize,
    pub succeeded: usize,
    /// Ranks failed, stopped or gone, in rank order.
    problems: BTreeSet<usize>,
    /// Ranks whose report is about this generation ...
    reporting: usize,
    /// ... and how many of them wrote each checkpoint step (a multiset).
    written: BTreeMap<u64, usize>,
    /// The ranks reported as stragglers, as of the last tick.
    pub stragglers: Vec<u32>,
    /// For each rank some failed rank's error says is gone ([`gone_rank`]), how many say so.
    blamed: BTreeMap<usize, usize>,
}

impl Tally {
    /// Every rank of `job`'s current generation, from what its worker reports: O(world).
    pub fn new(job: &Job, workers: &BTreeMap<String, Worker>) -> Tally {
        let mut t = Tally {
            generation: job.generation,
            ranks: vec![(Standing::Elsewhere, None); job.ranks.len()],
            ..Tally::default()
        };
        for rank in 0..job.ranks.len() {
            t.set(rank, standing(job, rank, workers));
        }
        t
    }

    /// Rank `rank` now stands as `new`: O(log world).
    pub fn set(&mut self, rank: usize, new: Rank) {
        let Some(slot) = self.ranks.get_mut(rank) else {
            return;
        };
        let old = std::mem::replace(slot, new.clone());
        self.count(rank, &old, false);
        self.count(rank, &new, true);
    }

    fn count(&mut self, rank: usize, (standing, written): &Rank, add: bool) {
        let bump = |n: &mut usize| {
            if add {
                *n += 1
            } else {
                *n -= 1
            }
        };
        match standing {
            Standing::Running => bump(&mut self.running),
            Standing::Succeeded => bump(&mut self.succeeded),
            Standing::Elsewhere => {}
            Standing::Failed(_) | Standing::Stopped | Standing::Gone => {
                if let Standing::Failed(error) = standing {
                    if let Some(gone) = gone_rank(error) {
                        let n = self.blamed.entry(gone as usize).or_insert(0);
                        bump(n);
                        if *n == 0 {
                            self.blamed.remove(&(gone as usize));
                        }
                    }
                }
                if add {
                    self.problems.insert(rank);
                } else {
                    self.problems.remove(&rank);
                }
            }
        }
        if let Some(step) = written {
            bump(&mut self.reporting);
            let n = self.written.entry(*step).or_insert(0);
            bump(n);
            if *n == 0 {
                self.written.remove(step);
            }
        }
    }

    /// The ranks still counted running whose every ring neighbour (the ranks it had
    /// connections to) failed saying it is gone: its process is dead although nobody
    /// reported it, as when its host died with its agent. O(blamed ranks).
    pub fn abandoned(&self, tp: u32, shard: u32) -> Vec<usize> {
        let world = self.ranks.len() as u32;
        self.blamed
            .keys()
            .copied()
            .filter(|&x| self.ranks.get(x).is_some_and(|r| r.0 == Standing::Running))
            .filter(|&x| {
                let neighbours: Vec<u32> = ring_neighbours(x as u32, world, tp, shard)
                    .into_iter()
                    .filter(|&n| n as usize != x)
                    .collect();
                !neighbours.is_empty()
                    && neighbours.iter().all(|&n| {
                        matches!(&self.ranks[n as usize].0,
                            Standing::Failed(e) if gone_rank(e) == Some(x as u32))
                    })
            })
            .collect()
    }

    /// The step every rank has written, once every rank reports this generation.
    pub fn written_by_all(&self) -> Option<u64> {
        if self.reporting < self.ranks.len() {
            return None;
        }
        self.written.keys().next().copied()
    }

    /// The first failure in rank order, as the job's log says it; a rank that stopped
    /// counts only once the generation has left its rendezvous (before, a report about it
    /// may predate its start).
    pub fn first_failure(&self, job: &Job, in_rendezvous: bool) -> Option<String> {
        self.problems.iter().find_map(|&rank| {
            let id = &job.ranks[rank];
            match &self.ranks[rank].0 {
                Standing::Gone => Some(format!("worker {id} (rank {rank}) is gone")),
                Standing::Failed(error) => Some(format!(
                    "rank {rank} (worker {id}) failed: {}",
                    if error.is_empty() {
                        "no message"
                    } else {
                        error
                    }
                )),
                Standing::Stopped if !in_rendezvous => {
                    Some(format!("rank {rank} (worker {id}) stopped running"))
                }
                _ => None,
            }
        })
    }
}

/// How rank `rank` of `job`'s current generation stands, from its worker's report.
pub(super) fn standing(job: &Job, rank: usize, workers: &BTreeMap<String, Worker>) -> Rank {
    let Some(w) = job.ranks.get(rank).and_then(|id| workers.get(id)) else {
        return (Standing::Gone, None);
    };
    let (r, g) = (&w.report, job.generation);
    let here = r.job_id == job.id && r.generation == g;
    let standing = match r.finished(&job.id, g) {
        Some(WorkerState::Succeeded) => Standing::Succeeded,
        Some(_) => Standing::Failed(r.error.trim().to_owned()),
        None if r.runs(&job.id, g) => Standing::Running,
        None if here => Standing::Stopped,
        None => Standing::Elsewhere,
    };
    (standing, here.then_some(r.checkpoint_written))
}

/// Which rank of which generation of which job each worker was last given, so that a
/// heartbeat finds its job in O(1). An entry holds only while the job still has that worker
/// at that rank in that generation ([`RankIndex::get`] checks).
#[derive(Debug, Clone, Default)]
pub(super) struct RankIndex(HashMap<String, (String, u64, usize)>);

impl RankIndex {
    /// Every rank of `job`'s current generation.
    pub fn assign(&mut self, job: &Job) {
        for (rank, id) in job.ranks.iter().enumerate() {
            self.0
                .insert(id.clone(), (job.id.clone(), job.generation, rank));
        }
    }

    /// The job and rank `worker` holds in that job's current generation, if it holds one.
    pub fn get<'a>(
        &self,
        worker: &str,
        jobs: &'a BTreeMap<String, Job>,
    ) -> Option<(&'a Job, usize)> {
        let (job_id, generation, rank) = self.0.get(worker)?;
        let job = jobs.get(job_id)?;
        (job.generation == *generation && job.ranks.get(*rank).is_some_and(|w| w == worker))
            .then_some((job, *rank))
    }

    /// The job `worker` was last given a rank of, whether or not that rank still stands.
    pub fn job_of(&self, worker: &str) -> Option<&str> {
        self.0.get(worker).map(|(job, _, _)| job.as_str())
    }

    /// `worker` holds rank `rank` of generation `generation` of `job`.
    pub fn insert(&mut self, worker: &str, job: &str, generation: u64, rank: usize) {
        self.0
            .insert(worker.to_owned(), (job.to_owned(), generation, rank));
    }

    pub fn forget(&mut self, worker: &str) {
        self.0.remove(worker);
    }

    /// Whether `worker` holds a rank of a live job in `jobs`.
    pub fn busy(&self, worker: &str, jobs: &BTreeMap<String, Job>) -> bool {
        self.get(worker, jobs)
            .is_some_and(|(job, _)| job.phase.live())
    }
}
