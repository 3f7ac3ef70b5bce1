//! The coordinator with real processes on loopback: `kiln coordinator`, `kiln worker` and
//! `kiln submit`/`status`/`scale` as separate processes, and `kiln local`. Each training
//! run is checked against an uninterrupted `kiln train` of the same job: the same losses
//! and the same ledger of samples. Bad requests and TLS are in tests/coordinator_service.rs.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/otlp.rs"]
mod otlp;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{twin, Cluster};
use common::*;

/// The command lines of this machine's processes that contain `text`.
fn processes_with(text: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(text))
        .collect()
}

/// dp 2 x tp 2 on four workers, through `kiln local` and through a coordinator and worker
/// processes started separately (two hosts' worth of `--nproc-per-node 2`): both train
/// the curve of one process with the whole batch.
#[test]
fn dp2_tp2_through_kiln_local_and_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let single = twin(dir.path(), "single", 8, 2, "", 12);
    let base = run(&single, 1);

    let local = twin(dir.path(), "local", 8, 2, "tp = 2", 12);
    // The worker processes' temporary folders go here, and must be gone when it returns.
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "local",
            path_str(&local),
            "--workers",
            "4",
            "--heartbeat-timeout-s",
            "20",
        ])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "kiln local left {left:?} in its TMPDIR");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kiln local failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("completed"), "{stdout}");
    assert!(
        stdout.contains("all 4 ranks running") || stderr.contains("all 4 ranks running"),
        "{stdout}\n{stderr}"
    );
    let local_run = Run::read(&output_dir(&local));
    assert_eq!(local_run.start["dp"], 2);
    assert_eq!(local_run.start["tp"], 2);
    local_run.assert_matches(&base, 1e-4, "kiln local, dp 2 x tp 2");

    let mut cluster = Cluster::new(dir.path(), "20");
    cluster.add_worker(2);
    cluster.add_worker(2);
    let separate = twin(dir.path(), "separate", 8, 2, "tp = 2", 12);
    let watched = cluster.kiln_ok(&["submit", path_str(&separate), "--workers", "4", "--watch"]);
    assert!(watched.contains(": completed"), "{watched}");
    let s = cluster.status(watched.lines().next().unwrap().trim());
    assert_eq!((s.world, s.tp, s.generation, s.restarts), (4, 2, 1, 0));
    Run::read(&output_dir(&separate)).assert_matches(
        &base,
        1e-4,
        "separate processes, dp 2 x tp 2",
    );
    // The checkpoints were committed through the coordinator.
    assert_eq!(s.committed_step, 12);
}

/// `kiln local` killed with SIGKILL leaves neither a worker nor a training process behind.
#[test]
fn nothing_outlives_a_killed_kiln_local() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_job_with(dir.path(), "orphancheck", 8, 4, "", "every = 4", 100_000);
    let mut local = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["local", path_str(&job), "--workers", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = local.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("coordinator on ") {
                let _ = tx.send(rest.split(';').next().unwrap_or("").to_owned());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("kiln local starts");
    let ranks = "orphancheck-1-g1-r";
    let deadline = Instant::now() + Duration::from_secs(300);
    while processes_with(ranks).len() < 2 {
        assert!(Instant::now() < deadline, "the ranks never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(processes_with(&url).len(), 2, "two workers");
    local.kill().unwrap();
    local.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<String> = [processes_with(&url), processes_with(ranks)].concat();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILL a worker mid-run: the job recovers from its last committed checkpoint on the
/// spare worker and finishes with the curve and the samples of an uninterrupted run. The
/// killed worker's agent dies with its rank, as with a lost host: rank 0, the only rank
/// connected to it, reports it lost, and the coordinator gives it up at once instead of
/// waiting out its heartbeat timeout (60 s here, longer than the whole test takes otherwise).
#[test]
fn a_killed_worker_is_replaced_and_the_curve_continues() {
    let dir = tempfile::tempdir().unwrap();
    let base_job = twin(dir.path(), "base", 8, 4, "", 40);
    let base = run(&base_job, 2);

    // The coordinator exports its metrics and spans to a receiver here.
    let receiver = otlp::Receiver::start();
    let mut cluster = Cluster::with_env(dir.path(), "60", &[], receiver.env());
    for _ in 0..3 {
        cluster.add_worker(1);
    }
    let job_path = twin(dir.path(), "recover", 8, 4, "", 40);
    let job = cluster.submit(&job_path, 2);
    cluster.wait(&job, "committed step 8", |s| {
        s.committed_step >= 8 && s.phase == "running"
    });
    let victim = cluster.worker_of_rank(&job, 1);
    cluster.kill_worker(victim);
    let kill_step = cluster.status(&job).committed_step;
    println!("killed worker {victim} (rank 1) after checkpoint step {kill_step}");
    // Its training process does not outlive it.
    let marker = format!("work-{victim}/");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !processes_with(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "orphaned: {:?}",
            processes_with(&marker)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let s = cluster.wait_done(&job);
    assert!(s.restarts >= 1, "{s:?}");
    assert!(s.generation >= 2, "{s:?}");
    // Every committed folder holds what its manifest names and nothing the killed rank
    // left (a cut-short upload, `NAME#N`, included).
    let ckpts = output_dir(&job_path).join("checkpoints");
    for entry in std::fs::read_dir(&ckpts).unwrap().flatten() {
        let folder = entry.path();
        let Ok(text) = std::fs::read(folder.join("manifest.json")) else {
            continue;
        };
        let manifest: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let objects = manifest["objects"].as_array().unwrap();
        let mut expected: Vec<String> = objects
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_owned())
            .chain((0..objects.len()).map(|r| format!("rank-{r:05}.json")))
            .chain(["manifest.json".to_owned()])
            .collect();
        expected.sort();
        let mut held: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        held.sort();
        assert_eq!(held, expected, "{}", folder.display());
    }
    let logs = cluster.logs(&job);
    assert!(
        logs.contains("recovering from the newest checkpoint"),
        "{logs}"
    );
    assert!(
        logs.contains("(rank 1) given up: every rank connected to it lost it"),
        "{logs}"
    );
    assert!(!logs.contains("stopped sending heartbeats"), "{logs}");
    // The recovery is a span, from the failure to generation 2 running, and a count.
    let deadline = Instant::now() + Duration::from_secs(20);
    let recovery = loop {
        let spans = receiver.spans();
        if let Some(span) = spans.into_iter().find(|s| s.name == "recovery") {
            break span;
        }
        assert!(Instant::now() < deadline, "no recovery span arrived");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(recovery.attributes["kiln.job.id"], job);
    assert_eq!(recovery.attributes["kiln.generation"], "1");
    assert_eq!(recovery.attributes["kiln.next_generation"], "2");
    assert!(
        recovery.attributes["kiln.reason"].contains("rank 1"),
        "{:?}",
        recovery.attributes
    );
    assert!(recovery.end_ns > recovery.start_ns);
    println!(
        "recovery span: {:.2} s, {:?}",
        (recovery.end_ns - recovery.start_ns) as f64 / 1e9,
        recovery.attributes
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !receiver
        .points()
        .iter()
        .any(|p| p.name == "kiln.job.recoveries" && p.value >= 1.0)
    {
        assert!(
            Instant::now() < deadline,
            "kiln.job.recoveries never counted 1"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = Run::read(&output_dir(&job_path));
    run.assert_matches(&base, 1e-6, "recovered after a killed worker");
    // Nothing committed before the kill was lost: every checkpoint kept is whole.
    let list = kiln_ok(&[
        "checkpoint",
        "list",
        path_str(&output_dir(&job_path).join("checkpoints")),
    ]);
    assert!(list.contains("step-40: committed"), "{list}");
}

/// `checkpoint.memory_every = 1` with the store's checkpoint only at the end: a worker
/// (its agent, its training process and the snapshots it held) is killed mid-run, and the
/// job resumes from the newest step every rank still finds in the surviving workers' memory,
/// rank 1's from the peer that held its copy, and trains the uninterrupted curve.
#[test]
fn a_lost_worker_resumes_from_its_peers_memory() {
    let dir = tempfile::tempdir().unwrap();
    let base = run(&twin(dir.path(), "base", 8, 4, "", 40), 2);
    let mut cluster = Cluster::new(dir.path(), "60");
    for _ in 0..3 {
        cluster.add_worker(1);
    }
    let job_path = tiny_job_with(
        dir.path(),
        "memory",
        8,
        4,
        "",
        "every = 40\nmemory_every = 1",
        40,
    );
    let job = cluster.submit(&job_path, 2);
    let s = cluster.wait(&job, "step 8", |s| {
        s.progress.as_ref().is_some_and(|p| p.step >= 8) && s.phase == "running"
    });
    let seen = s.progress.as_ref().map_or(0, |p| p.step);
    let victim = cluster.worker_of_rank(&job, 1);
    cluster.kill_worker(victim);
    assert_eq!(
        cluster.status(&job).committed_step,
        0,
        "the store has no checkpoint before the end"
    );
    println!("killed worker {victim} (rank 1) after step {seen}");
    let s = cluster.wait_done(&job);
    assert!(s.restarts >= 1, "{s:?}");
    let out = output_dir(&job_path);
    let resumed: Vec<serde_json::Value> = read_metrics(&out.join("metrics.jsonl"))
        .into_iter()
        .filter(|m| m["type"] == "resumed")
        .collect();
    println!("{resumed:?}");
    let last = resumed.last().expect("a resumed event");
    let step = last["step"].as_i64().unwrap();
    let from = last["from"].as_str().unwrap();
    assert!(from.contains("in workers' memory"), "{from}");
    // At most the step in flight is redone: the snapshots are of every step.
    assert!(step + 1 >= seen as i64, "resumed at {step}, seen at {seen}");
    Run::read(&out).assert_matches(&base, 1e-6, "resumed from memory after a lost worker");
}

/// SIGKILL the coordinator mid-run and start it again on the same state: the workers
/// register again, the job is picked up where it is (no restart) and finishes.
#[test]
fn a_killed_coordinator_restarts_and_the_job_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let base_job = twin(dir.path(), "base", 8, 4, "", 40);
    let base = run(&base_job, 2);

    let mut cluster = Cluster::new(dir.path(), "5");
    cluster.add_worker(1);
    cluster.add_worker(1);
    let job_path = twin(dir.path(), "survive", 8, 4, "", 40);
    let job = cluster.submit(&job_path, 2);
    let before = cluster.wait(&job, "committed step 4", |s| s.committed_step >= 4);
    cluster.kill_coordinator();
    std::thread::sleep(Duration::from_millis(1500));
    cluster.start_coordinator();
    let after = cluster.status(&job);
    println!("before the kill: {before:?}\nafter the restart: {after:?}");
    assert!(after.committed_step >= before.committed_step);
    assert_eq!(after.generation, 1);

    let s = cluster.wait_done(&job);
    assert_eq!((s.generation, s.restarts), (1, 0), "{s:?}");
    let logs = cluster.logs(&job);
    assert!(logs.contains("coordinator restarted"), "{logs}");
    Run::read(&output_dir(&job_path)).assert_matches(&base, 1e-6, "through a coordinator restart");
    let log = std::fs::read_to_string(&cluster.workers[0].1).unwrap();
    assert!(log.contains("registered again"), "{log}");
}

/// 2 -> 3 -> 1 workers during one run: each change takes effect at a checkpoint, and the
/// ledger shows every step's samples exactly once, the same samples as one process.
#[test]
fn scaling_2_3_1_keeps_the_data_stream() {
    let dir = tempfile::tempdir().unwrap();
    let base_job = twin(dir.path(), "base", 6, 1, "", 36);
    let base = run(&base_job, 1);

    let mut cluster = Cluster::new(dir.path(), "10");
    for _ in 0..3 {
        cluster.add_worker(1);
    }
    let job_path = twin(dir.path(), "elastic", 6, 1, "", 36);
    let job = cluster.submit(&job_path, 2);
    cluster.wait(&job, "step 4 committed on 2", |s| {
        s.committed_step >= 4 && s.world == 2
    });
    println!("{}", cluster.kiln_ok(&["scale", &job, "--workers", "3"]));
    let three = cluster.wait(&job, "running on 3", |s| {
        s.world == 3 && s.phase == "running"
    });
    cluster.wait(&job, "a checkpoint on 3", |s| {
        s.world == 3 && s.committed_step > three.committed_step
    });
    println!("{}", cluster.kiln_ok(&["scale", &job, "--workers", "1"]));
    cluster.wait(&job, "running on 1", |s| s.world == 1);
    let s = cluster.wait_done(&job);
    assert!(s.generation >= 3, "{s:?}");
    let logs = cluster.logs(&job);
    for change in ["2 -> 3 workers", "3 -> 1 workers"] {
        assert!(logs.contains(change), "{logs}");
    }

    let run = Run::read(&output_dir(&job_path));
    // Every step once, in order, each the next 6 samples.
    let steps: Vec<serde_json::Value> = run
        .ledger
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 36);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"], i as u64);
        assert_eq!(s["first_sample"], 6 * i as u64);
    }
    // The same samples as one process, and the curve within float noise of it (the
    // data-parallel size changed twice).
    run.assert_matches(&base, 1e-4, "scaled 2 -> 3 -> 1");
}
