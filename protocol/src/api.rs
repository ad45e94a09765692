//! Request and response bodies of the orchestrator's HTTP API (JSON), and
//! its routes. Plain data and validation only: no HTTP code lives here.
//!
//! | route | method | caller (bearer token) | body -> response |
//! |---|---|---|---|
//! | [`routes::VMS`] | POST | host agent (host credential) | [`RegisterVmRequest`] -> [`RegisterVmResponse`] |
//! | [`routes::VM`] | DELETE | host agent (host credential) | - -> 204; revokes the VM token |
//! | [`routes::VM_ACQUIRE`] | POST | host agent (VM token) | [`AcquireJobRequest`] -> [`AcquireJobResponse`] (long poll) |
//! | [`routes::VM_RELEASE`] | POST | host agent (VM token) | - -> [`ReleaseVmResponse`]; the VM takes no job any more, and a job it acquired but never started is queued again |
//! | [`routes::JOB_EVENTS`] | POST | host agent (VM token) | [`PostJobEventsRequest`] -> [`PostJobEventsResponse`] |
//! | [`routes::JOBS`] | POST | client (client credential) | [`SubmitJobRequest`] -> [`SubmitJobResponse`] |
//! | [`routes::JOB`] | GET | client | - -> [`JobStatus`] |
//! | [`routes::JOB_EVENTS`] | GET `?after=N` | client | - -> [`JobEventsPage`] (long poll; follow logs) |
//! | [`routes::JOB_CANCEL`] | POST | client | [`CancelJobRequest`] -> [`JobStatus`] |
//!
//! Errors are any non-2xx status with an [`ApiError`] body.
//!
//! # Event sequence numbers
//!
//! The host agent numbers the events of one job 0, 1, 2, ... ([`JobEvent::seq`])
//! and retries a failed POST with the same events. The orchestrator appends
//! events whose `seq` is the next expected one, ignores those it already has
//! (a retry), refuses a gap with 409, and always answers the next `seq` it
//! expects, so delivery is exactly-once in order.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::job::JobSpec;
use crate::limits;
use crate::message::{
    GuestMessage, Job, JobFinished, JobId, JobResult, LogChunk, Secrets, StepFinished, StepStarted,
};
use crate::validation::{Checker, Problem, Violations};

/// Routes, as axum-style templates (`{name}` for a path parameter), and
/// builders for concrete paths. Ids are validated identifiers, so they need
/// no escaping.
pub mod routes {
    use super::VmId;
    use crate::message::JobId;

    /// Register a VM (POST).
    pub const VMS: &str = "/v1/vms";
    /// One VM: deregister (DELETE).
    pub const VM: &str = "/v1/vms/{vm_id}";
    /// Long-poll for a job for this VM (POST).
    pub const VM_ACQUIRE: &str = "/v1/vms/{vm_id}/acquire";
    /// Give up a VM before its job started (POST).
    pub const VM_RELEASE: &str = "/v1/vms/{vm_id}/release";
    /// Submit a job (POST).
    pub const JOBS: &str = "/v1/jobs";
    /// One job: status (GET).
    pub const JOB: &str = "/v1/jobs/{job_id}";
    /// A job's events: post (POST, host agent) or follow (GET, client).
    pub const JOB_EVENTS: &str = "/v1/jobs/{job_id}/events";
    /// Cancel a job (POST).
    pub const JOB_CANCEL: &str = "/v1/jobs/{job_id}/cancel";

    /// Path of [`VM`] for `vm_id`.
    pub fn vm(vm_id: &VmId) -> String {
        format!("{VMS}/{vm_id}")
    }

    /// Path of [`VM_ACQUIRE`] for `vm_id`.
    pub fn vm_acquire(vm_id: &VmId) -> String {
        format!("{VMS}/{vm_id}/acquire")
    }

    /// Path of [`VM_RELEASE`] for `vm_id`.
    pub fn vm_release(vm_id: &VmId) -> String {
        format!("{VMS}/{vm_id}/release")
    }

    /// Path of [`JOB`] for `job_id`.
    pub fn job(job_id: &JobId) -> String {
        format!("{JOBS}/{job_id}")
    }

    /// Path of [`JOB_EVENTS`] for `job_id`.
    pub fn job_events(job_id: &JobId) -> String {
        format!("{JOBS}/{job_id}/events")
    }

    /// Path of [`JOB_CANCEL`] for `job_id`.
    pub fn job_cancel(job_id: &JobId) -> String {
        format!("{JOBS}/{job_id}/cancel")
    }
}

/// A VM's identifier, assigned by the orchestrator at registration.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(pub String);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The bearer token that lets exactly one VM acquire a job. Never enters the
/// guest; never printed (`Debug` is redacted).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmToken(pub String);

impl fmt::Debug for VmToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VmToken(<redacted>)")
    }
}

/// Register one VM that a host agent is booting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterVmRequest {
    /// The host agent's identity (e.g. its hostname).
    pub host_id: String,
    /// Labels of the VM's pool; a job runs here only if its `runs-on` labels
    /// are all among these.
    pub labels: Vec<String>,
    /// Whether the VM has a network device (default `true`). Only VMs
    /// without one take jobs that ask for `network: false`.
    #[serde(default = "has_network_default")]
    pub network: bool,
}

fn has_network_default() -> bool {
    true
}

/// The label the orchestrator adds, on both sides of matching, for VMs
/// without a network device and for jobs that ask for `network: false`.
/// It contains `/`, which user labels cannot (they are identifiers), so no
/// job or pool can claim it by naming it.
pub const NO_NETWORK_LABEL: &str = "kindling/no-network";

impl RegisterVmRequest {
    /// The labels to match jobs against: the pool's, plus
    /// [`NO_NETWORK_LABEL`] when the VM has no network device.
    pub fn matching_labels(&self) -> Vec<String> {
        let mut labels = self.labels.clone();
        if !self.network {
            labels.push(NO_NETWORK_LABEL.to_string());
        }
        labels
    }
}

impl RegisterVmRequest {
    /// Checks the host id and labels.
    pub fn validate(&self) -> Result<(), Violations> {
        let mut checker = Checker::new();
        checker.identifier("host_id", &self.host_id, limits::MAX_ID_LEN);
        checker.labels("labels", &self.labels);
        checker.finish()
    }
}

/// The registered VM's id and its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterVmResponse {
    /// Id of the VM.
    pub vm_id: VmId,
    /// Token authorising this VM (and only it) to acquire one job.
    pub token: VmToken,
}

/// Long-poll for a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireJobRequest {
    /// How long the orchestrator may hold the request before answering
    /// "no job", in seconds (at most [`limits::MAX_LONG_POLL_SECS`]).
    #[serde(default = "default_wait_secs")]
    pub wait_secs: u32,
}

fn default_wait_secs() -> u32 {
    limits::DEFAULT_LONG_POLL_SECS
}

impl Default for AcquireJobRequest {
    fn default() -> Self {
        Self {
            wait_secs: default_wait_secs(),
        }
    }
}

impl AcquireJobRequest {
    /// Checks the wait bound.
    pub fn validate(&self) -> Result<(), Violations> {
        let mut checker = Checker::new();
        let max = u64::from(limits::MAX_LONG_POLL_SECS);
        if u64::from(self.wait_secs) > max {
            let value = u64::from(self.wait_secs);
            checker.report("wait_secs", Problem::TooBig { value, max });
        }
        checker.finish()
    }
}

/// A job for the VM, or none if the long poll expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireJobResponse {
    /// The job, secrets included, ready to forward to the guest.
    pub job: Option<Job>,
}

/// The answer to a release: the job the VM had acquired but never
/// started, now queued again for another VM (none if it held no job, or
/// if the job was given back too often and failed instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseVmResponse {
    /// The job queued again, if any.
    pub requeued: Option<JobId>,
}

/// One event of a running job, as relayed by the host agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Per-job event number, from 0 without gaps (see the module docs).
    pub seq: u64,
    /// What happened.
    pub event: JobEventKind,
}

/// What happened in a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEventKind {
    /// Output of a step (`data` is base64).
    LogChunk(LogChunk),
    /// A step began.
    StepStarted(StepStarted),
    /// A step ended.
    StepFinished(StepFinished),
    /// The job ended. Also posted by the host agent itself when the guest or
    /// VMM fails (as [`JobResult::Error`]).
    JobFinished(JobFinished),
}

impl JobEventKind {
    /// The event to relay for a guest message; `None` for messages that are
    /// about the channel, not the job (`Hello`, `Ready`, `Heartbeat`).
    pub fn from_guest(msg: GuestMessage) -> Option<Self> {
        match msg {
            GuestMessage::LogChunk(chunk) => Some(Self::LogChunk(chunk)),
            GuestMessage::StepStarted(started) => Some(Self::StepStarted(started)),
            GuestMessage::StepFinished(finished) => Some(Self::StepFinished(finished)),
            GuestMessage::JobFinished(finished) => Some(Self::JobFinished(finished)),
            GuestMessage::Hello(_) | GuestMessage::Ready | GuestMessage::Heartbeat => None,
        }
    }

    fn check(&self, checker: &mut Checker, path: &str) {
        match self {
            Self::LogChunk(chunk) => chunk.check(checker, path),
            Self::StepStarted(started) => started.check(checker, path),
            Self::JobFinished(finished) => finished.check(checker, path),
            Self::StepFinished(_) => {}
        }
    }
}

/// A batch of events of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostJobEventsRequest {
    /// Events in ascending, gap-free `seq` order.
    pub events: Vec<JobEvent>,
}

impl PostJobEventsRequest {
    /// Checks the batch size, each event's bounds, and that `seq`s are
    /// consecutive within the batch.
    pub fn validate(&self) -> Result<(), Violations> {
        let mut checker = Checker::new();
        checker.count("events", self.events.len(), limits::MAX_EVENTS_PER_POST);
        for (i, pair) in self.events.windows(2).enumerate() {
            if pair[0].seq.checked_add(1) != Some(pair[1].seq) {
                checker.report(
                    format!("events[{}].seq", i + 1),
                    Problem::NotConsecutive {
                        expected: pair[0].seq.saturating_add(1),
                        got: pair[1].seq,
                    },
                );
            }
        }
        for (i, event) in self.events.iter().enumerate() {
            event.event.check(&mut checker, &format!("events[{i}]"));
        }
        checker.finish()
    }
}

/// The orchestrator's acknowledgement of posted events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostJobEventsResponse {
    /// The next `seq` the orchestrator expects: everything below it is stored.
    pub next_seq: u64,
}

/// Submit a job: its spec (as JSON) and its secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJobRequest {
    /// The job spec (same fields as the YAML file, in JSON).
    pub spec: JobSpec,
    /// Secret values by name; exported to the steps, masked in the logs.
    #[serde(default)]
    pub secrets: Secrets,
}

impl SubmitJobRequest {
    /// The job to hand to a VM, with `id` assigned; validates the spec, the
    /// secrets and that the whole job fits in one frame.
    pub fn to_job(&self, id: JobId) -> Result<Job, Violations> {
        self.spec.to_job(id, self.secrets.clone())
    }
}

/// The id of a submitted job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitJobResponse {
    /// Id of the new job.
    pub job_id: JobId,
}

/// Cancel a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelJobRequest {
    /// Why (shown in the job's log).
    #[serde(default)]
    pub reason: Option<String>,
}

impl CancelJobRequest {
    /// Checks the reason's length.
    pub fn validate(&self) -> Result<(), Violations> {
        let mut checker = Checker::new();
        if let Some(reason) = &self.reason {
            checker.text("reason", reason, limits::MAX_REASON_LEN, false);
        }
        checker.finish()
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a VM with matching labels.
    Queued,
    /// Handed to a VM, which has not yet reported a step.
    Assigned {
        /// The VM.
        vm_id: VmId,
    },
    /// Steps are running on a VM.
    Running {
        /// The VM.
        vm_id: VmId,
    },
    /// Every step succeeded.
    Succeeded,
    /// A step failed.
    Failed {
        /// Index of the failed step.
        step: u32,
    },
    /// A timeout expired while this step ran.
    TimedOut {
        /// Index of the step that was running.
        step: u32,
    },
    /// Cancelled by a client.
    Cancelled,
    /// The job could not run (guest, VMM or infrastructure failure).
    Error {
        /// What went wrong.
        reason: String,
    },
}

impl JobState {
    /// Whether the job is over (no state follows).
    pub fn is_terminal(&self) -> bool {
        !matches!(
            self,
            Self::Queued | Self::Assigned { .. } | Self::Running { .. }
        )
    }
}

impl From<JobResult> for JobState {
    fn from(result: JobResult) -> Self {
        match result {
            JobResult::Succeeded => Self::Succeeded,
            JobResult::Failed { step } => Self::Failed { step },
            JobResult::TimedOut { step } => Self::TimedOut { step },
            JobResult::Cancelled => Self::Cancelled,
            JobResult::Error { reason } => Self::Error { reason },
        }
    }
}

/// Where a step is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Running now.
    Running,
    /// Ended.
    Finished {
        /// Exit status, if it exited normally.
        exit_code: Option<i32>,
        /// Terminating signal, if it was killed.
        signal: Option<i32>,
        /// Wall-clock duration, in milliseconds.
        duration_ms: u64,
    },
}

/// One step of a [`JobStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStatus {
    /// The step's name.
    pub name: String,
    /// Where it is.
    pub state: StepState,
}

/// A job's status, as shown to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Id of the job.
    pub id: JobId,
    /// Its name.
    pub name: String,
    /// Labels it asked for.
    pub runs_on: Vec<String>,
    /// Where it is.
    pub state: JobState,
    /// Its steps, in order.
    pub steps: Vec<StepStatus>,
}

/// A page of a job's events, for following its logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEventsPage {
    /// Events with `seq >= after`, in order.
    pub events: Vec<JobEvent>,
    /// The `after` to ask for next.
    pub next_seq: u64,
    /// Whether the job is over and no event will follow.
    pub finished: bool,
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, for humans.
    pub error: String,
}

#[cfg(test)]
mod tests;
