//! A host tap device: one Ethernet frame per read(2)/write(2) on an fd
//! from /dev/net/tun, opened by name (created if absent when the VMM may).
//!
//! The tap is attached with `IFF_VNET_HDR` and a header size of 12
//! (`TUNSETVNETHDRSZ`): every frame, both ways, is preceded by a
//! `virtio_net_hdr_v1`, the layout the guest uses, so checksum and
//! segmentation offload information passes through (see
//! [`super::header`]). Attach-time flags are the ones that count: a
//! persistent tap created without `IFF_VNET_HDR` gets it when we attach.
//! What the tap may hand us (partial checksums, TSO/UFO frames) is set
//! with `TUNSETOFFLOAD` once the guest's features are known; until then
//! (it is reset at attach, as a reused tap may keep an earlier setting) it
//! hands us plain, fully checksummed frames.

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
    /// TUNSETOFFLOAD failed.
    #[error("cannot reset the offloads of tap {name}: {source}")]
    Offload {
        /// The tap name.
        name: String,
        /// The error.
        source: io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the vnet header size of tap {name}: {source}")]
    VnetHeaderSize {
        /// The tap name.
        name: String,
        /// The error.
        source: io::Error,
    },
}

/// Anything that moves whole Ethernet frames, each preceded by a 12-byte
/// `virtio_net_hdr_v1` (a tap; a socket pair in tests).
pub trait FrameDevice: Send {
    /// Reads one header and frame into `buf`; `WouldBlock` when none is
    /// waiting. A packet longer than `buf` is cut short (as read(2) on a
    /// tap does): give one byte more than the longest packet accepted.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one header and frame.
    fn write_frame(&mut self, packet: &[u8]) -> io::Result<()>;
    /// Lets the device hand us frames with these offloads (`TUN_F_*`
    /// bits of `TUNSETOFFLOAD`; 0: plain, fully checksummed frames only).
    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<()>;
    /// The fd to watch for readability.
    fn raw_fd(&self) -> RawFd;
}

/// Size of the vnet header the tap is told to use (`virtio_net_hdr_v1`).
const VNET_HDR_SIZE: libc::c_int = super::header::NET_HEADER_SIZE as libc::c_int;

/// An attached tap device (non-blocking, no packet-info header, a vnet
/// header in front of every frame).
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
        request.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads an ifreq, which `request` is, from a valid
        // tun fd; the return value is checked.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if rc < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which
        // points at a live c_int; the fd is an attached tap; rc is checked.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &VNET_HDR_SIZE) };
        if rc < 0 {
            return Err(TapError::VnetHeaderSize {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let mut tap = Self {
            file,
            name: name.to_string(),
        };
        tap.set_offloads(0).map_err(|source| TapError::Offload {
            name: name.to_string(),
            source,
        })?;
        Ok(tap)
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

    fn write_frame(&mut self, packet: &[u8]) -> io::Result<()> {
        let written = self.file.write(packet)?;
        if written != packet.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short tap write"));
        }
        Ok(())
    }

    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (no pointer);
        // the fd is an attached tap; rc is checked.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(tun_flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
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
