//! Unit tests of the coordinator's decisions, by concept; the helpers here build specs,
//! reports and running jobs.

use super::*;

use kiln_proto::control::Progress;

const EPOCH: &str = "e";

fn spec(tp: u32, batch: u64, micro: u64) -> JobSpec {
    JobSpec {
        name: "test".into(),
        toml: "[train]\nsteps = 100\n".into(),
        tp,
        shard: 0,
        batch_size: batch,
        micro_batch_size: micro,
        steps: 100,
        checkpoint_every: 10,
        memory_every: 0,
        min_workers: 1,
        max_workers: 0,
        outputs: Vec::new(),
        queue: false,
    }
}

fn machine() -> Machine {
    Machine::new(Policy::default(), EPOCH.into())
}

fn addr(i: usize) -> String {
    format!("10.0.0.{i}:29500")
}

fn idle(addr: &str) -> WorkerReport {
    WorkerReport {
        ready_addr: Some(addr.into()),
        ..WorkerReport::default()
    }
}

fn running(job: &str, generation: u64, rank: u32) -> WorkerReport {
    WorkerReport {
        state: WorkerState::Running,
        job_id: job.into(),
        generation,
        rank,
        ..WorkerReport::default()
    }
}

fn ended(job: &str, generation: u64, rank: u32, state: WorkerState, error: &str) -> WorkerReport {
    WorkerReport {
        state,
        ready_addr: Some(addr(90 + rank as usize)),
        job_id: job.into(),
        generation,
        rank,
        error: error.into(),
        ..WorkerReport::default()
    }
}

fn ckpt(mut r: WorkerReport, written: u64, committed: u64) -> WorkerReport {
    r.checkpoint_written = written;
    r.checkpoint_committed = committed;
    r
}

fn compute(mut r: WorkerReport, compute_s: f64) -> WorkerReport {
    r.progress = Some(Progress {
        step: 1,
        steps: 100,
        loss: 2.0,
        step_s: compute_s,
        compute_s,
        ..Progress::default()
    });
    r
}

fn run_of(reply: &Reply) -> &Assignment {
    match &reply.command {
        Command::Run(a) => a,
        other => panic!("expected Run, got {other:?}"),
    }
}

fn abort_of(reply: &Reply) -> &str {
    match &reply.command {
        Command::Abort(why) => why,
        other => panic!("expected Abort, got {other:?}"),
    }
}

/// The newest log entry of the job entering `Recovering` (why its generation ended).
fn failure_log(j: &Job) -> &LogEntry {
    j.log
        .iter()
        .rev()
        .find(|e| e.phase == Phase::Recovering)
        .expect("a recovery in the log")
}

fn hb(m: &mut Machine, id: &str, report: WorkerReport, now: f64) -> Reply {
    m.heartbeat(id, report, now).expect("a known worker")
}

/// The address worker `id` registered with (workers are registered with `addr(i)`).
fn addr_of(m: &Machine, id: &str) -> String {
    m.workers[id].report.ready_addr.clone().unwrap_or_default()
}

/// Registers `n` idle workers, then submits `spec` for `desired` workers, and has every
/// rank of generation 1 start and report running. Returns the job and all worker ids.
fn start(
    m: &mut Machine,
    spec: JobSpec,
    n: usize,
    desired: u32,
    now: f64,
) -> (String, Vec<String>) {
    let ids: Vec<String> = (1..=n)
        .map(|i| m.register(format!("host-{i}"), "", idle(&addr(i)), now))
        .collect();
    let job = m.submit(spec, desired, now).expect("a valid job");
    assert_eq!(
        m.jobs[&job].phase,
        Phase::Rendezvous,
        "{}",
        m.jobs[&job].message
    );
    assert_eq!(m.jobs[&job].generation, 1);
    let ranks = m.jobs[&job].ranks.clone();
    for (rank, id) in ranks.iter().enumerate() {
        let a = addr_of(m, id);
        let reply = hb(m, id, idle(&a), now);
        assert_eq!(run_of(&reply).rank, rank as u32);
    }
    for (rank, id) in ranks.iter().enumerate() {
        let reply = hb(m, id, running(&job, 1, rank as u32), now);
        assert_eq!(reply.command, Command::Wait);
    }
    assert_eq!(
        m.jobs[&job].phase,
        Phase::Running,
        "{}",
        m.jobs[&job].message
    );
    (job, ids)
}

mod elastic;
mod failures;
mod lifecycle;
mod memory;
mod pool;
mod restore;
mod retention;
mod scale;
mod spec;
mod stop;
mod stragglers;
