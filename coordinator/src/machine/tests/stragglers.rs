//! Stragglers: reported, and evicted when asked.

use super::*;

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
    // What `kiln status` lists, kept by the tick.
    assert_eq!(m.stragglers_of(&job), vec![2]);
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
