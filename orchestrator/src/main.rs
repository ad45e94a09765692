//! `orchestrator`: serve the control plane, or act as its client.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use orchestrator::cli::{Cli, Command, run};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs at info by default; client commands stay quiet so
    // that their stdout/stderr carry only the job's output.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    run(cli).await
}
