//! What `GET /v1/jobs/{id}` returns and what the archive keeps of a job:
//! the protocol's [`JobStatus`] plus what an operator needs beside it (why a
//! job waits or failed, when things happened, which VM ran it).
//!
//! The extra fields sit next to the [`JobStatus`] fields in one JSON object,
//! so a client that only knows [`JobStatus`] reads a report unchanged.
//! No field ever holds a secret.

use std::time::{SystemTime, UNIX_EPOCH};

use protocol::api::{JobState, JobStatus, StepState, StepStatus, VmId};
use protocol::message::JobResult;
use serde::{Deserialize, Serialize};

/// A job's status and its circumstances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    /// The protocol's view of the job.
    #[serde(flatten)]
    pub status: JobStatus,
    /// For humans: why a queued job waits ("no idle VM with labels ..."),
    /// why a job failed, or why it was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The VM the job was handed to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<VmId>,
    /// The job's effective timeout, in seconds.
    pub timeout_secs: u64,
    /// When the job was submitted (Unix time, milliseconds).
    pub submitted_at_ms: u64,
    /// When it was handed to a VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_at_ms: Option<u64>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
}

/// `time` as Unix milliseconds (0 before 1970).
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A one-line explanation of how a job ended, from its result and steps:
/// `step 1 "test" exited with code 2`.
pub fn describe_result(result: &JobResult, steps: &[StepStatus]) -> Option<String> {
    let step_name = |step: u32| {
        steps
            .get(step as usize)
            .map(|s| format!("step {step} {:?}", s.name))
            .unwrap_or_else(|| format!("step {step}"))
    };
    match result {
        JobResult::Succeeded | JobResult::Cancelled => None,
        JobResult::Failed { step } => {
            let how = match steps.get(*step as usize).map(|s| &s.state) {
                Some(StepState::Finished {
                    exit_code: Some(code),
                    ..
                }) => format!("exited with code {code}"),
                Some(StepState::Finished {
                    signal: Some(signal),
                    ..
                }) => format!("was killed by signal {signal}"),
                _ => "failed".to_owned(),
            };
            Some(format!("{} {how}", step_name(*step)))
        }
        JobResult::TimedOut { step } => Some(format!("{} timed out", step_name(*step))),
        JobResult::Error { reason } => Some(reason.clone()),
    }
}

/// The terminal [`JobState`] name used in metrics and the CLI.
pub fn state_name(state: &JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Assigned { .. } => "assigned",
        JobState::Running { .. } => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed { .. } => "failed",
        JobState::TimedOut { .. } => "timed_out",
        JobState::Cancelled => "cancelled",
        JobState::Error { .. } => "error",
    }
}

#[cfg(test)]
mod tests {
    use protocol::message::JobId;

    use super::*;

    fn steps() -> Vec<StepStatus> {
        vec![
            StepStatus {
                name: "build".into(),
                state: StepState::Finished {
                    exit_code: Some(2),
                    signal: None,
                    duration_ms: 5,
                },
            },
            StepStatus {
                name: "test".into(),
                state: StepState::Finished {
                    exit_code: None,
                    signal: Some(9),
                    duration_ms: 5,
                },
            },
        ]
    }

    #[test]
    fn results_are_described_with_step_names() {
        let steps = steps();
        assert_eq!(
            describe_result(&JobResult::Failed { step: 0 }, &steps).unwrap(),
            "step 0 \"build\" exited with code 2"
        );
        assert_eq!(
            describe_result(&JobResult::Failed { step: 1 }, &steps).unwrap(),
            "step 1 \"test\" was killed by signal 9"
        );
        assert_eq!(
            describe_result(&JobResult::TimedOut { step: 7 }, &steps).unwrap(),
            "step 7 timed out"
        );
        assert_eq!(describe_result(&JobResult::Succeeded, &steps), None);
    }

    #[test]
    fn report_reads_as_plain_job_status() {
        let report = JobReport {
            status: JobStatus {
                id: JobId("job-1".into()),
                name: "build".into(),
                runs_on: vec!["linux".into()],
                state: JobState::Failed { step: 0 },
                steps: steps(),
            },
            detail: Some("step 0 \"build\" exited with code 2".into()),
            vm_id: Some(VmId("vm-1".into())),
            timeout_secs: 60,
            submitted_at_ms: 1,
            assigned_at_ms: Some(2),
            finished_at_ms: Some(3),
        };
        let json = serde_json::to_string(&report).unwrap();
        let status: JobStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(status, report.status);
        let back: JobReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
    }
}
