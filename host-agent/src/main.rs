//! `host-agent`: the per-host daemon (`serve`) and the single-shot runner
//! (`run job.yaml`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use host_agent::agent::Agent;
use host_agent::config::{Config, PoolNetwork, RateLimitConfig};
use host_agent::single_shot::{RunOptions, run};

/// Kindling host agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: keep the configured pools warm and run jobs from the orchestrator.
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run one job in one fresh microVM with an embedded orchestrator, print its
    /// logs and a timing summary, and exit with its result (0 ok, 1 failed, 2 other,
    /// 3 something was left on the host).
    Run {
        /// Job spec (YAML, or JSON with a .json extension).
        job: PathBuf,
        /// A secret for the job: NAME=VALUE, or NAME to read it from the environment.
        #[arg(long = "secret")]
        secrets: Vec<String>,
        /// The vmm binary.
        #[arg(long)]
        vmm: PathBuf,
        /// Guest kernel.
        #[arg(long)]
        kernel: PathBuf,
        /// Guest root image.
        #[arg(long)]
        image: PathBuf,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u32,
        /// State directory (default: a temporary one, removed at the end).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Seconds to wait for the guest's Hello.
        #[arg(long, default_value_t = 60)]
        boot_timeout: u64,
        /// Start the VMM directly instead of through `kindling-jailer`
        /// (debugging only: no uid, namespace, cgroup or chroot confinement).
        #[arg(long)]
        no_jail: bool,
        /// The VM's network: none, nat or deny-all (a job with
        /// `network: false` gets none whatever this says).
        #[arg(long, default_value = "none", value_parser = parse_network)]
        network: PoolNetwork,
        /// Resolver the guest's DNS is DNAT'd to (default: the host's).
        #[arg(long)]
        dns: Option<std::net::Ipv4Addr>,
        /// Limit of the bytes per second to the guest.
        #[arg(long)]
        rx_bytes_per_sec: Option<u64>,
        /// Limit of the bytes per second from the guest.
        #[arg(long)]
        tx_bytes_per_sec: Option<u64>,
    },
    /// Remove what a crashed agent left (VMMs, VM directories, taps, the
    /// nftables table) - the clean-up `serve` runs at start - and exit.
    Cleanup {
        /// TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn parse_network(s: &str) -> Result<PoolNetwork, String> {
    match s {
        "none" => Ok(PoolNetwork::None),
        "nat" => Ok(PoolNetwork::Nat),
        "deny-all" => Ok(PoolNetwork::DenyAll),
        _ => Err(format!("{s:?}: expected none, nat or deny-all")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("host-agent: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Cmd::Serve { config } => serve(config).await,
            Cmd::Cleanup { config } => cleanup(config).await,
            Cmd::Run {
                job,
                secrets,
                vmm,
                kernel,
                image,
                vcpus,
                memory_mib,
                state_dir,
                boot_timeout,
                no_jail,
                network,
                dns,
                rx_bytes_per_sec,
                tx_bytes_per_sec,
            } => {
                let secrets = match parse_secrets(&secrets) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("host-agent: {e}");
                        return 2;
                    }
                };
                let opts = RunOptions {
                    job,
                    secrets,
                    vmm,
                    kernel,
                    image,
                    vcpus,
                    memory_mib,
                    state_dir,
                    boot_timeout_secs: boot_timeout,
                    jail: !no_jail,
                    network,
                    dns,
                    rate_limit: RateLimitConfig {
                        rx_bytes_per_sec,
                        tx_bytes_per_sec,
                        ..RateLimitConfig::default()
                    },
                };
                match run(opts).await {
                    Ok(code) => code,
                    Err(e) => {
                        eprintln!("host-agent: {e}");
                        2
                    }
                }
            }
        }
    });
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}

async fn serve(path: PathBuf) -> i32 {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("host-agent: {e}");
            return 2;
        }
    };
    let grace = std::time::Duration::from_secs(config.shutdown_grace_secs);
    let agent = match Agent::start(config, false).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("host-agent: {e}");
            return 2;
        }
    };
    tracing::info!("host agent running");
    orchestrator::server::termination_signal().await;
    tracing::info!("stopping: no new jobs, {grace:?} for running ones");
    agent.shutdown(grace).await;
    0
}

async fn cleanup(path: PathBuf) -> i32 {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("host-agent: {e}");
            return 2;
        }
    };
    match host_agent::agent::clean_up(&config).await {
        Ok(summary) => {
            println!("{summary}");
            0
        }
        Err(e) => {
            eprintln!("host-agent: {e}");
            2
        }
    }
}

fn parse_secrets(specs: &[String]) -> Result<Vec<(String, String)>, String> {
    specs
        .iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => std::env::var(s)
                .map(|v| (s.clone(), v))
                .map_err(|_| format!("--secret {s}: no value given and ${s} is not set")),
        })
        .collect()
}
