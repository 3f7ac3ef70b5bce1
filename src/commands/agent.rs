//! `kiln worker` and `kiln local`: the processes on a training host that take ranks from a
//! coordinator (and, for `local`, a coordinator of their own).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use kiln_control::{finish, runtime, Conn};
use kiln_coordinator::agent::{self, AgentOptions};
use kiln_coordinator::ops;

#[derive(Subcommand)]
pub enum Commands {
    /// Run worker processes for a coordinator: each trains the ranks it is given.
    Worker {
        #[command(flatten)]
        conn: Conn,
        /// The address other workers reach this host at.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Workers on this host (one per GPU, at most 256); their heartbeats go to the
        /// coordinator together, in one call.
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        /// Where the ranks' job files go (default: `kiln-worker-PID` in the system's temporary
        /// directory, removed when this process exits; a given directory is kept).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        #[arg(long, default_value = "worker")]
        name: String,
        /// Host memory this process may keep ranks' snapshots in (`checkpoint.memory_every`:
        /// its own ranks' and peers'); the oldest go first beyond it. 0: keep none.
        #[arg(long, default_value_t = agent::DEFAULT_MEMORY_BUDGET_MB)]
        memory_budget_mb: u64,
        /// Stop when stdin closes (`kiln local`'s workers: none outlives it).
        #[arg(long, hide = true)]
        exit_with_stdin: bool,
    },
    /// Run a job on this host: a coordinator and N worker processes.
    Local {
        job: PathBuf,
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Where the coordinator keeps its state (default: output.dir/coordinator).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 10.0)]
        heartbeat_timeout_s: f64,
        /// Serve the coordinator's metrics for Prometheus at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
}

impl Commands {
    /// Runs the command to its end.
    pub fn run(self) -> Result<()> {
        match self {
            Commands::Worker {
                conn,
                host,
                nproc_per_node,
                work_dir,
                name,
                memory_budget_mb,
                exit_with_stdin,
            } => {
                // Without --work-dir, the rank job files go to a folder of this process's own,
                // removed when it exits.
                let temporary = work_dir.is_none();
                let work_dir =
                    work_dir.unwrap_or_else(|| agent::default_work_dir(std::process::id()));
                let cleanup = {
                    let dir = work_dir.clone();
                    move || {
                        if temporary {
                            let _ = std::fs::remove_dir_all(&dir);
                        }
                    }
                };
                if exit_with_stdin {
                    // Its training processes follow: their stdin closes with this process.
                    let cleanup = cleanup.clone();
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                        cleanup();
                        std::process::exit(1);
                    });
                }
                let options = AgentOptions {
                    target: conn.target(),
                    host,
                    exe: std::env::current_exe().context("cannot find the kiln executable")?,
                    work_dir,
                    local_rank: None,
                    label: name,
                    threads: None,
                    memory_budget_mb,
                };
                let most = kiln_coordinator::service::MAX_HOST_WORKERS;
                if nproc_per_node == 0 || nproc_per_node > most {
                    bail!("--nproc-per-node must be between 1 and {most}, not {nproc_per_node}");
                }
                let ran = runtime()?.block_on(agent::run_many(options, nproc_per_node));
                cleanup();
                Ok(ran?)
            }
            Commands::Local {
                job,
                workers,
                state,
                heartbeat_timeout_s,
                metrics_listen,
            } => {
                let options = ops::Local {
                    metrics_listen,
                    job,
                    workers,
                    exe: std::env::current_exe().context("cannot find the kiln executable")?,
                    state_url: state,
                    heartbeat_timeout: std::time::Duration::from_secs_f64(
                        heartbeat_timeout_s.max(0.5),
                    ),
                };
                finish(runtime()?.block_on(ops::local(options))?)
            }
        }
    }
}

impl Commands {
    /// Who this process is, for the resource of its telemetry.
    pub fn identity(&self) -> kiln_telemetry::Identity {
        match self {
            Commands::Local { .. } => kiln_telemetry::Identity::new("kiln-coordinator"),
            Commands::Worker { .. } => kiln_telemetry::Identity::new("kiln-worker"),
        }
    }
}
