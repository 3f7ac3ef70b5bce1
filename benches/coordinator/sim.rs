//! The simulated workers and the coordinator they talk to: starting a coordinator on its
//! own runtime, registering workers over shared connections, their reports and heartbeats,
//! and a job submitted for all of them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kiln_coordinator::machine::Policy;
use kiln_coordinator::service::{self, Config, Running};
use kiln_proto::client::{Client, Target};
use kiln_proto::rpc;
use rpc::heartbeat_reply::Command;
use tokio::runtime::Runtime;

use crate::Error;

const TOKEN: &str = "coordinator-bench-token";

/// A coordinator on `rt`, its state in a fresh temporary directory.
pub struct Coordinator {
    running: Running,
    _state: tempfile::TempDir,
}

impl Coordinator {
    pub fn start(rt: &Runtime, interval: Duration) -> Result<Self, Error> {
        let state = tempfile::tempdir()?;
        let config = Config {
            listen: "127.0.0.1:0".parse::<SocketAddr>()?,
            token: TOKEN.into(),
            state_url: state.path().to_string_lossy().into_owned(),
            policy: Policy::default(),
            heartbeat_interval: interval,
            tls: None,
            metrics_listen: None,
            // The simulated jobs name no real data.
            data_check: kiln_coordinator::preflight::DataCheck::Skip,
        };
        let running = rt.block_on(service::start(config))?;
        Ok(Coordinator {
            running,
            _state: state,
        })
    }

    pub fn target(&self) -> Target {
        Target {
            url: format!("http://{}", self.running.addr),
            token: TOKEN.into(),
            tls_ca: None,
        }
    }

    pub fn stop(self, rt: &Runtime) {
        self.running.shutdown();
        let done = self.running.done;
        rt.block_on(async {
            match tokio::time::timeout(Duration::from_secs(10), done).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => eprintln!("the coordinator stopped with an error: {e}"),
                Ok(Err(e)) => eprintln!("the coordinator's task failed: {e}"),
                Err(_) => eprintln!("the coordinator did not stop within 10 s"),
            }
        });
    }
}

/// `connections` clients, each its own HTTP/2 connection; worker `i` uses `i % connections`.
pub async fn connect(target: &Target, connections: usize) -> Result<Vec<Client>, Error> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(target.connect().await?);
    }
    Ok(clients)
}

pub fn ready_addr(i: usize) -> String {
    format!("127.0.0.1:{}", 10_000 + i % 55_000)
}

pub fn idle_report(i: usize) -> rpc::WorkerReport {
    rpc::WorkerReport {
        state: rpc::WorkerState::Idle as i32,
        ready_addr: ready_addr(i),
        ..Default::default()
    }
}

pub fn running_report(a: &rpc::Assignment) -> rpc::WorkerReport {
    rpc::WorkerReport {
        state: rpc::WorkerState::Running as i32,
        job_id: a.job_id.clone(),
        generation: a.generation,
        rank: a.rank,
        progress: Some(rpc::Progress {
            step: 5,
            steps: 1000,
            loss: 3.5,
            tokens_per_s: 10_000.0,
            mfu: 0.4,
            step_seconds: 1.0,
            compute_seconds: 0.8,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A job file the coordinator accepts for `workers` ranks (tp 1, one sequence per rank).
pub fn job_toml(workers: usize) -> String {
    format!(
        r#"name = "coordinator-bench"

[model]
preset = "tiny"

[data]
path = "/nonexistent/coordinator-bench/data"

[train]
seq_len = 128
batch_size = {workers}
micro_batch_size = 1
steps = 1000

[parallel]
tp = 1

[checkpoint]
every = 10

[output]
dir = "/nonexistent/coordinator-bench/out"
"#
    )
}

/// A registered simulated worker.
#[derive(Clone)]
pub struct Sim {
    pub index: usize,
    pub id: String,
    pub client: Client,
    pub interval: Duration,
}

/// Registers `n` idle workers (with ready addresses) at once over `clients`; returns them
/// and how long that took.
pub async fn register(clients: &[Client], n: usize) -> Result<(Vec<Sim>, Duration), Error> {
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut client = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let reply = client
                .register(rpc::RegisterRequest {
                    host: "127.0.0.1".into(),
                    previous_id: String::new(),
                    report: Some(idle_report(i)),
                    kiln_version: "bench".into(),
                    memory_addr: String::new(),
                })
                .await?
                .into_inner();
            Ok::<_, tonic::Status>(Sim {
                index: i,
                id: reply.worker_id,
                client,
                interval: Duration::from_millis(u64::from(reply.heartbeat_interval_ms.max(50))),
            })
        }));
    }
    let mut sims = Vec::with_capacity(n);
    for task in tasks {
        sims.push(task.await??);
    }
    Ok((sims, t.elapsed()))
}

pub fn heartbeat_request(sim: &Sim, report: &rpc::WorkerReport) -> rpc::HeartbeatRequest {
    held_request(sim, report, Duration::ZERO, 0)
}

/// A heartbeat the coordinator may hold up to `hold` (a long poll, as the agent sends).
pub fn held_request(
    sim: &Sim,
    report: &rpc::WorkerReport,
    hold: Duration,
    commit_told: u64,
) -> rpc::HeartbeatRequest {
    rpc::HeartbeatRequest {
        worker_id: sim.id.clone(),
        report: Some(report.clone()),
        hold_ms: hold.as_millis() as u32,
        commit_told,
    }
}

/// Submits a job for `workers` ranks; the job id.
pub async fn submit(client: &mut Client, workers: usize) -> Result<String, Error> {
    let reply = client
        .submit(rpc::SubmitRequest {
            job_toml: job_toml(workers),
            workers: workers as u32,
            min_workers: 0,
            max_workers: 0,
            queue: false,
        })
        .await?;
    Ok(reply.into_inner().job_id)
}

/// The job's line of `Status`.
pub async fn job_status(client: &mut Client, job_id: &str) -> Result<rpc::JobStatus, Error> {
    let reply = client
        .status(rpc::StatusRequest {
            job_id: job_id.into(),
        })
        .await?
        .into_inner();
    reply
        .jobs
        .into_iter()
        .find(|j| j.job_id == job_id)
        .ok_or_else(|| "Status does not list the job".into())
}

pub async fn job_phase(client: &mut Client, job_id: &str) -> Result<(String, u64), Error> {
    let job = job_status(client, job_id).await?;
    Ok((job.phase, job.generation))
}

/// Submits a job for all `sims` and brings every one of them to RUNNING; their reports.
pub async fn start_job(
    control: &mut Client,
    sims: &[Sim],
) -> Result<(String, Vec<rpc::WorkerReport>), Error> {
    let job_id = submit(control, sims.len()).await?;
    let mut tasks = Vec::with_capacity(sims.len());
    for sim in sims {
        let mut sim = sim.clone();
        tasks.push(tokio::spawn(async move {
            let idle = idle_report(sim.index);
            for _ in 0..100 {
                let reply = sim
                    .client
                    .heartbeat(heartbeat_request(&sim, &idle))
                    .await?
                    .into_inner();
                if let Some(Command::Run(a)) = reply.command {
                    let report = running_report(&a);
                    sim.client
                        .heartbeat(heartbeat_request(&sim, &report))
                        .await?;
                    return Ok::<_, Error>(report);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(format!("worker {} was given no assignment", sim.id).into())
        }));
    }
    let mut reports = Vec::with_capacity(sims.len());
    for task in tasks {
        reports.push(task.await??);
    }
    for _ in 0..100 {
        if job_phase(control, &job_id).await?.0 == "running" {
            return Ok((job_id, reports));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("job {job_id} did not reach running").into())
}
