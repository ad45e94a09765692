//! The output pump of one step: reads the step's stdout and stderr pipes as
//! output is produced, masks secrets, and sends log chunks to the host.
//!
//! One thread polls both pipes, so chunks go out in the order the bytes
//! became readable. Memory is bounded: one 64 KiB read buffer, the masked
//! bytes of that read, and each masker's held-back tail. The send blocks
//! while the host is slow; meanwhile nothing reads the pipes, so the step
//! blocks in `write(2)` once the kernel's 64 KiB pipe buffer is full.
//!
//! # Coalescing
//!
//! A writer in full flow (`yes | head`, a chatty build) writes in 4 KiB
//! pieces, and on a small VM the pump wakes for each one. One chunk per
//! piece costs a frame, a vsock packet, a queue notification and an
//! interrupt each: 16 times what 64 KiB chunks cost. So while output
//! flows, that is when the stream's previous chunk went out less than
//! [`COALESCE_WINDOW`] ago, a read waits up to that window for more of the
//! same stream, until the buffer is full, the pipe ends, or the *other*
//! pipe has output (its bytes must not go out late). A line after a quiet
//! spell still goes out at once; a flood adds at most the window to each
//! chunk's latency.
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

/// How long a read of a stream in full flow waits for more of it before
/// the chunk goes out (see "Coalescing" above): short against a human
/// reading logs, long against the 4 KiB writes of a flood.
const COALESCE_WINDOW: Duration = Duration::from_millis(10);

/// Whether a stream whose previous chunk went out at `last_sent` is in
/// full flow at `now`, so that a read should wait for more of it.
fn in_full_flow(last_sent: Option<Instant>, now: Instant) -> bool {
    last_sent.is_some_and(|sent| now.saturating_duration_since(sent) < COALESCE_WINDOW)
}

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
    /// When this stream's last chunk went out.
    last_sent: Option<Instant>,
}

/// How a pipe's read ended it.
enum PipeEnd {
    /// End of file: everything holding the write end is gone.
    Eof,
    /// Reading failed.
    Failed(std::io::Error),
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
            last_sent: None,
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
        let ready = match wait_readable(pipes, POLL_INTERVAL) {
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
        for (index, readable) in ready.into_iter().enumerate() {
            if !readable || pipes[index].reader.is_none() {
                continue;
            }
            let (filled, end) = read_chunk(pipes, index, &mut buf);
            let pipe = &mut pipes[index];
            masked.clear();
            pipe.masker.push(&buf[..filled], &mut masked);
            if let Some(end) = end {
                if let PipeEnd::Failed(err) = end {
                    tracing::warn!(step, error = %err, "reading the step's output failed");
                }
                pipe.masker.finish(&mut masked);
                pipe.reader = None;
            }
            if masked.is_empty() || activity.abandoned.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(err) = outbound.send_log(step, pipe.stream, &masked) {
                tracing::debug!(step, error = %err, "output pump stops");
                return;
            }
            pipe.last_sent = Some(Instant::now());
        }
        if ready.contains(&true) {
            // Touch before clearing `busy`, so an observer never sees an
            // idle, stale pump that has in fact just sent output.
            activity.touch();
            activity.busy.store(false, Ordering::SeqCst);
        }
    }
}

/// Reads what `pipes[index]` has into `buf` and, while the stream is in
/// full flow (see "Coalescing"), keeps reading until `buf` is full, the
/// window closes, the other pipe has output, or the pipe ends. Returns
/// the bytes read and how the pipe ended, if it did.
fn read_chunk(pipes: &mut [Pipe; 2], index: usize, buf: &mut [u8]) -> (usize, Option<PipeEnd>) {
    let started = Instant::now();
    let flowing = in_full_flow(pipes[index].last_sent, started);
    let mut filled = 0;
    loop {
        let Some(reader) = pipes[index].reader.as_mut() else {
            return (filled, None);
        };
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return (filled, Some(PipeEnd::Eof)),
            Ok(n) => filled += n,
            Err(err) if matches!(err.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            Err(err) => return (filled, Some(PipeEnd::Failed(err))),
        }
        let left = COALESCE_WINDOW.saturating_sub(started.elapsed());
        if !flowing || filled == buf.len() || left.is_zero() {
            return (filled, None);
        }
        match wait_readable(pipes, left) {
            Ok(ready) if ready[index] && !ready[1 - index] => {}
            _ => return (filled, None),
        }
    }
}

/// Waits (at most `timeout`) until a pipe is readable or closed.
fn wait_readable(pipes: &[Pipe; 2], timeout: Duration) -> Result<[bool; 2], Errno> {
    let mut slots = [None, None];
    let mut fds = Vec::with_capacity(2);
    for (i, pipe) in pipes.iter().enumerate() {
        if let Some(reader) = &pipe.reader {
            slots[i] = Some(fds.len());
            fds.push(PollFd::new(reader.as_fd(), PollFlags::POLLIN));
        }
    }
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::NONE);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stream_that_sent_within_the_window_is_in_full_flow() {
        let now = Instant::now();
        assert!(!in_full_flow(None, now), "a first read goes out at once");
        assert!(in_full_flow(Some(now), now));
        assert!(in_full_flow(Some(now - COALESCE_WINDOW / 2), now));
        assert!(!in_full_flow(Some(now - COALESCE_WINDOW), now));
        assert!(!in_full_flow(Some(now - Duration::from_secs(1)), now));
    }
}
