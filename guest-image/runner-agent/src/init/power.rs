//! Ending the VM: stop every process, flush, reboot.
//!
//! The VMM treats a guest reboot as a clean exit, and the kernel is booted
//! with `reboot=k` (reset through the i8042 controller), so
//! `reboot(RB_AUTOBOOT)` is how the VM ends, whatever happened before.

use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, sync};

/// Time the remaining processes get between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_millis(200);

/// Stops every other process, syncs, and reboots. Only returns if the
/// reboot call itself failed (the caller, PID 1, then exits, and the kernel
/// panics and reboots after `panic=` seconds).
pub fn power_off() -> nix::Error {
    tracing::info!("powering off");
    // kill(-1) reaches every process but PID 1 (us) and kernel threads.
    if kill(Pid::from_raw(-1), Signal::SIGTERM).is_ok() && !all_children_gone(TERM_GRACE) {
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    }
    sync();
    match reboot(RebootMode::RB_AUTOBOOT) {
        Err(errno) => errno,
    }
}

/// Reaps children until none is left (`true`) or `grace` has passed
/// (`false`). As PID 1 every orphan is our child, so "no children" means no
/// user process is left. (`kill(-1)` succeeding says nothing: it also
/// "reaches" kernel threads, which ignore it.)
fn all_children_gone(grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return true,
            Ok(WaitStatus::StillAlive) | Err(_) => {
                if Instant::now() >= deadline {
                    return false;
                }
                thread::sleep(Duration::from_millis(5));
            }
            Ok(_) => {} // reaped one; look for more at once
        }
    }
}
