//! The client commands: how a client reaches the coordinator, `kiln submit` and
//! `kiln status`. (`scale`, `stop` and `logs` are one call each, in the crate root.)

use std::path::PathBuf;

use anyhow::{bail, Result};
use kiln_coordinator::ops;
use kiln_proto::client::Target;

use crate::runtime;

/// How to reach the coordinator.
#[derive(clap::Args)]
pub struct Conn {
    #[arg(
        long,
        env = "KILN_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
    /// The CA certificate (PEM) of a coordinator that serves TLS.
    #[arg(long, env = "KILN_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

impl Conn {
    /// The coordinator these options name.
    pub fn target(self) -> Target {
        Target {
            url: self.coordinator,
            token: self.token,
            tls_ca: self.tls_ca,
        }
    }
}

/// `kiln submit`'s arguments.
#[derive(clap::Args)]
pub struct SubmitArgs {
    job: PathBuf,
    #[command(flatten)]
    conn: Conn,
    /// Workers to run it on (default: parallel.tp, one data-parallel group).
    #[arg(long, default_value_t = 0)]
    workers: u32,
    /// Fewest workers it may continue on after a failure.
    #[arg(long, default_value_t = 1)]
    min_workers: u32,
    /// Most workers it may grow to (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_workers: u32,
    /// When an unfinished job writes to this job's output or checkpoint directory, wait for
    /// it to end (and for any job queued there before) instead of being refused.
    #[arg(long)]
    queue: bool,
    /// Follow it to its end with a progress bar.
    #[arg(long)]
    watch: bool,
}

/// `kiln submit`: prints the job's id; with `--watch`, follows it to its end.
pub fn submit(args: SubmitArgs) -> Result<()> {
    let target = args.conn.target();
    runtime()?.block_on(async {
        let id = ops::submit(
            &target,
            &args.job,
            args.workers,
            args.min_workers,
            args.max_workers,
            args.queue,
        )
        .await?;
        println!("{id}");
        if args.watch {
            finish(ops::watch(&target, &id).await?)?;
        }
        Ok(())
    })
}

/// `kiln status [JOB] [--watch]`.
pub fn status(job: Option<String>, conn: Conn, watch: bool) -> Result<()> {
    let target = conn.target();
    let job = job.unwrap_or_default();
    runtime()?.block_on(async {
        if watch && !job.is_empty() {
            finish(ops::watch(&target, &job).await?)
        } else {
            if watch {
                bail!("--watch follows one job: name it");
            }
            ops::status(&target, &job).await?;
            Ok(())
        }
    })
}

/// Prints how a followed job ended; an error unless it completed.
pub fn finish(job: kiln_proto::rpc::JobStatus) -> Result<()> {
    println!("{}", ops::job_line(&job));
    if job.phase != "completed" {
        bail!("job {} {}: {}", job.job_id, job.phase, job.message);
    }
    Ok(())
}
