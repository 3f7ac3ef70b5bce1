//! Finished jobs leave the state after their retention; unfinished ones never do.

use super::*;

/// Submits a one-worker job (a distinct output each) at `now` and stops it at `now`.
fn finished_job(m: &mut Machine, n: usize, now: f64) -> String {
    let mut s = spec(1, 1, 1);
    s.outputs = vec![format!("/runs/{n}")];
    let id = m.submit(s, 1, now).unwrap();
    m.stop(&id, now).unwrap();
    id
}

#[test]
fn only_the_newest_finished_jobs_are_kept() {
    let mut m = Machine::new(
        Policy {
            retain_finished_jobs: 3,
            ..Policy::default()
        },
        EPOCH.into(),
    );
    let ids: Vec<String> = (0..5).map(|n| finished_job(&mut m, n, n as f64)).collect();
    let mut open = spec(1, 1, 1);
    open.outputs = vec!["/runs/open".into()];
    let pending = m.submit(open, 1, 0.0).unwrap();
    m.take_changes();
    m.tick(10.0);
    let kept: BTreeSet<&String> = m.jobs.keys().collect();
    assert_eq!(kept, [&ids[2], &ids[3], &ids[4], &pending].into());
    let changes = m.take_changes();
    assert_eq!(changes.dropped, [ids[0].clone(), ids[1].clone()].into());
    assert!(changes.jobs.is_empty());
    // Dropped is dropped once; the counter goes on, so no id is handed out again.
    m.tick(11.0);
    assert!(m.take_changes().dropped.is_empty());
    let next = finished_job(&mut m, 9, 12.0);
    assert!(!ids.contains(&next));
}

#[test]
fn finished_jobs_are_dropped_after_the_retention_period() {
    let mut m = Machine::new(
        Policy {
            retain_finished_s: 100.0,
            ..Policy::default()
        },
        EPOCH.into(),
    );
    let old = finished_job(&mut m, 0, 0.0);
    let young = finished_job(&mut m, 1, 50.0);
    m.tick(100.0);
    assert!(m.jobs.contains_key(&old), "kept exactly the period");
    m.tick(120.0);
    assert!(!m.jobs.contains_key(&old));
    assert!(m.jobs.contains_key(&young));
    assert_eq!(m.jobs[&young].finished_unix_s, 50.0);
    assert!(matches!(m.stop(&old, 121.0), Err(Refusal::UnknownJob(_))));
}

#[test]
fn a_job_finished_before_its_finish_time_was_kept_counts_from_its_last_entry() {
    let mut m = machine();
    let id = finished_job(&mut m, 0, 30.0);
    let mut state = m.persisted();
    state.jobs[0].finished_unix_s = 0.0;
    let r = Machine::restore(Policy::default(), "e2".into(), state, 1000.0);
    assert_eq!(r.jobs[&id].finished_unix_s, 30.0);
}
