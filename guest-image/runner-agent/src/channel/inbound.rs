//! The host -> guest direction: a thread that reads frames and hands each
//! message (or the reason the channel ended) to the agent's event loop.

use std::thread::{self, JoinHandle};

use protocol::frame::FrameError;
use protocol::message::HostMessage;
use protocol::read_frame;

use super::HostStream;

/// What the reader saw.
#[derive(Debug)]
pub enum Inbound {
    /// A valid message from the host.
    Message(HostMessage),
    /// The channel ended: closed by the host, an I/O error, or a frame we
    /// refuse (the stream cannot be trusted after a bad frame). Always the
    /// last thing delivered.
    Ended {
        /// Why, for logs and the job's error.
        reason: String,
        /// Whether the host closed cleanly at a frame boundary.
        clean: bool,
    },
}

/// Starts the reader thread; `deliver` gets every message, then exactly one
/// [`Inbound::Ended`].
pub fn spawn_reader(
    mut stream: HostStream,
    deliver: impl Fn(Inbound) + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("host-reader".into())
        .spawn(move || {
            loop {
                match read_frame::<HostMessage>(&mut stream) {
                    Ok(msg) => {
                        tracing::debug!(
                            kind = protocol::message::WireMessage::kind(&msg),
                            "host message"
                        );
                        deliver(Inbound::Message(msg));
                    }
                    Err(err) => {
                        let clean = matches!(err, FrameError::Closed);
                        deliver(Inbound::Ended {
                            reason: err.to_string(),
                            clean,
                        });
                        return;
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    use protocol::write_frame;

    use super::*;

    fn start() -> (UnixStream, mpsc::Receiver<Inbound>) {
        let (host, guest) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let stream = HostStream {
            fd: OwnedFd::from(guest),
            is_socket: true,
        };
        spawn_reader(stream, move |event| {
            let _ = tx.send(event);
        })
        .unwrap();
        (host, rx)
    }

    #[test]
    fn delivers_messages_then_a_clean_end() {
        let (mut host, events) = start();
        write_frame(&mut host, &HostMessage::Shutdown).unwrap();
        drop(host);
        assert!(matches!(
            events.recv().unwrap(),
            Inbound::Message(HostMessage::Shutdown)
        ));
        assert!(matches!(
            events.recv().unwrap(),
            Inbound::Ended { clean: true, .. }
        ));
    }

    #[test]
    fn a_bad_frame_ends_the_channel() {
        let (mut host, events) = start();
        host.write_all(&[0, 0, 0, 2, 0xff, 0xff]).unwrap();
        match events.recv().unwrap() {
            Inbound::Ended { reason, clean } => {
                assert!(!clean);
                assert!(reason.contains("malformed"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_before_its_payload() {
        let (mut host, events) = start();
        host.write_all(&u32::MAX.to_be_bytes()).unwrap();
        match events.recv().unwrap() {
            Inbound::Ended { reason, clean } => {
                assert!(!clean);
                assert!(reason.contains("exceeds"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
