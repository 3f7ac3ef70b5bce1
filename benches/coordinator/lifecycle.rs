//! Part 3, a job's life at scale: N simulated workers, each acting as an agent that waits
//! for the coordinator's decision, through
//!
//! 1. bring-up: the N workers wait idle (for `settle`), then a job for all N is submitted;
//!    until every worker has its `Run`, answered RUNNING, and `Status` says "running";
//! 2. commit: every rank reports step 10's checkpoint written at once; rank 0 waits for phase
//!    two in its replies and reports it committed; until `Status` says step 10 is committed;
//! 3. recovery: the ranks wait running (for `settle`), then rank N/2 reports its process
//!    failed; every other rank is told to abort,
//!    reports idle, and the next generation forms on all N (the failed worker's agent lives);
//!    until every worker has its `Run` of generation 2, answered RUNNING, and `Status` says
//!    "running" in generation 2.
//!
//! Bring-up and recovery are timed from the submit and the failure (the waiting before them
//! is not counted, though it goes on during them, as in a cluster); the commit from its
//! first request. The coordinator's CPU time and the heartbeats over each phase are kept.
//!
//! A worker waits as the agent does: with `hold` > 0 each heartbeat is a long poll that the
//! coordinator answers when it has something for the worker (or after `hold`), and the next
//! goes out at once; with `hold` = 0 it heartbeats every `poll`, as the agent does with a
//! coordinator that does not hold. The workers come in hosts of `per_host`, whose heartbeats
//! go in one call (`HeartbeatHost`, as `kiln worker --nproc-per-node` sends them; one worker
//! a host: `Heartbeat`). A host's final RUNNING reports and the reports of hosts without
//! rank 0 that their shards are written are sent unheld, so that the phase's tasks end with
//! them; what they change at the coordinator is the same.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_proto::rpc;
use rpc::heartbeat_reply::Command;
use serde_json::{json, Value};
use tokio::runtime::Runtime;

use crate::sim::{
    connect, held_request, idle_report, job_phase, register, running_report, submit, Coordinator,
    Sim,
};
use crate::{cpu_seconds, load_average, Error, SERVER_THREADS};

/// The job's status: phase, generation, committed step.
async fn status(
    control: &mut kiln_proto::client::Client,
    job_id: &str,
) -> Result<(String, u64, u64), Error> {
    let job = crate::sim::job_status(control, job_id).await?;
    Ok((job.phase, job.generation, job.committed_step))
}

/// Polls `Status` every 20 ms until `done` says yes (at most `limit`); the time it did.
async fn until(
    control: &mut kiln_proto::client::Client,
    job_id: &str,
    t0: Instant,
    limit: Duration,
    done: impl Fn(&(String, u64, u64)) -> bool,
) -> Result<f64, Error> {
    loop {
        let s = status(control, job_id).await?;
        if done(&s) {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > limit {
            return Err(format!("job {job_id} still {s:?} after {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Heartbeat calls sent by the simulated workers so far (a host's call counts once).
static SENT: AtomicU64 = AtomicU64::new(0);

/// A simulated host: its workers' heartbeats go in one call, `Heartbeat` for one worker,
/// `HeartbeatHost` for several (as `kiln worker --nproc-per-node` sends them).
#[derive(Clone)]
struct Host {
    sims: Vec<Sim>,
}

impl Host {
    /// One call with each worker's report, held up to `hold`; each worker's reply, in order.
    async fn send(
        &mut self,
        reports: &[rpc::WorkerReport],
        hold: Duration,
        commit_told: u64,
    ) -> Result<Vec<rpc::HeartbeatReply>, Error> {
        SENT.fetch_add(1, Ordering::Relaxed);
        let mut requests: Vec<_> = self
            .sims
            .iter()
            .zip(reports)
            .map(|(sim, report)| held_request(sim, report, hold, commit_told))
            .collect();
        let client = &mut self.sims[0].client;
        if requests.len() == 1 {
            let request = requests.pop().expect("one request");
            return Ok(vec![client.heartbeat(request).await?.into_inner()]);
        }
        let request = rpc::HeartbeatHostRequest { workers: requests };
        let answers = client.heartbeat_host(request).await?.into_inner().workers;
        answers
            .into_iter()
            .map(|a| {
                a.reply
                    .ok_or_else(|| format!("heartbeat refused: {}", a.message).into())
            })
            .collect()
    }
}

/// How a simulated worker waits for a decision.
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    /// Between heartbeats when the coordinator does not hold them.
    pub poll: Duration,
    /// How long the coordinator may hold each (0: not asked to).
    pub hold: Duration,
}

impl Wait {
    async fn pause(self, replies: &[rpc::HeartbeatReply]) {
        if self.hold.is_zero() || !replies.iter().all(|r| r.holds) {
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// When a phase started, once it has: the workers wait before it as they would in a
/// cluster (held, or polling).
type Clock = tokio::sync::watch::Receiver<Option<Instant>>;

/// Heartbeats the host's `reports` until every worker's reply has been a `Run` of
/// `generation`; a worker given its `Run` reports RUNNING in the host's next call, and once
/// all have, they are reported RUNNING once more unheld. When each `Run` came (after the
/// phase started), and the RUNNING reports.
async fn until_run(
    host: &mut Host,
    mut reports: Vec<rpc::WorkerReport>,
    generation: u64,
    wait: Wait,
    clock: Clock,
) -> Result<(Vec<f64>, Vec<rpc::WorkerReport>), Error> {
    let mut run_at: Vec<Option<f64>> = vec![None; reports.len()];
    for _ in 0..30_000 {
        let replies = host.send(&reports, wait.hold, 0).await?;
        for (i, reply) in replies.iter().enumerate() {
            match &reply.command {
                Some(Command::Run(a)) if a.generation == generation && run_at[i].is_none() => {
                    let t0 = clock.borrow().ok_or("a Run before the phase started")?;
                    run_at[i] = Some(t0.elapsed().as_secs_f64());
                    reports[i] = running_report(a);
                }
                // Told to abort what it runs: it stops, and says so.
                Some(Command::Abort(_)) => reports[i] = idle_report(host.sims[i].index),
                _ => {}
            }
        }
        if run_at.iter().all(Option::is_some) {
            host.send(&reports, Duration::ZERO, 0).await?;
            return Ok((run_at.into_iter().flatten().collect(), reports));
        }
        wait.pause(&replies).await;
    }
    Err(format!(
        "host of {} was given no generation {generation}",
        host.sims[0].id
    )
    .into())
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// The coordinator's CPU seconds and the heartbeat calls sent over one phase.
struct Meter {
    cpu: f64,
    sent: u64,
}

impl Meter {
    fn start() -> Meter {
        Meter {
            cpu: cpu_seconds(SERVER_THREADS),
            sent: SENT.load(Ordering::Relaxed),
        }
    }

    /// Since [`Meter::start`]: (CPU seconds, heartbeat calls).
    fn read(&self) -> (f64, u64) {
        (
            cpu_seconds(SERVER_THREADS) - self.cpu,
            SENT.load(Ordering::Relaxed) - self.sent,
        )
    }
}

/// Phase 2: every rank reports step 10's checkpoint written at once; the host of rank 0
/// waits until rank 0 is told to commit and reports it committed. The reports after it, by
/// host.
async fn commit_step_10(
    hosts: &[Host],
    reports: &[Vec<rpc::WorkerReport>],
    wait: Wait,
) -> Result<Vec<Vec<rpc::WorkerReport>>, Error> {
    let tasks: Vec<_> = hosts
        .iter()
        .zip(reports)
        .map(|(host, reports)| {
            let mut host = host.clone();
            let mut reports = reports.clone();
            for r in &mut reports {
                r.checkpoint_written = 10;
            }
            tokio::spawn(async move {
                let Some(zero) = reports.iter().position(|r| r.rank == 0) else {
                    host.send(&reports, Duration::ZERO, 0).await?;
                    return Ok::<_, Error>(reports);
                };
                for _ in 0..3000 {
                    let replies = host.send(&reports, wait.hold, 0).await?;
                    if replies[zero].commit_step == 10 {
                        reports[zero].checkpoint_committed = 10;
                        host.send(&reports, Duration::ZERO, 0).await?;
                        return Ok(reports);
                    }
                    wait.pause(&replies).await;
                }
                Err("rank 0 was never told to commit step 10".into())
            })
        })
        .collect();
    let mut written = Vec::with_capacity(reports.len());
    for t in tasks {
        written.push(t.await??);
    }
    Ok(written)
}

/// The three phases for `n` workers in hosts of `per_host` on a fresh coordinator; a JSON
/// row.
pub fn lifecycle(
    server_rt: &Runtime,
    client_rt: &Runtime,
    n: usize,
    per_host: usize,
    connections: usize,
    wait: Wait,
    settle: Duration,
) -> Result<Value, Error> {
    let coordinator = Coordinator::start(server_rt, Duration::from_secs(1))?;
    let target = coordinator.target();
    let per_host = per_host.clamp(1, n.max(1));
    let connections = connections.min(n.div_ceil(per_host));
    let load_before = load_average();
    let limit = Duration::from_secs(600);
    let row = client_rt.block_on(async {
        let clients = connect(&target, connections).await?;
        let mut control = target.connect().await?;
        let (sims, registered) = register(&clients, n).await?;
        // A host's workers share its connection.
        let hosts: Vec<Host> = sims
            .chunks(per_host)
            .enumerate()
            .map(|(h, chunk)| Host {
                sims: chunk
                    .iter()
                    .map(|sim| Sim {
                        client: clients[h % clients.len()].clone(),
                        ..sim.clone()
                    })
                    .collect(),
            })
            .collect();

        // 1. Bring-up: the workers wait idle, then a job for all of them is submitted.
        let (start, clock) = tokio::sync::watch::channel(None);
        let tasks: Vec<_> = hosts
            .iter()
            .map(|host| {
                let (mut host, clock) = (host.clone(), clock.clone());
                tokio::spawn(async move {
                    let idle = host.sims.iter().map(|s| idle_report(s.index)).collect();
                    until_run(&mut host, idle, 1, wait, clock).await
                })
            })
            .collect();
        tokio::time::sleep(settle).await;
        let meter = Meter::start();
        let t0 = Instant::now();
        start.send_replace(Some(t0));
        let job_id = submit(&mut control, n).await?;
        let mut reports = Vec::with_capacity(hosts.len());
        let mut run_at = Vec::with_capacity(n);
        for t in tasks {
            let (at, report) = t.await??;
            run_at.extend(at);
            reports.push(report);
        }
        let all_acked = t0.elapsed().as_secs_f64();
        let bring_up = until(&mut control, &job_id, t0, limit, |s| s.0 == "running").await?;
        let (bring_up_cpu, bring_up_heartbeats) = meter.read();

        // 2. Commit of step 10.
        let meter = Meter::start();
        let t0 = Instant::now();
        let written = commit_step_10(&hosts, &reports, wait).await?;
        let commit = until(&mut control, &job_id, t0, limit, |s| {
            s.0 == "running" && s.2 == 10
        })
        .await?;
        let (commit_cpu, commit_heartbeats) = meter.read();

        // 3. Recovery: the ranks wait running, then rank N/2 reports its process failed.
        let (start, clock) = tokio::sync::watch::channel(None);
        let failed = n / 2;
        let tasks: Vec<_> = hosts
            .iter()
            .zip(&written)
            .map(|(host, reports)| {
                let (mut host, mut clock) = (host.clone(), clock.clone());
                let mut reports = reports.clone();
                tokio::spawn(async move {
                    if let Some(i) = host.sims.iter().position(|s| s.index == failed) {
                        clock.changed().await?;
                        let report = &mut reports[i];
                        report.state = rpc::WorkerState::Failed as i32;
                        report.error = "simulated failure".into();
                        report.ready_addr = crate::sim::ready_addr(failed);
                    }
                    until_run(&mut host, reports, 2, wait, clock).await
                })
            })
            .collect();
        tokio::time::sleep(settle).await;
        let meter = Meter::start();
        let t0 = Instant::now();
        start.send_replace(Some(t0));
        let mut rerun_at = Vec::with_capacity(n);
        for t in tasks {
            rerun_at.extend(t.await??.0);
        }
        let re_acked = t0.elapsed().as_secs_f64();
        let recovery = until(&mut control, &job_id, t0, limit, |s| {
            s.0 == "running" && s.1 == 2
        })
        .await?;
        let (recovery_cpu, recovery_heartbeats) = meter.read();
        let (phase, generation) = job_phase(&mut control, &job_id).await?;
        drop((hosts, sims, clients, control));
        Ok::<_, Error>(json!({
            "workers": n,
            "per_host": per_host,
            "connections": connections,
            "poll_ms": wait.poll.as_millis() as u64,
            "hold_ms": wait.hold.as_millis() as u64,
            "settle_s": settle.as_secs_f64(),
            "register_s": registered.as_secs_f64(),
            "bring_up_all_run_s": max(&run_at),
            "bring_up_all_running_acked_s": all_acked,
            "bring_up_status_running_s": bring_up,
            "bring_up_coordinator_cpu_s": bring_up_cpu,
            "bring_up_heartbeats": bring_up_heartbeats,
            "commit_status_committed_s": commit,
            "commit_coordinator_cpu_s": commit_cpu,
            "commit_heartbeats": commit_heartbeats,
            "recovery_all_run_s": max(&rerun_at),
            "recovery_all_running_acked_s": re_acked,
            "recovery_status_running_s": recovery,
            "recovery_coordinator_cpu_s": recovery_cpu,
            "recovery_heartbeats": recovery_heartbeats,
            "job_after": format!("{phase}, generation {generation}"),
            "load_before": load_before,
            "load_after": load_average(),
        }))
    })?;
    coordinator.stop(server_rt);
    Ok(row)
}

/// The same three phases driven on a [`Machine`] directly, each worker sending only the
/// reports that move it (no gRPC, no polling): the coordinator's decisions alone. Seconds
/// per phase, as a JSON row.
pub fn machine_lifecycle(n: usize) -> Value {
    use kiln_coordinator::machine::{JobSpec, Machine, Policy};
    use kiln_proto::control::{Command as C, WorkerReport, WorkerState};

    let mut m = Machine::new(Policy::default(), "bench".into());
    let idle = |i: usize| WorkerReport {
        ready_addr: Some(crate::sim::ready_addr(i)),
        ..WorkerReport::default()
    };
    let running = |job: &str, generation: u64, rank: u32| WorkerReport {
        state: WorkerState::Running,
        job_id: job.into(),
        generation,
        rank,
        ..WorkerReport::default()
    };
    let t = Instant::now();
    let ids: Vec<String> = (0..n)
        .map(|i| m.register(format!("host-{i}"), "", idle(i), 0.0))
        .collect();
    let register = t.elapsed().as_secs_f64();
    let spec = JobSpec {
        name: "bench".into(),
        toml: crate::sim::job_toml(n),
        tp: 1,
        shard: 0,
        batch_size: n as u64,
        micro_batch_size: 1,
        steps: 1000,
        checkpoint_every: 10,
        memory_every: 0,
        min_workers: 1,
        max_workers: 0,
        outputs: Vec::new(),
        queue: false,
    };
    let run = |m: &mut Machine, id: &str, report: WorkerReport, now: f64| -> u32 {
        match m.heartbeat(id, report, now).expect("registered").command {
            C::Run(a) => a.rank,
            other => panic!("expected Run, got {other:?}"),
        }
    };

    let t = Instant::now();
    let job = m.submit(spec, n as u32, 1.0).expect("a valid job");
    let ranks: Vec<u32> = (0..n).map(|i| run(&mut m, &ids[i], idle(i), 1.0)).collect();
    for (i, id) in ids.iter().enumerate() {
        m.heartbeat(id, running(&job, 1, ranks[i]), 1.0).unwrap();
    }
    let bring_up = t.elapsed().as_secs_f64();
    assert_eq!(m.jobs[&job].phase.name(), "running");

    let t = Instant::now();
    let mut rank0 = None;
    for (i, id) in ids.iter().enumerate() {
        let mut r = running(&job, 1, ranks[i]);
        r.checkpoint_written = 10;
        let reply = m.heartbeat(id, r.clone(), 2.0).unwrap();
        if ranks[i] == 0 {
            rank0 = Some((id.clone(), r));
        } else {
            assert_eq!(reply.commit_step, 0);
        }
    }
    let (id0, mut r0) = rank0.expect("a rank 0");
    assert_eq!(m.heartbeat(&id0, r0.clone(), 2.0).unwrap().commit_step, 10);
    r0.checkpoint_committed = 10;
    m.heartbeat(&id0, r0, 2.0).unwrap();
    let commit = t.elapsed().as_secs_f64();
    assert_eq!(m.jobs[&job].committed_step, 10);

    let t = Instant::now();
    let failed = n / 2;
    let mut f = running(&job, 1, ranks[failed]);
    f.state = WorkerState::Failed;
    f.error = "simulated failure".into();
    f.ready_addr = Some(crate::sim::ready_addr(failed));
    m.heartbeat(&ids[failed], f.clone(), 3.0).unwrap();
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != failed) {
        let reply = m.heartbeat(id, running(&job, 1, ranks[i]), 3.0).unwrap();
        assert!(matches!(reply.command, C::Abort(_)), "{reply:?}");
        m.heartbeat(id, idle(i), 3.0).unwrap();
    }
    let ranks: Vec<u32> = (0..n)
        .map(|i| {
            let report = if i == failed { f.clone() } else { idle(i) };
            run(&mut m, &ids[i], report, 3.0)
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        m.heartbeat(id, running(&job, 2, ranks[i]), 3.0).unwrap();
    }
    let recovery = t.elapsed().as_secs_f64();
    let j = &m.jobs[&job];
    assert_eq!((j.phase.name(), j.generation), ("running", 2));
    json!({
        "workers": n,
        "register_s": register,
        "bring_up_s": bring_up,
        "commit_s": commit,
        "recovery_s": recovery,
        "heartbeats": 2 * n + (n + 2) + (1 + 2 * (n - 1) + 2 * n),
    })
}
