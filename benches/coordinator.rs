//! The coordinator under load, on 127.0.0.1: a coordinator (`service::start`) on its own
//! 2-thread tokio runtime and thousands of simulated workers on another runtime of this
//! process, speaking the real gRPC protocol over a few shared HTTP/2 connections.
//!
//! 1. Heartbeats: N workers register, then heartbeat (a) back to back, one request in
//!    flight per worker (the saturation throughput), and (b) every second as the agent does
//!    (`heartbeat; sleep(interval)`), the latency at that offered load. Both while the
//!    workers are idle (no job) and while they run one job of world N (each heartbeat then
//!    reports RUNNING with progress, as a training rank's agent does).
//! 2. Rendezvous: N workers heartbeat idle at the interval the coordinator returns at
//!    Register; a job for all N is submitted; measured from the Submit call until every
//!    worker has its `Run` assignment, until every worker's RUNNING report was answered,
//!    and until `Status` says "running".
//!
//! ```text
//! cargo bench -p kiln-coordinator --bench coordinator -- [--workers 1000,2000,4000]
//!     [--connections 32] [--window 10] [--warmup 3] [--modes idle,running]
//!     [--rendezvous-workers 1000] [--rendezvous-intervals 1000,200] [--rounds 3]
//!     [--client-threads 2] [--skip-heartbeat] [--skip-rendezvous]
//! ```
//!
//! Prints Markdown tables; with `KILN_BENCH_OUT=PATH` also writes the results as JSON.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_coordinator::machine::Policy;
use kiln_coordinator::service::{self, Config, Running};
use kiln_proto::client::{Client, Target};
use kiln_proto::rpc;
use rpc::heartbeat_reply::Command;
use serde_json::{json, Value};
use tokio::runtime::Runtime;

const TOKEN: &str = "coordinator-bench-token";
/// Thread names (`/proc/self/task/*/comm`) of the two runtimes, for their CPU time.
const SERVER_THREADS: &str = "kiln-coord";
const CLIENT_THREADS: &str = "sim-workers";

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    workers: Vec<usize>,
    connections: usize,
    window: Duration,
    warmup: Duration,
    modes: Vec<String>,
    rendezvous_workers: Vec<usize>,
    rendezvous_intervals_ms: Vec<u64>,
    rounds: usize,
    client_threads: usize,
    heartbeat: bool,
    rendezvous: bool,
}

fn list<T: std::str::FromStr>(flag: &str, value: &str) -> Result<Vec<T>, Error> {
    value
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| format!("{flag}: cannot read {s:?}").into())
        })
        .collect()
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        workers: vec![1000, 2000, 4000],
        connections: 32,
        window: Duration::from_secs(10),
        warmup: Duration::from_secs(3),
        modes: vec!["idle".into(), "running".into()],
        rendezvous_workers: vec![1000],
        rendezvous_intervals_ms: vec![1000, 200],
        rounds: 3,
        client_threads: 2,
        heartbeat: true,
        rendezvous: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--workers" => a.workers = list(&flag, &value()?)?,
            "--connections" => a.connections = value()?.parse()?,
            "--window" => a.window = Duration::from_secs_f64(value()?.parse()?),
            "--warmup" => a.warmup = Duration::from_secs_f64(value()?.parse()?),
            "--modes" => a.modes = list(&flag, &value()?)?,
            "--rendezvous-workers" => a.rendezvous_workers = list(&flag, &value()?)?,
            "--rendezvous-intervals" => a.rendezvous_intervals_ms = list(&flag, &value()?)?,
            "--rounds" => a.rounds = value()?.parse()?,
            "--client-threads" => a.client_threads = value()?.parse()?,
            "--skip-heartbeat" => a.heartbeat = false,
            "--skip-rendezvous" => a.rendezvous = false,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if a.connections == 0 || a.rounds == 0 || a.client_threads == 0 {
        return Err("--connections, --rounds and --client-threads must be at least 1".into());
    }
    if let Some(m) = a
        .modes
        .iter()
        .find(|m| !matches!(m.as_str(), "idle" | "running"))
    {
        return Err(format!("--modes: {m:?} is neither idle nor running").into());
    }
    Ok(a)
}

/// CPU seconds used so far by this process's threads whose name starts with `prefix`
/// (threads that exited are not counted).
fn cpu_seconds(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A coordinator on `rt`, its state in a fresh temporary directory.
struct Coordinator {
    running: Running,
    _state: tempfile::TempDir,
}

impl Coordinator {
    fn start(rt: &Runtime, interval: Duration) -> Result<Self, Error> {
        let state = tempfile::tempdir()?;
        let config = Config {
            listen: "127.0.0.1:0".parse::<SocketAddr>()?,
            token: TOKEN.into(),
            state_url: state.path().to_string_lossy().into_owned(),
            policy: Policy::default(),
            heartbeat_interval: interval,
            tls: None,
            metrics_listen: None,
        };
        let running = rt.block_on(service::start(config))?;
        Ok(Coordinator {
            running,
            _state: state,
        })
    }

    fn target(&self) -> Target {
        Target {
            url: format!("http://{}", self.running.addr),
            token: TOKEN.into(),
            tls_ca: None,
        }
    }

    fn stop(self, rt: &Runtime) {
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
async fn connect(target: &Target, connections: usize) -> Result<Vec<Client>, Error> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(target.connect().await?);
    }
    Ok(clients)
}

fn ready_addr(i: usize) -> String {
    format!("127.0.0.1:{}", 10_000 + i % 55_000)
}

fn idle_report(i: usize) -> rpc::WorkerReport {
    rpc::WorkerReport {
        state: rpc::WorkerState::Idle as i32,
        ready_addr: ready_addr(i),
        ..Default::default()
    }
}

fn running_report(a: &rpc::Assignment) -> rpc::WorkerReport {
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
fn job_toml(workers: usize) -> String {
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
struct Sim {
    index: usize,
    id: String,
    client: Client,
    interval: Duration,
}

/// Registers `n` idle workers (with ready addresses) at once over `clients`; returns them
/// and how long that took.
async fn register(clients: &[Client], n: usize) -> Result<(Vec<Sim>, Duration), Error> {
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

fn heartbeat_request(sim: &Sim, report: &rpc::WorkerReport) -> rpc::HeartbeatRequest {
    rpc::HeartbeatRequest {
        worker_id: sim.id.clone(),
        report: Some(report.clone()),
    }
}

/// Submits a job for `workers` ranks; the job id.
async fn submit(client: &mut Client, workers: usize) -> Result<String, Error> {
    let reply = client
        .submit(rpc::SubmitRequest {
            job_toml: job_toml(workers),
            workers: workers as u32,
            min_workers: 0,
            max_workers: 0,
        })
        .await?;
    Ok(reply.into_inner().job_id)
}

async fn job_phase(client: &mut Client, job_id: &str) -> Result<(String, u64), Error> {
    let reply = client
        .status(rpc::StatusRequest {
            job_id: job_id.into(),
        })
        .await?
        .into_inner();
    let job = reply
        .jobs
        .into_iter()
        .find(|j| j.job_id == job_id)
        .ok_or("Status does not list the job")?;
    Ok((job.phase, job.generation))
}

/// Submits a job for all `sims` and brings every one of them to RUNNING; their reports.
async fn start_job(
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

/// What one worker saw during a measured window.
#[derive(Default)]
struct Seen {
    /// Latencies (microseconds) of the heartbeats answered inside the window.
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    /// Replies other than Wait.
    unexpected: u64,
}

/// Heartbeats with `report` until `end`: back to back, or sleeping `pace` after each reply
/// (the agent's loop); the first one after `offset`.
async fn heartbeat_loop(
    mut sim: Sim,
    report: rpc::WorkerReport,
    pace: Option<Duration>,
    offset: Duration,
    start: Instant,
    end: Instant,
) -> Seen {
    let mut seen = Seen::default();
    tokio::time::sleep(offset).await;
    while Instant::now() < end {
        let t = Instant::now();
        let result = sim.client.heartbeat(heartbeat_request(&sim, &report)).await;
        let done = Instant::now();
        let counted = done >= start && done < end;
        match result {
            Ok(reply) => {
                if !matches!(reply.get_ref().command, Some(Command::Wait(_))) {
                    seen.unexpected += 1;
                }
                if counted {
                    let us = (done - t).as_micros().min(u32::MAX as u128) as u32;
                    seen.latencies_us.push(us);
                }
            }
            Err(s) => {
                if counted {
                    seen.errors += 1;
                }
                seen.first_error.get_or_insert_with(|| s.to_string());
            }
        }
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
    }
    seen
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p / 100.0) as usize).min(sorted.len() - 1);
    f64::from(sorted[i]) / 1000.0
}

/// One measured heartbeat window over all `sims`; a JSON row.
#[allow(clippy::too_many_arguments)]
fn measure(
    client_rt: &Runtime,
    sims: &[Sim],
    reports: &[rpc::WorkerReport],
    pace: Option<Duration>,
    warmup: Duration,
    window: Duration,
    mode: &str,
    connections: usize,
) -> Value {
    let n = sims.len();
    let begin = Instant::now();
    let start = begin + warmup;
    let end = start + window;
    let (seen, server_cpu, client_cpu) = client_rt.block_on(async {
        let tasks: Vec<_> = sims
            .iter()
            .zip(reports)
            .enumerate()
            .map(|(i, (sim, report))| {
                // Paced workers start spread over one interval, as agents started at
                // different times are.
                let offset = pace.map_or(Duration::ZERO, |p| p.mul_f64(i as f64 / n as f64));
                tokio::spawn(heartbeat_loop(
                    sim.clone(),
                    report.clone(),
                    pace,
                    offset,
                    start,
                    end,
                ))
            })
            .collect();
        tokio::time::sleep_until(start.into()).await;
        let (s0, c0) = (cpu_seconds(SERVER_THREADS), cpu_seconds(CLIENT_THREADS));
        tokio::time::sleep_until(end.into()).await;
        let (s1, c1) = (cpu_seconds(SERVER_THREADS), cpu_seconds(CLIENT_THREADS));
        let mut seen = Vec::with_capacity(n);
        for t in tasks {
            seen.push(t.await.unwrap_or_default());
        }
        (seen, s1 - s0, c1 - c0)
    });
    let mut all: Vec<u32> = seen
        .iter()
        .flat_map(|s| s.latencies_us.iter().copied())
        .collect();
    all.sort_unstable();
    let errors: u64 = seen.iter().map(|s| s.errors).sum();
    let unexpected: u64 = seen.iter().map(|s| s.unexpected).sum();
    if let Some(e) = seen.iter().find_map(|s| s.first_error.as_ref()) {
        eprintln!("  first error: {e}");
    }
    let secs = window.as_secs_f64();
    let silent = seen.iter().filter(|s| s.latencies_us.is_empty()).count();
    json!({
        "mode": mode,
        "workers": n,
        "connections": connections.min(n),
        "load": match pace {
            None => "saturation".to_string(),
            Some(p) => format!("every {} ms", p.as_millis()),
        },
        "window_s": secs,
        "heartbeats": all.len(),
        "heartbeats_per_s": all.len() as f64 / secs,
        "p50_ms": percentile(&all, 50.0),
        "p99_ms": percentile(&all, 99.0),
        "max_ms": all.last().map_or(f64::NAN, |&v| f64::from(v) / 1000.0),
        "errors": errors,
        "unexpected_replies": unexpected,
        "workers_without_reply_in_window": silent,
        "coordinator_cpu_cores": server_cpu / secs,
        "simulator_cpu_cores": client_cpu / secs,
    })
}

/// Part 1 for `n` workers in `mode` at one load (back to back, or paced at the interval
/// returned at Register), on a fresh coordinator; a JSON row.
fn heartbeat_part(
    server_rt: &Runtime,
    client_rt: &Runtime,
    args: &Args,
    n: usize,
    mode: &str,
    paced: bool,
) -> Result<Value, Error> {
    let coordinator = Coordinator::start(server_rt, Duration::from_secs(1))?;
    let target = coordinator.target();
    let connections = args.connections.min(n);
    let (clients, mut control) = client_rt.block_on(async {
        Ok::<_, Error>((
            connect(&target, connections).await?,
            target.connect().await?,
        ))
    })?;
    let (sims, took) = client_rt.block_on(register(&clients, n))?;
    eprintln!(
        "[{mode}, {n} workers, {}] registered in {:.2} s ({:.0}/s) over {connections} connections",
        if paced { "paced" } else { "saturation" },
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    let (job_id, reports) = if mode == "running" {
        let t = Instant::now();
        let (job_id, reports) = client_rt.block_on(start_job(&mut control, &sims))?;
        eprintln!(
            "  job {job_id} running on all {n} in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        (Some(job_id), reports)
    } else {
        (None, sims.iter().map(|s| idle_report(s.index)).collect())
    };
    let pace = paced.then_some(sims[0].interval);
    // Paced: two intervals of warm-up at least, so every worker is in its rhythm.
    let warmup = pace.map_or(args.warmup, |p| args.warmup.max(p * 2));
    let mut row = measure(
        client_rt,
        &sims,
        &reports,
        pace,
        warmup,
        args.window,
        mode,
        connections,
    );
    row["register_s"] = json!(took.as_secs_f64());
    row["load_average"] = json!(load_average());
    if let Some(job_id) = &job_id {
        // A worker whose heartbeats wait longer than the heartbeat timeout is declared gone
        // and the job recovers: say so rather than hide it.
        let (phase, generation) = client_rt.block_on(job_phase(&mut control, job_id))?;
        row["job_after"] = json!(format!("{phase}, generation {generation}"));
    }
    eprintln!("  {row}");
    drop((sims, clients, control));
    coordinator.stop(server_rt);
    Ok(row)
}

/// What one agent-like worker saw of a rendezvous.
#[derive(Default)]
struct Rendezvous {
    run_at: Option<Instant>,
    rank: Option<u32>,
    running_acked_at: Option<Instant>,
    bad: Option<String>,
}

/// The agent's loop: heartbeat, act on the reply, sleep the interval; a `Run` is
/// followed by an immediate heartbeat reporting RUNNING (the agent wakes itself).
async fn agent_loop(
    mut sim: Sim,
    n: usize,
    offset: Duration,
    stop: Arc<AtomicBool>,
    given: Arc<AtomicUsize>,
) -> Rendezvous {
    let mut out = Rendezvous::default();
    let mut report = idle_report(sim.index);
    tokio::time::sleep(offset).await;
    while !stop.load(Ordering::Relaxed) {
        match sim.client.heartbeat(heartbeat_request(&sim, &report)).await {
            Ok(reply) => match reply.into_inner().command {
                Some(Command::Run(a)) if out.run_at.is_none() => {
                    out.run_at = Some(Instant::now());
                    out.rank = Some(a.rank);
                    if a.peers.len() != n || a.generation != 1 || a.job_toml.is_empty() {
                        out.bad.get_or_insert(format!(
                            "assignment with {} peers, generation {}",
                            a.peers.len(),
                            a.generation
                        ));
                    }
                    given.fetch_add(1, Ordering::Relaxed);
                    report = running_report(&a);
                    continue;
                }
                Some(Command::Wait(_)) => {
                    if out.run_at.is_some() && out.running_acked_at.is_none() {
                        out.running_acked_at = Some(Instant::now());
                    }
                }
                other => {
                    out.bad.get_or_insert(format!("unexpected reply {other:?}"));
                }
            },
            Err(s) => {
                out.bad.get_or_insert(s.to_string());
            }
        }
        tokio::time::sleep(sim.interval).await;
    }
    out
}

/// One rendezvous of `n` workers at `interval`, on a fresh coordinator; a JSON row.
fn rendezvous_round(
    server_rt: &Runtime,
    client_rt: &Runtime,
    n: usize,
    interval: Duration,
    connections: usize,
) -> Result<Value, Error> {
    let coordinator = Coordinator::start(server_rt, interval)?;
    let target = coordinator.target();
    let connections = connections.min(n);
    let row = client_rt.block_on(async {
        let clients = connect(&target, connections).await?;
        let mut control = target.connect().await?;
        let (sims, _) = register(&clients, n).await?;
        let returned = sims[0].interval;
        let stop = Arc::new(AtomicBool::new(false));
        let given = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = sims
            .iter()
            .enumerate()
            .map(|(i, sim)| {
                let offset = sim.interval.mul_f64(i as f64 / n as f64);
                tokio::spawn(agent_loop(
                    sim.clone(),
                    n,
                    offset,
                    stop.clone(),
                    given.clone(),
                ))
            })
            .collect();
        // Every worker heartbeating idle, in its rhythm.
        tokio::time::sleep(returned * 3 + Duration::from_millis(500)).await;
        let load = load_average();
        let cpu0 = cpu_seconds(SERVER_THREADS);
        let t0 = Instant::now();
        let job_id = submit(&mut control, n).await?;
        let submit_s = t0.elapsed().as_secs_f64();
        let mut status_ms = Vec::new();
        let (status_running_s, generation) = loop {
            let t = Instant::now();
            let (phase, generation) = job_phase(&mut control, &job_id).await?;
            status_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            if phase == "running" {
                break (t0.elapsed().as_secs_f64(), generation);
            }
            if t0.elapsed() > Duration::from_secs(120) {
                return Err(format!(
                    "job {job_id} still {phase} after 120 s; {} of {n} workers have their assignment",
                    given.load(Ordering::Relaxed)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let cpu = cpu_seconds(SERVER_THREADS) - cpu0;
        // Let the last RUNNING acknowledgements arrive, then stop.
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        let mut seen = Vec::with_capacity(n);
        for t in tasks {
            seen.push(t.await?);
        }
        if let Some(bad) = seen.iter().find_map(|s| s.bad.as_ref()) {
            return Err(format!("a worker saw: {bad}").into());
        }
        let ranks: BTreeSet<u32> = seen.iter().filter_map(|s| s.rank).collect();
        if ranks.len() != n || generation != 1 {
            return Err(format!(
                "{} distinct ranks of {n} given, generation {generation}",
                ranks.len()
            )
            .into());
        }
        let mut run: Vec<f64> = seen
            .iter()
            .map(|s| s.run_at.map_or(f64::NAN, |t| (t - t0).as_secs_f64()))
            .collect();
        run.sort_by(f64::total_cmp);
        let acked = seen
            .iter()
            .map(|s| s.running_acked_at.map(|t| (t - t0).as_secs_f64()))
            .collect::<Option<Vec<f64>>>()
            .map_or(f64::NAN, |v| v.into_iter().fold(0.0, f64::max));
        drop((sims, clients, control));
        Ok::<_, Error>(json!({
            "workers": n,
            "connections": connections,
            "heartbeat_interval_ms": returned.as_millis() as u64,
            "submit_call_ms": submit_s * 1000.0,
            "all_run_s": run[n - 1],
            "median_run_s": run[n / 2],
            "first_run_s": run[0],
            "all_running_acked_s": acked,
            "status_running_s": status_running_s,
            "status_polls": status_ms.len(),
            "status_call_median_ms": median(status_ms.clone()),
            "status_call_max_ms": status_ms.iter().copied().fold(0.0, f64::max),
            "coordinator_cpu_s": cpu,
            "load_average": load,
        }))
    });
    coordinator.stop(server_rt);
    row
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn runtime(name: &str, threads: usize) -> Result<Runtime, Error> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()?)
}

fn main() -> Result<(), Error> {
    let args = parse_args()?;
    let server_rt = runtime(SERVER_THREADS, 2)?;
    let client_rt = runtime(CLIENT_THREADS, args.client_threads)?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "coordinator: 2 runtime threads; simulated workers: {} runtime threads; {cores} cores; load {}",
        args.client_threads,
        load_average()
    );

    let mut heartbeat_rows = Vec::new();
    if args.heartbeat {
        for mode in &args.modes {
            for &n in &args.workers {
                for paced in [false, true] {
                    let row = heartbeat_part(&server_rt, &client_rt, &args, n, mode, paced)?;
                    heartbeat_rows.push(row);
                }
            }
        }
    }
    let mut rendezvous_rows = Vec::new();
    if args.rendezvous {
        for &n in &args.rendezvous_workers {
            for &ms in &args.rendezvous_intervals_ms {
                for round in 1..=args.rounds {
                    let row = rendezvous_round(
                        &server_rt,
                        &client_rt,
                        n,
                        Duration::from_millis(ms),
                        args.connections,
                    )?;
                    eprintln!("[rendezvous {n} workers, {ms} ms, round {round}] {row}");
                    rendezvous_rows.push(row);
                }
            }
        }
    }

    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    if !heartbeat_rows.is_empty() {
        println!(
            "\nHeartbeats, {} s window after warm-up; coordinator on 2 runtime threads, \
             simulated workers on {} in the same process; {cores} cores.\n",
            args.window.as_secs_f64(),
            args.client_threads
        );
        println!(
            "| workers | job | HTTP/2 connections | load | heartbeats/s | p50 ms | p99 ms | max ms | errors | coordinator CPU (cores) | simulator CPU (cores) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &heartbeat_rows {
            println!(
                "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {:.2} | {:.2} |",
                r["workers"],
                match r["job_after"].as_str() {
                    Some("running, generation 1") => "running, world = workers".to_string(),
                    Some(after) => format!("running, world = workers; after: {after}"),
                    None => "none (idle)".to_string(),
                },
                r["connections"],
                r["load"].as_str().unwrap_or(""),
                f(r, "heartbeats_per_s"),
                f(r, "p50_ms"),
                f(r, "p99_ms"),
                f(r, "max_ms"),
                r["errors"],
                f(r, "coordinator_cpu_cores"),
                f(r, "simulator_cpu_cores"),
            );
        }
    }
    if !rendezvous_rows.is_empty() {
        println!(
            "\nRendezvous, from the Submit call; median of {} rounds (min-max), each on a fresh \
             coordinator; Status polled every 20 ms.\n",
            args.rounds
        );
        println!(
            "| workers | heartbeat interval | HTTP/2 connections | Submit call | all have Run | all RUNNING acknowledged | Status \"running\" | coordinator CPU |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let mut groups: Vec<(u64, u64)> = rendezvous_rows
            .iter()
            .map(|r| {
                (
                    r["workers"].as_u64().unwrap_or(0),
                    r["heartbeat_interval_ms"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        groups.dedup();
        for (n, ms) in groups {
            let rows: Vec<&Value> = rendezvous_rows
                .iter()
                .filter(|r| r["workers"] == n && r["heartbeat_interval_ms"] == ms)
                .collect();
            let cell = |k: &str, scale: f64, unit: &str, digits: usize| {
                let v: Vec<f64> = rows.iter().map(|r| f(r, k) * scale).collect();
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                format!(
                    "{:.digits$} {unit} ({lo:.digits$}-{hi:.digits$})",
                    median(v.clone())
                )
            };
            println!(
                "| {n} | {ms} ms | {} | {} | {} | {} | {} | {} |",
                rows[0]["connections"],
                cell("submit_call_ms", 1.0, "ms", 1),
                cell("all_run_s", 1.0, "s", 3),
                cell("all_running_acked_s", 1.0, "s", 3),
                cell("status_running_s", 1.0, "s", 3),
                cell("coordinator_cpu_s", 1.0, "s", 3),
            );
        }
    }
    if let Some(path) = std::env::var_os("KILN_BENCH_OUT") {
        let out = json!({
            "bench": "coordinator",
            "cores": cores,
            "coordinator_threads": 2,
            "simulator_threads": args.client_threads,
            "heartbeat": heartbeat_rows,
            "rendezvous": rendezvous_rows,
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&out)?)?;
        eprintln!("results written to {}", path.to_string_lossy());
    }
    drop(client_rt);
    drop(server_rt);
    Ok(())
}
