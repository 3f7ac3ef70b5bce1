//! Changing the worker count at a committed checkpoint.

use super::*;

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
    assert_eq!(run.peers, vec![(0, addr(1)), (1, addr(2)), (2, addr(3))]);
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
    // 4 and 5 workers do not fit a batch of 6. (A registration does not count the free
    // workers of a job that cannot form; the tick says how many there are.)
    m.tick(0.5);
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
