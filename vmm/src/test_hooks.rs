//! Test hooks, compiled only with the `test-hooks` feature (the
//! `vmm-test-hooks` binary; the shipped `vmm` never contains them) and in
//! this crate's unit tests.
//!
//! [`FORBIDDEN_SYSCALL_MARK`]: when the guest writes this byte to the boot
//! timer port, the vCPU thread handling the write issues a syscall that is
//! on no allow-list (`socket(AF_INET, SOCK_STREAM)`), the way a guest that
//! escaped into the VMM might. With seccomp on, the kernel kills the whole
//! VMM with `SIGSYS`; the security suite checks that and the job's reason.
//! From a guest: `printf '\134' | dd of=/dev/port bs=1 seek=1088 count=1`.
//!
//! [`FAULT_PORT`]: a port of its own where the guest asks for a VMM bug:
//! [`VCPU_PANIC_MARK`] panics the vCPU thread handling the write,
//! [`DEVICE_PANIC_MARK`] panics the device thread, [`DEVICE_ERROR_MARK`]
//! makes a device-thread handler report a fatal error (its loop ends with
//! an error). Each must end the VM at once with its reason. From a guest:
//! `printf '\002' | dd of=/dev/port bs=1 seek=1089 count=1`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::event_loop::{EventHandler, EventLoop, EventLoopError};

/// The boot-timer byte that triggers the forbidden syscall (0x5c, `\134`).
pub const FORBIDDEN_SYSCALL_MARK: u8 = 0x5c;

/// Issues the forbidden syscall. Returns only if seccomp let it through.
pub fn forbidden_syscall() {
    log::warn!("test hook: issuing a forbidden syscall (socket AF_INET) from a vCPU thread");
    // SAFETY: socket(2) with constant arguments; the fd (if any) is closed.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: closing the fd we just got.
        unsafe { libc::close(fd) };
    }
    log::error!("test hook: the forbidden syscall returned {fd}: seccomp is NOT enforced");
}

/// The fault-injection port (1089, next to the boot timer's 1088).
pub const FAULT_PORT: u64 = 0x441;
/// Fault byte: panic on the vCPU thread that handles the write.
pub const VCPU_PANIC_MARK: u8 = 0x01;
/// Fault byte: panic on the device thread.
pub const DEVICE_PANIC_MARK: u8 = 0x02;
/// Fault byte: a device-thread handler reports a fatal error.
pub const DEVICE_ERROR_MARK: u8 = 0x03;

/// Errors of attaching the fault port.
#[derive(Debug, thiserror::Error)]
pub enum FaultPortError {
    /// The eventfd could not be created.
    #[error("fault port eventfd: {0}")]
    EventFd(std::io::Error),
    /// The eventfd could not be watched by the device thread.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The port is taken.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Places the fault port on `pio` and its device-thread half on
/// `event_loop`.
pub fn attach_fault_port(pio: &mut Bus, event_loop: &mut EventLoop) -> Result<(), FaultPortError> {
    let kick = EventFd::new(EFD_NONBLOCK).map_err(FaultPortError::EventFd)?;
    let requested = Arc::new(AtomicU8::new(0));
    let registrar = event_loop.registrar();
    registrar.add(kick.as_raw_fd(), 0, EventSet::IN)?;
    let port = FaultPort {
        requested: requested.clone(),
        kick: kick.try_clone().map_err(FaultPortError::EventFd)?,
    };
    pio.insert(Arc::new(Mutex::new(port)), FAULT_PORT, 1)?;
    event_loop.set_handler(
        &registrar,
        Arc::new(Mutex::new(FaultHandler {
            requested,
            kick,
            fatal: None,
        })),
    );
    log::warn!("test hook: fault port at {FAULT_PORT:#x}");
    Ok(())
}

/// The vCPU half: takes the guest's request.
struct FaultPort {
    requested: Arc<AtomicU8>,
    kick: EventFd,
}

impl BusDevice for FaultPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data.first().copied() {
            Some(VCPU_PANIC_MARK) => panic!("test hook: vCPU panic requested by the guest"),
            Some(mark @ (DEVICE_PANIC_MARK | DEVICE_ERROR_MARK)) => {
                log::warn!("test hook: device thread fault {mark:#04x} requested by the guest");
                self.requested.store(mark, Ordering::SeqCst);
                // A full counter still wakes the device thread.
                let _ = self.kick.write(1);
            }
            _ => {}
        }
    }
}

/// The device-thread half: does what was asked.
struct FaultHandler {
    requested: Arc<AtomicU8>,
    kick: EventFd,
    fatal: Option<String>,
}

impl EventHandler for FaultHandler {
    fn handle_event(&mut self, _sub: u32, _events: EventSet) {
        // EAGAIN (already drained) is fine.
        let _ = self.kick.read();
        match self.requested.swap(0, Ordering::SeqCst) {
            DEVICE_PANIC_MARK => panic!("test hook: device thread panic requested by the guest"),
            DEVICE_ERROR_MARK => {
                self.fatal = Some("test hook: device failure requested by the guest".into());
            }
            _ => {}
        }
    }

    fn fatal_error(&mut self) -> Option<String> {
        self.fatal.take()
    }
}
