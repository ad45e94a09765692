//! The guest -> host direction, shared by every thread of the agent.
//!
//! Frames from the output pumps, the job supervisor and the heartbeat all go
//! through one [`Outbound`]: a mutex around the stream, so frames never
//! interleave, and around the log sequence counter, so sequence numbers are
//! assigned in the order frames hit the wire (the host checks they have no
//! gaps).
//!
//! Writes block: a host that reads slowly slows the pump that is writing,
//! which stops reading its pipes, which blocks the step's `write(2)`. That is
//! the whole backpressure story, and it bounds memory to a few 64 KiB
//! buffers whatever the job prints.
//!
//! The first write error marks the channel broken; the `on_broken` callback
//! tells the supervisor, which kills the job. After `JobFinished` the
//! channel is closed for good: late frames (a detached pump's) are dropped.

use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use protocol::frame::FrameError;
use protocol::limits::MAX_LOG_CHUNK_BYTES;
use protocol::message::{GuestMessage, JobFinished, JobResult, LogChunk, OutputStream};
use protocol::write_frame;

use super::HostStream;

/// Why a frame was not sent.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// `JobFinished` was sent or the agent closed the channel.
    #[error("the channel to the host is closed")]
    Closed,
    /// A write failed earlier or now; the channel is unusable.
    #[error("the channel to the host is broken: {0}")]
    Broken(String),
    /// The message breaks a protocol bound (an agent bug); nothing was sent.
    #[error("refusing to send an invalid {kind} message: {reason}")]
    Invalid {
        /// The message's variant.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Whether frames may still be sent.
#[derive(Debug)]
enum Status {
    Open,
    Closed,
    Broken(String),
}

struct State {
    stream: HostStream,
    next_seq: u64,
    status: Status,
}

struct Shared {
    state: Mutex<State>,
    on_broken: Box<dyn Fn(String) + Send + Sync>,
}

/// Cheaply clonable handle on the guest -> host direction.
#[derive(Clone)]
pub struct Outbound {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").finish_non_exhaustive()
    }
}

impl Outbound {
    /// Wraps the sending half of the channel; `on_broken` is called once,
    /// with the reason, when a write fails.
    pub fn new(stream: HostStream, on_broken: impl Fn(String) + Send + Sync + 'static) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    stream,
                    next_seq: 0,
                    status: Status::Open,
                }),
                on_broken: Box::new(on_broken),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking writer leaves the stream as usable as any failed write.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends one message (blocking while the host is slow).
    pub fn send(&self, msg: &GuestMessage) -> Result<(), SendError> {
        let mut state = self.lock();
        self.write_locked(&mut state, msg)
    }

    /// Sends `data` as log chunks of `step`'s `stream`, split to the
    /// protocol's chunk bound, each with the next sequence number.
    pub fn send_log(&self, step: u32, stream: OutputStream, data: &[u8]) -> Result<(), SendError> {
        for piece in data.chunks(MAX_LOG_CHUNK_BYTES) {
            let mut state = self.lock();
            let msg = GuestMessage::LogChunk(LogChunk {
                step,
                stream,
                seq: state.next_seq,
                data: piece.to_vec(),
            });
            self.write_locked(&mut state, &msg)?;
            state.next_seq += 1;
        }
        Ok(())
    }

    /// Sends a heartbeat unless another frame is being written right now
    /// (which tells the host we are alive just as well).
    pub fn heartbeat(&self) -> Result<(), SendError> {
        let mut state = match self.shared.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::WouldBlock) => return Ok(()),
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        };
        self.write_locked(&mut state, &GuestMessage::Heartbeat)
    }

    /// Sends `JobFinished` and closes our direction: nothing is sent after it.
    pub fn finish(&self, result: JobResult) -> Result<(), SendError> {
        let mut state = self.lock();
        let sent = self.write_locked(
            &mut state,
            &GuestMessage::JobFinished(JobFinished { result }),
        );
        Self::close_locked(&mut state);
        sent
    }

    /// Closes our direction without a final message.
    pub fn close(&self) {
        Self::close_locked(&mut self.lock());
    }

    /// Whether frames can still be sent.
    pub fn is_open(&self) -> bool {
        matches!(self.lock().status, Status::Open)
    }

    /// Log chunks sent so far.
    pub fn chunks_sent(&self) -> u64 {
        self.lock().next_seq
    }

    fn close_locked(state: &mut State) {
        if matches!(state.status, Status::Open) {
            state.status = Status::Closed;
            state.stream.shutdown_write();
        }
    }

    fn write_locked(&self, state: &mut State, msg: &GuestMessage) -> Result<(), SendError> {
        match &state.status {
            Status::Open => {}
            Status::Closed => return Err(SendError::Closed),
            Status::Broken(reason) => return Err(SendError::Broken(reason.clone())),
        }
        match write_frame(&mut state.stream, msg) {
            Ok(()) => Ok(()),
            Err(err @ (FrameError::Invalid { .. } | FrameError::TooLarge { .. })) => {
                tracing::error!(kind = msg_kind(msg), error = %err, "not sending an invalid message");
                Err(SendError::Invalid {
                    kind: msg_kind(msg),
                    reason: err.to_string(),
                })
            }
            Err(err) => {
                let reason = format!("sending {} failed: {err}", msg_kind(msg));
                state.status = Status::Broken(reason.clone());
                (self.shared.on_broken)(reason.clone());
                Err(SendError::Broken(reason))
            }
        }
    }
}

fn msg_kind(msg: &GuestMessage) -> &'static str {
    protocol::message::WireMessage::kind(msg)
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    use protocol::read_frame;

    use super::*;

    fn pair() -> (UnixStream, Outbound, mpsc::Receiver<String>) {
        let (host, guest) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let stream = HostStream {
            fd: OwnedFd::from(guest),
            is_socket: true,
        };
        let outbound = Outbound::new(stream, move |reason| {
            let _ = tx.send(reason);
        });
        (host, outbound, rx)
    }

    #[test]
    fn log_is_split_into_numbered_chunks() {
        let (mut host, outbound, _) = pair();
        let data = vec![b'x'; MAX_LOG_CHUNK_BYTES * 2 + 10];
        let writer = {
            let outbound = outbound.clone();
            std::thread::spawn(move || outbound.send_log(3, OutputStream::Stderr, &data))
        };
        let mut sizes = Vec::new();
        for expected_seq in 0..3 {
            match read_frame::<GuestMessage>(&mut host).unwrap() {
                GuestMessage::LogChunk(chunk) => {
                    assert_eq!(chunk.seq, expected_seq);
                    assert_eq!(chunk.step, 3);
                    assert_eq!(chunk.stream, OutputStream::Stderr);
                    sizes.push(chunk.data.len());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        writer.join().unwrap().unwrap();
        assert_eq!(sizes, [MAX_LOG_CHUNK_BYTES, MAX_LOG_CHUNK_BYTES, 10]);
        assert_eq!(outbound.chunks_sent(), 3);
    }

    #[test]
    fn nothing_is_sent_after_job_finished() {
        let (mut host, outbound, _) = pair();
        outbound.finish(JobResult::Succeeded).unwrap();
        assert_eq!(
            outbound.send_log(0, OutputStream::Stdout, b"late"),
            Err(SendError::Closed)
        );
        assert!(matches!(
            read_frame::<GuestMessage>(&mut host).unwrap(),
            GuestMessage::JobFinished(_)
        ));
        assert!(matches!(
            read_frame::<GuestMessage>(&mut host),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn a_failed_write_breaks_the_channel_once() {
        let (host, outbound, broken) = pair();
        drop(host);
        let err = outbound.send(&GuestMessage::Ready).unwrap_err();
        assert!(matches!(err, SendError::Broken(_)), "{err}");
        assert!(matches!(
            outbound.send(&GuestMessage::Heartbeat),
            Err(SendError::Broken(_))
        ));
        assert!(broken.try_recv().unwrap().contains("Ready"));
        assert!(broken.try_recv().is_err(), "reported once");
        assert!(!outbound.is_open());
    }
}
