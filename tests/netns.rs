//! A job across hosts: the coordinator and each worker in its own network namespace with its
//! own address (tests/common/netns.rs), the ranks reaching each other by those addresses, and
//! links cut under it. Needs root; CI runs it as root. Outside CI, a machine that cannot make
//! namespaces skips it and says so.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::time::Instant;

use cluster::netns::Net;
use cluster::{twin, Cluster};
use common::*;

fn net_or_skip(n: usize) -> Option<Net> {
    match Net::new(n) {
        Ok(net) => Some(net),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: cannot make network namespaces here ({e}); CI runs this as root");
            None
        }
        Err(e) => panic!("network namespaces: {e}"),
    }
}

/// Cuts the links `pairs` until `job`'s failure count grows past `restarts`, then restores
/// them; the job's status then.
fn cut_until_recovery(
    cluster: &Cluster,
    job: &str,
    pairs: &[(usize, usize)],
    what: &str,
) -> kiln_proto::rpc::JobStatus {
    let before = cluster.status(job);
    let net = cluster.net.as_ref().unwrap();
    for &(a, b) in pairs {
        net.cut(a, b);
    }
    let t = Instant::now();
    let s = cluster.wait(job, what, |s| s.restarts > before.restarts);
    println!(
        "{what}: a failure after {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        s.message
    );
    for &(a, b) in pairs {
        net.restore(a, b);
    }
    s
}

#[test]
fn a_job_across_hosts_survives_cut_links() {
    let Some(net) = net_or_skip(4) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base_job = twin(dir.path(), "base", 8, 4, "", 48);
    let base = run(&base_job, 2);

    // Host 0: the coordinator; hosts 1 to 3: a worker each (2 ranks and a spare).
    let mut cluster = Cluster::in_net(dir.path(), "3", &["--max-restarts", "20"], net);
    for _ in 0..3 {
        cluster.add_worker(1);
    }
    let job_path = twin(dir.path(), "hosts", 8, 4, "", 48);
    // At least 2 workers: a recovery waits for a second one rather than go on alone.
    let job = cluster
        .kiln_ok(&[
            "submit",
            path_str(&job_path),
            "--workers",
            "2",
            "--min-workers",
            "2",
        ])
        .trim()
        .to_owned();
    cluster.wait(&job, "committed step 4", |s| {
        s.committed_step >= 4 && s.phase == "running"
    });
    // The workers offer, and the ranks use, their hosts' own addresses.
    let reply = cluster.try_status(&job).unwrap();
    let mut hosts: Vec<&str> = reply.workers.iter().map(|w| w.host.as_str()).collect();
    hosts.sort();
    assert_eq!(hosts, ["10.231.0.2", "10.231.0.3", "10.231.0.4"]);

    // 1. The coordinator cut off from every worker for longer than the heartbeat timeout:
    //    the ranks keep training meanwhile, the coordinator gives the workers up; once the
    //    links are back the agents register again, the ranks still running are aborted and
    //    the job resumes from its newest committed checkpoint.
    let s = cut_until_recovery(
        &cluster,
        &job,
        &[(0, 1), (0, 2), (0, 3)],
        "coordinator cut off",
    );
    assert!(s.message.contains("stopped sending heartbeats"), "{s:?}");
    let c = s.committed_step;
    cluster.wait(&job, "committing again", |s| {
        s.phase == "running" && s.generation >= 2 && s.committed_step > c
    });

    // 2. The two training workers cut off from each other, not from the coordinator: the
    //    ranks fail naming the rank they cannot reach, and the job recovers once the link is
    //    back.
    let (a, b) = (
        cluster.worker_of_rank(&job, 0),
        cluster.worker_of_rank(&job, 1),
    );
    let before = cluster.status(&job);
    cut_until_recovery(&cluster, &job, &[(a + 1, b + 1)], "ranks cut off");
    let logs = cluster.logs(&job);
    assert!(
        ["lost rank", "cannot reach rank", "for rank"]
            .iter()
            .any(|named| logs.contains(named)),
        "no rank named in:\n{logs}"
    );
    cluster.wait(&job, "committing again", |s| {
        s.phase == "running"
            && s.generation > before.generation
            && s.committed_step > before.committed_step
    });

    // 3. A training worker cut off from the coordinator, not from its peer: after the
    //    heartbeat timeout the coordinator gives it up and aborts the other rank; the job
    //    continues on the other worker and the spare.
    let victim = cluster.worker_of_rank(&job, 1);
    cut_until_recovery(&cluster, &job, &[(0, victim + 1)], "worker cut off");

    cluster.wait_done(&job);
    let logs = cluster.logs(&job);
    assert!(
        logs.matches("stopped sending heartbeats").count() >= 2,
        "{logs}"
    );
    // Nothing committed was lost and no two generations wrote at once: the losses, the
    // validation losses and the ledger of samples are the uninterrupted run's.
    let run = Run::read(&output_dir(&job_path));
    run.assert_matches(&base, 1e-6, "across hosts, through cut links");
    let list = kiln_ok(&[
        "checkpoint",
        "list",
        path_str(&output_dir(&job_path).join("checkpoints")),
    ]);
    assert!(list.contains("step-48: committed"), "{list}");
}
