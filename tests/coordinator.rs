//! The coordinator with real processes on loopback: `kiln coordinator`, `kiln worker` and
//! `kiln submit`/`status`/`scale` as separate processes, and `kiln local`. Each training
//! run is checked against an uninterrupted `kiln train` of the same job: the same losses
//! and the same ledger of samples.

mod common;
#[path = "common/otlp.rs"]
mod otlp;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kiln_proto::client::Target;
use kiln_proto::rpc;

/// A coordinator process and worker processes, killed when dropped.
struct Cluster {
    dir: PathBuf,
    port: u16,
    token: String,
    heartbeat_timeout_s: &'static str,
    coordinator: Option<Child>,
    /// Each worker process and the file its stderr goes to.
    workers: Vec<(Child, PathBuf)>,
    rt: tokio::runtime::Runtime,
    extra: Vec<String>,
    /// The coordinator's environment, besides this process's.
    env: Vec<(String, String)>,
}

impl Cluster {
    fn new(dir: &Path, heartbeat_timeout_s: &'static str) -> Cluster {
        Cluster::with_args(dir, heartbeat_timeout_s, &[])
    }

    fn with_args(dir: &Path, heartbeat_timeout_s: &'static str, extra: &[&str]) -> Cluster {
        Cluster::with_env(dir, heartbeat_timeout_s, extra, Vec::new())
    }

    fn with_env(
        dir: &Path,
        heartbeat_timeout_s: &'static str,
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> Cluster {
        let port = free_peers(1)[0]
            .rsplit_once(':')
            .unwrap()
            .1
            .parse()
            .unwrap();
        let mut c = Cluster {
            dir: dir.to_owned(),
            port,
            token: "test-token-1234".into(),
            heartbeat_timeout_s,
            coordinator: None,
            workers: Vec::new(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env,
        };
        c.start_coordinator();
        c
    }

    fn url(&self) -> String {
        let scheme = if self.extra.iter().any(|a| a == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://localhost:{}", self.port)
    }

    fn start_coordinator(&mut self) {
        let log = File::create(self.dir.join("coordinator.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "coordinator",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
            ])
            .args(["--state", path_str(&self.dir.join("state"))])
            .args(["--token", &self.token])
            .args(["--heartbeat-timeout-s", self.heartbeat_timeout_s])
            .args(["--heartbeat-interval-ms", "200"])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.coordinator = Some(child);
        // Ready once it answers.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.try_status("").is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the coordinator did not start: {}",
                std::fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill_coordinator(&mut self) {
        let mut c = self.coordinator.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Starts a `kiln worker` process with `nproc` workers.
    fn add_worker(&mut self, nproc: usize) {
        let i = self.workers.len();
        let err = self.dir.join(format!("worker-{i}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "worker",
                "--coordinator",
                &self.url(),
                "--host",
                "127.0.0.1",
            ])
            .args(["--nproc-per-node", &nproc.to_string()])
            .args(["--name", &format!("worker-{i}")])
            .args(["--work-dir", path_str(&self.dir.join(format!("work-{i}")))])
            .envs(self.tls_env())
            .env("KILN_TOKEN", &self.token)
            .env("KILN_COLLECTIVE_TIMEOUT_S", "30")
            .stdout(Stdio::null())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap();
        self.workers.push((child, err));
    }

    fn tls_env(&self) -> Vec<(String, String)> {
        let ca = self.dir.join("ca.pem");
        if ca.exists() {
            vec![("KILN_TLS_CA".into(), path_str(&ca).into())]
        } else {
            Vec::new()
        }
    }

    fn target(&self) -> Target {
        let ca = self.dir.join("ca.pem");
        Target {
            url: self.url(),
            token: self.token.clone(),
            tls_ca: ca.exists().then_some(ca),
        }
    }

    /// `kiln ARGS` as a client of this cluster.
    fn kiln(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_COORDINATOR", self.url())
            .env("KILN_TOKEN", &self.token)
            .envs(self.tls_env())
            .output()
            .unwrap()
    }

    fn kiln_ok(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        assert!(
            out.status.success(),
            "kiln {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn submit(&self, job: &Path, workers: u32) -> String {
        self.kiln_ok(&["submit", path_str(job), "--workers", &workers.to_string()])
            .trim()
            .to_owned()
    }

    fn try_status(&self, job: &str) -> Result<rpc::StatusReply, tonic::Status> {
        let target = self.target();
        self.rt.block_on(async {
            let mut client = target
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            Ok(client
                .status(rpc::StatusRequest { job_id: job.into() })
                .await?
                .into_inner())
        })
    }

    fn status(&self, job: &str) -> rpc::JobStatus {
        self.try_status(job).unwrap().jobs.remove(0)
    }

    /// Waits until `job`'s status satisfies `pred` (or the job ends otherwise).
    fn wait(
        &self,
        job: &str,
        what: &str,
        pred: impl Fn(&rpc::JobStatus) -> bool,
    ) -> rpc::JobStatus {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let s = self.try_status(job).ok().map(|mut r| r.jobs.remove(0));
            if let Some(s) = s {
                if pred(&s) {
                    return s;
                }
                assert!(
                    !["completed", "failed", "stopped"].contains(&s.phase.as_str()),
                    "{job} ended before {what}: {s:?}\n{}",
                    self.logs(job)
                );
            }
            assert!(Instant::now() < deadline, "{job}: never {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_done(&self, job: &str) -> rpc::JobStatus {
        let s = self.wait(job, "ended", |s| s.phase == "completed");
        println!("{job}: {s:?}\n{}", self.logs(job));
        s
    }

    fn logs(&self, job: &str) -> String {
        String::from_utf8_lossy(&self.kiln(&["logs", job]).stdout).into_owned()
    }

    /// The index of the worker process running `rank` of `job`.
    fn worker_of_rank(&self, job: &str, rank: u32) -> usize {
        let reply = self.try_status(job).unwrap();
        let id = reply
            .workers
            .iter()
            .find(|w| w.job_id == job && w.rank == rank && w.state == "running")
            .unwrap_or_else(|| panic!("no worker runs rank {rank}: {:?}", reply.workers))
            .worker_id
            .clone();
        self.workers
            .iter()
            .position(|(_, log)| {
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .contains(&format!(" as {id}\n"))
            })
            .expect("the worker's log names its id")
    }

    fn kill_worker(&mut self, i: usize) {
        let (child, _) = &mut self.workers[i];
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (c, _) in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(c) = &mut self.coordinator {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The command lines of this machine's processes that contain `text`.
fn processes_with(text: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(text))
        .collect()
}

/// The same job under another name (its own output directory).
fn twin(dir: &Path, name: &str, batch: i64, micro: i64, parallel: &str, steps: i64) -> PathBuf {
    tiny_job_with(dir, name, batch, micro, parallel, "every = 4", steps)
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
/// spare worker and finishes with the curve and the samples of an uninterrupted run.
#[test]
fn a_killed_worker_is_replaced_and_the_curve_continues() {
    let dir = tempfile::tempdir().unwrap();
    let base_job = twin(dir.path(), "base", 8, 4, "", 40);
    let base = run(&base_job, 2);

    // The coordinator exports its metrics and spans to a receiver here.
    let receiver = otlp::Receiver::start();
    let mut cluster = Cluster::with_env(dir.path(), "3", &[], receiver.env());
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
    let logs = cluster.logs(&job);
    assert!(
        logs.contains("recovering from the newest checkpoint"),
        "{logs}"
    );
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

/// Wrong or missing tokens, malformed and oversized messages, unknown ids and bad fields
/// are refused with a clear status, and the coordinator keeps its jobs.
#[test]
fn bad_requests_are_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(dir.path(), "10");
    let job_path = twin(dir.path(), "kept", 8, 2, "", 12);
    let job = cluster.submit(&job_path, 2);

    // Tokens: through the CLI and the agent.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "status",
            "--coordinator",
            &cluster.url(),
            "--token",
            "wrong",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("the coordinator refused: wrong token"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["status", "--coordinator", &cluster.url()])
        .env_remove("KILN_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no token: pass --token or set KILN_TOKEN"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "worker",
            "--coordinator",
            &cluster.url(),
            "--token",
            "wrong",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("the coordinator refused this worker: wrong token"),
        "{err}"
    );

    // Unknown ids and bad fields, through the CLI.
    for (args, expected) in [
        (vec!["status", "nope-9"], "no job \"nope-9\""),
        (vec!["scale", "nope-9", "--workers", "2"], "no job \"nope-9\""),
        (vec!["stop", "nope-9"], "no job \"nope-9\""),
        (vec!["logs", "nope-9"], "no job \"nope-9\""),
        (
            vec!["scale", &job, "--workers", "3"],
            "3 workers cannot run this job: it needs a multiple of parallel.tp = 1 whose data-parallel size divides train.batch_size = 8",
        ),
        (vec!["scale", &job, "--workers", "0"], "the worker count must be at least 1"),
        (vec!["status", "has space"], "job_id: \"has space\" has characters other than printable ASCII"),
    ] {
        let out = cluster.kiln(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(expected), "{args:?}: {err}");
        println!("kiln {}: {}", args.join(" "), err.trim());
    }
    // A malformed job file is refused before anything is sent.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[train]\nsteps = \"many\"\n").unwrap();
    let out = cluster.kiln(&["submit", path_str(&bad)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "{err}");

    // Raw messages the CLI would never send.
    let target = cluster.target();
    cluster.rt.block_on(async {
        let mut client = target.connect().await.unwrap();
        let bad_state = client
            .heartbeat(rpc::HeartbeatRequest {
                worker_id: "w-1".into(),
                report: Some(rpc::WorkerReport {
                    state: 42,
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(bad_state.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            bad_state.message(),
            "report.state: 42 is not a worker state"
        );
        let unknown = client
            .heartbeat(rpc::HeartbeatRequest {
                worker_id: "w-unknown".into(),
                report: Some(rpc::WorkerReport {
                    state: rpc::WorkerState::Idle as i32,
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        assert!(unknown.message().contains("unknown worker"), "{unknown:?}");
        for (ready_addr, why) in [
            ("nowhere", "no port"),
            (
                "x:notaport",
                "port \"notaport\" is not a number in 1..=65535",
            ),
            (
                "127.0.0.1:99999",
                "port \"99999\" is not a number in 1..=65535",
            ),
            (":::", "port \"\" is not a number in 1..=65535"),
        ] {
            let addr = client
                .register(rpc::RegisterRequest {
                    host: "127.0.0.1".into(),
                    report: Some(rpc::WorkerReport {
                        state: rpc::WorkerState::Idle as i32,
                        ready_addr: ready_addr.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(addr.code(), tonic::Code::InvalidArgument);
            assert_eq!(
                addr.message(),
                format!("report.ready_addr: {ready_addr:?} is not HOST:PORT ({why})")
            );
        }
        let toml = client
            .submit(rpc::SubmitRequest {
                job_toml: "[train\n".into(),
                workers: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(toml.code(), tonic::Code::InvalidArgument);
        assert!(toml.message().contains("submitted job"), "{toml:?}");
        let huge = client
            .submit(rpc::SubmitRequest {
                job_toml: "#".repeat(1 << 20) + "\n",
                workers: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        println!("oversized job: {huge:?}");
        assert!(huge.message().contains("more than 1048576"), "{huge:?}");

        // Bytes that are not the message the method takes, and a message beyond the
        // size limit, sent around the typed client.
        let channel = tonic::transport::Endpoint::from_shared(target.endpoint_url().unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
        let path = "/kiln.v1.Coordinator/Submit".parse().unwrap();
        let mut request = tonic::Request::new(Garbage {
            job_toml: 7,
            filler: Vec::new(),
        });
        request
            .metadata_mut()
            .insert("authorization", "Bearer test-token-1234".parse().unwrap());
        grpc.ready().await.unwrap();
        let malformed = grpc
            .unary::<_, rpc::SubmitReply, _>(request, path, tonic_prost::ProstCodec::default())
            .await
            .unwrap_err();
        println!("malformed: {malformed:?}");
        assert!(
            malformed.message().contains("failed to decode"),
            "{malformed:?}"
        );
        let mut request = tonic::Request::new(Garbage {
            job_toml: 7,
            filler: vec![0; 8 << 20],
        });
        request
            .metadata_mut()
            .insert("authorization", "Bearer test-token-1234".parse().unwrap());
        grpc.ready().await.unwrap();
        let path = "/kiln.v1.Coordinator/Submit".parse().unwrap();
        let oversized = grpc
            .unary::<_, rpc::SubmitReply, _>(request, path, tonic_prost::ProstCodec::default())
            .await
            .unwrap_err();
        println!("oversized: {oversized:?}");
        assert_eq!(oversized.code(), tonic::Code::OutOfRange, "{oversized:?}");
    });

    // Still serving, and the job kept.
    let s = cluster.status(&job);
    assert_eq!(s.phase, "pending");
    assert!(s.message.contains("0 free, at least 2 needed"), "{s:?}");
    let stopped = cluster.kiln_ok(&["stop", &job]);
    assert_eq!(stopped.trim(), format!("job {job} stopped"));
    assert_eq!(cluster.status(&job).phase, "stopped");
    let again = cluster.kiln(&["stop", &job]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains(&format!("job {job} is already stopped")),
        "{err}"
    );
}

/// A message whose field 1 is a number where `SubmitRequest` has text.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(uint64, tag = "1")]
    job_toml: u64,
    #[prost(bytes = "vec", tag = "9")]
    filler: Vec<u8>,
}

/// With a certificate, the coordinator serves TLS: clients that trust its CA connect,
/// plain-text clients do not.
#[test]
fn tls_when_certificates_are_given() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), cert.cert.pem()).unwrap();
    let cluster = Cluster::with_args(
        dir.path(),
        "10",
        &[
            "--tls-cert",
            path_str(&cert_path),
            "--tls-key",
            path_str(&key_path),
        ],
    );
    let status = cluster.kiln_ok(&["status"]);
    assert!(status.contains("no jobs"), "{status}");
    let plain = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "status",
            "--coordinator",
            &format!("http://localhost:{}", cluster.port),
        ])
        .env("KILN_TOKEN", &cluster.token)
        .env_remove("KILN_TLS_CA")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&plain.stderr);
    println!("plain text against TLS: {err}");
    assert!(!plain.status.success(), "{err}");
}
