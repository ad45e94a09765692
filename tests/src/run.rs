//! The harness's entry point: picks the execution mode, serialises runs on
//! this machine (two L1s at once would starve each other of the 2 cores and
//! turn timeouts into noise), prepares the work directory and dispatches.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::host::{ExecMode, HostKvm};
use crate::initramfs::InitramfsError;
use crate::l1::L1Error;
use crate::ldd::LddError;
use crate::scenario::{ModeChoice, Outcome, Scenario, Status};
use crate::{direct, nested};

/// Errors that prevent a scenario from running at all (as opposed to a
/// scenario that ran and failed, which is an `Outcome`).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Finding the L1 kernel or its modules failed.
    #[error(transparent)]
    L1(#[from] L1Error),
    /// Building the initramfs failed.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    /// Resolving a binary's libraries failed.
    #[error(transparent)]
    Ldd(#[from] LddError),
    /// Something the run needs is missing.
    #[error("missing: {0}")]
    Missing(String),
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What was being started.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A child's pipe was not set up.
    #[error("internal error: child process pipe missing")]
    NoPipe,
    /// Another I/O error, with what was being done.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Direct mode was requested on a host without hardware KVM.
    #[error("direct mode needs hardware KVM, but this host has {0}")]
    NoHardwareKvm(HostKvm),
}

/// The directory for the machine-wide run lock and default work directories.
fn state_dir() -> PathBuf {
    std::env::var_os("KINDLING_HARNESS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("kindling-harness"))
}

/// Runs one scenario to completion.
pub fn run(sc: &Scenario) -> Result<Outcome, HarnessError> {
    let host = HostKvm::detect();
    let mode = match sc.mode {
        ModeChoice::Auto => host.preferred_mode(),
        ModeChoice::Nested => ExecMode::Nested,
        ModeChoice::Direct => {
            if host != HostKvm::Hardware {
                return Err(HarnessError::NoHardwareKvm(host));
            }
            ExecMode::Direct
        }
    };
    let base = state_dir();
    std::fs::create_dir_all(&base)
        .map_err(|e| HarnessError::Io(format!("creating {}", base.display()), e))?;
    let lock_path = base.join("run.lock");
    let lock = File::create(&lock_path)
        .map_err(|e| HarnessError::Io(format!("opening {}", lock_path.display()), e))?;
    lock.lock()
        .map_err(|e| HarnessError::Io("taking the run lock".into(), e))?;

    let nonce = nonce();
    let workdir = match &sc.workdir {
        Some(d) => d.clone(),
        None => base.join(format!("{}-{}", sanitize(&sc.name), nonce)),
    };
    std::fs::create_dir_all(&workdir)
        .map_err(|e| HarnessError::Io(format!("creating {}", workdir.display()), e))?;
    if sc.echo {
        eprintln!(
            "harness: {} on {host}; running scenario '{}' {mode}",
            if mode == ExecMode::Nested {
                "nesting"
            } else {
                "no nesting needed"
            },
            sc.name
        );
    }
    let started = Instant::now();
    let (status, output, mut timings) = match mode {
        ExecMode::Nested => {
            let mut r = nested::run(sc, &workdir, &nonce)?;
            // QEMU's TCG emulation of nested SVM very rarely resets the L1
            // on its own (no panic, no exit code, QEMU exits 0). That is the
            // emulator, not the scenario: run it once more in a fresh L1,
            // saying so. A second such end is reported as the failure.
            if is_spontaneous_reset(&r.status) {
                let first = workdir.join("console-attempt1.log");
                let _ = std::fs::rename(workdir.join("console.log"), &first);
                eprintln!(
                    "harness: WARNING: the L1 reset by itself during '{}' (console kept in {}); \
                     retrying once in a fresh L1",
                    sc.name,
                    first.display()
                );
                r = nested::run(sc, &workdir, &nonce)?;
            }
            (r.status, r.output, r.timings)
        }
        ExecMode::Direct => direct::run(sc, &workdir, &nonce)?,
    };
    timings.total = started.elapsed();
    let console_tail = tail_lines(
        &std::fs::read_to_string(workdir.join("console.log")).unwrap_or_default(),
        40,
    );
    drop(lock);
    Ok(Outcome {
        host,
        mode,
        status,
        output,
        console_tail,
        timings,
        workdir,
    })
}

/// An L1 that ended without a panic, without an exit code and without a
/// QEMU error: the guest reset itself.
fn is_spontaneous_reset(status: &Status) -> bool {
    matches!(status, Status::Died(why) if why == nested::SPONTANEOUS_END)
}

fn nonce() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    format!("{:x}{:05x}", std::process::id(), t.subsec_nanos() & 0xfffff)
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clean_end_without_exit_code_counts_as_a_spontaneous_reset() {
        assert!(is_spontaneous_reset(&Status::Died(
            nested::SPONTANEOUS_END.into()
        )));
        assert!(!is_spontaneous_reset(&Status::Died(
            "QEMU exited with 1".into()
        )));
        assert!(!is_spontaneous_reset(&Status::L1Panic));
        assert!(!is_spontaneous_reset(&Status::Exited(1)));
        assert!(!is_spontaneous_reset(&Status::TimedOut));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(sanitize("a b/c"), "a_b_c");
    }
}
