//! Test hooks, compiled only with the `test-hooks` feature (the
//! `vmm-test-hooks` binary; the shipped `vmm` never contains them).
//!
//! [`FORBIDDEN_SYSCALL_MARK`]: when the guest writes this byte to the boot
//! timer port, the vCPU thread handling the write issues a syscall that is
//! on no allow-list (`socket(AF_INET, SOCK_STREAM)`), the way a guest that
//! escaped into the VMM might. With seccomp on, the kernel kills the whole
//! VMM with `SIGSYS`; the security suite checks that and the job's reason.
//! From a guest: `printf '\134' | dd of=/dev/port bs=1 seek=1088 count=1`.

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
