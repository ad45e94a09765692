//! A panic anywhere in the VMM ends the whole process at once, after one
//! log line that names the thread, the source location and the message.
//!
//! Why a hook, and not `panic = "abort"`: the release profile lives in the
//! workspace `Cargo.toml` and is shared with the host agent, which must
//! keep unwinding (it recovers panicked tokio tasks); Cargo has no
//! per-binary panic strategy. The hook runs before any unwinding starts,
//! so with it installed no VMM thread can die alone: before it, a panic on
//! the device thread ended that thread silently while the vCPUs ran on,
//! and the guest hung until the host's heartbeat timeout.
//!
//! Why `_exit(EXIT_PANIC)` and not `std::process::abort()`: the jailed VMM
//! is PID 1 of its own PID namespace, and the kernel drops every signal a
//! namespace's init has no handler for, even one it sends itself: the
//! `SIGABRT` of `abort()` would be ignored, and glibc's fallback
//! (`rt_sigaction`, then a faulting instruction) would have the seccomp
//! filter kill the process with `SIGSYS`, which the host agent reports as
//! a seccomp violation. `_exit` (`exit_group`) is on every thread's
//! allow-list, ends every thread at once, and runs no destructors or
//! `atexit` handlers, exactly like an abort; the exit code [`EXIT_PANIC`]
//! and the log line say what happened.
//!
//! Installed by the `vmm` command ([`crate::entry::main`]) only: library
//! users and unit tests keep Rust's default, where each thread's
//! [`crate::lifecycle::ThreadExitGuard`] turns an unwinding panic into an
//! exit reason instead.

use std::panic::PanicHookInfo;

use crate::lifecycle::EXIT_PANIC;

/// Installs the hook for the whole process. Call once, first thing.
pub fn install() {
    std::panic::set_hook(Box::new(|info| {
        let line = describe(info);
        // The logger's format (time since start), or plain stderr when
        // logging is off: the reason must reach the VMM's log either way.
        if log::log_enabled!(log::Level::Error) {
            log::error!("{line}");
        } else {
            eprintln!("vmm: {line}");
        }
        // SAFETY: _exit(2) ends the process (all threads) immediately; it
        // touches no state of this process that could be inconsistent.
        unsafe { libc::_exit(EXIT_PANIC) }
    }));
}

/// "thread 'NAME' panicked at FILE:LINE:COL: MESSAGE; ending the VMM".
fn describe(info: &PanicHookInfo<'_>) -> String {
    let current = std::thread::current();
    let thread = current.name().unwrap_or("<unnamed>");
    let location = info
        .location()
        .map_or_else(|| "an unknown location".to_string(), ToString::to_string);
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!(
        "thread '{thread}' panicked at {location}: {message}; ending the VMM (exit {EXIT_PANIC})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the re-executed test binary: run the panicking child body.
    const CHILD_ENV: &str = "KINDLING_VMM_PANIC_HOOK_CHILD";

    /// The child: the hook installed, a named thread panics while the main
    /// thread waits to go on. Never returns normally if the hook works.
    fn child() {
        install();
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(|| panic!("injected device failure"))
            .unwrap();
        let _ = thread.join();
        // Reached only if the panic did not end the process.
        println!("main thread survived the panic");
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::process::exit(0);
    }

    #[test]
    fn a_panic_on_any_thread_ends_the_process_with_its_thread_and_location() {
        if std::env::var_os(CHILD_ENV).is_some() {
            child();
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "panic_hook::tests::a_panic_on_any_thread_ends_the_process_with_its_thread_and_location",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_PANIC), "{stdout}\n{stderr}");
        assert!(!stdout.contains("survived"), "{stdout}");
        assert!(
            stderr.contains("thread 'devices' panicked at vmm/src/panic_hook.rs:")
                && stderr.contains("injected device failure; ending the VMM (exit 101)"),
            "{stderr}"
        );
    }
}
