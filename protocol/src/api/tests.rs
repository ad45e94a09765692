use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde_json::json;

use super::*;
use crate::message::OutputStream;
use crate::message::tests::{every_guest_message, sample_job};

#[track_caller]
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) -> serde_json::Value {
    let json = serde_json::to_value(value).unwrap();
    let back: T = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(&back, value);
    json
}

fn events() -> Vec<JobEvent> {
    every_guest_message()
        .into_iter()
        .filter_map(JobEventKind::from_guest)
        .enumerate()
        .map(|(seq, event)| JobEvent {
            seq: seq as u64,
            event,
        })
        .collect()
}

#[test]
fn every_body_round_trips_through_json() {
    round_trip(&RegisterVmRequest {
        host_id: "host-1".into(),
        labels: vec!["linux".into(), "x64".into()],
        network: true,
    });
    round_trip(&RegisterVmResponse {
        vm_id: VmId("vm-1".into()),
        token: VmToken("t0k3n".into()),
    });
    round_trip(&AcquireJobRequest { wait_secs: 5 });
    round_trip(&AcquireJobResponse { job: None });
    round_trip(&AcquireJobResponse {
        job: Some(sample_job()),
    });
    round_trip(&PostJobEventsRequest { events: events() });
    round_trip(&PostJobEventsResponse { next_seq: 9 });
    round_trip(&SubmitJobResponse {
        job_id: JobId("j-1".into()),
    });
    round_trip(&CancelJobRequest {
        reason: Some("obsolete".into()),
    });
    round_trip(&ApiError {
        error: "nope".into(),
    });
    round_trip(&JobEventsPage {
        events: events(),
        next_seq: 11,
        finished: true,
    });
    let states = [
        JobState::Queued,
        JobState::Assigned {
            vm_id: VmId("vm-1".into()),
        },
        JobState::Running {
            vm_id: VmId("vm-1".into()),
        },
        JobState::Succeeded,
        JobState::Failed { step: 1 },
        JobState::TimedOut { step: 0 },
        JobState::Cancelled,
        JobState::Error {
            reason: "VMM crashed".into(),
        },
    ];
    for state in states {
        round_trip(&JobStatus {
            id: JobId("j-1".into()),
            name: "build".into(),
            runs_on: vec!["linux".into()],
            state,
            steps: vec![
                StepStatus {
                    name: "a".into(),
                    state: StepState::Finished {
                        exit_code: Some(0),
                        signal: None,
                        duration_ms: 3,
                    },
                },
                StepStatus {
                    name: "b".into(),
                    state: StepState::Running,
                },
                StepStatus {
                    name: "c".into(),
                    state: StepState::Pending,
                },
            ],
        });
    }
}

#[test]
fn wire_shapes_are_stable() {
    let log = JobEvent {
        seq: 4,
        event: JobEventKind::LogChunk(LogChunk {
            step: 1,
            stream: OutputStream::Stderr,
            seq: 2,
            data: b"hi\n".to_vec(),
        }),
    };
    assert_eq!(
        round_trip(&log),
        json!({"seq": 4, "event": {"type": "log_chunk", "step": 1, "stream": "stderr", "seq": 2, "data": "aGkK"}})
    );
    let done = JobEvent {
        seq: 5,
        event: JobEventKind::JobFinished(JobFinished {
            result: JobResult::Failed { step: 1 },
        }),
    };
    assert_eq!(
        round_trip(&done),
        json!({"seq": 5, "event": {"type": "job_finished", "result": {"failed": {"step": 1}}}})
    );
    assert_eq!(round_trip(&JobState::Queued), json!("queued"));
    assert_eq!(
        round_trip(&JobState::Assigned {
            vm_id: VmId("vm-7".into())
        }),
        json!({"assigned": {"vm_id": "vm-7"}})
    );
}

#[test]
fn bad_base64_log_data_is_refused() {
    let body = json!({"events": [{"seq": 0, "event": {"type": "log_chunk", "step": 0, "stream": "stdout", "seq": 0, "data": "***"}}]});
    let err = serde_json::from_value::<PostJobEventsRequest>(body).unwrap_err();
    assert!(err.to_string().contains("invalid base64"), "{err}");
}

#[test]
fn submit_request_parses_validates_and_hides_secrets() {
    let body = json!({
        "spec": {"name": "build", "runs-on": ["linux"], "steps": [{"run": "make"}]},
        "secrets": {"DEPLOY_KEY": "abc123"}
    });
    let request: SubmitJobRequest = serde_json::from_value(body).unwrap();
    assert!(!format!("{request:?}").contains("abc123"));
    let job = request.to_job(JobId("j-9".into())).unwrap();
    assert_eq!(job.secrets.0["DEPLOY_KEY"], "abc123");
    assert_eq!(job.steps[0].name, "Run make");

    let no_secrets = json!({"spec": {"name": "b", "runs-on": "linux", "steps": [{"run": "make"}]}});
    let request: SubmitJobRequest = serde_json::from_value(no_secrets).unwrap();
    assert!(request.secrets.0.is_empty());

    let unknown =
        json!({"spec": {"name": "b", "runs-on": "l", "steps": [{"run": "m"}]}, "extra": 1});
    assert!(serde_json::from_value::<SubmitJobRequest>(unknown).is_err());

    let bad = SubmitJobRequest {
        spec: request.spec.clone(),
        secrets: Secrets(BTreeMap::from([("X".into(), String::new())])),
    };
    let err = bad.to_job(JobId("j".into())).unwrap_err();
    assert!(err.contains("secrets[\"X\"]", &Problem::Empty), "{err}");
}

#[test]
fn vm_token_is_never_printed() {
    let response = RegisterVmResponse {
        vm_id: VmId("vm-1".into()),
        token: VmToken("very-secret".into()),
    };
    assert!(!format!("{response:?}").contains("very-secret"));
}

#[test]
fn register_request_is_validated() {
    let ok = RegisterVmRequest {
        host_id: "host-1".into(),
        labels: vec!["linux".into()],
        network: true,
    };
    ok.validate().unwrap();
    let bad = RegisterVmRequest {
        host_id: "host/1".into(),
        labels: vec![],
        network: true,
    };
    let err = bad.validate().unwrap_err();
    assert!(err.contains("host_id", &Problem::BadIdentifier), "{err}");
    assert!(err.contains("labels", &Problem::Empty), "{err}");
}

#[test]
fn acquire_request_defaults_and_bounds() {
    let request: AcquireJobRequest = serde_json::from_str("{}").unwrap();
    assert_eq!(request.wait_secs, limits::DEFAULT_LONG_POLL_SECS);
    request.validate().unwrap();
    assert!(AcquireJobRequest { wait_secs: 3600 }.validate().is_err());
}

#[test]
fn event_batches_are_validated() {
    PostJobEventsRequest { events: events() }
        .validate()
        .unwrap();

    let mut gap = events();
    gap[2].seq = 10;
    let err = PostJobEventsRequest { events: gap }.validate().unwrap_err();
    assert_eq!(err.list().len(), 2, "{err}");
    assert!(
        err.contains(
            "events[2].seq",
            &Problem::NotConsecutive {
                expected: 2,
                got: 10
            }
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "events[3].seq",
            &Problem::NotConsecutive {
                expected: 11,
                got: 3
            }
        ),
        "{err}"
    );

    let big = JobEvent {
        seq: 0,
        event: JobEventKind::LogChunk(LogChunk {
            step: 0,
            stream: OutputStream::Stdout,
            seq: 0,
            data: vec![0; limits::MAX_LOG_CHUNK_BYTES + 1],
        }),
    };
    let err = PostJobEventsRequest { events: vec![big] }
        .validate()
        .unwrap_err();
    assert_eq!(err.list()[0].path, "events[0].data");

    let many = (0..=limits::MAX_EVENTS_PER_POST as u64)
        .map(|seq| JobEvent {
            seq,
            event: JobEventKind::StepStarted(StepStarted {
                step: 0,
                name: "s".into(),
            }),
        })
        .collect();
    let err = PostJobEventsRequest { events: many }
        .validate()
        .unwrap_err();
    assert_eq!(err.list()[0].path, "events");
}

#[test]
fn guest_messages_map_to_events() {
    assert_eq!(JobEventKind::from_guest(GuestMessage::Heartbeat), None);
    assert_eq!(JobEventKind::from_guest(GuestMessage::Ready), None);
    // Every message but Hello, Ready and Heartbeat is a job event.
    assert_eq!(events().len(), every_guest_message().len() - 3);
}

#[test]
fn job_results_map_to_terminal_states() {
    let results = [
        JobResult::Succeeded,
        JobResult::Failed { step: 0 },
        JobResult::TimedOut { step: 0 },
        JobResult::Cancelled,
        JobResult::Error { reason: "x".into() },
    ];
    for result in results {
        assert!(JobState::from(result).is_terminal());
    }
    assert!(!JobState::Queued.is_terminal());
    assert!(
        !JobState::Running {
            vm_id: VmId("v".into())
        }
        .is_terminal()
    );
}

#[test]
fn routes_fill_their_templates() {
    let vm = VmId("vm-3".into());
    let job = JobId("job-8".into());
    assert_eq!(routes::vm(&vm), routes::VM.replace("{vm_id}", "vm-3"));
    assert_eq!(
        routes::vm_acquire(&vm),
        routes::VM_ACQUIRE.replace("{vm_id}", "vm-3")
    );
    assert_eq!(routes::job(&job), routes::JOB.replace("{job_id}", "job-8"));
    assert_eq!(
        routes::job_events(&job),
        routes::JOB_EVENTS.replace("{job_id}", "job-8")
    );
    assert_eq!(
        routes::job_cancel(&job),
        routes::JOB_CANCEL.replace("{job_id}", "job-8")
    );
}
