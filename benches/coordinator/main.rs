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
//! 3. A job's life (`lifecycle.rs`): bring-up, a checkpoint commit and the recovery from a
//!    failed rank of one job over N workers that heartbeat every 100 ms while they wait;
//!    then the same phases on the decision machine alone (`--machine-workers`).
//!
//! ```text
//! cargo bench -p kiln-coordinator --bench coordinator -- [--workers 1000,2000,4000]
//!     [--connections 32] [--window 10] [--warmup 3] [--modes idle,running]
//!     [--rendezvous-workers 1000] [--rendezvous-intervals 1000,200] [--rounds 3]
//!     [--client-threads 2] [--skip-heartbeat] [--skip-rendezvous]
//!     [--lifecycle-workers 4000,16384] [--lifecycle-hold-ms 1000,0] [--lifecycle-poll-ms 100]
//!     [--lifecycle-settle-s 3] [--lifecycle-per-host 1,8]
//!     [--skip-lifecycle]
//! ```
//!
//! Prints Markdown tables; with `KILN_BENCH_OUT=PATH` also writes the results as JSON.
mod args;
mod heartbeat;
mod lifecycle;
mod rendezvous;
mod sim;

use std::time::Duration;

use serde_json::{json, Value};
use tokio::runtime::Runtime;

use args::{parse_args, Args};
use heartbeat::heartbeat_part;
use rendezvous::rendezvous_round;

/// Thread names (`/proc/self/task/*/comm`) of the two runtimes, for their CPU time.
const SERVER_THREADS: &str = "kiln-coord";
const CLIENT_THREADS: &str = "sim-workers";

type Error = Box<dyn std::error::Error + Send + Sync>;

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

    let mut lifecycle_rows = Vec::new();
    for &n in &args.lifecycle_workers {
        for &per_host in &args.lifecycle_per_host {
            for &hold in &args.lifecycle_holds_ms {
                let wait = lifecycle::Wait {
                    poll: args.lifecycle_poll,
                    hold: Duration::from_millis(hold),
                };
                let row = lifecycle::lifecycle(
                    &server_rt,
                    &client_rt,
                    n,
                    per_host,
                    args.connections,
                    wait,
                    args.lifecycle_settle,
                )?;
                eprintln!("[lifecycle {n} workers, {per_host} a host, hold {hold} ms] {row}");
                lifecycle_rows.push(row);
            }
        }
    }
    let machine_rows: Vec<Value> = args
        .machine_workers
        .iter()
        .map(|&n| {
            let row = lifecycle::machine_lifecycle(n);
            eprintln!("[machine {n} workers] {row}");
            row
        })
        .collect();

    if !heartbeat_rows.is_empty() {
        print_heartbeats(&heartbeat_rows, &args, cores);
    }
    if !lifecycle_rows.is_empty() {
        print_lifecycle(&lifecycle_rows);
    }
    if !machine_rows.is_empty() {
        println!(
            "\nThe same phases on the decision machine alone (`Machine` calls, each worker sending \
             only the reports that move it; no gRPC).\n"
        );
        println!("| workers | reports | register | bring-up | commit | recovery |");
        println!("|---|---|---|---|---|---|");
        for r in &machine_rows {
            println!(
                "| {} | {} | {:.3} s | {:.3} s | {:.3} s | {:.3} s |",
                r["workers"],
                r["heartbeats"],
                f(r, "register_s"),
                f(r, "bring_up_s"),
                f(r, "commit_s"),
                f(r, "recovery_s"),
            );
        }
    }
    if !rendezvous_rows.is_empty() {
        print_rendezvous(&rendezvous_rows, &args);
    }
    if let Some(path) = std::env::var_os("KILN_BENCH_OUT") {
        let out = json!({
            "bench": "coordinator",
            "cores": cores,
            "coordinator_threads": 2,
            "simulator_threads": args.client_threads,
            "heartbeat": heartbeat_rows,
            "rendezvous": rendezvous_rows,
            "lifecycle": lifecycle_rows,
            "machine": machine_rows,
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&out)?)?;
        eprintln!("results written to {}", path.to_string_lossy());
    }
    drop(client_rt);
    drop(server_rt);
    Ok(())
}

/// A number of a result row; NaN where there is none.
fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// The heartbeat rows as a Markdown table.
fn print_heartbeats(rows: &[Value], args: &Args, cores: usize) {
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
    for r in rows {
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

/// The lifecycle rows as a Markdown table.
fn print_lifecycle(rows: &[Value]) {
    println!(
        "\nA job's life over N simulated workers: bring-up from the submit and recovery from the \
         failure, after the workers waited {} s; the commit from its first request. Coordinator \
         CPU seconds and heartbeat calls over the phase in brackets (one call carries a host's \
         workers). A worker waits with heartbeats held up to the hold (a long poll), or, where \
         that is 0, with one every {} ms.\n",
        rows[0]["settle_s"], rows[0]["poll_ms"]
    );
    println!(
        "| workers | a host | hold | register | bring-up: all have Run | all RUNNING answered | Status \"running\" | commit: Status committed | recovery: all have Run | all RUNNING answered | Status \"running\" |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} ms | {:.2} s | {:.2} s | {:.2} s | {:.2} s ({:.2}, {}) | {:.2} s ({:.2}, {}) | {:.2} s | {:.2} s | {:.2} s ({:.2}, {}) |",
            r["workers"],
            r["per_host"],
            r["hold_ms"],
            f(r, "register_s"),
            f(r, "bring_up_all_run_s"),
            f(r, "bring_up_all_running_acked_s"),
            f(r, "bring_up_status_running_s"),
            f(r, "bring_up_coordinator_cpu_s"),
            r["bring_up_heartbeats"],
            f(r, "commit_status_committed_s"),
            f(r, "commit_coordinator_cpu_s"),
            r["commit_heartbeats"],
            f(r, "recovery_all_run_s"),
            f(r, "recovery_all_running_acked_s"),
            f(r, "recovery_status_running_s"),
            f(r, "recovery_coordinator_cpu_s"),
            r["recovery_heartbeats"],
        );
    }
}

/// The rendezvous rows as a Markdown table: per worker count and interval, the median of
/// the rounds (min-max).
fn print_rendezvous(rows: &[Value], args: &Args) {
    println!(
        "\nRendezvous, from the Submit call; median of {} rounds (min-max), each on a fresh \
         coordinator; Status polled every 20 ms.\n",
        args.rounds
    );
    println!(
        "| workers | heartbeat interval | HTTP/2 connections | Submit call | all have Run | all RUNNING acknowledged | Status \"running\" | coordinator CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut groups: Vec<(u64, u64)> = rows
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
        let rows: Vec<&Value> = rows
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
