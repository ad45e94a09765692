//! Messages exchanged over the runner-agent vsock channel.
//!
//! The guest (runner agent) speaks [`GuestMessage`], the host agent speaks
//! [`HostMessage`]. Each message travels in one frame (see [`crate::frame`]).
//!
//! # Conversation
//!
//! ```text
//! guest                                   host
//!   Hello{protocol_version, ...}  ---->
//!                                 <----   HelloAck{protocol_version} | HelloRejected
//!   Ready                         ---->
//!                                 <----   Job{id, steps, env, secrets, timeout}
//!   StepStarted{0} / LogChunk* / StepFinished{0} / ... / JobFinished
//!   Heartbeat (any time after Hello)
//!                                 <----   Cancel (any time during the job), Shutdown
//! ```
//!
//! # Versioning
//!
//! The guest announces the one version it speaks in `Hello`; the host answers
//! `HelloAck` with that same version or `HelloRejected`. Variant 0 of both
//! enums is the handshake message and its first field is the protocol version;
//! that prefix is frozen for all versions, so a peer can always read the
//! version of a message whose remaining layout it does not know (see
//! [`WireMessage::announced_version`]). `HelloRejected` (variant 1 of
//! [`HostMessage`]) is frozen as well, so a rejected guest learns why.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::limits;
use crate::validation::{Checker, Problem, Violations};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// A job's identifier, assigned by the orchestrator. Safe to use as a file
/// name: ASCII letters, digits, `.`, `_`, `-` (see [`crate::validation::is_identifier`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub String);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Secret values by name, supplied at job submission. Never printed: the
/// `Debug` impl shows the names only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secrets(pub BTreeMap<String, String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|name| (name, "<redacted>")))
            .finish()
    }
}

impl Secrets {
    /// Checks names (environment variable names) and values (non-empty, bounded).
    pub fn validate(&self) -> Result<(), Violations> {
        let mut checker = Checker::new();
        self.check(&mut checker, "secrets");
        checker.finish()
    }

    pub(crate) fn check(&self, checker: &mut Checker, path: &str) {
        checker.count(path, self.0.len(), limits::MAX_SECRETS);
        for (name, value) in &self.0 {
            let entry = format!("{path}[{name:?}]");
            checker.env_name(&entry, name);
            // Values are never echoed in errors; only the path is.
            if value.is_empty() {
                checker.report(&entry, Problem::Empty);
            } else if value.len() > limits::MAX_SECRET_VALUE_LEN {
                checker.report(
                    &entry,
                    Problem::TooLong {
                        len: value.len(),
                        max: limits::MAX_SECRET_VALUE_LEN,
                    },
                );
            } else if value.contains('\0') {
                checker.report(&entry, Problem::ContainsNul);
            }
        }
    }
}

/// A message from the runner agent (guest) to the host agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// First message on every connection. Must stay variant 0.
    Hello(GuestHello),
    /// The guest is set up and can take its job.
    Ready,
    /// A piece of a step's output.
    LogChunk(LogChunk),
    /// A step began.
    StepStarted(StepStarted),
    /// A step ended.
    StepFinished(StepFinished),
    /// The job ended; the last job message of the connection.
    JobFinished(JobFinished),
    /// Liveness signal, sent every [`crate::session::HEARTBEAT_INTERVAL`].
    Heartbeat,
}

/// The guest's greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHello {
    /// Protocol version the guest speaks. Must stay the first field.
    pub protocol_version: u16,
    /// Version of the runner agent binary.
    pub agent_version: String,
    /// The guest kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// The guest kernel release (`uname -r`).
    pub kernel_release: String,
}

/// Which output stream a log chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A piece of output of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    /// Index of the step in [`Job::steps`].
    pub step: u32,
    /// Stream the bytes were read from.
    pub stream: OutputStream,
    /// Per-job sequence number: 0 for the first chunk, then +1 per chunk.
    pub seq: u64,
    /// Output bytes (secrets already masked): at least one, at most
    /// [`limits::MAX_LOG_CHUNK_BYTES`]. Base64 in JSON.
    #[serde(with = "crate::bytes_serde")]
    pub data: Vec<u8>,
}

/// A step began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStarted {
    /// Index of the step in [`Job::steps`].
    pub step: u32,
    /// The step's name.
    pub name: String,
}

/// A step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepFinished {
    /// Index of the step in [`Job::steps`].
    pub step: u32,
    /// Exit status of the step's shell, if it exited normally.
    pub exit_code: Option<i32>,
    /// Signal that terminated the step's shell, if it was killed.
    pub signal: Option<i32>,
    /// Wall-clock duration of the step, in milliseconds.
    pub duration_ms: u64,
}

impl StepFinished {
    /// Whether the step succeeded (exited with status 0).
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// The job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFinished {
    /// How it ended.
    pub result: JobResult,
}

/// How a job ended, as seen by the runner agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobResult {
    /// Every step exited with status 0.
    Succeeded,
    /// A step failed (non-zero exit or killed by a signal); later steps did not run.
    Failed {
        /// Index of the failed step.
        step: u32,
    },
    /// A step or job timeout expired while this step ran.
    TimedOut {
        /// Index of the step that was running.
        step: u32,
    },
    /// The host sent [`HostMessage::Cancel`].
    Cancelled,
    /// The runner agent could not run the job (setup failure, bad job...).
    Error {
        /// What went wrong.
        reason: String,
    },
}

/// A message from the host agent to the runner agent (guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// Accepts the guest's `Hello`. Must stay variant 0.
    HelloAck {
        /// The accepted version (equal to the guest's). Must stay the first field.
        protocol_version: u16,
    },
    /// Refuses the guest's `Hello`; the host closes the channel. Must stay variant 1.
    HelloRejected {
        /// Why.
        reason: String,
        /// The version the host speaks.
        supported_version: u16,
    },
    /// The job to run. Sent once, after `Ready`.
    Job(Job),
    /// Stop the job now: kill the running step and report `Cancelled`.
    Cancel {
        /// Why (shown in the job's log).
        reason: String,
    },
    /// Power off the VM.
    Shutdown,
}

/// A job as sent to the guest: steps with their scripts, environment,
/// secrets and timeouts, all resolved (no defaults left to apply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The orchestrator's id of the job.
    pub id: JobId,
    /// Display name.
    pub name: String,
    /// Steps, run in order until one fails.
    pub steps: Vec<JobStep>,
    /// Environment of every step.
    pub env: BTreeMap<String, String>,
    /// Secret values; exported to steps and masked in their output.
    pub secrets: Secrets,
    /// Wall-clock limit of the whole job, in seconds.
    pub timeout_secs: u64,
}

/// One step of a [`Job`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStep {
    /// Display name.
    pub name: String,
    /// Shell script run with `sh -e`.
    pub run: String,
    /// Directory the script runs in (default: the job's workspace).
    pub working_directory: Option<String>,
    /// Environment added on top of [`Job::env`] for this step.
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit of this step, in seconds (default: the job's).
    pub timeout_secs: Option<u64>,
}

impl Job {
    /// Checks every bound of the job, including that it fits in one frame.
    pub fn validate(&self) -> Result<(), Violations> {
        let mut checker = Checker::new();
        checker.identifier("id", &self.id.0, limits::MAX_ID_LEN);
        checker.text("name", &self.name, limits::MAX_NAME_LEN, true);
        if self.steps.is_empty() {
            checker.report("steps", Problem::Empty);
        }
        checker.count("steps", self.steps.len(), limits::MAX_STEPS);
        for (i, step) in self.steps.iter().enumerate() {
            let path = format!("steps[{i}]");
            checker.text(
                &format!("{path}.name"),
                &step.name,
                limits::MAX_NAME_LEN,
                true,
            );
            checker.text(&format!("{path}.run"), &step.run, limits::MAX_RUN_LEN, true);
            if let Some(dir) = &step.working_directory {
                checker.text(
                    &format!("{path}.working_directory"),
                    dir,
                    limits::MAX_PATH_LEN,
                    true,
                );
            }
            checker.env(&format!("{path}.env"), &step.env);
            if let Some(secs) = step.timeout_secs {
                checker.timeout(&format!("{path}.timeout_secs"), secs, self.timeout_secs);
            }
        }
        checker.env("env", &self.env);
        self.secrets.check(&mut checker, "secrets");
        checker.timeout("timeout_secs", self.timeout_secs, limits::MAX_TIMEOUT_SECS);
        let frame_len = encoded_job_len(self);
        if frame_len > limits::MAX_FRAME_LEN {
            checker.report(
                "job",
                Problem::TooLong {
                    len: frame_len,
                    max: limits::MAX_FRAME_LEN,
                },
            );
        }
        checker.finish()
    }
}

/// Length of `HostMessage::Job(job)` encoded as a frame payload.
fn encoded_job_len(job: &Job) -> usize {
    /// Mirrors the encoding of `HostMessage::Job` without cloning the job.
    #[derive(Serialize)]
    enum Shape<'a> {
        _HelloAck,
        _HelloRejected,
        Job(&'a Job),
    }
    postcard::serialize_with_flavor(&Shape::Job(job), postcard::ser_flavors::Size::default())
        .unwrap_or(usize::MAX)
}

/// The two message directions; implemented by [`GuestMessage`] and
/// [`HostMessage`] only (sealed), so a frame cannot be read as the wrong type.
pub trait WireMessage: Serialize + DeserializeOwned + fmt::Debug + sealed::Sealed {
    /// Short name of the message's variant, for logs and errors.
    fn kind(&self) -> &'static str;

    /// Checks the message's own bounds (sizes, names, counts). State-dependent
    /// rules (step order, sequence numbers) are [`crate::session`]'s job.
    fn validate(&self) -> Result<(), Violations>;

    /// If `payload` encodes this direction's handshake message (variant 0),
    /// the protocol version it announces, read from the frozen prefix alone.
    fn announced_version(payload: &[u8]) -> Option<u16> {
        match postcard::take_from_bytes::<(u32, u16)>(payload) {
            Ok(((0, version), _)) => Some(version),
            _ => None,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::GuestMessage {}
    impl Sealed for super::HostMessage {}
}

impl WireMessage for GuestMessage {
    fn kind(&self) -> &'static str {
        match self {
            Self::Hello(_) => "Hello",
            Self::Ready => "Ready",
            Self::LogChunk(_) => "LogChunk",
            Self::StepStarted(_) => "StepStarted",
            Self::StepFinished(_) => "StepFinished",
            Self::JobFinished(_) => "JobFinished",
            Self::Heartbeat => "Heartbeat",
        }
    }

    fn validate(&self) -> Result<(), Violations> {
        let mut checker = Checker::new();
        match self {
            Self::Hello(hello) => {
                checker.text(
                    "hello.agent_version",
                    &hello.agent_version,
                    limits::MAX_ID_LEN,
                    false,
                );
                checker.text("hello.boot_id", &hello.boot_id, limits::MAX_ID_LEN, false);
                checker.text(
                    "hello.kernel_release",
                    &hello.kernel_release,
                    limits::MAX_ID_LEN,
                    false,
                );
            }
            Self::LogChunk(chunk) => chunk.check(&mut checker, "log_chunk"),
            Self::StepStarted(started) => started.check(&mut checker, "step_started"),
            Self::JobFinished(finished) => finished.check(&mut checker, "job_finished"),
            Self::Ready | Self::StepFinished(_) | Self::Heartbeat => {}
        }
        checker.finish()
    }
}

impl LogChunk {
    /// An empty chunk carries no output but still costs a frame, a relay
    /// batch slot and a line of the job's log: refused, so a hostile guest
    /// cannot stream nothing for free (the runner agent never sends one).
    pub(crate) fn check(&self, checker: &mut Checker, path: &str) {
        if self.data.is_empty() {
            checker.report(format!("{path}.data"), Problem::Empty);
        } else if self.data.len() > limits::MAX_LOG_CHUNK_BYTES {
            checker.report(
                format!("{path}.data"),
                Problem::TooLong {
                    len: self.data.len(),
                    max: limits::MAX_LOG_CHUNK_BYTES,
                },
            );
        }
    }
}

impl StepStarted {
    pub(crate) fn check(&self, checker: &mut Checker, path: &str) {
        checker.text(
            &format!("{path}.name"),
            &self.name,
            limits::MAX_NAME_LEN,
            false,
        );
    }
}

impl JobFinished {
    pub(crate) fn check(&self, checker: &mut Checker, path: &str) {
        if let JobResult::Error { reason } = &self.result {
            checker.text(
                &format!("{path}.reason"),
                reason,
                limits::MAX_REASON_LEN,
                false,
            );
        }
    }
}

impl WireMessage for HostMessage {
    fn kind(&self) -> &'static str {
        match self {
            Self::HelloAck { .. } => "HelloAck",
            Self::HelloRejected { .. } => "HelloRejected",
            Self::Job(_) => "Job",
            Self::Cancel { .. } => "Cancel",
            Self::Shutdown => "Shutdown",
        }
    }

    fn validate(&self) -> Result<(), Violations> {
        match self {
            Self::Job(job) => job.validate(),
            Self::HelloRejected { reason, .. } | Self::Cancel { reason } => {
                let mut checker = Checker::new();
                checker.text("reason", reason, limits::MAX_REASON_LEN, false);
                checker.finish()
            }
            Self::HelloAck { .. } | Self::Shutdown => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid job used across the crate's tests.
    pub(crate) fn sample_job() -> Job {
        Job {
            id: JobId("job-42".into()),
            name: "build".into(),
            steps: vec![
                JobStep {
                    name: "hello".into(),
                    run: "echo hello".into(),
                    working_directory: None,
                    env: BTreeMap::new(),
                    timeout_secs: None,
                },
                JobStep {
                    name: "test".into(),
                    run: "cargo test".into(),
                    working_directory: Some("/workspace/src".into()),
                    env: BTreeMap::from([("RUST_LOG".into(), "debug".into())]),
                    timeout_secs: Some(120),
                },
            ],
            env: BTreeMap::from([("CARGO_TERM_COLOR".into(), "always".into())]),
            secrets: Secrets(BTreeMap::from([("TOKEN".into(), "hunter2".into())])),
            timeout_secs: 600,
        }
    }

    /// One value of every message variant of both directions.
    pub(crate) fn every_guest_message() -> Vec<GuestMessage> {
        vec![
            GuestMessage::Hello(GuestHello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
                boot_id: "5d1b7b2e-1d7c-4a43-a0c4-0c8f3c1b9e11".into(),
                kernel_release: "6.1.0-kindling".into(),
            }),
            GuestMessage::Ready,
            GuestMessage::StepStarted(StepStarted {
                step: 0,
                name: "hello".into(),
            }),
            GuestMessage::LogChunk(LogChunk {
                step: 0,
                stream: OutputStream::Stdout,
                seq: 0,
                data: b"hello\n".to_vec(),
            }),
            GuestMessage::LogChunk(LogChunk {
                step: 0,
                stream: OutputStream::Stderr,
                seq: 1,
                data: vec![0, 0xff, 0x80, b'\n'],
            }),
            GuestMessage::StepFinished(StepFinished {
                step: 0,
                exit_code: Some(0),
                signal: None,
                duration_ms: 12,
            }),
            GuestMessage::StepFinished(StepFinished {
                step: 1,
                exit_code: None,
                signal: Some(9),
                duration_ms: 120_000,
            }),
            GuestMessage::Heartbeat,
            GuestMessage::JobFinished(JobFinished {
                result: JobResult::Succeeded,
            }),
            GuestMessage::JobFinished(JobFinished {
                result: JobResult::Failed { step: 1 },
            }),
            GuestMessage::JobFinished(JobFinished {
                result: JobResult::TimedOut { step: 1 },
            }),
            GuestMessage::JobFinished(JobFinished {
                result: JobResult::Cancelled,
            }),
            GuestMessage::JobFinished(JobFinished {
                result: JobResult::Error {
                    reason: "cannot mount /workspace".into(),
                },
            }),
        ]
    }

    pub(crate) fn every_host_message() -> Vec<HostMessage> {
        vec![
            HostMessage::HelloAck {
                protocol_version: PROTOCOL_VERSION,
            },
            HostMessage::HelloRejected {
                reason: "unsupported".into(),
                supported_version: PROTOCOL_VERSION,
            },
            HostMessage::Job(sample_job()),
            HostMessage::Cancel {
                reason: "cancelled by user".into(),
            },
            HostMessage::Shutdown,
        ]
    }

    #[test]
    fn every_message_round_trips_through_postcard_and_json() {
        for msg in every_guest_message() {
            let bytes = postcard::to_stdvec(&msg).unwrap();
            assert_eq!(postcard::from_bytes::<GuestMessage>(&bytes).unwrap(), msg);
            let json = serde_json::to_string(&msg).unwrap();
            assert_eq!(serde_json::from_str::<GuestMessage>(&json).unwrap(), msg);
            msg.validate().unwrap();
        }
        for msg in every_host_message() {
            let bytes = postcard::to_stdvec(&msg).unwrap();
            assert_eq!(postcard::from_bytes::<HostMessage>(&bytes).unwrap(), msg);
            let json = serde_json::to_string(&msg).unwrap();
            assert_eq!(serde_json::from_str::<HostMessage>(&json).unwrap(), msg);
            msg.validate().unwrap();
        }
    }

    #[test]
    fn an_empty_log_chunk_is_refused() {
        let empty = GuestMessage::LogChunk(LogChunk {
            step: 0,
            stream: OutputStream::Stdout,
            seq: 0,
            data: Vec::new(),
        });
        let err = empty.validate().unwrap_err();
        assert!(err.contains("log_chunk.data", &Problem::Empty), "{err}");
        assert_eq!(err.to_string(), "log_chunk.data: must not be empty");
        let one = GuestMessage::LogChunk(LogChunk {
            step: 0,
            stream: OutputStream::Stdout,
            seq: 0,
            data: vec![b'x'],
        });
        one.validate().unwrap();
    }

    #[test]
    fn log_bytes_are_compact_in_postcard_and_base64_in_json() {
        let chunk = LogChunk {
            step: 0,
            stream: OutputStream::Stdout,
            seq: 0,
            data: vec![0xAB; 1000],
        };
        let bytes = postcard::to_stdvec(&chunk).unwrap();
        assert!(bytes.len() < 1010, "postcard length {}", bytes.len());
        let json = serde_json::to_value(&chunk).unwrap();
        assert_eq!(
            json["data"].as_str().unwrap().len(),
            1336,
            "base64 of 1000 bytes"
        );
    }

    #[test]
    fn handshake_prefix_is_frozen() {
        // Variant 0, then the version as a varint: these bytes must never change.
        let hello = postcard::to_stdvec(&every_guest_message()[0]).unwrap();
        assert_eq!(&hello[..2], &[0, PROTOCOL_VERSION as u8]);
        assert_eq!(
            GuestMessage::announced_version(&hello),
            Some(PROTOCOL_VERSION)
        );
        let ack = postcard::to_stdvec(&every_host_message()[0]).unwrap();
        assert_eq!(ack, [0, PROTOCOL_VERSION as u8]);
        assert_eq!(HostMessage::announced_version(&ack), Some(PROTOCOL_VERSION));
        assert_eq!(GuestMessage::announced_version(&[1]), None);
    }

    #[test]
    fn secrets_debug_hides_values() {
        let text = format!("{:?}", sample_job());
        assert!(text.contains("TOKEN"));
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn job_validation_reports_each_problem_with_its_path() {
        let mut job = sample_job();
        job.steps[0].run = "  ".into();
        job.steps[1].timeout_secs = Some(0);
        job.steps[1].env.insert("1BAD".into(), "x".into());
        job.env.insert("OK".into(), "a\0b".into());
        job.secrets.0.insert("EMPTY".into(), String::new());
        job.timeout_secs = limits::MAX_TIMEOUT_SECS + 1;
        job.id = JobId("../etc".into());
        let err = job.validate().unwrap_err();
        assert!(err.contains("steps[0].run", &Problem::Empty), "{err}");
        assert!(
            err.contains("steps[1].timeout_secs", &Problem::Zero),
            "{err}"
        );
        assert!(
            err.contains("steps[1].env[\"1BAD\"]", &Problem::BadEnvName),
            "{err}"
        );
        assert!(err.contains("env[\"OK\"]", &Problem::ContainsNul), "{err}");
        assert!(err.contains("secrets[\"EMPTY\"]", &Problem::Empty), "{err}");
        assert!(err.contains("id", &Problem::BadIdentifier), "{err}");
        assert!(
            err.contains(
                "timeout_secs",
                &Problem::TooBig {
                    value: limits::MAX_TIMEOUT_SECS + 1,
                    max: limits::MAX_TIMEOUT_SECS
                }
            ),
            "{err}"
        );
        assert_eq!(err.list().len(), 7, "{err}");

        let mut empty = sample_job();
        empty.steps.clear();
        assert!(
            empty
                .validate()
                .unwrap_err()
                .contains("steps", &Problem::Empty)
        );
    }

    #[test]
    fn job_that_does_not_fit_in_a_frame_is_rejected() {
        let mut job = sample_job();
        let step = JobStep {
            name: "big".into(),
            run: "x".repeat(limits::MAX_RUN_LEN),
            working_directory: None,
            env: BTreeMap::new(),
            timeout_secs: None,
        };
        job.steps = vec![step; 20];
        let err = job.validate().unwrap_err();
        assert_eq!(err.list().len(), 1, "{err}");
        assert_eq!(err.list()[0].path, "job");
        let exact = postcard::to_stdvec(&HostMessage::Job(job.clone()))
            .unwrap()
            .len();
        assert_eq!(encoded_job_len(&job), exact);
    }

    #[test]
    fn oversized_log_chunk_is_invalid() {
        let msg = GuestMessage::LogChunk(LogChunk {
            step: 0,
            stream: OutputStream::Stdout,
            seq: 0,
            data: vec![0; limits::MAX_LOG_CHUNK_BYTES + 1],
        });
        assert!(msg.validate().is_err());
    }
}
