//! A host tap device: one Ethernet frame per read(2)/write(2) on an fd
//! from /dev/net/tun, opened by name (created if absent when the VMM may),
//! or inherited already attached (a jailed VMM in an empty network
//! namespace: its jailer attaches the tap in the host's namespace).
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
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
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
    /// An inherited fd is not an attached tap with the flags we need.
    #[error("fd {fd} is not a tap attached with IFF_NO_PI and IFF_VNET_HDR: {why}")]
    NotATap {
        /// The fd.
        fd: RawFd,
        /// What is wrong with it.
        why: String,
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
        Self::configure(file, name.to_string())
    }

    /// Adopts the inherited fd `fd`: it must be a tap already attached with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (checked with `TUNGETIFF`
    /// before the fd is taken over, so a wrong fd stays untouched). It is
    /// made non-blocking and close-on-exec, and closed with the device.
    /// The caller names each fd once, and only fds it was handed.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        let not_a_tap = |why: String| TapError::NotATap { fd, why };
        if fd < 3 {
            return Err(not_a_tap("stdin, stdout and stderr are not taps".into()));
        }
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one ifreq through the pointer, which
        // points at a live ifreq; on any other kind of fd it fails (EBADF,
        // ENOTTY, EINVAL, EBADFD) without touching it; rc is checked.
        let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut request) };
        if rc < 0 {
            return Err(not_a_tap(format!(
                "TUNGETIFF: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: TUNGETIFF filled in the flags member of the union.
        let flags = i32::from(unsafe { request.ifr_ifru.ifru_flags });
        let needed = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & needed != needed {
            return Err(not_a_tap(format!("its flags are {flags:#x}")));
        }
        let name: String = request
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        // SAFETY: fcntl on a valid fd (TUNGETIFF succeeded on it), with
        // integer arguments only; every rc is checked (also below).
        let status = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        let fcntl_failed = status < 0
            // SAFETY: as above.
            || unsafe { libc::fcntl(fd, libc::F_SETFL, status | libc::O_NONBLOCK) } < 0
            // SAFETY: as above.
            || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0;
        if fcntl_failed {
            return Err(not_a_tap(format!("fcntl: {}", io::Error::last_os_error())));
        }
        // SAFETY: `fd` is an open tap fd this process inherited and that
        // nothing else here owns (the config names each fd once, and only
        // when the VMM opens no tap itself); the File becomes its one owner.
        let file = unsafe { File::from_raw_fd(fd) };
        Self::configure(file, name)
    }

    /// Sets the vnet header size and resets the offloads of an attached
    /// tap.
    fn configure(file: File, name: String) -> Result<Self, TapError> {
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which
        // points at a live c_int; the fd is an attached tap; rc is checked.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &VNET_HDR_SIZE) };
        if rc < 0 {
            return Err(TapError::VnetHeaderSize {
                name,
                source: io::Error::last_os_error(),
            });
        }
        let mut tap = Self { file, name };
        tap.set_offloads(0).map_err(|source| TapError::Offload {
            name: tap.name.clone(),
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
    fn an_inherited_fd_that_is_no_tap_is_refused_and_left_open() {
        let file = File::open("/dev/null").unwrap();
        let fd = file.as_raw_fd();
        let err = Tap::from_fd(fd).unwrap_err();
        assert!(matches!(err, TapError::NotATap { .. }), "{err}");
        assert!(err.to_string().contains("TUNGETIFF"), "{err}");
        // Still open and still ours: not adopted.
        // SAFETY: F_GETFD on an fd `file` owns.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
        assert!(matches!(Tap::from_fd(1), Err(TapError::NotATap { .. })));
        drop(file);
    }

    /// Attaches a fresh (non-persistent) tap with `flags`, as a jailer does;
    /// `None` where this process may not create taps (no CAP_NET_ADMIN or
    /// no /dev/net/tun).
    fn attached_tap(name: &str, flags: libc::c_int) -> Option<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .ok()?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads an ifreq from a tun fd; rc is checked.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        (rc == 0).then_some(file)
    }

    #[test]
    fn an_inherited_attached_tap_is_adopted_with_its_name() {
        use std::os::fd::IntoRawFd;
        let name = format!("kdlt{}", std::process::id() % 100_000);
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let Some(file) = attached_tap(&name, flags) else {
            eprintln!("skipped: cannot create a tap here (needs CAP_NET_ADMIN)");
            return;
        };
        let fd = file.into_raw_fd();
        let tap = Tap::from_fd(fd).unwrap();
        assert_eq!(tap.name(), name);
        assert_eq!(tap.raw_fd(), fd);
        // SAFETY: F_GETFL/F_GETFD on the fd `tap` owns.
        let (status, fd_flags) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        };
        assert_ne!(status & libc::O_NONBLOCK, 0);
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        // Non-blocking: no frame waiting is WouldBlock, not a hang.
        let mut tap = tap;
        let err = tap.read_frame(&mut [0; 64]).unwrap_err();
        assert!(
            matches!(err.kind(), io::ErrorKind::WouldBlock)
                || err.raw_os_error() == Some(libc::EIO),
            "{err}"
        );
    }

    #[test]
    fn a_tap_attached_without_a_vnet_header_is_refused() {
        let name = format!("kdlu{}", std::process::id() % 100_000);
        let Some(file) = attached_tap(&name, libc::IFF_TAP | libc::IFF_NO_PI) else {
            eprintln!("skipped: cannot create a tap here (needs CAP_NET_ADMIN)");
            return;
        };
        let err = Tap::from_fd(file.as_raw_fd()).unwrap_err();
        assert!(matches!(err, TapError::NotATap { .. }), "{err}");
        assert!(err.to_string().contains("flags"), "{err}");
    }

    #[test]
    fn names_are_checked_before_any_syscall() {
        assert!(matches!(Tap::open(""), Err(TapError::InvalidName(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long"),
            Err(TapError::InvalidName(_))
        ));
    }
}
