//! Snapshots in workers' memory: where each rank sends them, and where a later generation
//! looks for them after the ranks moved.

use super::*;
use crate::machine::job::memory_peers;

fn mem(i: usize) -> String {
    format!("10.0.1.{i}:7000")
}

#[test]
fn a_ranks_peer_copy_goes_to_another_host() {
    let workers: Vec<String> = ["a0", "a1", "b0", "b1"].map(String::from).to_vec();
    let hosts = ["a", "a", "b", "b"];
    assert_eq!(memory_peers(0, &workers, &hosts), ["a0", "b0"]);
    assert_eq!(memory_peers(1, &workers, &hosts), ["a1", "b0"]);
    assert_eq!(memory_peers(3, &workers, &hosts), ["b1", "a0"]);
    // One host: the next rank's worker.
    assert_eq!(memory_peers(1, &workers, &["h"; 4]), ["a1", "b0"]);
    assert_eq!(memory_peers(0, &workers[..1], &["h"]), ["a0"]);
}

#[test]
fn snapshots_are_looked_for_where_earlier_generations_sent_them() {
    let mut m = machine();
    let ids: Vec<String> = (1..=4)
        .map(|i| {
            let id = m.register(format!("host-{i}"), "", idle(&addr(i)), 0.0);
            m.set_memory_addr(&id, mem(i));
            id
        })
        .collect();
    let mut s = spec(1, 6, 1);
    s.memory_every = 1;
    let job = m.submit(s, 3, 0.0).unwrap();
    let mut runs = Vec::new();
    for (rank, id) in ids[..3].iter().enumerate() {
        let run = run_of(&hb(&mut m, id, idle(&addr(rank + 1)), 0.0)).clone();
        assert_eq!(run.rank, rank as u32);
        runs.push(run);
    }
    // Each rank to its own worker and the next rank's (every worker is its own host).
    assert_eq!(runs[0].memory_to, [mem(1), mem(2)]);
    assert_eq!(runs[1].memory_to, [mem(2), mem(3)]);
    assert_eq!(runs[2].memory_to, [mem(3), mem(1)]);
    assert_eq!(runs[2].memory_from, runs[2].memory_to);
    for (rank, id) in ids[..3].iter().enumerate() {
        hb(&mut m, id, running(&job, 1, rank as u32), 1.0);
    }
    // Rank 1's worker goes silent and is given up; the spare takes a rank.
    hb(&mut m, &ids[0], running(&job, 1, 0), 14.0);
    hb(&mut m, &ids[2], running(&job, 1, 2), 14.0);
    hb(&mut m, &ids[3], idle(&addr(4)), 14.0);
    m.tick(15.5);
    assert!(!m.workers.contains_key(&ids[1]));
    abort_of(&hb(&mut m, &ids[0], running(&job, 1, 0), 16.0));
    abort_of(&hb(&mut m, &ids[2], running(&job, 1, 2), 16.0));
    hb(&mut m, &ids[0], idle(&addr(1)), 17.0);
    hb(&mut m, &ids[2], idle(&addr(3)), 17.0);
    let j = &m.jobs[&job];
    assert_eq!(j.generation, 2, "{}", j.message);
    assert_eq!(j.ranks, [&ids[0], &ids[2], &ids[3]].map(|s| s.clone()));
    let rank =
        |m: &mut Machine, id: &str, a: usize| run_of(&hb(m, id, idle(&addr(a)), 17.0)).clone();
    let r1 = rank(&mut m, &ids[2], 3);
    let r2 = rank(&mut m, &ids[3], 4);
    assert_eq!((r1.rank, r2.rank), (1, 2));
    // Rank 1 is now on worker 3, which held old rank 1's peer copy; the lost worker 2 is
    // not offered.
    assert_eq!(r1.memory_to, [mem(3), mem(4)]);
    assert_eq!(r1.memory_from, [mem(3), mem(4)]);
    // Rank 2 moved to the spare: it looks where it went and where rank 2 sent its own.
    assert_eq!(r2.memory_to, [mem(4), mem(1)]);
    assert_eq!(r2.memory_from, [mem(4), mem(1), mem(3)]);
}

#[test]
fn a_job_without_snapshots_names_no_workers() {
    let mut m = machine();
    let id = m.register("host-1".into(), "", idle(&addr(1)), 0.0);
    m.set_memory_addr(&id, mem(1));
    m.submit(spec(1, 2, 1), 1, 0.0).unwrap();
    let run = run_of(&hb(&mut m, &id, idle(&addr(1)), 0.0)).clone();
    assert!(run.memory_to.is_empty() && run.memory_from.is_empty());
}

/// Rank 1 fails `times` times; between failures rank 0 trains 5 steps further each time.
/// Returns the job's phase after the last failure.
fn fail_with_progress(memory_every: u64, times: u64) -> Phase {
    let mut m = machine();
    let mut s = spec(1, 2, 1);
    s.memory_every = memory_every;
    let (job, ids) = start(&mut m, s, 2, 2, 0.0);
    let mut now = 1.0;
    for g in 1..=times {
        let mut r = running(&job, g, 0);
        r.progress = Some(Progress {
            step: 5 * g,
            steps: 100,
            ..Progress::default()
        });
        hb(&mut m, &ids[0], r, now);
        m.tick(now);
        hb(
            &mut m,
            &ids[1],
            ended(&job, g, 1, WorkerState::Failed, "killed\n"),
            now,
        );
        if m.jobs[&job].phase.finished() {
            break;
        }
        abort_of(&hb(&mut m, &ids[0], running(&job, g, 0), now));
        run_of(&hb(&mut m, &ids[0], idle(&addr(1)), now));
        let failed = ended(&job, g, 1, WorkerState::Failed, "killed\n");
        run_of(&hb(&mut m, &ids[1], failed, now));
        hb(&mut m, &ids[1], running(&job, g + 1, 1), now);
        now += 1.0;
    }
    m.jobs[&job].phase
}

#[test]
fn progress_kept_in_memory_resets_the_failures_in_a_row() {
    // Without snapshots, nothing committed between failures: the job gives up after
    // max_restarts failures in a row.
    assert_eq!(fail_with_progress(0, 8), Phase::Failed);
    // With them, each generation trained past the furthest step before it.
    assert_ne!(fail_with_progress(1, 8), Phase::Failed);
}
