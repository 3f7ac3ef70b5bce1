//! A job of thousands of ranks through the machine, one rank's report at a time, as the
//! heartbeats arrive: each report moves only its own rank's tally, and the job moves exactly
//! when the last rank it waits for reports.

use super::*;

const WORLD: usize = 4096;

#[test]
fn a_large_job_moves_when_its_last_rank_reports() {
    let mut m = machine();
    let ids: Vec<String> = (0..WORLD)
        .map(|i| {
            m.register(
                format!("host-{i}"),
                "",
                idle(&format!("10.1.{}.{}:7000", i / 256, i % 256)),
                0.0,
            )
        })
        .collect();
    let job = m
        .submit(spec(4, WORLD as u64 / 4, 1), WORLD as u32, 0.0)
        .unwrap();
    assert_eq!(m.jobs[&job].phase, Phase::Rendezvous);
    let ranks = m.jobs[&job].ranks.clone();
    assert_eq!(ranks.len(), WORLD);

    // Bring-up: each rank's assignment names only its ring neighbours.
    for (rank, id) in ranks.iter().enumerate() {
        let a = addr_of(&m, id);
        let reply = hb(&mut m, id, idle(&a), 1.0);
        let run = run_of(&reply);
        assert_eq!((run.rank, run.world_size), (rank as u32, WORLD as u32));
        let named: Vec<u32> = run.peers.iter().map(|(r, _)| *r).collect();
        assert_eq!(named, ring_neighbours(rank as u32, WORLD as u32, 4, 0));
        for (r, a) in &run.peers {
            assert_eq!(*a, m.jobs[&job].peers[*r as usize]);
        }
    }
    for (rank, id) in ranks.iter().enumerate() {
        assert_eq!(m.jobs[&job].phase, Phase::Rendezvous, "rank {rank}");
        hb(&mut m, id, running(&job, 1, rank as u32), 2.0);
    }
    assert_eq!(m.jobs[&job].phase, Phase::Running);

    // Commit: phase two only once the last rank wrote step 10, and the job's record is not
    // written before.
    m.take_changes();
    for (rank, id) in ranks.iter().enumerate().rev() {
        assert_eq!(m.jobs[&job].commit_step, 0, "rank {rank}");
        let reply = hb(&mut m, id, ckpt(running(&job, 1, rank as u32), 10, 0), 3.0);
        if rank > 0 {
            assert!(m.take_changes().is_empty(), "rank {rank}");
        } else {
            assert_eq!(reply.commit_step, 10);
        }
    }
    assert_eq!(m.jobs[&job].phase, Phase::Checkpointing);
    hb(&mut m, &ranks[0], ckpt(running(&job, 1, 0), 10, 10), 3.5);
    assert_eq!(m.jobs[&job].phase, Phase::Running);
    assert_eq!(m.jobs[&job].committed_step, 10);

    // A rank fails: the generation ends; the next forms only when the last of the others
    // stopped, on all the workers (the failed one's agent lives).
    let failed = WORLD / 2;
    hb(
        &mut m,
        &ranks[failed],
        ended(&job, 1, failed as u32, WorkerState::Failed, "boom"),
        4.0,
    );
    assert_eq!(m.jobs[&job].phase, Phase::Recovering);
    assert!(failure_log(&m.jobs[&job]).message.contains(&format!(
        "rank {failed} (worker {}) failed: boom",
        ranks[failed]
    )));
    for (rank, id) in ranks.iter().enumerate().filter(|(r, _)| *r != failed) {
        let reply = hb(&mut m, id, ckpt(running(&job, 1, rank as u32), 10, 10), 5.0);
        abort_of(&reply);
        assert_eq!(m.jobs[&job].generation, 1, "rank {rank}");
        let a = addr_of(&m, id);
        hb(&mut m, id, idle(&a), 5.0);
    }
    let j = &m.jobs[&job];
    assert_eq!(
        (j.phase, j.generation),
        (Phase::Rendezvous, 2),
        "{}",
        j.message
    );
    assert_eq!(j.ranks.len(), WORLD);
    assert_eq!(j.ranks, ranks, "the same workers keep their ranks");
    // Finished: every rank succeeds.
    for (rank, id) in ranks.iter().enumerate() {
        hb(&mut m, id, running(&job, 2, rank as u32), 6.0);
    }
    assert_eq!(m.jobs[&job].phase, Phase::Running);
    for (rank, id) in ranks.iter().enumerate() {
        assert_eq!(m.jobs[&job].phase, Phase::Running, "rank {rank}");
        let a = addr_of(&m, id);
        let mut done = ended(&job, 2, rank as u32, WorkerState::Succeeded, "");
        done.ready_addr = Some(a);
        hb(&mut m, id, done, 7.0);
    }
    assert_eq!(m.jobs[&job].phase, Phase::Completed);
    assert_eq!(ids.len(), WORLD);
}
