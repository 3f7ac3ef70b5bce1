//! `kiln-control`: the coordinator, its clients and `kiln report`, in a binary that links no
//! libtorch (the coordinator's container image; a laptop that submits and watches jobs).
//! The same commands are part of `kiln`.

use std::process::ExitCode;

use clap::Parser;
use kiln_control::ControlCommand;

#[derive(Parser)]
#[command(
    name = "kiln-control",
    version,
    about = "Kiln's control plane: run a coordinator, submit and watch jobs, write reports (no libtorch)"
)]
struct Cli {
    #[command(subcommand)]
    command: ControlCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs to stderr; metrics and traces over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    // Dropped (flushed) when `main` returns.
    let _telemetry = kiln_telemetry::init(&cli.command.identity());
    kiln_control::exit_code(cli.command.run())
}
