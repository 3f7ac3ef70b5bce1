//! Stopping jobs, and workers the coordinator does not know.

use super::*;

#[test]
fn stop_aborts_the_ranks_and_is_final() {
    let mut m = machine();
    let (job, ids) = start(&mut m, spec(1, 2, 1), 2, 2, 0.0);
    m.take_changes();
    let msg = m.stop(&job, 1.0).unwrap();
    assert!(msg.contains("stopped"), "{msg}");
    assert!(!m.take_changes().is_empty());
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
