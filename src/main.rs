//! `kiln`: the command-line front end, a dispatcher over one module per command family
//! ([`commands`]; the control plane's commands come from `kiln-control`, which also builds
//! them alone into `kiln-control`). Each command parses its arguments, validates them into a
//! library config and calls the library; nothing here trains or tokenizes by itself.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln_control::ControlCommand;
use kiln_telemetry::Identity;

mod commands;

use commands::{agent, checkpoint, data, model, plan, train};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Pre-train Llama-style language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Every command, by family (the help lists them in this order).
#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Data(data::Commands),
    #[command(flatten)]
    Train(train::Commands),
    #[command(flatten)]
    Plan(plan::Commands),
    #[command(flatten)]
    Control(ControlCommand),
    #[command(flatten)]
    Agent(agent::Commands),
    #[command(flatten)]
    Model(model::Commands),
    #[command(flatten)]
    Checkpoint(checkpoint::Commands),
}

impl Command {
    /// Who this process is, for the resource of its telemetry.
    fn identity(&self) -> Identity {
        match self {
            Command::Train(c) => c.identity(),
            Command::Control(c) => c.identity(),
            Command::Agent(c) => c.identity(),
            _ => Identity::new("kiln"),
        }
    }

    fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Data(c) => c.run(),
            Command::Train(c) => c.run(),
            Command::Plan(c) => c.run(),
            Command::Control(c) => c.run(),
            Command::Agent(c) => c.run(),
            Command::Model(c) => c.run(),
            Command::Checkpoint(c) => c.run(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs to stderr; metrics and traces over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    // Dropped (flushed) when `main` returns.
    let _telemetry = kiln_telemetry::init(&cli.command.identity());
    kiln_control::exit_code(cli.command.run())
}
