//! The order of the conversation: handshake, and the host's checker of
//! everything the guest says.
//!
//! Frames that decode and validate can still be nonsense in context: a second
//! `Hello`, a log chunk before the job was sent, step 3 starting before step
//! 2 finished, a gap in log sequence numbers. The guest is untrusted, so the
//! host agent runs every guest message through a [`HostSession`], a sans-IO
//! state machine, and on the first error closes the channel and fails the
//! job with that error as its reason.
//!
//! ```text
//!  AwaitingHello --Hello--> AwaitingReady --Ready--> Ready --(host sends Job)--> Running
//!  Running: StepStarted(n) LogChunk* StepFinished(n), n = 0, 1, ...; then JobFinished --> Finished
//!  Heartbeat is accepted in every phase after Hello.
//! ```

use std::fmt;
use std::io::{Read, Write};
use std::time::Duration;

use crate::frame::{FrameError, read_frame, write_frame};
use crate::message::{
    GuestHello, GuestMessage, HostMessage, Job, JobFinished, JobResult, PROTOCOL_VERSION,
    WireMessage,
};
use crate::validation::Violations;

/// How often the runner agent sends `Heartbeat`.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// How long the host waits without any guest message before declaring the
/// guest dead (six missed heartbeats).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the conversation cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Reading, writing or decoding a frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A message that is not allowed at this point of the conversation.
    #[error("unexpected {got} message while {phase}")]
    UnexpectedMessage {
        /// The message's variant.
        got: &'static str,
        /// Where the conversation was.
        phase: Phase,
    },
    /// The host refused the guest's `Hello`.
    #[error("host rejected hello: {reason} (host speaks protocol version {supported_version})")]
    Rejected {
        /// The host's reason.
        reason: String,
        /// Version the host speaks.
        supported_version: u16,
    },
    /// A step started out of order, or while another step was running.
    #[error("step {got} started, expected step {expected}")]
    StepOutOfOrder {
        /// The step that may start now.
        expected: u32,
        /// The step the guest started.
        got: u32,
    },
    /// An event names a step that is not running (or has not started).
    #[error("{event} for step {step}, which is not {wanted}")]
    StepNotRunning {
        /// The message's variant.
        event: &'static str,
        /// The step it named.
        step: u32,
        /// What the step should have been ("running" or "started").
        wanted: &'static str,
    },
    /// A log chunk's sequence number is not the next one.
    #[error("log chunk seq {got}, expected {expected}")]
    SeqGap {
        /// The next expected sequence number.
        expected: u64,
        /// The one received.
        got: u64,
    },
    /// `JobFinished` contradicts the steps reported before it.
    #[error("job finished as {result} after {finished} of {count} steps finished")]
    InconsistentResult {
        /// The reported result (its variant).
        result: &'static str,
        /// Steps that finished.
        finished: u32,
        /// Steps in the job.
        count: u32,
    },
    /// The host tried to send a job that breaks the protocol's bounds.
    #[error("invalid job: {0}")]
    InvalidJob(Violations),
}

/// Where a conversation is, from the host's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connected; the guest must say `Hello`.
    AwaitingHello,
    /// Handshake done; the guest is setting up.
    AwaitingReady,
    /// The guest is ready; the host may send the job.
    Ready,
    /// The job was sent and is running.
    Running,
    /// The guest reported `JobFinished`.
    Finished,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AwaitingHello => "awaiting Hello",
            Self::AwaitingReady => "awaiting Ready",
            Self::Ready => "awaiting the job",
            Self::Running => "running the job",
            Self::Finished => "finished",
        })
    }
}

/// Host-side checker of the guest's messages (sans-IO).
#[derive(Debug)]
pub struct HostSession {
    phase: Phase,
    hello: Option<GuestHello>,
    step_count: u32,
    next_step: u32,
    running: Option<u32>,
    next_seq: u64,
}

impl Default for HostSession {
    fn default() -> Self {
        Self::new()
    }
}

impl HostSession {
    /// A session for a freshly accepted connection.
    pub fn new() -> Self {
        Self {
            phase: Phase::AwaitingHello,
            hello: None,
            step_count: 0,
            next_step: 0,
            running: None,
            next_seq: 0,
        }
    }

    /// Where the conversation is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The guest's `Hello`, once received.
    pub fn hello(&self) -> Option<&GuestHello> {
        self.hello.as_ref()
    }

    /// The answer to send when the guest's first frame failed to decode with
    /// `err`: `HelloRejected` for an unknown version, `None` otherwise (just
    /// close the channel).
    pub fn rejection_for(err: &FrameError) -> Option<HostMessage> {
        match err {
            FrameError::UnknownVersion { supported, .. } => Some(HostMessage::HelloRejected {
                reason: err.to_string(),
                supported_version: *supported,
            }),
            _ => None,
        }
    }

    /// Checks `msg` against the conversation so far and advances it. Returns
    /// the reply the protocol requires, if any (`HelloAck` after `Hello`).
    pub fn on_guest_message(
        &mut self,
        msg: &GuestMessage,
    ) -> Result<Option<HostMessage>, SessionError> {
        match (self.phase, msg) {
            (Phase::AwaitingHello, GuestMessage::Hello(hello)) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    return Err(FrameError::UnknownVersion {
                        offered: hello.protocol_version,
                        supported: PROTOCOL_VERSION,
                    }
                    .into());
                }
                self.hello = Some(hello.clone());
                self.phase = Phase::AwaitingReady;
                return Ok(Some(HostMessage::HelloAck {
                    protocol_version: PROTOCOL_VERSION,
                }));
            }
            (Phase::AwaitingHello, _) => return Err(self.unexpected(msg)),
            (_, GuestMessage::Heartbeat) => {}
            (Phase::AwaitingReady, GuestMessage::Ready) => self.phase = Phase::Ready,
            (Phase::Running, GuestMessage::StepStarted(started)) => {
                if self.running.is_some() || started.step != self.next_step {
                    return Err(SessionError::StepOutOfOrder {
                        expected: self.next_step,
                        got: started.step,
                    });
                }
                if started.step >= self.step_count {
                    return Err(self.not_running(msg, started.step, "in the job"));
                }
                self.running = Some(started.step);
                self.next_step += 1;
            }
            (Phase::Running, GuestMessage::LogChunk(chunk)) => {
                if chunk.step >= self.next_step {
                    return Err(self.not_running(msg, chunk.step, "started"));
                }
                if chunk.seq != self.next_seq {
                    return Err(SessionError::SeqGap {
                        expected: self.next_seq,
                        got: chunk.seq,
                    });
                }
                self.next_seq += 1;
            }
            (Phase::Running, GuestMessage::StepFinished(finished)) => {
                if self.running != Some(finished.step) {
                    return Err(self.not_running(msg, finished.step, "running"));
                }
                self.running = None;
            }
            (Phase::Running, GuestMessage::JobFinished(JobFinished { result })) => {
                self.check_result(result)?;
                self.phase = Phase::Finished;
            }
            _ => return Err(self.unexpected(msg)),
        }
        Ok(None)
    }

    /// Records that the host is about to send `job`. Fails unless the guest
    /// is `Ready` and the job is valid.
    pub fn on_job_sent(&mut self, job: &Job) -> Result<(), SessionError> {
        if self.phase != Phase::Ready {
            return Err(SessionError::UnexpectedMessage {
                got: "Job",
                phase: self.phase,
            });
        }
        job.validate().map_err(SessionError::InvalidJob)?;
        self.step_count = u32::try_from(job.steps.len()).unwrap_or(u32::MAX);
        self.phase = Phase::Running;
        Ok(())
    }

    fn check_result(&self, result: &JobResult) -> Result<(), SessionError> {
        let finished = match self.running {
            Some(_) => self.next_step - 1,
            None => self.next_step,
        };
        let inconsistent = |name| SessionError::InconsistentResult {
            result: name,
            finished,
            count: self.step_count,
        };
        match result {
            JobResult::Succeeded if finished != self.step_count => Err(inconsistent("Succeeded")),
            JobResult::Failed { step } if *step >= self.next_step => {
                Err(self.not_running_named("JobFinished(Failed)", *step, "started"))
            }
            JobResult::TimedOut { step } if *step >= self.step_count => {
                Err(self.not_running_named("JobFinished(TimedOut)", *step, "in the job"))
            }
            _ => Ok(()),
        }
    }

    fn unexpected(&self, msg: &GuestMessage) -> SessionError {
        SessionError::UnexpectedMessage {
            got: msg.kind(),
            phase: self.phase,
        }
    }

    fn not_running(&self, msg: &GuestMessage, step: u32, wanted: &'static str) -> SessionError {
        self.not_running_named(msg.kind(), step, wanted)
    }

    fn not_running_named(
        &self,
        event: &'static str,
        step: u32,
        wanted: &'static str,
    ) -> SessionError {
        SessionError::StepNotRunning {
            event,
            step,
            wanted,
        }
    }
}

/// Guest side of the handshake (blocking): sends `hello`, waits for the
/// host's answer. `Ok` means the host accepted [`PROTOCOL_VERSION`].
pub fn guest_handshake(
    stream: &mut (impl Read + Write),
    hello: GuestHello,
) -> Result<(), SessionError> {
    write_frame(stream, &GuestMessage::Hello(hello))?;
    match read_frame::<HostMessage>(stream)? {
        HostMessage::HelloAck { .. } => Ok(()),
        HostMessage::HelloRejected {
            reason,
            supported_version,
        } => Err(SessionError::Rejected {
            reason,
            supported_version,
        }),
        other => Err(SessionError::UnexpectedMessage {
            got: other.kind(),
            phase: Phase::AwaitingHello,
        }),
    }
}

#[cfg(test)]
mod tests;
