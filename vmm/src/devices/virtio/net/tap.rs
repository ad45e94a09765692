//! A host tap device: one Ethernet frame per read(2)/write(2) on an fd
//! from /dev/net/tun, opened by name (created if absent when the VMM may).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Longest interface name, without the NUL.
const IFNAMSIZ: usize = 16;

/// Errors of tap setup.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("invalid tap name {0:?}")]
    InvalidName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    /// TUNSETIFF failed (no such tap and no right to create it, or busy).
    #[error("cannot attach to tap {name}: {source}")]
    Attach {
        /// The tap name.
        name: String,
        /// The error.
        source: io::Error,
    },
}

/// Anything that moves whole Ethernet frames (a tap; a socket pair in tests).
pub trait FrameDevice: Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The fd to watch for readability.
    fn raw_fd(&self) -> RawFd;
}

/// An attached tap device (non-blocking, no packet-info header).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap called `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads an ifreq, which `request` is, from a valid
        // tun fd; the return value is checked.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if rc < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FrameDevice for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let written = self.file.write(frame)?;
        if written != frame.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short tap write"));
        }
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        assert!(matches!(Tap::open(""), Err(TapError::InvalidName(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long"),
            Err(TapError::InvalidName(_))
        ));
    }
}
