//! A job from submission to completion, and the two-phase checkpoint commit.

use super::*;

#[test]
fn two_worker_job_runs_to_completion() {
    let mut m = machine();
    let mut s = spec(1, 2, 1);
    s.min_workers = 2;
    let job = m.submit(s, 2, 0.0).unwrap();
    // A submission writes the head (the job counter) and the new job's record, no more.
    assert_eq!(
        m.take_changes(),
        Changes {
            head: true,
            jobs: [job.clone()].into(),
            dropped: Default::default(),
        }
    );
    assert!(m.take_changes().is_empty());
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
    let changes = m.take_changes();
    assert!(!changes.head);
    assert_eq!(changes.jobs, [job.clone()].into());

    for (rank, id) in [&a, &b].into_iter().enumerate() {
        let reply = hb(&mut m, id, idle(&addr(rank + 1)), 2.0);
        assert_eq!(reply.commit_step, 0);
        let run = run_of(&reply);
        assert_eq!(run.job_id, job);
        assert_eq!(run.generation, 1);
        assert_eq!(run.rank, rank as u32);
        assert_eq!(run.peers, vec![(0, addr(1)), (1, addr(2))]);
        assert_eq!(run.world_size, 2);
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

/// Who a coordinator that holds heartbeats answers at once: what changed since the last
/// look, as the service asks after each call.
fn woken(m: &mut Machine) -> Woken {
    let w = m.woken();
    m.take_changes();
    w
}

#[test]
fn held_heartbeats_are_woken_only_by_what_changes_their_reply() {
    let mut m = machine();
    let mut s = spec(1, 2, 1);
    s.min_workers = 2;
    let job = m.submit(s, 2, 0.0).unwrap();
    assert!(woken(&mut m).is_empty(), "pending: nobody is told anything");
    let a = m.register("host-a".into(), "", idle(&addr(1)), 1.0);
    let b = m.register("host-b".into(), "", idle(&addr(2)), 1.0);
    let c = m.register("host-c".into(), "", idle(&addr(3)), 1.0);
    assert_eq!(m.jobs[&job].generation, 1);
    // The generation formed: both of its workers are answered, the spare is not.
    let w = woken(&mut m);
    assert_eq!(w.jobs, [job.clone()].into());
    assert!(m.concerns(&a, &w) && m.concerns(&b, &w));
    assert!(!m.concerns(&c, &w));

    // Ranks starting, and steps going by, change nobody's reply.
    hb(&mut m, &a, running(&job, 1, 0), 2.0);
    hb(&mut m, &b, running(&job, 1, 1), 2.0);
    assert_eq!(m.jobs[&job].phase, Phase::Running);
    assert!(woken(&mut m).is_empty());

    // Step 4 written by both: rank 0 alone is to be told to commit it.
    hb(&mut m, &b, ckpt(running(&job, 1, 1), 4, 0), 3.0);
    assert!(woken(&mut m).is_empty(), "rank 0 has not written yet");
    hb(&mut m, &a, ckpt(running(&job, 1, 0), 4, 0), 3.0);
    let w = woken(&mut m);
    assert_eq!(w.workers, [a.clone()].into());
    assert!(w.jobs.is_empty());
    assert!(m.concerns(&a, &w) && !m.concerns(&b, &w));
    hb(&mut m, &a, ckpt(running(&job, 1, 0), 4, 4), 3.5);
    assert_eq!(m.jobs[&job].committed_step, 4);
    assert!(woken(&mut m).is_empty());

    // A rank failed: the generation ends, and both its workers are answered.
    hb(
        &mut m,
        &b,
        ended(&job, 1, 1, WorkerState::Failed, "boom"),
        4.0,
    );
    let w = woken(&mut m);
    assert_eq!(w.jobs, [job.clone()].into());
    assert!(m.concerns(&a, &w) && m.concerns(&b, &w));
    assert_eq!(
        abort_of(&m.command_for(&a)),
        &*format!("job {job} is recovering")
    );
}
