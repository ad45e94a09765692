//! The `vmm` command: parse flags, validate, build and run the machine with
//! the seccomp filters of [`crate::seccomp`]. Shared by the `vmm` binary and
//! the test-only `vmm-test-hooks` binary.

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::lifecycle::{EXIT_BAD_CONFIG, EXIT_GUEST_OR_VMM_ERROR, ExitSignal};
use crate::machine::{BootSource, Machine, MachineError};
use crate::seccomp::Filters;

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Runs the `vmm` command line; returns the process exit code.
pub fn main() -> ExitCode {
    crate::logger::init();
    // Any panic, on any thread, ends the VMM at once with its reason as the
    // last log line (see `panic_hook` for why a hook and not abort()).
    crate::panic_hook::install();
    let cli = Cli::parse();
    let print_config = cli.print_config;
    let config = match cli.into_config().and_then(|c| c.validate().map(|()| c)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vmm: invalid configuration: {e}");
            return exit_code(EXIT_BAD_CONFIG);
        }
    };
    crate::logger::set_max_bytes(config.log_max_bytes);
    if print_config {
        match serde_json::to_string_pretty(&config) {
            Ok(json) => {
                println!("{json}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("vmm: cannot print configuration: {e}");
                return exit_code(EXIT_GUEST_OR_VMM_ERROR);
            }
        }
    }

    // Compiled before anything else starts, installed per thread (see
    // `seccomp`): no guest instruction runs without its thread's filter.
    let result = Filters::compile()
        .map_err(MachineError::from)
        .and_then(|filters| {
            let exit = ExitSignal::new()?;
            exit.install_signal_handlers()?;
            Machine::build(&config, &BootSource::Kernel, exit)?.run_with_seccomp(Some(&filters))
        });
    match result {
        Ok(reason) => {
            let code = reason.exit_code();
            if code == 0 {
                log::info!("VM stopped: {reason}");
            } else {
                eprintln!("vmm: VM stopped: {reason}");
            }
            exit_code(code)
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            exit_code(EXIT_GUEST_OR_VMM_ERROR)
        }
    }
}
