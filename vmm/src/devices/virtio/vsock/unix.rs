//! Non-blocking connect to a Unix stream socket.
//!
//! `std::os::unix::net::UnixStream::connect` blocks while the listener's
//! backlog is full; the device thread must never block, so this connects
//! with `SOCK_NONBLOCK` and treats a full backlog as a refusal.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects to the stream socket at `path` without blocking.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // A Unix stream connect either succeeds at once or fails; EAGAIN
        // means the listener's backlog is full.
        return Err(err);
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn connects_and_refuses() {
        let path = std::env::temp_dir().join(format!("vmm-unix-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        assert!(connect_nonblocking(&path).is_err());
        let listener = UnixListener::bind(&path).unwrap();
        let mut client = connect_nonblocking(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.set_nonblocking(false).unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        std::fs::remove_file(&path).unwrap();
        assert!(connect_nonblocking(Path::new(&"x".repeat(200))).is_err());
    }
}
