//! Failures by report and by silence, and when a job gives up.

use super::*;

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
    assert_eq!(run.peers, vec![(0, a_addr), (1, addr(91))]);
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
    assert_eq!(run.peers, vec![(0, addr(1))]);
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

/// A rank whose host died with its agent reports nothing: once every rank connected to it
/// failed saying it lost it, its worker is given up at once rather than after the heartbeat
/// timeout, and the next generation forms without it.
#[test]
fn a_rank_every_neighbour_lost_is_given_up_without_the_timeout() {
    let mut m = machine();
    let (job, _) = start(&mut m, spec(1, 6, 1), 3, 3, 0.0);
    let ranks = m.jobs[&job].ranks.clone();
    let lost = |by: u32| {
        ended(
            &job,
            1,
            by,
            WorkerState::Failed,
            "error: lost rank 1 (10.0.0.2:29500) during all_reduce: it closed the connection",
        )
    };
    hb(&mut m, &ranks[0], lost(0), 1.0);
    assert_eq!(m.jobs[&job].phase, Phase::Recovering);
    // One of its two neighbours is not enough: it may have lost only that link.
    m.tick(1.5);
    let j = &m.jobs[&job];
    assert!(
        j.message
            .contains("waiting for 2 workers of generation 1 to stop"),
        "{}",
        j.message
    );
    assert!(m.workers.contains_key(&ranks[1]));
    // Rank 2 heard it from rank 0.
    hb(
        &mut m,
        &ranks[2],
        ended(
            &job,
            1,
            2,
            WorkerState::Failed,
            "error: rank 1 failed during all_reduce (reported by rank 0)",
        ),
        2.0,
    );
    let j = &m.jobs[&job];
    assert!(!m.workers.contains_key(&ranks[1]));
    assert!(
        j.log.iter().any(|e| e.message
            == format!(
                "worker {} (rank 1) given up: every rank connected to it lost it, and it has not reported since",
                ranks[1]
            )),
        "{:?}",
        j.log
    );
    assert_eq!(
        (j.phase, j.generation),
        (Phase::Rendezvous, 2),
        "{}",
        j.message
    );
    assert_eq!(j.ranks, vec![ranks[0].clone(), ranks[2].clone()]);
    // Still 2 s before its heartbeat timeout; if it was alive after all, it registers again.
    assert_eq!(
        m.heartbeat(&ranks[1], running(&job, 1, 1), 2.5),
        Err(Refusal::UnknownWorker(ranks[1].clone()))
    );
}

/// A worker given up after its heartbeat timeout (cut off from the coordinator) whose rank
/// still runs: when it registers again saying so, that rank counts as running again, and the
/// next generation waits until it has stopped.
#[test]
fn a_worker_back_from_a_timeout_still_running_holds_the_next_generation() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 4, 1), 3, 2, 0.0);
    let ranks = m.jobs[&job].ranks.clone();
    let spare = ids.iter().find(|id| !ranks.contains(id)).unwrap().clone();
    hb(&mut m, &ranks[0], running(&job, 1, 0), 9.0);
    let spare_addr = addr_of(&m, &spare);
    hb(&mut m, &spare, idle(&spare_addr), 9.0);
    m.tick(11.0);
    assert_eq!(m.jobs[&job].phase, Phase::Recovering);
    assert!(!m.workers.contains_key(&ranks[1]));
    // The link is back: it registers again under its id, its rank still running.
    let back = m.register("host-2".into(), &ranks[1], running(&job, 1, 1), 11.5);
    assert_eq!(back, ranks[1]);
    abort_of(&hb(&mut m, &ranks[0], running(&job, 1, 0), 12.0));
    hb(&mut m, &ranks[0], idle(&addr(1)), 12.0);
    let j = &m.jobs[&job];
    assert_eq!(
        (j.phase, j.generation),
        (Phase::Recovering, 1),
        "{}",
        j.message
    );
    assert!(
        j.message
            .contains("waiting for 1 workers of generation 1 to stop"),
        "{}",
        j.message
    );
    abort_of(&hb(&mut m, &ranks[1], running(&job, 1, 1), 12.5));
    hb(&mut m, &ranks[1], idle(&addr(2)), 12.5);
    assert_eq!(m.jobs[&job].generation, 2);
}
