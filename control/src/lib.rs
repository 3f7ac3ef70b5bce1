//! Kiln's control plane as command-line commands: `kiln coordinator`, the clients (`submit`,
//! `status`, `scale`, `stop`, `logs`) and `kiln report`.
//!
//! Both binaries run them: `kiln` (which also trains, and links libtorch) flattens
//! [`ControlCommand`] into its own commands, and `kiln-control` (`src/main.rs`) is these
//! commands alone. Architecture invariant: nothing this crate depends on links libtorch or
//! needs Python, so the coordinator's container image and a laptop that only watches jobs
//! need neither (a test checks the `kiln-control` binary with `ldd`).
//!
//! - [`clients`]: how a client reaches the coordinator ([`Conn`]) and the client commands.
//! - [`server`]: `kiln coordinator`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use kiln_telemetry::Identity;

pub mod clients;
pub mod server;

pub use clients::{finish, Conn};

/// The control-plane commands, as both binaries offer them.
#[derive(Subcommand)]
pub enum ControlCommand {
    /// Run a coordinator: it accepts jobs, forms them on registered workers, and recovers
    /// or re-forms them from their newest checkpoint.
    Coordinator(server::CoordinatorArgs),
    /// Submit a job to a coordinator.
    Submit(clients::SubmitArgs),
    /// The coordinator's jobs and workers, or one job (with --watch: followed to its end).
    Status {
        job: Option<String>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        watch: bool,
    },
    /// Change a job's worker count; it takes effect at the next checkpoint.
    Scale {
        job: String,
        #[arg(long)]
        workers: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop a job (its workers abort; its checkpoints stay).
    Stop {
        job: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// A job's event log: formations, failures, recoveries, checkpoints.
    Logs {
        job: String,
        #[command(flatten)]
        conn: Conn,
        #[arg(short, long)]
        follow: bool,
    },
    /// Write a self-contained HTML page (loss, throughput and step-time plots) from a run's
    /// metrics log.
    Report {
        /// The run: its output directory, a `metrics.jsonl`, a store URL holding one (the
        /// job's checkpoint directory), or the job file.
        run: String,
        /// Where to write the page (default: `report.html` in the current directory).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

impl ControlCommand {
    /// Who this process is, for the resource of its telemetry.
    pub fn identity(&self) -> Identity {
        match self {
            ControlCommand::Coordinator(_) => Identity::new("kiln-coordinator"),
            _ => Identity::new("kiln"),
        }
    }

    /// Runs the command to its end.
    pub fn run(self) -> Result<()> {
        match self {
            ControlCommand::Coordinator(args) => server::run(args),
            ControlCommand::Submit(args) => clients::submit(args),
            ControlCommand::Status { job, conn, watch } => clients::status(job, conn, watch),
            ControlCommand::Scale { job, workers, conn } => {
                let message = runtime()?.block_on(kiln_coordinator::ops::scale(
                    &conn.target(),
                    &job,
                    workers,
                ))?;
                println!("{message}");
                Ok(())
            }
            ControlCommand::Stop { job, conn } => {
                let message =
                    runtime()?.block_on(kiln_coordinator::ops::stop(&conn.target(), &job))?;
                println!("{message}");
                Ok(())
            }
            ControlCommand::Logs { job, conn, follow } => {
                runtime()?.block_on(kiln_coordinator::ops::logs(&conn.target(), &job, follow))?;
                Ok(())
            }
            ControlCommand::Report { run, output } => {
                let path = output.unwrap_or_else(|| PathBuf::from("report.html"));
                let written = runtime()?.block_on(kiln_report::write(&run, &path))?;
                println!("wrote {}", written.display());
                Ok(())
            }
        }
    }
}

/// The async runtime a command runs its IO on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The exit of a command: on an error, `error: ...` on stderr, each cause once.
pub fn exit_code(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already embed their causes; print each cause only once.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
