//! `runner-agent`: PID 1 of a Kindling guest, or (not PID 1) a test agent
//! configured by flags. See the library docs.

use std::fs;
use std::process::ExitCode;
use std::thread;

use clap::Parser;
use runner_agent::cmdline::KernelParams;
use runner_agent::init::{self, SetupReport};
use runner_agent::{AgentConfig, AgentExit, Args};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::Level;

fn main() -> ExitCode {
    if nix::unistd::getpid().as_raw() == 1 {
        run_as_init()
    } else {
        run_as_process()
    }
}

/// PID 1: set the guest up, run the job, power off. Never returns normally.
fn run_as_init() -> ExitCode {
    // A bug must still end the VM, not leave it hanging.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("runner-agent: panic: {info}");
        let err = init::power::power_off();
        eprintln!("runner-agent: reboot failed: {err}");
    }));
    let mut report = SetupReport::default();
    init::mount_early(&mut report);
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (params, cmdline_problems) = KernelParams::parse(&cmdline);
    let (config, config_problems) = AgentConfig::for_pid1(&params);
    init_logging(config.log_level);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "runner agent starting as PID 1"
    );
    for problem in report.fatal.iter().chain(&report.warnings) {
        tracing::error!(%problem, "early setup");
    }
    for problem in cmdline_problems
        .iter()
        .map(ToString::to_string)
        .chain(config_problems)
    {
        tracing::warn!(%problem, "kernel parameter");
    }
    init::prepare(&params, &mut report);
    let exit = runner_agent::run(&config, &report);
    log_exit(&exit);
    let err = init::power::power_off();
    tracing::error!(error = %err, "reboot failed; exiting (the kernel panics and reboots)");
    ExitCode::FAILURE
}

/// Not PID 1: flags, no guest setup.
fn run_as_process() -> ExitCode {
    let config = AgentConfig::from_args(Args::parse());
    init_logging(config.log_level);
    stop_job_on_termination_signals();
    tracing::info!(endpoint = %config.endpoint, "runner agent starting (not PID 1: no guest setup)");
    let exit = runner_agent::run(&config, &SetupReport::default());
    runner_agent::process::kill_descendants();
    log_exit(&exit);
    ExitCode::from(u8::try_from(exit.exit_code()).unwrap_or(1))
}

/// SIGTERM, SIGINT or SIGHUP (a host agent tearing its stand-in VM down,
/// Ctrl-C) kill the job's processes before the agent exits, as the end of
/// a VM would. (As PID 1 there is nothing to do: the kernel never delivers
/// a signal to init that init has no handler for.)
fn stop_job_on_termination_signals() {
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(err) => {
            tracing::warn!(error = %err, "cannot catch termination signals");
            return;
        }
    };
    let spawned = thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::warn!(signal, "terminated; killing the job's processes");
                let killed = runner_agent::process::kill_descendants();
                tracing::warn!(killed, "exiting");
                std::process::exit(128 + signal);
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start the signal thread");
    }
}

fn init_logging(level: Level) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .init();
}

fn log_exit(exit: &AgentExit) {
    let peak_rss_kib = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .map(|value| value.trim().to_owned())
        })
        .unwrap_or_default();
    match exit {
        AgentExit::JobFinished(_) | AgentExit::Shutdown => {
            tracing::info!(?exit, %peak_rss_kib, "agent done");
        }
        AgentExit::HostLost(_) | AgentExit::Internal(_) => {
            tracing::error!(?exit, %peak_rss_kib, "agent done");
        }
    }
}
