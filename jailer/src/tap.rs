//! The VM's tap, opened in the host's network namespace and handed to the
//! VMM as an inherited fd: the VMM itself runs in an empty network
//! namespace (no abstract Unix sockets of the host, no interfaces) and
//! needs neither `/dev/net/tun` nor a way to name a tap.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::error::{JailerError, io};

/// The fd the VMM finds its tap on (`--net tap-fd=3,...`).
pub const TAP_FD: RawFd = 3;

/// Longest interface name, without the NUL.
const IFNAMSIZ: usize = 16;

/// Attaches to the existing tap `name` (in the caller's network namespace)
/// with the flags the VMM's virtio-net needs: `IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`. The fd is close-on-exec until [`pass_to_vmm`].
pub(crate) fn open_tap(name: &str) -> Result<File, JailerError> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['\0', '/']) {
        return Err(JailerError::Invalid(format!("invalid tap name {name:?}")));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(io("opening /dev/net/tun"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as nix::libc::c_char;
    }
    request.ifr_ifru.ifru_flags =
        (nix::libc::IFF_TAP | nix::libc::IFF_NO_PI | nix::libc::IFF_VNET_HDR) as nix::libc::c_short;
    // SAFETY: TUNSETIFF reads an ifreq, which `request` is, from a tun fd;
    // the return value is checked.
    let rc = unsafe { nix::libc::ioctl(tun.as_raw_fd(), nix::libc::TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(io(format!("attaching to tap {name}"))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(tun)
}

/// Puts `tap` at [`TAP_FD`] without close-on-exec, so that it is the one
/// fd above stderr the VMM inherits. Called last before closing the rest.
pub(crate) fn pass_to_vmm(tap: &File) -> Result<(), JailerError> {
    let fd = tap.as_raw_fd();
    if fd == TAP_FD {
        // SAFETY: F_SETFD with an integer argument on an fd we own.
        let rc = unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) };
        if rc < 0 {
            return Err(io("clearing close-on-exec of the tap fd")(
                std::io::Error::last_os_error(),
            ));
        }
    } else {
        // SAFETY: dup2 onto TAP_FD, which nothing in this process uses
        // (fds above stderr are about to be closed; dup2 clears
        // close-on-exec on the copy).
        let rc = unsafe { nix::libc::dup2(fd, TAP_FD) };
        if rc < 0 {
            return Err(io("moving the tap fd to 3")(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tap_names_are_refused_before_any_syscall() {
        for name in ["", "a-name-that-is-too-long", "a/b", "a\0b"] {
            let err = open_tap(name).unwrap_err().to_string();
            assert!(err.contains("invalid tap name"), "{name:?}: {err}");
        }
    }
}
