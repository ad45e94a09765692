//! The output pump of one step: reads the step's stdout and stderr pipes as
//! output is produced, masks secrets, and sends log chunks to the host.
//!
//! One thread polls both pipes, so chunks go out in the order the bytes
//! became readable. Memory is bounded: one 64 KiB read buffer, the masked
//! bytes of that read, and each masker's held-back tail. The send blocks
//! while the host is slow; meanwhile nothing reads the pipes, so the step
//! blocks in `write(2)` once the kernel's 64 KiB pipe buffer is full.
//!
//! The pump ends when both pipes reach end-of-file, that is when the step's
//! shell *and* everything it started that still holds the pipes are gone.
//! A step may leave a background process running (a daemon for later
//! steps): the supervisor then stops waiting for the pump once it has been
//! idle for a moment after the shell exited (see `runner`), and the pump
//! carries on in the background, still labelling its chunks with its step,
//! until the job's end kills the process.

use std::io::{ErrorKind, Read};
use std::os::fd::AsFd;
use std::process::{ChildStderr, ChildStdout};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use protocol::limits::MAX_LOG_CHUNK_BYTES;
use protocol::message::OutputStream;

use crate::channel::outbound::Outbound;
use crate::mask::{Masker, SecretSet};

/// How often a pump waiting for output checks whether it was abandoned.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What the supervisor can see of a running pump.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last read that returned data.
    last_read_ms: AtomicU64,
    /// Whether the pump is between "a pipe is readable" and "what was read
    /// is sent" (reading, masking, or blocked sending to the host).
    busy: AtomicBool,
    /// Set by the supervisor: stop sending and exit.
    abandoned: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_read_ms: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_read_ms.store(ms, Ordering::SeqCst);
    }

    /// Whether the pump has been waiting on empty pipes for at least
    /// `quiet`: everything written more than `quiet` ago has been sent.
    pub fn is_idle_for(&self, quiet: Duration) -> bool {
        let last = Duration::from_millis(self.last_read_ms.load(Ordering::SeqCst));
        !self.busy.load(Ordering::SeqCst) && self.epoch.elapsed().saturating_sub(last) >= quiet
    }
}

/// Handle on a running pump.
#[derive(Debug)]
pub struct Pump {
    step: u32,
    activity: Arc<Activity>,
    thread: Option<JoinHandle<()>>,
    closed: bool,
}

impl Pump {
    /// Starts pumping `step`'s pipes; `on_closed` runs when both reached
    /// end-of-file (or the pump was abandoned or the channel failed).
    pub fn start(
        step: u32,
        stdout: ChildStdout,
        stderr: ChildStderr,
        secrets: Arc<SecretSet>,
        outbound: Outbound,
        on_closed: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Self> {
        let activity = Arc::new(Activity::new());
        let shared = Arc::clone(&activity);
        let thread = thread::Builder::new()
            .name(format!("pump-{step}"))
            .spawn(move || {
                let mut pipes = [
                    Pipe::new(Box::new(stdout), OutputStream::Stdout, &secrets),
                    Pipe::new(Box::new(stderr), OutputStream::Stderr, &secrets),
                ];
                pump(step, &mut pipes, &outbound, &shared);
                on_closed();
            })?;
        Ok(Self {
            step,
            activity,
            thread: Some(thread),
            closed: false,
        })
    }

    /// The step this pump reads.
    pub fn step(&self) -> u32 {
        self.step
    }

    /// What the pump is doing.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Records that the pump reported its end.
    pub fn mark_closed(&mut self) {
        self.closed = true;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(step = self.step, "an output pump panicked");
        }
    }

    /// Whether the pump reported its end.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Tells the pump to stop at its next wakeup without sending more.
    pub fn abandon(&self) {
        self.activity.abandoned.store(true, Ordering::Relaxed);
    }
}

/// Readable end of one pipe of the step, with its masker.
struct Pipe {
    reader: Option<Box<dyn ReadFd>>,
    stream: OutputStream,
    masker: Masker,
}

/// A pipe end we can both poll and read.
trait ReadFd: Read + AsFd + Send {}
impl<T: Read + AsFd + Send> ReadFd for T {}

impl Pipe {
    fn new(reader: Box<dyn ReadFd>, stream: OutputStream, secrets: &Arc<SecretSet>) -> Self {
        Self {
            reader: Some(reader),
            stream,
            masker: Masker::new(Arc::clone(secrets)),
        }
    }
}

/// The pump loop; returns when both pipes are closed, the pump was
/// abandoned, or the channel can no longer take output.
fn pump(step: u32, pipes: &mut [Pipe; 2], outbound: &Outbound, activity: &Activity) {
    let mut buf = vec![0u8; MAX_LOG_CHUNK_BYTES];
    let mut masked = Vec::with_capacity(MAX_LOG_CHUNK_BYTES);
    while pipes.iter().any(|p| p.reader.is_some()) {
        if activity.abandoned.load(Ordering::Relaxed) {
            return;
        }
        let ready = match wait_readable(pipes) {
            Ok(ready) if ready.contains(&true) => {
                activity.busy.store(true, Ordering::SeqCst);
                ready
            }
            Ok(ready) => ready,
            Err(Errno::EINTR) => continue,
            Err(err) => {
                tracing::error!(step, error = %err, "poll on the step's pipes failed");
                return;
            }
        };
        for (pipe, readable) in pipes.iter_mut().zip(ready) {
            if !readable {
                continue;
            }
            let Some(reader) = pipe.reader.as_mut() else {
                continue;
            };
            masked.clear();
            match reader.read(&mut buf) {
                Ok(0) => {
                    pipe.masker.finish(&mut masked);
                    pipe.reader = None;
                }
                Ok(n) => pipe.masker.push(&buf[..n], &mut masked),
                Err(err)
                    if matches!(err.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) =>
                {
                    continue;
                }
                Err(err) => {
                    tracing::warn!(step, error = %err, "reading the step's output failed");
                    pipe.masker.finish(&mut masked);
                    pipe.reader = None;
                }
            }
            if masked.is_empty() || activity.abandoned.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(err) = outbound.send_log(step, pipe.stream, &masked) {
                tracing::debug!(step, error = %err, "output pump stops");
                return;
            }
        }
        if ready.contains(&true) {
            // Touch before clearing `busy`, so an observer never sees an
            // idle, stale pump that has in fact just sent output.
            activity.touch();
            activity.busy.store(false, Ordering::SeqCst);
        }
    }
}

/// Waits (at most [`POLL_INTERVAL`]) until a pipe is readable or closed.
fn wait_readable(pipes: &[Pipe; 2]) -> Result<[bool; 2], Errno> {
    let mut slots = [None, None];
    let mut fds = Vec::with_capacity(2);
    for (i, pipe) in pipes.iter().enumerate() {
        if let Some(reader) = &pipe.reader {
            slots[i] = Some(fds.len());
            fds.push(PollFd::new(reader.as_fd(), PollFlags::POLLIN));
        }
    }
    let timeout = PollTimeout::try_from(POLL_INTERVAL).unwrap_or(PollTimeout::NONE);
    poll(&mut fds, timeout)?;
    let mut ready = [false; 2];
    for (i, slot) in slots.iter().enumerate() {
        if let Some(index) = slot {
            ready[i] = fds[*index]
                .revents()
                .is_some_and(|events| !events.is_empty());
        }
    }
    Ok(ready)
}
