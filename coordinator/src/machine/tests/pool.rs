//! Several jobs sharing one pool of workers.

use super::*;

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
