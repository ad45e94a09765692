//! The idle watch: while a warm VM long-polls the orchestrator for a job,
//! its guest channel is read too, so a guest that dies or wedges while it
//! waits is found before a job is handed to it, not 30 s into the job.
//!
//! The runner agent sends `Heartbeat` from `Ready` on. A guest silent for
//! [`Tuning::idle_silence`](crate::pool::Tuning) (no frame at all), a
//! closed or broken channel, or an exited VMM ends the wait; the pool then
//! releases the VM at the orchestrator (no job is handed to it any more,
//! and one matched to it meanwhile goes back to the queue) and replaces it.
//!
//! When a job does arrive, [`deliver`] sends it only to a guest still
//! alive; a job it could not deliver never reached the guest, and the pool
//! hands it back to the orchestrator's queue rather than failing it.

use std::time::Duration;

use futures_util::FutureExt;
use orchestrator::client::ClientError;
use protocol::api::{VmId, VmToken};
use protocol::message::Job;
use tokio::time::Instant;

use crate::pool::Shared;
use crate::relay::EXIT_SETTLE;
use crate::vm::{ChannelError, GuestChannel, RunningVm};

/// Long-poll wait per acquire request, in seconds.
const ACQUIRE_WAIT_SECS: u32 = 20;

/// How long sending the job may take before the guest counts as not
/// reading (the frame is far smaller than the socket buffers).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a warm VM stopped waiting without a job.
#[derive(Debug, thiserror::Error)]
pub enum IdleEnd {
    /// No frame from the guest (not even a heartbeat) for this long.
    #[error("guest silent for {0:?} while idle")]
    Silent(Duration),
    /// The guest closed the channel or broke the protocol.
    #[error("runner-agent channel failed while idle: {0}")]
    Channel(ChannelError),
    /// The VMM exited.
    #[error("vm exited with {status} while idle{detail}")]
    Exited {
        /// How it exited.
        status: String,
        /// The tail of its log, if any.
        detail: String,
    },
    /// The agent stops taking jobs.
    #[error("agent is draining")]
    Draining,
    /// The long poll failed.
    #[error("acquiring a job failed: {0}")]
    Acquire(ClientError),
}

impl IdleEnd {
    /// Whether the guest (or its VMM) is what ended the wait.
    pub fn guest_died(&self) -> bool {
        matches!(
            self,
            Self::Silent(_) | Self::Channel(_) | Self::Exited { .. }
        )
    }
}

/// Long-polls until the orchestrator hands this VM a job, reading the
/// guest channel meanwhile: fails when the guest is silent for `silence`,
/// its channel fails, the VMM exits or the agent starts draining. A poll
/// that returns nothing is followed by the next without dropping it early,
/// so a heartbeat never cuts a poll short.
pub async fn wait_for_job(
    shared: &Shared,
    vm: &mut RunningVm,
    channel: &mut GuestChannel,
    vm_id: &VmId,
    token: &VmToken,
    silence: Duration,
) -> Result<Job, IdleEnd> {
    let mut draining = shared.draining.clone();
    let acquire = || shared.client.acquire(vm_id, token, ACQUIRE_WAIT_SECS);
    let mut poll = Box::pin(acquire());
    let mut last_heard = Instant::now();
    let failed = loop {
        tokio::select! {
            r = &mut poll => match r {
                Ok(Some(job)) => return Ok(job),
                Ok(None) => poll = Box::pin(acquire()),
                Err(e) => {
                    shared.metrics.orchestrator_errors.inc();
                    return Err(IdleEnd::Acquire(e));
                }
            },
            msg = channel.recv() => match msg {
                // The session lets nothing but heartbeats through here.
                Ok(_) => last_heard = Instant::now(),
                Err(e) => break e,
            },
            status = vm.exited() => {
                return Err(IdleEnd::Exited { status, detail: vm.log_tail() });
            }
            () = tokio::time::sleep_until(last_heard + silence) => {
                return Err(IdleEnd::Silent(silence));
            }
            _ = draining.wait_for(|d| *d) => return Err(IdleEnd::Draining),
        }
    };
    // A dying VMM takes the guest's socket with it: its exit, if it
    // follows, is the cause.
    match tokio::time::timeout(EXIT_SETTLE, vm.exited()).await {
        Ok(status) => Err(IdleEnd::Exited {
            status,
            detail: vm.log_tail(),
        }),
        Err(_) => Err(IdleEnd::Channel(failed)),
    }
}

/// Why a job did not reach the guest.
#[derive(Debug, thiserror::Error)]
pub enum NotDelivered {
    /// The channel had already failed (or failed while sending).
    #[error("runner-agent channel failed: {0}")]
    Channel(#[from] ChannelError),
    /// The VMM had exited.
    #[error("vm exited with {0}")]
    Exited(String),
    /// The guest did not take the frame in time.
    #[error("the guest did not read the job within {0:?}")]
    Stalled(Duration),
}

/// Sends `job` to the guest unless it is found dead first: reads what the
/// guest sent since the last look (heartbeats, or the end of the channel)
/// and checks the VMM. An error means the job never reached the guest.
pub async fn deliver(
    vm: &mut RunningVm,
    channel: &mut GuestChannel,
    job: &Job,
) -> Result<(), NotDelivered> {
    // `recv` is cancel-safe: a frame read in part stays buffered.
    while let Some(msg) = channel.recv().now_or_never() {
        msg?;
    }
    if let Some(status) = vm.exited().now_or_never() {
        return Err(NotDelivered::Exited(status));
    }
    match tokio::time::timeout(SEND_TIMEOUT, channel.send_job(job)).await {
        Ok(sent) => Ok(sent?),
        Err(_) => Err(NotDelivered::Stalled(SEND_TIMEOUT)),
    }
}
