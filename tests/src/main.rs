//! `harness`: run a scenario in the nested L1 (or directly on hardware KVM).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use harness::{Asset, HostKvm, ModeChoice, Scenario};

/// Nested-virtualization test harness for Kindling.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print what KVM this host offers and where scenarios would run.
    Detect,
    /// Run a scenario and exit with its exit code (124: timeout, 125: L1 failure).
    Run(Box<RunArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Nested,
    Direct,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Scenario script file (POSIX sh).
    #[arg(long, conflicts_with = "command")]
    script: Option<PathBuf>,
    /// Scenario as an inline shell command.
    #[arg(short = 'c', long)]
    command: Option<String>,
    /// Name used for the work directory and the report.
    #[arg(long)]
    name: Option<String>,
    /// A host binary to put on the scenario's PATH (repeatable).
    #[arg(long = "bin")]
    bins: Vec<PathBuf>,
    /// A file exposed as $ASSETS/NAME: PATH or PATH=NAME (repeatable).
    #[arg(long = "asset", value_parser = Asset::parse)]
    assets: Vec<Asset>,
    /// An extra L1 kernel module to load (repeatable).
    #[arg(long = "module")]
    modules: Vec<String>,
    /// An extra argument for the L1 kernel's command line (repeatable);
    /// later ones win, e.g. `transparent_hugepage=always` over the
    /// harness's `never`.
    #[arg(long = "l1-kernel-arg")]
    l1_kernel_args: Vec<String>,
    /// Timeout for the whole run, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// L1 memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// L1 vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,
    /// Directory for logs (default: a new one under $TMPDIR/kindling-harness).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Do not stream the scenario's output live.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Detect => {
            let host = HostKvm::detect();
            println!("host: {host}");
            println!("scenarios run: {}", host.preferred_mode());
            ExitCode::SUCCESS
        }
        Cmd::Run(args) => run(*args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let script = match (&args.script, &args.command) {
        (Some(path), _) => match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("harness: cannot read scenario {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        (None, Some(cmd)) => cmd.clone(),
        (None, None) => {
            eprintln!("harness: give a scenario with --script FILE or -c COMMAND");
            return ExitCode::from(2);
        }
    };
    let name = args.name.clone().unwrap_or_else(|| {
        args.script
            .as_ref()
            .and_then(|p| p.file_stem())
            .and_then(|s| s.to_str())
            .unwrap_or("command")
            .to_string()
    });
    let mut sc = Scenario::new(&name, &script);
    sc.bins = args.bins;
    sc.assets = args.assets;
    sc.modules = args.modules;
    sc.l1_kernel_args = args.l1_kernel_args;
    sc.timeout = Duration::from_secs(args.timeout);
    sc.l1_memory_mib = args.memory;
    sc.l1_cpus = args.cpus;
    sc.workdir = args.workdir;
    sc.echo = !args.quiet;
    sc.mode = match args.mode {
        Mode::Auto => ModeChoice::Auto,
        Mode::Nested => ModeChoice::Nested,
        Mode::Direct => ModeChoice::Direct,
    };
    match harness::run(&sc) {
        Ok(outcome) => {
            eprint!("{}", outcome.report());
            ExitCode::from(u8::try_from(outcome.exit_code()).unwrap_or(125))
        }
        Err(e) => {
            eprintln!("harness: cannot run scenario '{name}': {e}");
            ExitCode::from(125)
        }
    }
}
