//! The channel to the host agent.
//!
//! The guest dials (guest-initiated, so there is no race with the host
//! connecting before the guest listens): AF_VSOCK to the host CID on
//! [`protocol::ports::RUNNER_AGENT_PORT`] in production, a Unix socket in
//! tests. The host's listener may not be up the instant the guest boots, so
//! refused or reset attempts are retried with exponential backoff within a
//! time budget. Then the guest says `Hello` and waits for `HelloAck`
//! ([`protocol::session::guest_handshake`]).
//!
//! Once up, the stream is split in two: [`outbound::Outbound`] (every
//! thread's frames, one at a time, with log sequence numbers) and
//! [`inbound::spawn_reader`] (a thread turning host frames into events).

pub mod endpoint;
pub mod inbound;
pub mod outbound;

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::socket::{
    AddressFamily, Shutdown, SockFlag, SockType, VsockAddr, connect as connect_socket, setsockopt,
    shutdown, socket, sockopt,
};
use nix::sys::stat::Mode;
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use nix::sys::time::{TimeVal, TimeValLike};
use protocol::limits::MAX_ID_LEN;
use protocol::message::GuestHello;
use protocol::session::{SessionError, guest_handshake};

pub use self::endpoint::Endpoint;

/// First pause between connection attempts; doubled after each failure.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(20);

/// Longest pause between connection attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Why the channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Every attempt within the budget was refused (the host is not listening).
    #[error(
        "cannot reach the host at {endpoint}: {attempts} attempts in {elapsed:?}, last error: {source}"
    )]
    Unreachable {
        /// Where we dialed.
        endpoint: Endpoint,
        /// How many times.
        attempts: u32,
        /// For how long.
        elapsed: Duration,
        /// The last attempt's error.
        #[source]
        source: io::Error,
    },
    /// An error retrying cannot fix (no vsock support, bad path...).
    #[error("cannot open {endpoint}: {source}")]
    Open {
        /// Where we dialed.
        endpoint: Endpoint,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Setting a socket option failed.
    #[error("cannot configure the channel socket: {0}")]
    Configure(#[source] io::Error),
    /// The host did not accept our `Hello`.
    #[error("handshake with the host failed: {0}")]
    Handshake(#[from] SessionError),
}

/// A connected stream to the host: a socket, or a raw serial line.
#[derive(Debug)]
pub struct HostStream {
    fd: OwnedFd,
    is_socket: bool,
}

impl HostStream {
    /// A second handle on the same stream (for the other direction).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            is_socket: self.is_socket,
        })
    }

    /// Ends our sending direction (the host then reads end-of-stream after
    /// the frames already sent). A no-op on a serial line.
    pub fn shutdown_write(&self) {
        if self.is_socket {
            // The peer may be gone already; nothing to do about it then.
            let _ = shutdown(self.fd.as_raw_fd(), Shutdown::Write);
        }
    }

    /// Bounds how long one send may make no progress (`None`: forever). A
    /// no-op on a serial line.
    pub fn set_send_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        if self.is_socket {
            setsockopt(&self.fd, sockopt::SendTimeout, &timeval(timeout))?;
        }
        Ok(())
    }

    /// Bounds how long one receive may wait (`None`: forever). A no-op on a
    /// serial line.
    pub fn set_receive_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        if self.is_socket {
            setsockopt(&self.fd, sockopt::ReceiveTimeout, &timeval(timeout))?;
        }
        Ok(())
    }
}

/// A socket timeout value; zero means "no timeout".
fn timeval(timeout: Option<Duration>) -> TimeVal {
    let micros = timeout.map_or(0, |t| i64::try_from(t.as_micros()).unwrap_or(i64::MAX));
    TimeVal::microseconds(micros)
}

impl Read for HostStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(self.fd.as_fd(), buf)?)
    }
}

impl Write for HostStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(nix::unistd::write(self.fd.as_fd(), buf)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Dials `endpoint`, retrying refused attempts with backoff for up to `budget`.
pub fn connect(endpoint: &Endpoint, budget: Duration) -> Result<HostStream, ChannelError> {
    let started = Instant::now();
    let mut delay = FIRST_RETRY_DELAY;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match open_endpoint(endpoint) {
            Ok(stream) => {
                tracing::info!(%endpoint, attempts, elapsed = ?started.elapsed(), "connected to the host");
                return Ok(stream);
            }
            Err(source) if is_retryable(&source) => {
                if started.elapsed() + delay > budget {
                    return Err(ChannelError::Unreachable {
                        endpoint: endpoint.clone(),
                        attempts,
                        elapsed: started.elapsed(),
                        source,
                    });
                }
                tracing::debug!(%endpoint, error = %source, ?delay, "host not reachable yet; retrying");
                thread::sleep(delay);
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
            Err(source) => {
                return Err(ChannelError::Open {
                    endpoint: endpoint.clone(),
                    source,
                });
            }
        }
    }
}

/// Errors that mean "the host is not listening yet" (or the vsock transport
/// is still being probed), as opposed to a configuration error.
fn is_retryable(err: &io::Error) -> bool {
    let Some(code) = err.raw_os_error() else {
        return false;
    };
    [
        Errno::ECONNREFUSED,
        Errno::ECONNRESET,
        Errno::ENOENT,
        Errno::ENODEV,
        Errno::ENXIO,
        Errno::ENETUNREACH,
        Errno::EHOSTUNREACH,
        Errno::ETIMEDOUT,
        Errno::EAGAIN,
        Errno::EINTR,
    ]
    .contains(&Errno::from_raw(code))
}

fn open_endpoint(endpoint: &Endpoint) -> io::Result<HostStream> {
    match endpoint {
        Endpoint::Vsock { cid, port } => {
            let fd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            connect_socket(fd.as_raw_fd(), &VsockAddr::new(*cid, *port))?;
            Ok(HostStream {
                fd,
                is_socket: true,
            })
        }
        Endpoint::Unix(path) => Ok(HostStream {
            fd: OwnedFd::from(UnixStream::connect(path)?),
            is_socket: true,
        }),
        Endpoint::Serial(path) => open_serial(path),
    }
}

/// Opens a serial line in raw mode (no echo, no line discipline).
fn open_serial(path: &Path) -> io::Result<HostStream> {
    let fd = open(
        path,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut termios = tcgetattr(&fd)?;
    cfmakeraw(&mut termios);
    tcsetattr(&fd, SetArg::TCSANOW, &termios)?;
    Ok(HostStream {
        fd,
        is_socket: false,
    })
}

/// Our `Hello`: protocol and agent versions, boot id, kernel release.
pub fn hello() -> GuestHello {
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    GuestHello {
        protocol_version: protocol::PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id: truncate(boot_id, MAX_ID_LEN),
        kernel_release: truncate(kernel_release, MAX_ID_LEN),
    }
}

/// Cuts `text` to at most `max` bytes at a character boundary.
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Says `Hello` and waits (at most `timeout`) for the host's acceptance.
pub fn handshake(stream: &mut HostStream, timeout: Duration) -> Result<(), ChannelError> {
    stream
        .set_receive_timeout(Some(timeout))
        .map_err(ChannelError::Configure)?;
    guest_handshake(stream, hello())?;
    stream
        .set_receive_timeout(None)
        .map_err(ChannelError::Configure)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use protocol::message::{GuestMessage, HostMessage};
    use protocol::{read_frame, write_frame};

    use super::*;

    #[test]
    fn connect_retries_until_the_host_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.sock");
        let endpoint = Endpoint::Unix(path.clone());
        let listener = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            let listener = UnixListener::bind(&path).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            let hello: GuestMessage = read_frame(&mut conn).unwrap();
            assert!(matches!(hello, GuestMessage::Hello(_)));
            write_frame(
                &mut conn,
                &HostMessage::HelloAck {
                    protocol_version: protocol::PROTOCOL_VERSION,
                },
            )
            .unwrap();
        });
        let mut stream = connect(&endpoint, Duration::from_secs(10)).unwrap();
        handshake(&mut stream, Duration::from_secs(5)).unwrap();
        listener.join().unwrap();
    }

    #[test]
    fn connect_gives_up_after_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = Endpoint::Unix(dir.path().join("nobody.sock"));
        let started = Instant::now();
        let err = connect(&endpoint, Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(err, ChannelError::Unreachable { attempts, .. } if attempts > 2),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn handshake_reports_a_rejection() {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let mut stream = HostStream {
            fd: OwnedFd::from(guest),
            is_socket: true,
        };
        let host = thread::spawn(move || {
            let _: GuestMessage = read_frame(&mut host).unwrap();
            write_frame(
                &mut host,
                &HostMessage::HelloRejected {
                    reason: "too old".into(),
                    supported_version: 9,
                },
            )
            .unwrap();
        });
        let err = handshake(&mut stream, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("too old"), "{err}");
        host.join().unwrap();
    }

    #[test]
    fn handshake_times_out_on_a_silent_host() {
        let (_host, guest) = UnixStream::pair().unwrap();
        let mut stream = HostStream {
            fd: OwnedFd::from(guest),
            is_socket: true,
        };
        let started = Instant::now();
        assert!(handshake(&mut stream, Duration::from_millis(200)).is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn hello_fields_fit_the_protocol() {
        use protocol::message::WireMessage;
        GuestMessage::Hello(hello()).validate().unwrap();
        assert_eq!(truncate("héllo".into(), 2), "h");
    }
}
