//! Job specs: which worlds fit, and what is refused.

use super::*;

#[test]
fn fits_needs_tp_multiples_and_a_dividing_batch() {
    let s = spec(1, 6, 1);
    for w in [1, 2, 3, 6] {
        assert!(s.fits(w), "world {w}");
    }
    for w in [0, 4, 5, 7, 12] {
        assert!(!s.fits(w), "world {w}");
    }
    // tp 2, batch 8 in micro-batches of 2: dp 1, 2 and 4 fit.
    let s = spec(2, 8, 2);
    for w in [2, 4, 8] {
        assert!(s.fits(w), "world {w}");
    }
    for w in [1, 3, 6, 12, 16] {
        assert!(!s.fits(w), "world {w}");
    }
    // Hybrid sharding in groups of 2 data-parallel ranks: dp 1 no longer fits, and a world
    // of 5 shrinks to 4, not 3.
    let mut s = spec(1, 8, 1);
    s.shard = 2;
    for w in [2, 4, 8] {
        assert!(s.fits(w), "world {w}");
    }
    for w in [1, 3, 6] {
        assert!(!s.fits(w), "world {w}");
    }
    assert_eq!(s.plan_world(5, 8), Some(4));
    let e = s.check_workers(1).unwrap_err();
    assert!(e.contains("a multiple of parallel.shard = 2"), "{e}");
}

#[test]
fn plan_world_takes_the_largest_fitting_world_within_bounds() {
    let s = spec(1, 6, 1);
    assert_eq!(s.plan_world(5, 5), Some(3));
    assert_eq!(s.plan_world(10, 4), Some(3));
    assert_eq!(s.plan_world(10, 6), Some(6));
    assert_eq!(s.plan_world(1, 6), Some(1));
    assert_eq!(s.plan_world(0, 2), None);

    let mut s = spec(1, 6, 1);
    s.min_workers = 4;
    assert_eq!(s.plan_world(10, 6), Some(6));
    assert_eq!(
        s.plan_world(5, 6),
        None,
        "4 and 5 do not fit, 3 is below the minimum"
    );

    let mut s = spec(1, 6, 1);
    s.max_workers = 2;
    assert_eq!(s.plan_world(10, 6), Some(2));

    let s = spec(2, 8, 2);
    assert_eq!(s.plan_world(7, 8), Some(4));
    assert_eq!(s.plan_world(1, 8), None);
}

#[test]
fn check_workers_explains_refusals() {
    let s = spec(1, 6, 1);
    assert_eq!(s.check_workers(3), Ok(()));
    assert!(s.check_workers(0).unwrap_err().contains("at least 1"));
    let e = s.check_workers(4).unwrap_err();
    assert!(e.contains("4 workers cannot run this job"), "{e}");
    assert!(e.contains("parallel.tp = 1"), "{e}");
    assert!(e.contains("train.batch_size = 6"), "{e}");
    assert!(e.contains("micro-batches of 1"), "{e}");

    let mut s = spec(1, 6, 1);
    s.min_workers = 2;
    s.max_workers = 3;
    let e = s.check_workers(1).unwrap_err();
    assert!(e.contains("below the job's minimum of 2"), "{e}");
    let e = s.check_workers(6).unwrap_err();
    assert!(e.contains("above the job's maximum of 3"), "{e}");
}

#[test]
fn submit_refuses_invalid_jobs() {
    let mut m = machine();
    assert!(matches!(
        m.submit(spec(0, 6, 1), 1, 0.0),
        Err(Refusal::Invalid(_))
    ));
    assert!(matches!(
        m.submit(spec(1, 6, 0), 1, 0.0),
        Err(Refusal::Invalid(_))
    ));
    let mut s = spec(1, 6, 1);
    s.min_workers = 3;
    s.max_workers = 2;
    let e = m.submit(s, 2, 0.0).unwrap_err();
    assert!(
        matches!(&e, Refusal::Invalid(t) if t.contains("above max_workers")),
        "{e}"
    );
    let e = m.submit(spec(1, 6, 1), 4, 0.0).unwrap_err();
    assert!(
        matches!(&e, Refusal::Invalid(t) if t.contains("cannot run this job")),
        "{e}"
    );
    assert!(m.jobs.is_empty());
    assert!(m.take_changes().is_empty());
}

#[test]
fn job_ids_are_sanitized_and_numbered() {
    let mut m = machine();
    let mut s = spec(1, 1, 1);
    s.name = "my job/v2".into();
    assert_eq!(m.submit(s, 1, 0.0).unwrap(), "my-job-v2-1");
    let mut s = spec(1, 1, 1);
    s.name = String::new();
    assert_eq!(m.submit(s, 1, 0.0).unwrap(), "job-2");
}

#[test]
fn a_second_job_writing_where_an_unfinished_one_writes_is_refused() {
    let writes = |outputs: &[&str]| JobSpec {
        outputs: outputs.iter().map(|o| o.to_string()).collect(),
        ..spec(1, 4, 1)
    };
    let mut m = machine();
    let first = m
        .submit(writes(&["/runs/a", "/runs/a/checkpoints"]), 1, 0.0)
        .unwrap();
    // The same place, a place inside it, a place that holds it: refused, naming the job.
    for outputs in [
        &["/runs/a", "/runs/a/checkpoints"][..],
        &["/runs/b", "/runs/a/checkpoints/more"],
        &["/runs", "s3://bucket/ckpt"],
    ] {
        let err = m.submit(writes(outputs), 1, 1.0).unwrap_err();
        assert!(matches!(err, Refusal::OutputInUse(_)), "{err}");
        assert!(err.to_string().contains(&first), "{err}");
        assert!(err.to_string().contains("kiln stop"), "{err}");
    }
    // Neighbours with a common prefix are not nested.
    let other = m.submit(writes(&["/runs/ab", "s3://bucket/ckpt"]), 1, 2.0);
    assert!(other.is_ok(), "{other:?}");
    let err = m
        .submit(writes(&["/elsewhere", "s3://bucket/ckpt/x"]), 1, 3.0)
        .unwrap_err();
    assert!(matches!(err, Refusal::OutputInUse(_)), "{err}");
    // Once the first job is finished, its place is free again.
    m.stop(&first, 4.0).unwrap();
    assert!(m.submit(writes(&["/runs/a"]), 1, 5.0).is_ok());
}

/// `kiln submit --queue`: a job that writes where an unfinished one writes waits for it (and
/// for the jobs queued there before it) to end, then runs; the output is never shared.
#[test]
fn a_queued_job_starts_when_the_jobs_ahead_of_it_have_ended() {
    let writes = |queue: bool| JobSpec {
        outputs: vec!["/runs/a".into()],
        queue,
        ..spec(1, 1, 1)
    };
    let mut m = machine();
    let w = m.register("host-1".into(), "", idle(&addr(1)), 0.0);
    let first = m.submit(writes(false), 1, 0.0).unwrap();
    assert_eq!(m.jobs[&first].phase, Phase::Rendezvous);
    let second = m.submit(writes(true), 1, 1.0).unwrap();
    let third = m.submit(writes(true), 1, 2.0).unwrap();
    assert!(m.jobs[&third].log[0]
        .message
        .contains(&format!("queued behind {first}, {second}")));
    // A spare worker does not start the queued jobs.
    m.register("host-2".into(), "", idle(&addr(2)), 2.5);
    m.tick(3.0);
    for id in [&second, &third] {
        assert_eq!(m.jobs[id].phase, Phase::Pending);
    }
    assert!(
        m.jobs[&second].message.contains(&format!(
            "queued: job {first} (rendezvous) writes where this job writes"
        )),
        "{}",
        m.jobs[&second].message
    );
    assert!(m.jobs[&third].message.contains(&format!("job {first}")));
    // Without --queue it is still refused, naming the flag.
    let err = m.submit(writes(false), 1, 3.5).unwrap_err().to_string();
    assert!(err.contains("--queue"), "{err}");
    // The first ends: the second starts, the third waits for it.
    run_of(&hb(&mut m, &w, idle(&addr(1)), 4.0));
    hb(&mut m, &w, running(&first, 1, 0), 4.0);
    let mut done = ended(&first, 1, 0, WorkerState::Succeeded, "");
    done.ready_addr = Some(addr(1));
    hb(&mut m, &w, done, 5.0);
    assert_eq!(m.jobs[&first].phase, Phase::Completed);
    m.tick(5.5);
    assert_eq!(m.jobs[&second].phase, Phase::Rendezvous);
    assert_eq!(m.jobs[&third].phase, Phase::Pending);
    assert!(m.jobs[&third]
        .message
        .contains(&format!("queued: job {second}")));
    m.stop(&second, 6.0).unwrap();
    m.tick(6.5);
    assert_eq!(m.jobs[&third].phase, Phase::Rendezvous);
}
