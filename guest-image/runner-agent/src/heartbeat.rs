//! Periodic `Heartbeat` frames, so the host can tell a quiet job from a dead
//! guest (it gives up after [`protocol::session::HEARTBEAT_TIMEOUT`]).

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::channel::outbound::Outbound;

/// The running heartbeat thread; [`Heartbeat::stop`] ends it.
#[derive(Debug)]
pub struct Heartbeat {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Heartbeat {
    /// Sends a heartbeat through `outbound` every `interval` until stopped
    /// or until the channel is closed or broken.
    pub fn start(outbound: Outbound, interval: Duration) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    if let Err(err) = outbound.heartbeat() {
                        tracing::debug!(error = %err, "heartbeat stops");
                        return;
                    }
                }
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops the thread and waits for it (at most one frame write).
    pub fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            tracing::error!("the heartbeat thread panicked");
        }
    }
}
