//! The agent's settings: from command-line flags (and environment) when it
//! runs as a normal process, from `kindling.*` kernel parameters when it is
//! PID 1 (see [`crate::cmdline`] for why).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use protocol::session::HEARTBEAT_INTERVAL;
use tracing::Level;

use crate::channel::Endpoint;
use crate::cmdline::KernelParams;
use crate::runner::RunnerSettings;
use crate::runner::step::Shell;

/// Default budget for reaching the host.
const DEFAULT_CONNECT_SECS: u64 = 30;
/// Default time to wait for the host's `HelloAck`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time between SIGTERM and SIGKILL.
const DEFAULT_KILL_GRACE_MS: u64 = 5_000;
/// Default wait for the host to close after `JobFinished`.
const DEFAULT_LINGER_MS: u64 = 5_000;
/// Default limit on one send making no progress before the channel is
/// declared broken (a host that stopped reading altogether).
const DEFAULT_SEND_STALL_SECS: u64 = 120;

/// Command line of the agent when it is not PID 1 (tests, debugging).
#[derive(Debug, Parser)]
#[command(
    name = "runner-agent",
    version,
    about = "Kindling runner agent: runs one CI job for the host agent.",
    long_about = "Kindling runner agent: runs one CI job for the host agent.\n\n\
        As PID 1 of a guest it takes no flags: it prepares the guest and reads \
        kindling.* kernel parameters. Run as a normal process (tests), it skips \
        the guest setup and takes the flags below."
)]
pub struct Args {
    /// Host endpoint: vsock:CID:PORT, unix:PATH or serial:PATH [default: vsock:2:10000].
    #[arg(long, env = "KINDLING_AGENT_CONNECT")]
    pub connect: Option<Endpoint>,
    /// Default working directory of the steps (created if missing).
    #[arg(long, env = "KINDLING_AGENT_WORKSPACE", default_value = "/workspace")]
    pub workspace: PathBuf,
    /// Shell running step scripts [default: bash if present, else /bin/sh].
    #[arg(long)]
    pub shell: Option<PathBuf>,
    /// Milliseconds between SIGTERM and SIGKILL when a step is stopped.
    #[arg(long, default_value_t = DEFAULT_KILL_GRACE_MS)]
    pub kill_grace_ms: u64,
    /// Seconds to keep trying to reach the host.
    #[arg(long, default_value_t = DEFAULT_CONNECT_SECS)]
    pub connect_timeout_secs: u64,
    /// Milliseconds to wait for the host to close after JobFinished.
    #[arg(long, default_value_t = DEFAULT_LINGER_MS)]
    pub linger_ms: u64,
    /// Milliseconds between heartbeats [default: the protocol's interval].
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Seconds one send may make no progress before the channel is broken.
    #[arg(long, default_value_t = DEFAULT_SEND_STALL_SECS)]
    pub send_stall_secs: u64,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "KINDLING_AGENT_LOG", default_value = "info")]
    pub log: Level,
}

/// Everything the agent needs to know, however it was configured.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the host is.
    pub endpoint: Endpoint,
    /// Whether the agent is PID 1 and does the guest setup.
    pub init: bool,
    /// How long to keep trying to reach the host.
    pub connect_budget: Duration,
    /// How long to wait for the host's answer to `Hello`.
    pub handshake_timeout: Duration,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// How long to wait for the host to close after `JobFinished`.
    pub linger: Duration,
    /// How long one send may make no progress.
    pub send_stall_timeout: Duration,
    /// Log level.
    pub log_level: Level,
    /// How steps run.
    pub runner: RunnerSettings,
}

impl AgentConfig {
    /// Settings of a PID-1 agent, from the kernel parameters; returns the
    /// problems with parameters it had to ignore.
    pub fn for_pid1(params: &KernelParams) -> (Self, Vec<String>) {
        let mut problems = Vec::new();
        let endpoint = match params.connect.as_deref().map(str::parse::<Endpoint>) {
            None => Endpoint::default(),
            Some(Ok(endpoint)) => endpoint,
            Some(Err(err)) => {
                problems.push(format!("kindling.connect ignored: {err}"));
                Endpoint::default()
            }
        };
        let log_level = match params.log_level.as_deref().map(str::parse::<Level>) {
            None => Level::INFO,
            Some(Ok(level)) => level,
            Some(Err(err)) => {
                problems.push(format!("kindling.log ignored: {err}"));
                Level::INFO
            }
        };
        let config = Self {
            endpoint,
            init: true,
            connect_budget: Duration::from_secs(DEFAULT_CONNECT_SECS),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            heartbeat_interval: HEARTBEAT_INTERVAL,
            linger: Duration::from_millis(DEFAULT_LINGER_MS),
            send_stall_timeout: Duration::from_secs(DEFAULT_SEND_STALL_SECS),
            log_level,
            runner: RunnerSettings::default(),
        };
        (config, problems)
    }

    /// Settings of an agent run as a normal process.
    pub fn from_args(args: Args) -> Self {
        let runner = RunnerSettings {
            workspace: args.workspace,
            shell: args.shell.as_deref().map_or_else(Shell::detect, Shell::at),
            kill_grace: Duration::from_millis(args.kill_grace_ms),
            ..RunnerSettings::default()
        };
        Self {
            endpoint: args.connect.unwrap_or_default(),
            init: false,
            connect_budget: Duration::from_secs(args.connect_timeout_secs),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            heartbeat_interval: args
                .heartbeat_ms
                .map_or(HEARTBEAT_INTERVAL, Duration::from_millis),
            linger: Duration::from_millis(args.linger_ms),
            send_stall_timeout: Duration::from_secs(args.send_stall_secs),
            log_level: args.log,
            runner,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid1_defaults_and_overrides() {
        let (config, problems) = AgentConfig::for_pid1(&KernelParams::default());
        assert!(problems.is_empty());
        assert_eq!(config.endpoint, Endpoint::default());
        assert!(config.init);
        assert_eq!(config.log_level, Level::INFO);
        assert_eq!(config.runner.workspace, PathBuf::from("/workspace"));

        let params = KernelParams {
            connect: Some("unix:/tmp/h.sock".into()),
            log_level: Some("debug".into()),
            ..KernelParams::default()
        };
        let (config, problems) = AgentConfig::for_pid1(&params);
        assert!(problems.is_empty());
        assert_eq!(config.endpoint, Endpoint::Unix("/tmp/h.sock".into()));
        assert_eq!(config.log_level, Level::DEBUG);
    }

    #[test]
    fn pid1_ignores_bad_values_with_a_problem_each() {
        let params = KernelParams {
            connect: Some("tcp:1.2.3.4".into()),
            log_level: Some("loud".into()),
            ..KernelParams::default()
        };
        let (config, problems) = AgentConfig::for_pid1(&params);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(config.endpoint, Endpoint::default());
    }

    #[test]
    fn flags_map_to_settings() {
        let args = Args::try_parse_from([
            "runner-agent",
            "--connect",
            "unix:/tmp/x.sock",
            "--workspace",
            "/tmp/ws",
            "--shell",
            "/bin/sh",
            "--kill-grace-ms",
            "300",
            "--heartbeat-ms",
            "100",
            "--log",
            "warn",
        ])
        .unwrap();
        let config = AgentConfig::from_args(args);
        assert_eq!(config.endpoint, Endpoint::Unix("/tmp/x.sock".into()));
        assert!(!config.init);
        assert_eq!(config.runner.shell, Shell::at("/bin/sh".as_ref()));
        assert_eq!(config.runner.kill_grace, Duration::from_millis(300));
        assert_eq!(config.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(config.log_level, Level::WARN);
        assert!(Args::try_parse_from(["runner-agent", "--connect", "nope"]).is_err());
    }
}
