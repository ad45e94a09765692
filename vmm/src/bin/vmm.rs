//! `vmm`: runs one microVM. See `vmm --help`.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::Cli;
use vmm::lifecycle::{EXIT_BAD_CONFIG, EXIT_GUEST_OR_VMM_ERROR, ExitSignal};
use vmm::machine::{BootSource, Machine};

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    vmm::logger::init();
    let cli = Cli::parse();
    let print_config = cli.print_config;
    let config = match cli.into_config().and_then(|c| c.validate().map(|()| c)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vmm: invalid configuration: {e}");
            return exit_code(EXIT_BAD_CONFIG);
        }
    };
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

    let result = ExitSignal::new()
        .map_err(vmm::machine::MachineError::from)
        .and_then(|exit| {
            exit.install_signal_handlers()?;
            Machine::build(&config, &BootSource::Kernel, exit)?.run()
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
