//! Part 2, rendezvous: workers heartbeating idle as agents do, a job submitted for all of
//! them, and how long until every one has its assignment, reports RUNNING, and `Status`
//! says "running".

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::rpc;
use rpc::heartbeat_reply::Command;
use serde_json::{json, Value};
use tokio::runtime::Runtime;

use crate::sim::{
    connect, heartbeat_request, idle_report, job_phase, register, running_report, submit,
    Coordinator, Sim,
};
use crate::{cpu_seconds, load_average, median, Error, SERVER_THREADS};

/// What one agent-like worker saw of a rendezvous.
#[derive(Default)]
pub struct Rendezvous {
    run_at: Option<Instant>,
    rank: Option<u32>,
    running_acked_at: Option<Instant>,
    bad: Option<String>,
}

/// The agent's loop: heartbeat, act on the reply, sleep the interval; a `Run` is
/// followed by an immediate heartbeat reporting RUNNING (the agent wakes itself).
pub async fn agent_loop(
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
                    // Only the rank's ring neighbours' addresses, whatever the world.
                    if a.world_size as usize != n
                        || a.peers.len() > 7
                        || a.peers.len() != a.peer_ranks.len()
                        || a.generation != 1
                        || a.job_toml.is_empty()
                    {
                        out.bad.get_or_insert(format!(
                            "assignment with {} peers of a world of {}, generation {}",
                            a.peers.len(),
                            a.world_size,
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
pub fn rendezvous_round(
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
