//! The agent's life, after the guest setup: dial the host, say hello, take
//! one job, run it, report, and leave.
//!
//! ```text
//! connect (retry) -> Hello/HelloAck -> Ready -> wait for Job
//!   -> run the job (or report the setup failure as JobFinished{Error})
//!   -> JobFinished -> close our direction -> wait (linger) for the host to close
//! ```
//!
//! Threads: the reaper, the host reader, the heartbeat, one output pump per
//! step, and this one (the supervisor). A lost channel at any point ends
//! the job at once: there is nobody left to report to, and the caller
//! powers the VM off.

use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use protocol::message::{GuestMessage, HostMessage, Job, JobResult, WireMessage};

use crate::channel::inbound::{self, Inbound};
use crate::channel::outbound::Outbound;
use crate::channel::{self, HostStream};
use crate::config::AgentConfig;
use crate::heartbeat::Heartbeat;
use crate::init::SetupReport;
use crate::reaper::Reaper;
use crate::runner::{self, Event, JobEnd, JobIo};

/// How the agent's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentExit {
    /// The job ended and the host was told how (`JobFinished`).
    JobFinished(JobResult),
    /// The host asked for the VM to power off.
    Shutdown,
    /// The host could not be reached, refused us, broke the protocol or
    /// went away; the job (if any) was killed.
    HostLost(String),
    /// The agent itself could not work (a thread could not start...).
    Internal(String),
}

impl AgentExit {
    /// Process exit status when the agent is not PID 1: 0 when the run
    /// ended as the protocol intends (job reported, or shutdown requested).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::JobFinished(_) | Self::Shutdown => 0,
            Self::HostLost(_) | Self::Internal(_) => 1,
        }
    }
}

/// Runs the agent until its one job is over; `setup` carries the problems
/// of the guest setup (a fatal one fails the job).
pub fn run(config: &AgentConfig, setup: &SetupReport) -> AgentExit {
    let reaper = match Reaper::start() {
        Ok(reaper) => reaper,
        Err(err) => return AgentExit::Internal(format!("cannot start the reaper: {err}")),
    };
    if !config.init
        && let Err(err) = nix::sys::prctl::set_child_subreaper(true)
    {
        tracing::warn!(error = %err, "cannot become a child subreaper; orphans escape cleanup");
    }
    let started = Instant::now();
    let stream = match open_channel(config) {
        Ok(stream) => stream,
        Err(err) => return AgentExit::HostLost(err),
    };
    tracing::info!(elapsed = ?started.elapsed(), "handshake done");
    match serve(config, setup, stream, &reaper) {
        Ok(exit) | Err(exit) => exit,
    }
}

/// Dials the host and completes the handshake.
fn open_channel(config: &AgentConfig) -> Result<HostStream, String> {
    let mut stream =
        channel::connect(&config.endpoint, config.connect_budget).map_err(|err| err.to_string())?;
    stream
        .set_send_timeout(Some(config.send_stall_timeout))
        .map_err(|err| format!("cannot set the send timeout: {err}"))?;
    channel::handshake(&mut stream, config.handshake_timeout).map_err(|err| err.to_string())?;
    Ok(stream)
}

/// Everything after the handshake.
fn serve(
    config: &AgentConfig,
    setup: &SetupReport,
    stream: HostStream,
    reaper: &Reaper,
) -> Result<AgentExit, AgentExit> {
    let internal = |what: &str, err: io::Error| AgentExit::Internal(format!("{what}: {err}"));
    let (events_tx, events) = mpsc::channel::<Event>();
    let outbound = {
        let events_tx = events_tx.clone();
        let writer = stream
            .try_clone()
            .map_err(|err| internal("cannot clone the channel", err))?;
        Outbound::new(writer, move |reason| {
            let _ = events_tx.send(Event::ChannelEnded {
                reason,
                clean: false,
            });
        })
    };
    {
        let events_tx = events_tx.clone();
        inbound::spawn_reader(stream, move |inbound| {
            let event = match inbound {
                Inbound::Message(msg) => Event::Host(msg),
                Inbound::Ended { reason, clean } => Event::ChannelEnded { reason, clean },
            };
            let _ = events_tx.send(event);
        })
        .map_err(|err| internal("cannot start the host reader", err))?;
    }
    outbound
        .send(&GuestMessage::Ready)
        .map_err(|err| AgentExit::HostLost(err.to_string()))?;
    let heartbeat = Heartbeat::start(outbound.clone(), config.heartbeat_interval)
        .map_err(|err| internal("cannot start the heartbeat", err))?;

    let end = match wait_for_job(&events) {
        Ok(job) => {
            tracing::info!(job = %job.id, name = %job.name, "job received");
            match setup.failure_reason() {
                Some(reason) => JobEnd::Finished(runner::error_result(&reason)),
                None => runner::run_job(
                    &job,
                    &config.runner,
                    &JobIo {
                        outbound: &outbound,
                        events: &events,
                        events_tx: &events_tx,
                        reaper,
                    },
                ),
            }
        }
        Err(exit) => {
            heartbeat.stop();
            outbound.close();
            return Err(exit);
        }
    };
    heartbeat.stop();
    match end {
        JobEnd::Finished(result) => match outbound.finish(result.clone()) {
            Ok(()) => {
                linger(&events, config.linger);
                Ok(AgentExit::JobFinished(result))
            }
            Err(err) => Err(AgentExit::HostLost(err.to_string())),
        },
        JobEnd::Shutdown => {
            outbound.close();
            Ok(AgentExit::Shutdown)
        }
        JobEnd::ChannelLost(reason) => {
            outbound.close();
            Err(AgentExit::HostLost(reason))
        }
    }
}

/// Waits for the host's `Job`, or for the reason there will be none.
fn wait_for_job(events: &Receiver<Event>) -> Result<Job, AgentExit> {
    loop {
        match events.recv() {
            Ok(Event::Host(HostMessage::Job(job))) => return Ok(job),
            Ok(Event::Host(HostMessage::Shutdown)) => return Err(AgentExit::Shutdown),
            Ok(Event::Host(HostMessage::Cancel { reason })) => {
                tracing::warn!(%reason, "Cancel before any job; ignored");
            }
            Ok(Event::Host(other)) => {
                return Err(AgentExit::HostLost(format!(
                    "protocol violation: host sent {} while we waited for the job",
                    other.kind()
                )));
            }
            Ok(Event::ChannelEnded { reason, .. }) => return Err(AgentExit::HostLost(reason)),
            Ok(Event::ChildExited { .. } | Event::OutputClosed { .. }) => {}
            Err(_) => return Err(AgentExit::HostLost("event channel closed".into())),
        }
    }
}

/// After `JobFinished`: give the host up to `linger` to read everything
/// and close (or say `Shutdown`), so ending the VM cannot cut off the last
/// frames in flight.
fn linger(events: &Receiver<Event>, linger: Duration) {
    let until = Instant::now() + linger;
    loop {
        match events.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(Event::ChannelEnded { .. } | Event::Host(HostMessage::Shutdown)) => return,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {
                tracing::info!(
                    ?linger,
                    "host did not close after JobFinished; leaving anyway"
                );
                return;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
