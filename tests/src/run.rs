//! The harness's entry point: picks the execution mode, serialises runs on
//! this machine (two L1s at once would starve each other of the 2 cores and
//! turn timeouts into noise), prepares the work directory and dispatches.

use std::fs::File;
use std::path::{Path, PathBuf};
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
            // Some ends are faults of the emulator, not of the scenario (see
            // `emulator_fault`): the L1 resets, panics or freezes by itself,
            // or the L2 guest triple-faults. Each time the scenario runs
            // again in a fresh L1, saying so, up to `L1_FAULT_RERUNS` times
            // for the L1's faults and `sc.l2_triple_fault_reruns` for the
            // L2's (a reset and then a freeze hit one CI run back to back; a
            // triple fault and then an L1 panic another); one more such end
            // is the failure.
            let (mut l1_reruns, mut l2_reruns) = (0, 0);
            for attempt in 1.. {
                let why = match emulator_fault(&r.status, &workdir.join("console.log")) {
                    Some(why) if l1_reruns < L1_FAULT_RERUNS => {
                        l1_reruns += 1;
                        format!("{why}; rerun {l1_reruns} of {L1_FAULT_RERUNS} for L1 faults")
                    }
                    None if l2_reruns < sc.l2_triple_fault_reruns
                        && is_l2_triple_fault(&r.status, &r.output) =>
                    {
                        l2_reruns += 1;
                        format!(
                            "the L2 guest triple-faulted (QEMU TCG's emulated SVM, most often \
                             under heavy L2 I/O); rerun {l2_reruns} of {} for L2 triple faults",
                            sc.l2_triple_fault_reruns
                        )
                    }
                    _ => break,
                };
                let kept = keep_attempt_logs(&workdir, attempt);
                eprintln!(
                    "harness: WARNING: '{}': {why}, in a fresh L1 (logs kept as {}); \
                     the ended attempt's report:\n{}",
                    sc.name,
                    kept.display(),
                    attempt_report(&r, &kept)
                );
                r = nested::run(sc, &workdir, &nonce)?;
            }
            (r.status, r.output, r.timings)
        }
        ExecMode::Direct => direct::run(sc, &workdir, &nonce)?,
    };
    timings.total = started.elapsed();
    let console_tail =
        console_excerpt(&std::fs::read_to_string(workdir.join("console.log")).unwrap_or_default());
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

/// How many times a scenario whose L1 failed by itself (see
/// `emulator_fault` in this module) runs again in a fresh L1.
pub const L1_FAULT_RERUNS: u32 = 2;

/// Renames a finished attempt's logs (`console.log` to
/// `console-attempt<N>.log`, likewise the output, heartbeat and frozen-vCPU
/// logs) so the next attempt starts clean; returns the kept console's path.
fn keep_attempt_logs(workdir: &Path, attempt: u32) -> PathBuf {
    let kept = |stem: &str| workdir.join(format!("{stem}-attempt{attempt}.log"));
    for stem in ["console", "output", "heartbeat", "l1-frozen-vcpus"] {
        let _ = std::fs::rename(workdir.join(format!("{stem}.log")), kept(stem));
    }
    kept("console")
}

/// Why an L1's end is a fault of the L1 itself (QEMU's emulation or the
/// L1's own kernel) rather than the scenario's, if it is: an L1 that ended
/// without a panic, an exit code or a QEMU error (it reset itself), an L1
/// that froze whole (no process in it ran for a minute, timers included),
/// or an L1 kernel panic that the scenario did not cause.
///
/// Nothing of ours runs in the L1 kernel: our binaries are processes there,
/// and a process cannot panic a kernel except on purpose (sysrq) or by
/// exhausting its memory. Every other panic is the emulator's or the L1
/// kernel's. Those seen so far: an interrupt delivered inside KVM's SVM
/// world switch (see [`is_world_switch_panic`]), its recursive-page-fault
/// shape in a vCPU thread, and a soft lockup (`softlockup_panic=1`); CI
/// also hit one whose console the report cut off (session 5).
fn emulator_fault(status: &Status, console: &Path) -> Option<&'static str> {
    match status {
        Status::Died(why) if why == nested::SPONTANEOUS_END => Some("the L1 reset by itself"),
        Status::L1Frozen(_) => {
            Some("the L1 froze (its heartbeat stopped; vCPU registers in l1-frozen-vcpus.log)")
        }
        Status::L1Panic => {
            let text = std::fs::read_to_string(console).unwrap_or_default();
            if SCENARIO_MADE_PANICS.iter().any(|p| text.contains(p)) {
                None
            } else if is_world_switch_panic(&text) {
                Some("the L1 kernel panicked on an interrupt inside KVM's world switch")
            } else if text.contains("watchdog: BUG: soft lockup") {
                Some("the L1 kernel locked up (soft lockup)")
            } else {
                Some("the L1 kernel panicked (not on purpose, not out of memory)")
            }
        }
        _ => None,
    }
}

/// An L1 kernel panic on an interrupt or exception taken inside KVM's SVM
/// world switch, in one of its two shapes: an interrupt delivered inside
/// `svm_vcpu_enter_exit`, where the global interrupt flag is clear and no
/// interrupt may arrive on real hardware; or, in a VMM's vCPU thread, a
/// page fault whose handler faults again on its very first per-CPU (GS)
/// access until it runs off its stack (the GS base was still the L2's:
/// the same window), which dies before printing a call trace.
fn is_world_switch_panic(console: &str) -> bool {
    let interrupt_in_switch =
        console.contains("svm_vcpu_enter_exit") && console.contains("asm_sysvec_");
    let recursive_gs_fault = console.contains("stack guard page was hit")
        && console.contains("RIP: 0010:exc_page_fault+")
        && console.contains("Comm: vcpu");
    console.contains("Kernel panic") && (interrupt_in_switch || recursive_gs_fault)
}

/// What a panic the scenario caused itself says: a crash asked for through
/// sysrq, or memory exhausted (the OOM killer found nothing to kill, or
/// `panic_on_oom`). These are the scenario's results, never rerun; so is
/// any panic after an OOM kill in the same L1 (the console says "Out of
/// memory" then too), which errs on the side of failing.
const SCENARIO_MADE_PANICS: &[&str] = &[
    "sysrq triggered crash",
    "Out of memory",
    "System is deadlocked on memory",
];

/// What our VMM prints when a vCPU stops on a triple fault (see
/// `vmm::lifecycle`).
pub const L2_TRIPLE_FAULT: &str = "triple fault (KVM_EXIT_SHUTDOWN)";

/// Whether a run failed with the L2 guest's triple fault in its output.
/// Under a long vsock flood, `dockerd`'s start, or two VMs starting at
/// once, QEMU TCG's emulated SVM sometimes triple-faults the L2 with no
/// message before it; the Firecracker peer in the same L1 under the same
/// flood does the same (1 of 3 runs). How often such a run is repeated is
/// the scenario's [`Scenario::l2_triple_fault_reruns`].
fn is_l2_triple_fault(status: &Status, output: &str) -> bool {
    *status != Status::Exited(0) && output.contains(L2_TRIPLE_FAULT)
}

/// What a rerun's warning shows of the attempt that ended: its status, the
/// last lines of its output and of its L1 console (from the first line of
/// a kernel panic, if there is one), so that a CI log keeps every fault's
/// shape even when the rerun passes.
fn attempt_report(r: &nested::NestedRun, console: &Path) -> String {
    let lines: Vec<&str> = r.output.lines().collect();
    let output = lines[lines.len().saturating_sub(ATTEMPT_OUTPUT_LINES)..].join("\n");
    let console = console_excerpt(&std::fs::read_to_string(console).unwrap_or_default());
    format!(
        "status: {}\n--- output (last lines) ---\n{output}\n--- L1 console (last lines) ---\n{console}",
        crate::scenario::describe(&r.status)
    )
}

/// Lines of a rerun attempt's output shown in its warning.
const ATTEMPT_OUTPUT_LINES: usize = 30;

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

/// Lines of console kept in a report when nothing went wrong in the kernel.
const CONSOLE_TAIL_LINES: usize = 40;
/// How far back from the end a kernel panic's first line is looked for:
/// a panic's register dump and call trace is 40-80 lines, depending on how
/// many stale frames the unwinder prints.
const PANIC_LOOKBACK_LINES: usize = 200;

/// The part of the L1 console a report carries: the last
/// [`CONSOLE_TAIL_LINES`] lines, extended back to the first line of a
/// kernel panic near the end so that the reason ("Kernel panic - not
/// syncing: ...") is never cut off by a long call trace.
fn console_excerpt(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let window = lines.len().saturating_sub(PANIC_LOOKBACK_LINES);
    let tail = lines.len().saturating_sub(CONSOLE_TAIL_LINES);
    let start = lines[window..]
        .iter()
        .position(|l| l.contains("Kernel panic"))
        .map_or(tail, |i| (window + i).min(tail));
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_excerpt_keeps_the_panic_line_above_a_long_call_trace() {
        let mut console: Vec<String> = (0..500).map(|i| format!("boot line {i}")).collect();
        console.push("Kernel panic - not syncing: sysrq triggered crash".into());
        console.extend((0..70).map(|i| format!("  trace frame {i}")));
        let excerpt = console_excerpt(&console.join("\n"));
        assert!(
            excerpt.starts_with("Kernel panic - not syncing"),
            "{excerpt}"
        );
        assert!(excerpt.ends_with("trace frame 69"));
    }

    #[test]
    fn a_console_excerpt_without_a_panic_is_the_last_lines() {
        let console: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
        let excerpt = console_excerpt(&console.join("\n"));
        assert_eq!(excerpt.lines().count(), CONSOLE_TAIL_LINES);
        assert!(excerpt.starts_with("line 60"));
        assert_eq!(console_excerpt(""), "");
    }

    #[test]
    fn a_reset_a_freeze_or_a_panic_the_scenario_did_not_cause_is_an_l1_fault() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let status = Status::Died(nested::SPONTANEOUS_END.into());
        assert!(emulator_fault(&status, &console).is_some());
        assert!(emulator_fault(&Status::L1Frozen(60), &console).is_some());
        for status in [
            Status::Died("QEMU exited with 1".into()),
            Status::Exited(1),
            Status::TimedOut,
        ] {
            assert!(emulator_fault(&status, &console).is_none());
        }
        // A scenario's own panic (sysrq) is the scenario's.
        std::fs::write(
            &console,
            "Kernel panic - not syncing: sysrq triggered crash\n sysrq_handle_crash+0x16/0x20\n",
        )
        .unwrap();
        assert!(emulator_fault(&Status::L1Panic, &console).is_none());
        // The emulator's: a timer interrupt inside the SVM world switch.
        std::fs::write(
            &console,
            "BUG: TASK stack guard page was hit\n asm_sysvec_apic_timer_interrupt+0x16/0x20\n \
             svm_vcpu_enter_exit+0x28/0x60 [kvm_amd]\n\
             Kernel panic - not syncing: Fatal exception in interrupt\n",
        )
        .unwrap();
        assert!(emulator_fault(&Status::L1Panic, &console).is_some());
        // Its other shape: a page fault in a vCPU thread recursing on the
        // L2's GS base until the stack guard page (CI, session 4).
        let recursive = "BUG: TASK stack guard page was hit at 000000007df6fc71\n\
             CPU: 0 PID: 143 Comm: vcpu0 Not tainted 6.1.0-56-cloud-amd64 #1\n\
             RIP: 0010:exc_page_fault+0x15/0x170\n\
             Kernel panic - not syncing: corrupted stack end detected inside scheduler\n";
        std::fs::write(&console, recursive).unwrap();
        assert!(emulator_fault(&Status::L1Panic, &console).is_some());
        // Any other panic of the L1 kernel is not ours either...
        std::fs::write(
            &console,
            "BUG: unable to handle page fault for address: ffffc90000a3c000\n\
             Kernel panic - not syncing: Fatal exception\n",
        )
        .unwrap();
        assert!(emulator_fault(&Status::L1Panic, &console).is_some());
        // ...unless memory ran out: that may be a leak of ours.
        std::fs::write(
            &console,
            "Kernel panic - not syncing: System is deadlocked on memory\n",
        )
        .unwrap();
        assert!(emulator_fault(&Status::L1Panic, &console).is_none());
        std::fs::write(
            &console,
            "Kernel panic - not syncing: Out of memory: compulsory panic_on_oom is enabled\n",
        )
        .unwrap();
        assert!(emulator_fault(&Status::L1Panic, &console).is_none());
        // The L1 kernel's own soft lockup (softlockup_panic=1).
        std::fs::write(
            &console,
            "watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [tokio-rt-worker:181]\n\
             Kernel panic - not syncing: softlockup: hung tasks\n",
        )
        .unwrap();
        assert!(emulator_fault(&Status::L1Panic, &console).is_some());
    }

    #[test]
    fn only_a_failed_run_with_the_vmms_triple_fault_line_is_an_l2_triple_fault() {
        let line = format!("vmm: VM stopped: vCPU 0: {L2_TRIPLE_FAULT}\n");
        assert!(is_l2_triple_fault(&Status::Exited(1), &line));
        assert!(is_l2_triple_fault(&Status::TimedOut, &line));
        assert!(!is_l2_triple_fault(&Status::Exited(0), &line));
        assert!(!is_l2_triple_fault(
            &Status::Exited(1),
            "vmm: VM stopped: vCPU 0: internal error\n"
        ));
    }

    #[test]
    fn a_short_console_is_kept_whole_and_names_are_sanitized() {
        assert_eq!(console_excerpt("a\nb\nc\n"), "a\nb\nc");
        assert_eq!(sanitize("a b/c"), "a_b_c");
    }
}
