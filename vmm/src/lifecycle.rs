//! Why the VM stops, and how the thread that notices tells the main thread.
//!
//! Any vCPU thread, device or signal handler may end the VM. The first
//! reason recorded wins; later ones are ignored (a reset followed by the
//! errors of vCPUs being torn down must still report the reset). The main
//! thread blocks on an eventfd until a reason arrives.
//!
//! A device or vCPU thread must not end without the VM ending too: each
//! holds a [`ThreadExitGuard`] for its whole life, which records
//! [`ExitReason::ThreadEnded`] when the thread returns or unwinds without
//! having been told to stop. (In the `vmm` binary a panic never unwinds:
//! `crate::panic_hook` ends the process first.)
//!
//! SIGTERM/SIGINT are delivered to a handler that only does
//! async-signal-safe things: it stores the signal number in an atomic and
//! writes the eventfd.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Process exit code of a VMM whose guest rebooted or powered off.
pub const EXIT_OK: i32 = 0;
/// Process exit code of a guest crash, KVM error or device failure.
pub const EXIT_GUEST_OR_VMM_ERROR: i32 = 1;
/// Process exit code of an invalid configuration (nothing was started).
pub const EXIT_BAD_CONFIG: i32 = 2;
/// Process exit code of a panic anywhere in the VMM (`crate::panic_hook`);
/// the same code a Rust program returns when its main thread panics.
pub const EXIT_PANIC: i32 = 101;
/// Process exit code after SIGTERM/SIGINT: 128 + signal number.
pub const EXIT_SIGNAL_BASE: i32 = 128;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 0xfe, or a KVM reset event).
    GuestReset,
    /// The guest powered off (KVM shutdown system event).
    GuestPowerOff,
    /// The VMM got SIGTERM or SIGINT.
    Signal(i32),
    /// A vCPU hit a triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU index.
        vcpu: u8,
    },
    /// KVM reported an internal error.
    InternalError {
        /// The vCPU index.
        vcpu: u8,
        /// KVM's sub-error code.
        suberror: u32,
        /// The guest instruction pointer at the error (0 if unreadable).
        rip: u64,
    },
    /// VM entry failed.
    FailEntry {
        /// The vCPU index.
        vcpu: u8,
        /// Hardware failure reason.
        reason: u64,
    },
    /// A vCPU thread failed for another reason.
    VcpuError {
        /// The vCPU index.
        vcpu: u8,
        /// What went wrong.
        message: String,
    },
    /// A device failed in a way the VM cannot survive.
    DeviceError {
        /// The device.
        device: String,
        /// What went wrong.
        message: String,
    },
    /// A device or vCPU thread ended on its own (an error return of its
    /// loop, or a panic that unwound): the VM cannot go on without it.
    ThreadEnded {
        /// The thread's name (`devices`, `vcpu0`, ...).
        thread: String,
        /// Why it ended.
        message: String,
    },
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::GuestReset | Self::GuestPowerOff => EXIT_OK,
            Self::Signal(signal) => EXIT_SIGNAL_BASE + signal,
            _ => EXIT_GUEST_OR_VMM_ERROR,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestReset => write!(f, "guest reset"),
            Self::GuestPowerOff => write!(f, "guest powered off"),
            Self::Signal(s) => write!(f, "stopped by signal {s}"),
            Self::TripleFault { vcpu } => {
                write!(f, "vCPU {vcpu}: triple fault (KVM_EXIT_SHUTDOWN)")
            }
            Self::InternalError {
                vcpu,
                suberror,
                rip,
            } => write!(
                f,
                "vCPU {vcpu}: KVM internal error, suberror {suberror} at RIP {rip:#x}"
            ),
            Self::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "vCPU {vcpu}: VM entry failed, hardware reason {reason:#x}"
                )
            }
            Self::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu}: {message}"),
            Self::DeviceError { device, message } => write!(f, "device {device}: {message}"),
            Self::ThreadEnded { thread, message } => {
                write!(f, "thread '{thread}' ended: {message}")
            }
        }
    }
}

/// Errors of the exit channel.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The eventfd could not be created or read.
    #[error("exit eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Shared "the VM must stop" channel.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
}

/// The eventfd signal handlers write to (-1 before installation).
static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);
/// The last stop signal received (0 = none).
static SIGNAL_RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNAL_RECEIVED.store(signal, Ordering::SeqCst);
    let fd = SIGNAL_EVENT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is the eventfd owned by
        // the process-lifetime ExitSignal and `one` is 8 valid bytes.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

impl ExitSignal {
    /// A new channel with no reason recorded.
    pub fn new() -> Result<Arc<Self>, LifecycleError> {
        Ok(Arc::new(Self {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK).map_err(LifecycleError::EventFd)?,
        }))
    }

    /// Records `reason` unless one is already recorded, and wakes the waiter.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        // A full eventfd counter still wakes the reader: nothing to handle.
        let _ = self.event.write(1);
    }

    /// The recorded reason, if any (or a pending stop signal).
    pub fn reason(&self) -> Option<ExitReason> {
        let recorded = self
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        recorded.or_else(|| match SIGNAL_RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(ExitReason::Signal(signal)),
        })
    }

    /// Blocks until a reason is available and returns it.
    pub fn wait(&self) -> Result<ExitReason, LifecycleError> {
        loop {
            if let Some(reason) = self.reason() {
                return Ok(reason);
            }
            let mut pfd = libc::pollfd {
                fd: self.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(LifecycleError::EventFd(err));
                }
            }
            // Drain the counter; EAGAIN (already drained) is fine.
            let _ = self.event.read();
        }
    }

    /// Routes SIGTERM and SIGINT to this channel. Call once per process.
    pub fn install_signal_handlers(&self) -> Result<(), LifecycleError> {
        SIGNAL_EVENT_FD.store(self.event.as_raw_fd(), Ordering::SeqCst);
        for signal in [libc::SIGTERM, libc::SIGINT] {
            vmm_sys_util::signal::register_signal_handler(signal, on_stop_signal).map_err(|e| {
                LifecycleError::EventFd(std::io::Error::from_raw_os_error(e.errno()))
            })?;
        }
        Ok(())
    }
}

/// Held by a device or vCPU thread for its whole life: unless the thread
/// calls [`ThreadExitGuard::stopped`] (it was told to stop), its end stops
/// the VM with [`ExitReason::ThreadEnded`]: "failed" with the message given
/// to [`ThreadExitGuard::failed`], "panicked" when it unwinds, "returned"
/// otherwise.
#[derive(Debug)]
pub struct ThreadExitGuard {
    exit: Arc<ExitSignal>,
    thread: String,
    armed: bool,
}

impl ThreadExitGuard {
    /// A guard for the thread named `thread`, reporting to `exit`.
    pub fn new(exit: Arc<ExitSignal>, thread: impl Into<String>) -> Self {
        Self {
            exit,
            thread: thread.into(),
            armed: true,
        }
    }

    /// The thread ends because it was told to: nothing to report.
    pub fn stopped(mut self) {
        self.armed = false;
    }

    /// The thread ends because of `message`: logs it and stops the VM.
    pub fn failed(mut self, message: impl std::fmt::Display) {
        self.armed = false;
        self.end(message.to_string());
    }

    fn end(&self, message: String) {
        log::error!("thread '{}' ended: {message}", self.thread);
        self.exit.request(ExitReason::ThreadEnded {
            thread: self.thread.clone(),
            message,
        });
    }
}

impl Drop for ThreadExitGuard {
    fn drop(&mut self) {
        if self.armed {
            let message = if std::thread::panicking() {
                "panicked"
            } else {
                "returned without being told to stop"
            };
            self.end(message.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let exit = ExitSignal::new().unwrap();
        exit.request(ExitReason::GuestReset);
        exit.request(ExitReason::TripleFault { vcpu: 0 });
        assert_eq!(exit.wait().unwrap(), ExitReason::GuestReset);
    }

    #[test]
    fn wait_blocks_until_another_thread_requests() {
        let exit = ExitSignal::new().unwrap();
        let other = Arc::clone(&exit);
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            other.request(ExitReason::InternalError {
                vcpu: 1,
                suberror: 3,
                rip: 0x1000,
            });
        });
        let reason = exit.wait().unwrap();
        t.join().unwrap();
        assert_eq!(reason.exit_code(), EXIT_GUEST_OR_VMM_ERROR);
        assert!(reason.to_string().contains("internal error"));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(ExitReason::GuestPowerOff.exit_code(), 0);
        assert_eq!(ExitReason::Signal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(ExitReason::TripleFault { vcpu: 0 }.exit_code(), 1);
        let ended = ExitReason::ThreadEnded {
            thread: "devices".into(),
            message: "epoll_wait failed".into(),
        };
        assert_eq!(ended.exit_code(), EXIT_GUEST_OR_VMM_ERROR);
        assert_eq!(
            ended.to_string(),
            "thread 'devices' ended: epoll_wait failed"
        );
    }

    fn ended(exit: &ExitSignal) -> Option<(String, String)> {
        match exit.reason() {
            Some(ExitReason::ThreadEnded { thread, message }) => Some((thread, message)),
            _ => None,
        }
    }

    #[test]
    fn a_guarded_thread_that_is_told_to_stop_reports_nothing() {
        let exit = ExitSignal::new().unwrap();
        ThreadExitGuard::new(exit.clone(), "devices").stopped();
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn a_guarded_thread_that_fails_stops_the_vm_with_its_reason() {
        let exit = ExitSignal::new().unwrap();
        ThreadExitGuard::new(exit.clone(), "devices").failed("epoll_wait failed: EBADF");
        assert_eq!(
            ended(&exit),
            Some(("devices".into(), "epoll_wait failed: EBADF".into()))
        );
    }

    #[test]
    fn a_guarded_thread_that_panics_or_just_returns_stops_the_vm() {
        let exit = ExitSignal::new().unwrap();
        let guard_exit = exit.clone();
        let thread = std::thread::spawn(move || {
            let _guard = ThreadExitGuard::new(guard_exit, "vcpu0");
            panic!("boom");
        });
        assert!(thread.join().is_err());
        assert_eq!(ended(&exit), Some(("vcpu0".into(), "panicked".into())));

        let exit = ExitSignal::new().unwrap();
        drop(ThreadExitGuard::new(exit.clone(), "vcpu1"));
        let (thread, message) = ended(&exit).unwrap();
        assert_eq!(thread, "vcpu1");
        assert!(message.contains("without being told"), "{message}");
    }
}
