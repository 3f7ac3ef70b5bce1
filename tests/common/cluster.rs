//! A coordinator and its workers as separate `kiln` processes on loopback, for the
//! coordinator's tests: started, driven through the CLI and the gRPC client, killed.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::client::Target;
use kiln_proto::rpc;

use crate::common::{announced, coordinator_listening, path_str, tiny_job_with};

#[path = "netns.rs"]
pub mod netns;

/// A coordinator process and worker processes, killed when dropped.
pub struct Cluster {
    pub dir: PathBuf,
    /// The coordinator's port: 0 until its first start, which binds port 0 and says which
    /// port it got; a restarted coordinator binds that port again, as a real one would.
    pub port: u16,
    pub token: String,
    pub heartbeat_timeout_s: &'static str,
    pub coordinator: Option<Child>,
    /// Each worker process and the file its stderr goes to.
    pub workers: Vec<(Child, PathBuf)>,
    pub rt: tokio::runtime::Runtime,
    pub extra: Vec<String>,
    /// The coordinator's environment, besides this process's.
    pub env: Vec<(String, String)>,
    /// Hosts as network namespaces: the coordinator in the first, worker `i` in `i + 1`.
    pub net: Option<netns::Net>,
}

impl Cluster {
    pub fn new(dir: &Path, heartbeat_timeout_s: &'static str) -> Cluster {
        Cluster::with_args(dir, heartbeat_timeout_s, &[])
    }

    pub fn with_args(dir: &Path, heartbeat_timeout_s: &'static str, extra: &[&str]) -> Cluster {
        Cluster::with_env(dir, heartbeat_timeout_s, extra, Vec::new())
    }

    pub fn with_env(
        dir: &Path,
        heartbeat_timeout_s: &'static str,
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> Cluster {
        Cluster::start(dir, heartbeat_timeout_s, extra, env, None)
    }

    fn start(
        dir: &Path,
        heartbeat_timeout_s: &'static str,
        extra: &[&str],
        env: Vec<(String, String)>,
        net: Option<netns::Net>,
    ) -> Cluster {
        let mut c = Cluster {
            dir: dir.to_owned(),
            port: 0,
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
            net,
        };
        c.start_coordinator();
        c
    }

    /// A coordinator in `net`'s first namespace; workers added go to the next ones.
    pub fn in_net(
        dir: &Path,
        heartbeat_timeout_s: &'static str,
        extra: &[&str],
        net: netns::Net,
    ) -> Cluster {
        Cluster::start(dir, heartbeat_timeout_s, extra, Vec::new(), Some(net))
    }

    /// A command run where the coordinator runs (its namespace, if any).
    fn command_at(&self, host: usize) -> Command {
        match &self.net {
            Some(net) => {
                let mut c = net.exec(host);
                c.arg(env!("CARGO_BIN_EXE_kiln"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_kiln")),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.extra.iter().any(|a| a == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        let host = self.net.as_ref().map_or("localhost", |n| n.front.as_str());
        format!("{scheme}://{host}:{}", self.port)
    }

    pub fn start_coordinator(&mut self) {
        // Its output and errors in one file: the first line says where it listens.
        let said = self.dir.join("coordinator.log");
        let log = File::create(&said).unwrap();
        let listen = if self.net.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let mut child = self
            .command_at(0)
            .args([
                "coordinator",
                "--listen",
                &format!("{listen}:{}", self.port),
            ])
            .args(["--state", path_str(&self.dir.join("state"))])
            .args(["--token", &self.token])
            .args(["--heartbeat-timeout-s", self.heartbeat_timeout_s])
            .args(["--heartbeat-interval-ms", "200"])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        if self.port == 0 {
            let addr = announced(
                &mut child,
                &said,
                "the coordinator's address",
                coordinator_listening,
            );
            self.port = addr.rsplit_once(':').unwrap().1.parse().unwrap();
        }
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

    pub fn kill_coordinator(&mut self) {
        let mut c = self.coordinator.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Starts a `kiln worker` process with `nproc` workers.
    pub fn add_worker(&mut self, nproc: usize) {
        let i = self.workers.len();
        let err = self.dir.join(format!("worker-{i}.log"));
        let (coordinator, host) = match &self.net {
            Some(net) => (
                format!("http://{}:{}", net.addrs[0], self.port),
                net.addrs[i + 1].clone(),
            ),
            None => (self.url(), "127.0.0.1".to_owned()),
        };
        let child = self
            .command_at(i + 1)
            .args(["worker", "--coordinator", &coordinator, "--host", &host])
            .args(["--nproc-per-node", &nproc.to_string()])
            .args(["--name", &format!("worker-{i}")])
            .args(["--work-dir", path_str(&self.dir.join(format!("work-{i}")))])
            .envs(self.tls_env())
            .env("KILN_TOKEN", &self.token)
            .env("KILN_COLLECTIVE_TIMEOUT_S", "30")
            // Across namespaces, a cut link shows as silence: give up on it sooner.
            .envs(self.net.iter().flat_map(|_| {
                [
                    ("KILN_COLLECTIVE_TIMEOUT_S", "5"),
                    ("KILN_RENDEZVOUS_TIMEOUT_S", "10"),
                ]
            }))
            .stdout(Stdio::null())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap();
        self.workers.push((child, err));
    }

    pub fn tls_env(&self) -> Vec<(String, String)> {
        let ca = self.dir.join("ca.pem");
        if ca.exists() {
            vec![("KILN_TLS_CA".into(), path_str(&ca).into())]
        } else {
            Vec::new()
        }
    }

    pub fn target(&self) -> Target {
        let ca = self.dir.join("ca.pem");
        Target {
            url: self.url(),
            token: self.token.clone(),
            tls_ca: ca.exists().then_some(ca),
        }
    }

    /// `kiln ARGS` as a client of this cluster.
    pub fn kiln(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_COORDINATOR", self.url())
            .env("KILN_TOKEN", &self.token)
            .envs(self.tls_env())
            .output()
            .unwrap()
    }

    pub fn kiln_ok(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        assert!(
            out.status.success(),
            "kiln {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn submit(&self, job: &Path, workers: u32) -> String {
        self.kiln_ok(&["submit", path_str(job), "--workers", &workers.to_string()])
            .trim()
            .to_owned()
    }

    pub fn try_status(&self, job: &str) -> Result<rpc::StatusReply, tonic::Status> {
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

    pub fn status(&self, job: &str) -> rpc::JobStatus {
        self.try_status(job).unwrap().jobs.remove(0)
    }

    /// Waits until `job`'s status satisfies `pred` (or the job ends otherwise).
    pub fn wait(
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

    pub fn wait_done(&self, job: &str) -> rpc::JobStatus {
        let s = self.wait(job, "ended", |s| s.phase == "completed");
        println!("{job}: {s:?}\n{}", self.logs(job));
        s
    }

    pub fn logs(&self, job: &str) -> String {
        String::from_utf8_lossy(&self.kiln(&["logs", job]).stdout).into_owned()
    }

    /// The index of the worker process running `rank` of `job`.
    pub fn worker_of_rank(&self, job: &str, rank: u32) -> usize {
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

    pub fn kill_worker(&mut self, i: usize) {
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

/// The same job under another name (its own output directory).
pub fn twin(dir: &Path, name: &str, batch: i64, micro: i64, parallel: &str, steps: i64) -> PathBuf {
    tiny_job_with(dir, name, batch, micro, parallel, "every = 4", steps)
}
