//! `kindling-jailer`: starts one VMM jailed (see the `kindling_jailer`
//! library). Run by the host agent as root; not meant to be run by hand.

use std::process::ExitCode;

use clap::Parser;
use kindling_jailer::{JailerArgs, run};

fn main() -> ExitCode {
    let args = JailerArgs::parse();
    match run(&args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
