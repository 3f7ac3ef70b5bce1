//! Part 1, heartbeats: every simulated worker heartbeating back to back (the saturation
//! throughput) or paced at the interval the coordinator returns (the latency at that load),
//! idle or running one job of all of them.

use std::time::{Duration, Instant};

use kiln_proto::rpc;
use rpc::heartbeat_reply::Command;
use serde_json::{json, Value};
use tokio::runtime::Runtime;

use crate::args::Args;
use crate::sim::{
    connect, heartbeat_request, idle_report, job_phase, register, start_job, Coordinator, Sim,
};
use crate::{cpu_seconds, load_average, Error, CLIENT_THREADS, SERVER_THREADS};

/// What one worker saw during a measured window.
#[derive(Default)]
pub struct Seen {
    /// Latencies (microseconds) of the heartbeats answered inside the window.
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    /// Replies other than Wait.
    unexpected: u64,
}

/// Heartbeats with `report` until `end`: back to back, or sleeping `pace` after each reply
/// (the agent's loop); the first one after `offset`.
pub async fn heartbeat_loop(
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

pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p / 100.0) as usize).min(sorted.len() - 1);
    f64::from(sorted[i]) / 1000.0
}

/// One measured heartbeat window over all `sims`; a JSON row.
#[allow(clippy::too_many_arguments)]
pub fn measure(
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
pub fn heartbeat_part(
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
