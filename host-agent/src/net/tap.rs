//! Creates a VM's tap device as a *persistent* tap: it outlives the fd that
//! created it, so the host agent can create and address it before the VMM
//! exists, and the VMM (possibly jailed under its own uid) attaches to it by
//! name. The tap is removed by deleting the link (see [`super::link`]).
//!
//! Creation uses the tun driver's ioctls on `/dev/net/tun` (there is no
//! netlink call that creates a tun/tap): `TUNSETIFF` with `IFF_TUN_EXCL` (fail
//! rather than adopt an existing device of that name), then optionally
//! `TUNSETOWNER`/`TUNSETGROUP` so that an unprivileged VMM may attach, then
//! `TUNSETPERSIST`. Flags are those the VMM attaches with (`IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR`); the kernel applies the flags of each
//! attach, so what counts is the VMM's (which also sets the vnet header
//! size and the offloads itself).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Longest interface name, including the NUL.
const IFNAMSIZ: usize = 16;

/// Errors creating a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("invalid tap name {0:?} (1-15 bytes, no NUL)")]
    InvalidName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0} (is the `tun` module loaded and are we root?)")]
    OpenTun(io::Error),
    /// An ioctl failed.
    #[error("tap {name}: {what} failed: {source}")]
    Ioctl {
        /// The tap.
        name: String,
        /// Which ioctl.
        what: &'static str,
        /// The error (`EBUSY` on create: a device of that name exists).
        source: io::Error,
    },
}

/// Creates the persistent tap `name`, owned by `owner` (uid, gid) if given,
/// so that a VMM running under that uid/gid may attach to it.
pub fn create_persistent_tap(name: &str, owner: Option<(u32, u32)>) -> Result<(), TapError> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
        return Err(TapError::InvalidName(name.to_string()));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    request.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL)
            as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `request` is, on a
    // valid tun fd; the result is checked.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    check(rc, name, "TUNSETIFF (create)")?;
    if let Some((uid, gid)) = owner {
        set_int(
            &tun,
            name,
            libc::TUNSETOWNER,
            uid as libc::c_ulong,
            "TUNSETOWNER",
        )?;
        set_int(
            &tun,
            name,
            libc::TUNSETGROUP,
            gid as libc::c_ulong,
            "TUNSETGROUP",
        )?;
    }
    set_int(&tun, name, libc::TUNSETPERSIST, 1, "TUNSETPERSIST")?;
    Ok(())
}

/// The tun ioctls that take their argument by value.
fn set_int(
    tun: &File,
    name: &str,
    request: libc::Ioctl,
    value: libc::c_ulong,
    what: &'static str,
) -> Result<(), TapError> {
    // SAFETY: these tun ioctls take an integer argument by value (no
    // pointer is dereferenced); the fd is a valid tun fd attached to a
    // device; the result is checked.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), request, value) };
    check(rc, name, what)
}

fn check(rc: libc::c_int, name: &str, what: &'static str) -> Result<(), TapError> {
    if rc < 0 {
        return Err(TapError::Ioctl {
            name: name.to_string(),
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["", "a-name-that-is-too-long", "a\0b"] {
            assert!(matches!(
                create_persistent_tap(bad, None),
                Err(TapError::InvalidName(_))
            ));
        }
    }
}
