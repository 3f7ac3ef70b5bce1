use super::*;

use kiln_proto::control::Progress;

const EPOCH: &str = "e";

fn spec(tp: u32, batch: u64, micro: u64) -> JobSpec {
    JobSpec {
        name: "test".into(),
        toml: "[train]\nsteps = 100\n".into(),
        tp,
        batch_size: batch,
        micro_batch_size: micro,
        steps: 100,
        checkpoint_every: 10,
        min_workers: 1,
        max_workers: 0,
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

// ---------------------------------------------------------------- JobSpec

#[test]
fn fits_needs_tp_multiples_and_a_dividing_batch() {
    let s = spec(1, 6, 1);
    for w in [1, 2, 3, 6] {
        assert!(s.fits(w), "world {w}");
    }
    for w in [0, 4, 5, 7, 12] {
        assert!(!s.fits(w), "world {w}");
    }
    // tp 2, batch 8 in micro-batches of 2: dp 1, 2 and 4 fit.
    let s = spec(2, 8, 2);
    for w in [2, 4, 8] {
        assert!(s.fits(w), "world {w}");
    }
    for w in [1, 3, 6, 12, 16] {
        assert!(!s.fits(w), "world {w}");
    }
}

#[test]
fn plan_world_takes_the_largest_fitting_world_within_bounds() {
    let s = spec(1, 6, 1);
    assert_eq!(s.plan_world(5, 5), Some(3));
    assert_eq!(s.plan_world(10, 4), Some(3));
    assert_eq!(s.plan_world(10, 6), Some(6));
    assert_eq!(s.plan_world(1, 6), Some(1));
    assert_eq!(s.plan_world(0, 2), None);

    let mut s = spec(1, 6, 1);
    s.min_workers = 4;
    assert_eq!(s.plan_world(10, 6), Some(6));
    assert_eq!(
        s.plan_world(5, 6),
        None,
        "4 and 5 do not fit, 3 is below the minimum"
    );

    let mut s = spec(1, 6, 1);
    s.max_workers = 2;
    assert_eq!(s.plan_world(10, 6), Some(2));

    let s = spec(2, 8, 2);
    assert_eq!(s.plan_world(7, 8), Some(4));
    assert_eq!(s.plan_world(1, 8), None);
}

#[test]
fn check_workers_explains_refusals() {
    let s = spec(1, 6, 1);
    assert_eq!(s.check_workers(3), Ok(()));
    assert!(s.check_workers(0).unwrap_err().contains("at least 1"));
    let e = s.check_workers(4).unwrap_err();
    assert!(e.contains("4 workers cannot run this job"), "{e}");
    assert!(e.contains("parallel.tp = 1"), "{e}");
    assert!(e.contains("train.batch_size = 6"), "{e}");
    assert!(e.contains("micro-batches of 1"), "{e}");

    let mut s = spec(1, 6, 1);
    s.min_workers = 2;
    s.max_workers = 3;
    let e = s.check_workers(1).unwrap_err();
    assert!(e.contains("below the job's minimum of 2"), "{e}");
    let e = s.check_workers(6).unwrap_err();
    assert!(e.contains("above the job's maximum of 3"), "{e}");
}

#[test]
fn submit_refuses_invalid_jobs() {
    let mut m = machine();
    assert!(matches!(
        m.submit(spec(0, 6, 1), 1, 0.0),
        Err(Refusal::Invalid(_))
    ));
    assert!(matches!(
        m.submit(spec(1, 6, 0), 1, 0.0),
        Err(Refusal::Invalid(_))
    ));
    let mut s = spec(1, 6, 1);
    s.min_workers = 3;
    s.max_workers = 2;
    let e = m.submit(s, 2, 0.0).unwrap_err();
    assert!(
        matches!(&e, Refusal::Invalid(t) if t.contains("above max_workers")),
        "{e}"
    );
    let e = m.submit(spec(1, 6, 1), 4, 0.0).unwrap_err();
    assert!(
        matches!(&e, Refusal::Invalid(t) if t.contains("cannot run this job")),
        "{e}"
    );
    assert!(m.jobs.is_empty());
    assert!(!m.take_dirty());
}

#[test]
fn job_ids_are_sanitized_and_numbered() {
    let mut m = machine();
    let mut s = spec(1, 1, 1);
    s.name = "my job/v2".into();
    assert_eq!(m.submit(s, 1, 0.0).unwrap(), "my-job-v2-1");
    let mut s = spec(1, 1, 1);
    s.name = String::new();
    assert_eq!(m.submit(s, 1, 0.0).unwrap(), "job-2");
}

// ---------------------------------------------------------------- lifecycle

#[test]
fn two_worker_job_runs_to_completion() {
    let mut m = machine();
    let mut s = spec(1, 2, 1);
    s.min_workers = 2;
    let job = m.submit(s, 2, 0.0).unwrap();
    assert!(m.take_dirty());
    assert!(!m.take_dirty());
    assert_eq!(m.jobs[&job].phase, Phase::Pending);
    assert!(
        m.jobs[&job].message.contains("waiting for workers"),
        "{}",
        m.jobs[&job].message
    );

    let a = m.register("host-a".into(), "", idle(&addr(1)), 1.0);
    assert_eq!(
        m.jobs[&job].phase,
        Phase::Pending,
        "one worker is below the minimum"
    );
    let b = m.register("host-b".into(), "", idle(&addr(2)), 1.0);
    assert_ne!(a, b);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Rendezvous);
    assert_eq!(j.generation, 1);
    assert_eq!(j.ranks, vec![a.clone(), b.clone()]);
    assert_eq!(j.peers, vec![addr(1), addr(2)]);
    assert!(m.take_dirty());

    for (rank, id) in [&a, &b].into_iter().enumerate() {
        let reply = hb(&mut m, id, idle(&addr(rank + 1)), 2.0);
        assert_eq!(reply.commit_step, 0);
        let run = run_of(&reply);
        assert_eq!(run.job_id, job);
        assert_eq!(run.generation, 1);
        assert_eq!(run.rank, rank as u32);
        assert_eq!(run.peers, vec![addr(1), addr(2)]);
        assert_eq!(run.resume, "latest");
        assert_eq!(run.job_toml, spec(1, 2, 1).toml);
    }

    assert_eq!(
        hb(&mut m, &a, running(&job, 1, 0), 3.0).command,
        Command::Wait
    );
    assert_eq!(
        m.jobs[&job].phase,
        Phase::Rendezvous,
        "rank 1 has not started yet"
    );
    assert_eq!(
        hb(&mut m, &b, running(&job, 1, 1), 3.0).command,
        Command::Wait
    );
    assert_eq!(m.jobs[&job].phase, Phase::Running);

    let done = |rank| ended(&job, 1, rank, WorkerState::Succeeded, "");
    assert_eq!(hb(&mut m, &a, done(0), 4.0).command, Command::Wait);
    assert_eq!(m.jobs[&job].phase, Phase::Running, "rank 1 still runs");
    assert_eq!(hb(&mut m, &b, done(1), 4.0).command, Command::Wait);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Completed);
    assert!(j.message.contains("completed 100 steps"), "{}", j.message);
    assert_eq!(j.restarts, 0);
    // A finished job hands out nothing.
    assert_eq!(hb(&mut m, &a, idle(&addr(1)), 5.0).command, Command::Wait);
}

#[test]
fn checkpoint_commit_takes_two_phases() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 2, 1), 2, 2, 0.0);
    let (a, b) = (&ids[0], &ids[1]);

    // Rank 1 wrote step 4, rank 0 not yet: nothing to commit.
    let reply = hb(&mut m, b, ckpt(running(&job, 1, 1), 4, 0), 1.0);
    assert_eq!(reply.commit_step, 0);
    assert_eq!(m.jobs[&job].commit_step, 0);
    assert_eq!(m.jobs[&job].phase, Phase::Running);

    // Both wrote step 4: rank 0 is told to commit it, rank 1 is not.
    let reply = hb(&mut m, a, ckpt(running(&job, 1, 0), 4, 0), 2.0);
    assert_eq!(reply.command, Command::Wait);
    assert_eq!(reply.commit_step, 4);
    assert_eq!(m.jobs[&job].phase, Phase::Checkpointing);
    assert_eq!(m.jobs[&job].commit_step, 4);
    assert_eq!(m.jobs[&job].committed_step, 0);
    let reply = hb(&mut m, b, ckpt(running(&job, 1, 1), 4, 0), 2.5);
    assert_eq!(reply.commit_step, 0);
    // Until it says it committed, rank 0 is told again.
    let reply = hb(&mut m, a, ckpt(running(&job, 1, 0), 4, 0), 2.8);
    assert_eq!(reply.commit_step, 4);

    // Rank 0 committed.
    let reply = hb(&mut m, a, ckpt(running(&job, 1, 0), 4, 4), 3.0);
    assert_eq!(reply.command, Command::Wait);
    assert_eq!(reply.commit_step, 0);
    let j = &m.jobs[&job];
    assert_eq!(j.committed_step, 4);
    assert_eq!(j.phase, Phase::Running);
    assert_eq!(j.generation, 1);
    assert!(
        j.message.contains("checkpoint step 4 committed"),
        "{}",
        j.message
    );
}

// ---------------------------------------------------------------- failures

#[test]
fn a_failed_rank_recovers_in_a_new_generation() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 2, 1), 2, 2, 0.0);
    let (a, b) = (&ids[0], &ids[1]);

    let reply = hb(
        &mut m,
        b,
        ended(&job, 1, 1, WorkerState::Failed, "CUDA out of memory\n"),
        1.0,
    );
    assert_eq!(
        reply.command,
        Command::Wait,
        "no rank of the failed generation to run"
    );
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Recovering);
    assert!(j.message.contains("CUDA out of memory"), "{}", j.message);
    assert!(j.message.contains("rank 1"), "{}", j.message);
    assert_eq!(j.restarts, 1);
    assert_eq!(j.failures_in_row, 1);
    assert_eq!(j.generation, 1);

    // The other rank still runs generation 1: it is aborted, and no new generation
    // forms until it has stopped.
    let why = abort_of(&hb(&mut m, a, running(&job, 1, 0), 2.0)).to_owned();
    assert!(why.contains(&job), "{why}");
    // An unchanged report moves nothing by itself; the next tick says what the job waits
    // for.
    m.tick(2.0);
    assert_eq!(m.jobs[&job].phase, Phase::Recovering);
    assert_eq!(m.jobs[&job].generation, 1);
    assert!(
        m.jobs[&job].message.contains("to stop"),
        "{}",
        m.jobs[&job].message
    );

    let a_addr = addr(1);
    let reply = hb(&mut m, a, idle(&a_addr), 3.0);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Rendezvous, "{}", j.message);
    assert_eq!(j.generation, 2);
    assert_eq!(
        j.ranks,
        vec![a.clone(), b.clone()],
        "the previous ranks are preferred"
    );
    let run = run_of(&reply);
    assert_eq!((run.generation, run.rank), (2, 0));
    // The failed worker is free again and runs its rank of generation 2.
    let run = run_of(&hb(
        &mut m,
        b,
        ended(&job, 1, 1, WorkerState::Failed, "x"),
        3.0,
    ))
    .clone();
    assert_eq!((run.generation, run.rank), (2, 1));
    assert_eq!(run.peers, vec![a_addr, addr(91)]);
}

#[test]
fn a_silent_worker_is_removed_and_the_job_reforms_smaller() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 2, 1), 2, 2, 0.0);
    let (a, b) = (&ids[0], &ids[1]);

    hb(&mut m, a, running(&job, 1, 0), 5.0);
    hb(&mut m, b, running(&job, 1, 1), 5.0);
    hb(&mut m, a, running(&job, 1, 0), 14.0);
    m.tick(15.0);
    assert_eq!(
        m.jobs[&job].phase,
        Phase::Running,
        "b was heard from 10 s ago"
    );
    assert!(m.workers.contains_key(b));

    m.tick(15.5);
    assert!(!m.workers.contains_key(b));
    assert!(m.workers.contains_key(a));
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Recovering);
    let why = &failure_log(j).message;
    assert!(why.contains(b.as_str()), "{why}");
    assert!(why.contains("stopped sending heartbeats"), "{why}");
    assert_eq!(j.restarts, 1);

    // The silent worker is unknown now.
    assert_eq!(
        m.heartbeat(b, running(&job, 1, 1), 16.0),
        Err(Refusal::UnknownWorker(b.clone()))
    );

    abort_of(&hb(&mut m, a, running(&job, 1, 0), 16.0));
    let reply = hb(&mut m, a, idle(&addr(1)), 17.0);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Rendezvous, "{}", j.message);
    assert_eq!(j.generation, 2);
    assert_eq!(j.ranks, vec![a.clone()]);
    assert_eq!(j.desired, 2, "the job still wants 2");
    let run = run_of(&reply);
    assert_eq!(run.rank, 0);
    assert_eq!(run.peers, vec![addr(1)]);
}

/// While a job waits for the old generation to stop, its message should still say why
/// it is recovering: after `tick` it says only "waiting for 1 workers of generation 1 to
/// stop" (try_form's set_message replaces fail_generation's reason in the same decide).
#[test]
fn a_silent_worker_is_named_in_the_job_message() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 2, 1), 2, 2, 0.0);
    hb(&mut m, &ids[0], running(&job, 1, 0), 14.0);
    m.tick(15.0);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Recovering);
    assert!(j.message.contains(ids[1].as_str()), "{}", j.message);
    assert!(
        j.message.contains("stopped sending heartbeats"),
        "{}",
        j.message
    );
}

#[test]
fn too_many_failures_in_a_row_fail_the_job() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 1, 1), 1, 1, 0.0);
    let w = &ids[0];
    let mut t = 1.0;
    for g in 1..=DEFAULT_MAX_RESTARTS as u64 {
        hb(&mut m, w, ended(&job, g, 0, WorkerState::Failed, "boom"), t);
        assert_eq!(m.jobs[&job].phase, Phase::Recovering, "failure {g}");
        assert_eq!(m.jobs[&job].failures_in_row, g as u32);
        let run = run_of(&hb(&mut m, w, idle(&addr(1)), t + 0.1)).clone();
        assert_eq!(run.generation, g + 1);
        hb(&mut m, w, running(&job, g + 1, 0), t + 0.2);
        assert_eq!(m.jobs[&job].phase, Phase::Running);
        t += 1.0;
    }
    let g = DEFAULT_MAX_RESTARTS as u64 + 1;
    let reply = hb(&mut m, w, ended(&job, g, 0, WorkerState::Failed, "boom"), t);
    assert_eq!(reply.command, Command::Wait);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Failed);
    assert!(j.message.contains("giving up"), "{}", j.message);
    assert!(j.message.contains("boom"), "{}", j.message);
    assert_eq!(j.restarts, DEFAULT_MAX_RESTARTS + 1);
    // Nothing more is formed.
    assert_eq!(
        hb(&mut m, w, idle(&addr(1)), t + 1.0).command,
        Command::Wait
    );
    assert_eq!(m.jobs[&job].generation, g);
}

#[test]
fn a_committed_checkpoint_resets_the_failures_in_a_row() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 1, 1), 1, 1, 0.0);
    let w = &ids[0];
    hb(
        &mut m,
        w,
        ended(&job, 1, 0, WorkerState::Failed, "boom"),
        1.0,
    );
    run_of(&hb(&mut m, w, idle(&addr(1)), 2.0));
    hb(&mut m, w, running(&job, 2, 0), 3.0);
    assert_eq!(m.jobs[&job].failures_in_row, 1);
    let reply = hb(&mut m, w, ckpt(running(&job, 2, 0), 10, 0), 4.0);
    assert_eq!(reply.commit_step, 10);
    hb(&mut m, w, ckpt(running(&job, 2, 0), 10, 10), 5.0);
    let j = &m.jobs[&job];
    assert_eq!(j.committed_step, 10);
    assert_eq!(j.failures_in_row, 0);
    assert_eq!(j.restarts, 1);
    // The next generation resumes at the committed step: nothing left to commit.
    hb(
        &mut m,
        w,
        ended(&job, 2, 0, WorkerState::Failed, "boom"),
        6.0,
    );
    run_of(&hb(&mut m, w, idle(&addr(1)), 7.0));
    let j = &m.jobs[&job];
    assert_eq!(j.generation, 3);
    assert_eq!(j.commit_step, 10);
    assert!(j.message.contains("step 10"), "{}", j.message);
}

#[test]
fn a_job_without_checkpoints_gives_up_on_its_second_failure() {
    let mut m = machine();
    let mut s = spec(1, 1, 1);
    s.checkpoint_every = 0;
    let (job, ids) = start(&mut m, s, 1, 1, 0.0);
    let w = &ids[0];
    // It cannot change size once it has started.
    assert!(
        matches!(m.scale(&job, 1, 0.5), Err(Refusal::Invalid(t)) if t.contains("no checkpoints"))
    );
    hb(
        &mut m,
        w,
        ended(&job, 1, 0, WorkerState::Failed, "boom"),
        1.0,
    );
    assert_eq!(m.jobs[&job].phase, Phase::Recovering);
    run_of(&hb(&mut m, w, idle(&addr(1)), 2.0));
    hb(
        &mut m,
        w,
        ended(&job, 2, 0, WorkerState::Failed, "boom"),
        3.0,
    );
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Failed);
    assert!(j.message.contains("giving up"), "{}", j.message);
}

// ---------------------------------------------------------------- elastic

#[test]
fn scale_up_waits_for_a_committed_checkpoint() {
    let mut m = machine();
    let mut s = spec(1, 6, 1);
    s.min_workers = 2;
    let (job, ids) = start(&mut m, s, 3, 2, 0.0);
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    assert_eq!(m.jobs[&job].ranks, vec![a.clone(), b.clone()]);
    assert_eq!(hb(&mut m, c, idle(&addr(3)), 0.5).command, Command::Wait);

    let msg = m.scale(&job, 3, 1.0).unwrap();
    assert!(msg.contains("2 -> 3"), "{msg}");
    assert!(msg.contains("next checkpoint"), "{msg}");
    assert_eq!(m.jobs[&job].desired, 3);
    assert_eq!(m.jobs[&job].phase, Phase::Running);
    assert_eq!(m.jobs[&job].generation, 1);

    // Running on, and even a written (not yet committed) checkpoint, change nothing.
    assert_eq!(
        hb(&mut m, a, running(&job, 1, 0), 2.0).command,
        Command::Wait
    );
    assert_eq!(hb(&mut m, c, idle(&addr(3)), 2.0).command, Command::Wait);
    hb(&mut m, a, ckpt(running(&job, 1, 0), 4, 0), 3.0);
    hb(&mut m, b, ckpt(running(&job, 1, 1), 4, 0), 3.0);
    assert_eq!(m.jobs[&job].phase, Phase::Checkpointing);
    assert_eq!(m.jobs[&job].generation, 1);
    assert_eq!(hb(&mut m, c, idle(&addr(3)), 3.0).command, Command::Wait);

    // At the commit, the job re-forms.
    let reply = hb(&mut m, a, ckpt(running(&job, 1, 0), 4, 4), 4.0);
    abort_of(&reply);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Recovering);
    assert!(j.message.contains("re-forming"), "{}", j.message);
    assert_eq!(j.committed_step, 4);
    assert_eq!(j.restarts, 0, "a re-form is no failure");
    abort_of(&hb(&mut m, b, ckpt(running(&job, 1, 1), 4, 0), 4.0));
    assert_eq!(hb(&mut m, c, idle(&addr(3)), 4.0).command, Command::Wait);

    assert_eq!(hb(&mut m, a, idle(&addr(1)), 5.0).command, Command::Wait);
    assert_eq!(
        m.jobs[&job].phase,
        Phase::Recovering,
        "b still runs generation 1"
    );
    let reply = hb(&mut m, b, idle(&addr(2)), 5.0);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Rendezvous, "{}", j.message);
    assert_eq!(j.generation, 2);
    assert_eq!(j.ranks, vec![a.clone(), b.clone(), c.clone()]);
    assert_eq!(j.commit_step, 4);
    assert_eq!(run_of(&reply).rank, 1);
    let run = run_of(&hb(&mut m, c, idle(&addr(3)), 5.0)).clone();
    assert_eq!((run.generation, run.rank), (2, 2));
    assert_eq!(run.peers, vec![addr(1), addr(2), addr(3)]);
}

#[test]
fn scale_down_reforms_at_the_next_commit() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 6, 1), 3, 3, 0.0);
    m.scale(&job, 2, 1.0).unwrap();
    assert_eq!(m.jobs[&job].generation, 1);
    for (rank, id) in ids.iter().enumerate() {
        hb(&mut m, id, ckpt(running(&job, 1, rank as u32), 8, 0), 2.0);
    }
    assert_eq!(m.jobs[&job].phase, Phase::Checkpointing);
    hb(&mut m, &ids[0], ckpt(running(&job, 1, 0), 8, 8), 3.0);
    assert_eq!(m.jobs[&job].phase, Phase::Recovering);
    for (rank, id) in ids.iter().enumerate() {
        abort_of(&hb(&mut m, id, running(&job, 1, rank as u32), 4.0));
    }
    for (i, id) in ids.iter().enumerate() {
        hb(&mut m, id, idle(&addr(i + 1)), 5.0);
    }
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Rendezvous, "{}", j.message);
    assert_eq!(j.generation, 2);
    assert_eq!(j.ranks, vec![ids[0].clone(), ids[1].clone()]);
}

#[test]
fn scale_refuses_bad_counts_and_unknown_jobs() {
    let mut m = machine();
    let (job, _) = start(&mut m, spec(1, 6, 1), 2, 2, 0.0);
    let e = m.scale(&job, 4, 1.0).unwrap_err();
    assert!(
        matches!(&e, Refusal::Invalid(t) if t.contains("cannot run this job")),
        "{e}"
    );
    assert!(matches!(m.scale(&job, 0, 1.0), Err(Refusal::Invalid(_))));
    assert_eq!(m.jobs[&job].desired, 2);
    assert_eq!(
        m.scale("nope-9", 3, 1.0),
        Err(Refusal::UnknownJob("nope-9".into()))
    );
    assert_eq!(
        m.stop("nope-9", 1.0),
        Err(Refusal::UnknownJob("nope-9".into()))
    );
}

#[test]
fn a_pending_job_says_what_it_waits_for() {
    let mut m = machine();
    let mut s = spec(1, 6, 1);
    s.min_workers = 4;
    let job = m.submit(s, 6, 0.0).unwrap();
    for i in 1..=5 {
        m.register(format!("host-{i}"), "", idle(&addr(i)), 0.0);
    }
    // 4 and 5 workers do not fit a batch of 6.
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Pending);
    assert_eq!(j.generation, 0);
    assert!(
        j.message.contains("5 free, at least 6 needed"),
        "{}",
        j.message
    );
    assert!(
        matches!(m.scale(&job, 3, 1.0), Err(Refusal::Invalid(t)) if t.contains("minimum of 4"))
    );
    // Before its first generation, a new count applies at once.
    let msg = m.scale(&job, 6, 1.0).unwrap();
    assert_eq!(msg, "workers 6 -> 6");
    m.register("host-6".into(), "", idle(&addr(6)), 2.0);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Rendezvous, "{}", j.message);
    assert_eq!(j.ranks.len(), 6);
}

// ---------------------------------------------------------------- stop, unknown workers

#[test]
fn stop_aborts_the_ranks_and_is_final() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 2, 1), 2, 2, 0.0);
    m.take_dirty();
    let msg = m.stop(&job, 1.0).unwrap();
    assert!(msg.contains("stopped"), "{msg}");
    assert!(m.take_dirty());
    assert_eq!(m.jobs[&job].phase, Phase::Stopped);
    let why = abort_of(&hb(&mut m, &ids[0], running(&job, 1, 0), 2.0)).to_owned();
    assert!(why.contains("stopped"), "{why}");
    assert_eq!(
        hb(&mut m, &ids[0], idle(&addr(1)), 3.0).command,
        Command::Wait
    );
    assert!(
        matches!(m.stop(&job, 4.0), Err(Refusal::Finished(t)) if t.contains("already stopped"))
    );
    assert!(matches!(m.scale(&job, 1, 4.0), Err(Refusal::Finished(_))));
}

#[test]
fn a_heartbeat_from_an_unknown_worker_is_refused() {
    let mut m = machine();
    assert_eq!(
        m.heartbeat("w-nobody", idle(&addr(1)), 0.0),
        Err(Refusal::UnknownWorker("w-nobody".into()))
    );
}

#[test]
fn a_worker_running_an_unknown_job_is_aborted() {
    let mut m = machine();
    let w = m.register("host-1".into(), "", running("gone-7", 3, 0), 0.0);
    let why = abort_of(&hb(&mut m, &w, running("gone-7", 3, 0), 1.0)).to_owned();
    assert!(why.contains("no job gone-7"), "{why}");
}

#[test]
fn register_reuses_a_previous_id_only_when_it_is_free_or_the_same_host() {
    let mut m = machine();
    let a = m.register("host-a".into(), "", idle(&addr(1)), 0.0);
    assert!(a.starts_with(&format!("w{EPOCH}-")), "{a}");
    assert_eq!(m.register("host-a".into(), &a, idle(&addr(1)), 1.0), a);
    let other = m.register("host-b".into(), &a, idle(&addr(2)), 1.0);
    assert_ne!(other, a, "another host may not take a live id");
    assert_eq!(
        m.register("host-c".into(), "w-old-3", idle(&addr(3)), 1.0),
        "w-old-3"
    );
    assert_eq!(m.workers.len(), 3);
}

// ---------------------------------------------------------------- restore

/// A two-worker job running generation 1 with step 4 committed, persisted through JSON,
/// and restored at t = 100 under a new epoch.
fn restored() -> (Machine, String, Vec<String>) {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 2, 1), 2, 2, 0.0);
    hb(&mut m, &ids[0], ckpt(running(&job, 1, 0), 4, 0), 1.0);
    hb(&mut m, &ids[1], ckpt(running(&job, 1, 1), 4, 0), 1.0);
    hb(&mut m, &ids[0], ckpt(running(&job, 1, 0), 4, 4), 2.0);
    assert_eq!(m.jobs[&job].committed_step, 4);
    assert!(m.take_dirty());

    let persisted = m.persisted();
    let json = serde_json::to_string(&persisted).unwrap();
    let back: Persisted = serde_json::from_str(&json).unwrap();
    assert_eq!(back, persisted);

    let r = Machine::restore(Policy::default(), "e2".into(), back, 100.0);
    (r, job, ids)
}

#[test]
fn restore_keeps_the_job_and_picks_up_returning_ranks() {
    let (mut m, job, ids) = restored();
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Running);
    assert_eq!(j.generation, 1);
    assert_eq!(j.committed_step, 4);
    assert_eq!(j.ranks, ids);
    assert_eq!(m.next_job, 1);
    assert!(j
        .log
        .last()
        .unwrap()
        .message
        .contains("coordinator restarted"));
    // A placeholder is no registered worker.
    assert!(matches!(
        m.heartbeat(&ids[0], running(&job, 1, 0), 100.5),
        Err(Refusal::UnknownWorker(_))
    ));

    for (rank, id) in ids.iter().enumerate() {
        let report = ckpt(running(&job, 1, rank as u32), 4, 4);
        assert_eq!(
            m.register(format!("host-{}", rank + 1), id, report.clone(), 101.0),
            *id
        );
        let reply = hb(&mut m, id, report, 102.0);
        assert_eq!(reply.command, Command::Wait, "rank {rank}");
        assert_eq!(reply.commit_step, 0);
    }
    m.tick(110.0);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Running, "{}", j.message);
    assert_eq!(j.generation, 1);
    assert_eq!(j.restarts, 0);
    // A new coordinator's workers get ids of its own epoch.
    let fresh = m.register("host-9".into(), "", idle(&addr(9)), 110.0);
    assert!(fresh.starts_with("we2-"), "{fresh}");
}

#[test]
fn restore_recovers_when_a_rank_does_not_come_back() {
    let (mut m, job, ids) = restored();
    m.register("host-1".into(), &ids[0], running(&job, 1, 0), 101.0);
    hb(&mut m, &ids[0], running(&job, 1, 0), 108.0);
    m.tick(109.0);
    assert_eq!(m.jobs[&job].phase, Phase::Running);
    m.tick(110.5);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Recovering);
    let why = &failure_log(j).message;
    assert!(why.contains("did not come back"), "{why}");
    assert!(why.contains(ids[1].as_str()), "{why}");
    assert!(!m.workers.contains_key(&ids[1]));
    abort_of(&hb(&mut m, &ids[0], running(&job, 1, 0), 111.0));
    let run = run_of(&hb(&mut m, &ids[0], idle(&addr(1)), 112.0)).clone();
    assert_eq!((run.generation, run.rank), (2, 0));
    assert_eq!(m.jobs[&job].commit_step, 4);
}

// ---------------------------------------------------------------- stragglers

#[test]
fn stragglers_are_slower_than_the_median() {
    assert_eq!(
        stragglers(&[(0, 1.0), (1, 1.0), (2, 2.0)], 1.5, 0.0),
        vec![2]
    );
    assert_eq!(
        stragglers(&[(0, 1.0), (1, 1.0), (2, 2.0)], 1.5, 0.01),
        vec![2]
    );
    assert!(stragglers(&[(0, 1.0), (1, 1.0), (2, 1.0)], 1.5, 0.0).is_empty());
    assert!(stragglers(&[(0, 9.0)], 1.5, 0.0).is_empty());
    assert!(stragglers(&[], 1.5, 0.0).is_empty());
    // Under the factor, or under the gap: no straggler.
    assert!(stragglers(&[(0, 1.0), (1, 1.0), (2, 1.4)], 1.5, 0.0).is_empty());
    assert!(stragglers(&[(0, 0.001), (1, 0.001), (2, 0.005)], 1.5, 0.01).is_empty());
    assert_eq!(
        stragglers(
            &[(3, 1.0), (1, 5.0), (0, 1.0), (2, 6.0), (4, 1.0)],
            1.5,
            0.0
        ),
        vec![1, 2]
    );
}

/// Three ranks, rank 2 three times slower, reporting every second from t = 10 to `until`.
fn straggle(m: &mut Machine, job: &str, ids: &[String], until: f64) {
    let mut t = 10.0;
    while t <= until {
        for (rank, id) in ids.iter().enumerate() {
            let slow = if rank == 2 { 3.0 } else { 1.0 };
            hb(m, id, compute(running(job, 1, rank as u32), slow), t);
        }
        // Stragglers are looked for on the coordinator's tick.
        m.tick(t);
        t += 1.0;
    }
}

#[test]
fn stragglers_are_only_reported_without_an_eviction_policy() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 6, 1), 3, 3, 0.0);
    straggle(&mut m, &job, &ids, 30.0);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Running);
    assert!(j.excluded.is_empty());
    let flagged: Vec<_> = j
        .log
        .iter()
        .filter(|e| e.message.contains("is a straggler"))
        .collect();
    assert_eq!(flagged.len(), 1, "logged once while it straggles");
    assert!(
        flagged[0].message.contains("rank 2"),
        "{}",
        flagged[0].message
    );
    assert_eq!(m.workers[&ids[2]].straggling_since, Some(10.0));
    assert_eq!(m.workers[&ids[0]].straggling_since, None);
}

#[test]
fn a_persistent_straggler_is_evicted_and_not_picked_again() {
    let policy = Policy {
        evict_stragglers_after_s: Some(5.0),
        ..Policy::default()
    };
    let mut m = Machine::new(policy, EPOCH.into());
    let (job, ids) = start(&mut m, spec(1, 6, 1), 3, 3, 0.0);
    straggle(&mut m, &job, &ids, 14.0);
    assert_eq!(m.jobs[&job].phase, Phase::Running, "4 s of straggling");
    assert!(m.jobs[&job].excluded.is_empty());

    // At 15 s it has straggled for 5 s.
    hb(&mut m, &ids[0], compute(running(&job, 1, 0), 1.0), 15.0);
    m.tick(15.0);
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Recovering);
    assert!(j.message.contains("evicted"), "{}", j.message);
    assert!(j.message.contains("rank 2"), "{}", j.message);
    assert!(j.excluded.contains(&ids[2]));

    for (rank, id) in ids.iter().enumerate() {
        abort_of(&hb(&mut m, id, running(&job, 1, rank as u32), 16.0));
    }
    for (i, id) in ids.iter().enumerate() {
        hb(&mut m, id, idle(&addr(i + 1)), 17.0);
    }
    let j = &m.jobs[&job];
    assert_eq!(j.phase, Phase::Rendezvous, "{}", j.message);
    assert_eq!(j.generation, 2);
    assert_eq!(j.ranks, vec![ids[0].clone(), ids[1].clone()]);
    assert_eq!(
        hb(&mut m, &ids[2], idle(&addr(3)), 18.0).command,
        Command::Wait
    );
}

// ---------------------------------------------------------------- several jobs

#[test]
fn a_worker_serves_one_job_at_a_time() {
    let mut m = machine();
    let (first, ids) = start(&mut m, spec(1, 2, 1), 2, 2, 0.0);
    let second = m.submit(spec(1, 1, 1), 1, 1.0).unwrap();
    assert_eq!(m.jobs[&second].phase, Phase::Pending);
    let c = m.register("host-3".into(), "", idle(&addr(3)), 2.0);
    assert_eq!(m.jobs[&second].phase, Phase::Rendezvous);
    assert_eq!(m.jobs[&second].ranks, vec![c.clone()]);
    assert_eq!(run_of(&hb(&mut m, &c, idle(&addr(3)), 3.0)).job_id, second);
    assert_eq!(m.jobs[&first].ranks, ids);
}

/// A free worker that another live job holds (given a rank, not yet running) cannot
/// join this job, so it is no reason to re-form at a commit.
#[test]
fn a_worker_held_by_another_job_does_not_trigger_a_reform() {
    let mut m = machine();
    let mut s = spec(1, 6, 1);
    s.min_workers = 2;
    s.checkpoint_every = 4;
    let (first, ids) = start(&mut m, s, 2, 2, 0.0);
    assert_eq!(m.jobs[&first].ranks.len(), 2);
    m.scale(&first, 3, 0.5).unwrap();
    let second = m.submit(spec(1, 1, 1), 1, 1.0).unwrap();
    let c = m.register("host-3".into(), "", idle(&addr(3)), 2.0);
    // The first job is live, so the free worker goes to the second (still idle: it has
    // not been told to run yet).
    assert_eq!(m.jobs[&second].ranks, vec![c.clone()]);
    assert_eq!(m.jobs[&second].phase, Phase::Rendezvous);

    hb(&mut m, &ids[0], ckpt(running(&first, 1, 0), 4, 0), 3.0);
    hb(&mut m, &ids[1], ckpt(running(&first, 1, 1), 4, 0), 3.0);
    hb(&mut m, &ids[0], ckpt(running(&first, 1, 0), 4, 4), 4.0);
    let j = &m.jobs[&first];
    assert_eq!(j.committed_step, 4);
    assert_eq!(j.phase, Phase::Running, "{}", j.message);
    assert_eq!(j.generation, 1);
}

/// A new job waits for every worker it asked for; only a recovery continues on fewer.
#[test]
fn a_first_generation_waits_for_the_workers_asked_for() {
    let mut m = machine();
    let a = m.register("host-1".into(), "", idle(&addr(1)), 0.0);
    let job = m.submit(spec(1, 6, 1), 2, 0.0).unwrap();
    assert_eq!(m.jobs[&job].phase, Phase::Pending);
    assert!(
        m.jobs[&job].message.contains("1 free, at least 2 needed"),
        "{}",
        m.jobs[&job].message
    );
    assert_eq!(hb(&mut m, &a, idle(&addr(1)), 1.0).command, Command::Wait);
    m.register("host-2".into(), "", idle(&addr(2)), 2.0);
    assert_eq!(m.jobs[&job].phase, Phase::Rendezvous);
    assert_eq!(m.jobs[&job].ranks.len(), 2);
}
