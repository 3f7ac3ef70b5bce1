//! `kiln coordinator`: the coordinator's options and its run until Ctrl-C.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kiln_coordinator::machine::Policy;
use kiln_coordinator::ops;
use kiln_coordinator::preflight::DataCheck;
use kiln_coordinator::service::{self, Config};

use crate::runtime;

/// `kiln coordinator`'s arguments.
#[derive(clap::Args)]
pub struct CoordinatorArgs {
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: std::net::SocketAddr,
    /// Where job state is kept, so a restarted coordinator picks its jobs up: a
    /// directory or store URL.
    #[arg(long, default_value = ".kiln/coordinator")]
    state: String,
    /// The shared token of workers and clients (generated and printed when not given).
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A worker not heard from for this many seconds is gone.
    #[arg(long, default_value_t = 10.0)]
    heartbeat_timeout_s: f64,
    #[arg(long, default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    /// Failures in a row (no checkpoint committed between them) before a job fails.
    #[arg(long, default_value_t = 5)]
    max_restarts: u32,
    /// Evict a worker that straggles (computes 1.5x slower than the median) this long.
    #[arg(long)]
    evict_stragglers_after_s: Option<f64>,
    /// Keep a finished (completed, failed or stopped) job in the state, for `kiln status`
    /// and `kiln logs`, this many hours ...
    #[arg(long, default_value_t = 168.0)]
    retain_finished_hours: f64,
    /// ... and keep at most this many finished jobs: the state holds the unfinished jobs
    /// and these, however many were ever submitted.
    #[arg(long, default_value_t = 100)]
    retain_finished_jobs: usize,
    /// Serve TLS with this certificate (PEM) ...
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// ... and key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve job-level metrics for Prometheus at http://ADDR/metrics (e.g.
    /// 0.0.0.0:9464).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Do not read a submitted job's datasets (their manifests) at submit, only check its
    /// file: for a coordinator that cannot see the data its workers read.
    #[arg(long)]
    no_data_check: bool,
}

/// Runs a coordinator until it fails or Ctrl-C.
pub fn run(args: CoordinatorArgs) -> Result<()> {
    let token = match args.token.filter(|t| !t.is_empty()) {
        Some(t) => t,
        None => {
            let t = ops::random_token();
            eprintln!(
                "no --token or KILN_TOKEN given; workers and clients need:\nexport KILN_TOKEN={t}"
            );
            t
        }
    };
    if !(args.heartbeat_timeout_s.is_finite() && args.heartbeat_timeout_s > 0.0) {
        bail!("--heartbeat-timeout-s must be a positive number of seconds");
    }
    if !(args.retain_finished_hours.is_finite() && args.retain_finished_hours >= 0.0) {
        bail!("--retain-finished-hours must be a number of hours, 0 or more");
    }
    let config = Config {
        listen: args.listen,
        token,
        state_url: args.state,
        policy: Policy {
            heartbeat_timeout_s: args.heartbeat_timeout_s,
            max_restarts: args.max_restarts,
            evict_stragglers_after_s: args.evict_stragglers_after_s,
            retain_finished_s: args.retain_finished_hours * 3600.0,
            retain_finished_jobs: args.retain_finished_jobs,
            ..Policy::default()
        },
        heartbeat_interval: std::time::Duration::from_millis(args.heartbeat_interval_ms.max(50)),
        tls: args.tls_cert.zip(args.tls_key),
        metrics_listen: args.metrics_listen,
        data_check: if args.no_data_check {
            DataCheck::Skip
        } else {
            DataCheck::Read
        },
    };
    runtime()?.block_on(async {
        let running = service::start(config).await?;
        println!(
            "kiln coordinator listening on {}; state in {}",
            running.addr, running.state_url
        );
        if let Some(at) = running.metrics_addr {
            println!("metrics for Prometheus at http://{at}/metrics");
        }
        let done = running.done;
        tokio::select! {
            r = done => r.context("the coordinator task failed")??,
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<_, anyhow::Error>(())
    })
}
