//! A restarted coordinator picking its jobs up.

use super::*;

/// A two-worker job running generation 1 with step 4 committed, persisted through JSON,
/// and restored at t = 100 under a new epoch.
fn restored() -> (Machine, String, Vec<String>) {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 2, 1), 2, 2, 0.0);
    hb(&mut m, &ids[0], ckpt(running(&job, 1, 0), 4, 0), 1.0);
    hb(&mut m, &ids[1], ckpt(running(&job, 1, 1), 4, 0), 1.0);
    hb(&mut m, &ids[0], ckpt(running(&job, 1, 0), 4, 4), 2.0);
    assert_eq!(m.jobs[&job].committed_step, 4);
    assert!(!m.take_changes().is_empty());

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
