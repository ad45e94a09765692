use std::os::unix::net::UnixStream;
use std::thread;

use super::*;
use crate::message::tests::{every_guest_message, sample_job};
use crate::message::{LogChunk, OutputStream, StepFinished, StepStarted};

fn hello() -> GuestHello {
    match &every_guest_message()[0] {
        GuestMessage::Hello(hello) => hello.clone(),
        other => panic!("{other:?}"),
    }
}

fn started(step: u32) -> GuestMessage {
    GuestMessage::StepStarted(StepStarted {
        step,
        name: format!("step {step}"),
    })
}

fn log(step: u32, seq: u64) -> GuestMessage {
    GuestMessage::LogChunk(LogChunk {
        step,
        stream: OutputStream::Stdout,
        seq,
        data: b"out\n".to_vec(),
    })
}

fn finished(step: u32, exit_code: i32) -> GuestMessage {
    GuestMessage::StepFinished(StepFinished {
        step,
        exit_code: Some(exit_code),
        signal: None,
        duration_ms: 5,
    })
}

fn job_finished(result: JobResult) -> GuestMessage {
    GuestMessage::JobFinished(JobFinished { result })
}

/// A session with the sample two-step job running.
fn running_session() -> HostSession {
    let mut session = HostSession::new();
    let reply = session
        .on_guest_message(&GuestMessage::Hello(hello()))
        .unwrap();
    assert_eq!(
        reply,
        Some(HostMessage::HelloAck {
            protocol_version: PROTOCOL_VERSION
        })
    );
    session.on_guest_message(&GuestMessage::Ready).unwrap();
    assert_eq!(session.phase(), Phase::Ready);
    session.on_job_sent(&sample_job()).unwrap();
    assert_eq!(session.phase(), Phase::Running);
    session
}

fn feed(session: &mut HostSession, messages: &[GuestMessage]) -> Result<(), SessionError> {
    for msg in messages {
        assert_eq!(session.on_guest_message(msg)?, None);
    }
    Ok(())
}

#[test]
fn full_conversation_is_accepted() {
    let mut session = running_session();
    assert_eq!(session.hello().unwrap().agent_version, "0.1.0");
    feed(
        &mut session,
        &[
            started(0),
            log(0, 0),
            GuestMessage::Heartbeat,
            log(0, 1),
            finished(0, 0),
            started(1),
            log(1, 2),
            finished(1, 0),
            job_finished(JobResult::Succeeded),
            GuestMessage::Heartbeat,
        ],
    )
    .unwrap();
    assert_eq!(session.phase(), Phase::Finished);
}

#[test]
fn failure_timeout_cancel_and_error_results_are_accepted() {
    let cases = [
        (
            vec![started(0), finished(0, 1)],
            JobResult::Failed { step: 0 },
        ),
        (vec![started(0)], JobResult::TimedOut { step: 0 }),
        (vec![started(0)], JobResult::Cancelled),
        (
            vec![],
            JobResult::Error {
                reason: "no /workspace".into(),
            },
        ),
    ];
    for (steps, result) in cases {
        let mut session = running_session();
        feed(&mut session, &steps).unwrap();
        feed(&mut session, &[job_finished(result.clone())]).unwrap();
        assert_eq!(session.phase(), Phase::Finished, "{result:?}");
    }
}

#[test]
fn messages_out_of_phase_are_unexpected() {
    let mut fresh = HostSession::new();
    for msg in [GuestMessage::Heartbeat, GuestMessage::Ready, log(0, 0)] {
        assert!(matches!(
            fresh.on_guest_message(&msg),
            Err(SessionError::UnexpectedMessage {
                phase: Phase::AwaitingHello,
                ..
            })
        ));
    }

    let mut session = HostSession::new();
    session
        .on_guest_message(&GuestMessage::Hello(hello()))
        .unwrap();
    let again = session.on_guest_message(&GuestMessage::Hello(hello()));
    assert!(matches!(
        again,
        Err(SessionError::UnexpectedMessage { got: "Hello", .. })
    ));
    assert!(matches!(
        session.on_job_sent(&sample_job()),
        Err(SessionError::UnexpectedMessage { got: "Job", .. })
    ));
    session.on_guest_message(&GuestMessage::Ready).unwrap();
    for msg in [GuestMessage::Ready, started(0), log(0, 0)] {
        assert!(matches!(
            session.on_guest_message(&msg),
            Err(SessionError::UnexpectedMessage {
                phase: Phase::Ready,
                ..
            })
        ));
    }

    let mut done = running_session();
    feed(&mut done, &[job_finished(JobResult::Cancelled)]).unwrap();
    let err = done.on_guest_message(&started(0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unexpected StepStarted message while finished"
    );
}

#[test]
fn steps_must_run_in_order_one_at_a_time() {
    let mut session = running_session();
    assert!(matches!(
        session.on_guest_message(&started(1)),
        Err(SessionError::StepOutOfOrder {
            expected: 0,
            got: 1
        })
    ));
    let mut session = running_session();
    feed(&mut session, &[started(0)]).unwrap();
    assert!(matches!(
        session.on_guest_message(&started(1)),
        Err(SessionError::StepOutOfOrder { .. })
    ));
    let mut session = running_session();
    feed(
        &mut session,
        &[started(0), finished(0, 0), started(1), finished(1, 0)],
    )
    .unwrap();
    assert!(matches!(
        session.on_guest_message(&started(2)),
        Err(SessionError::StepNotRunning { step: 2, .. })
    ));
    let mut session = running_session();
    feed(&mut session, &[started(0)]).unwrap();
    assert!(matches!(
        session.on_guest_message(&finished(1, 0)),
        Err(SessionError::StepNotRunning { step: 1, .. })
    ));
    let mut session = running_session();
    assert!(matches!(
        session.on_guest_message(&log(0, 0)),
        Err(SessionError::StepNotRunning { step: 0, .. })
    ));
}

#[test]
fn log_sequence_numbers_must_be_contiguous() {
    for bad in [1, 5, u64::MAX] {
        let mut session = running_session();
        feed(&mut session, &[started(0)]).unwrap();
        assert!(matches!(
            session.on_guest_message(&log(0, bad)),
            Err(SessionError::SeqGap { expected: 0, got }) if got == bad
        ));
    }
    let mut session = running_session();
    feed(&mut session, &[started(0), log(0, 0)]).unwrap();
    assert!(matches!(
        session.on_guest_message(&log(0, 0)),
        Err(SessionError::SeqGap {
            expected: 1,
            got: 0
        })
    ));
}

#[test]
fn job_result_must_match_the_steps() {
    let mut session = running_session();
    feed(&mut session, &[started(0), finished(0, 0)]).unwrap();
    let err = session
        .on_guest_message(&job_finished(JobResult::Succeeded))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "job finished as Succeeded after 1 of 2 steps finished"
    );
    let mut session = running_session();
    assert!(matches!(
        session.on_guest_message(&job_finished(JobResult::Failed { step: 0 })),
        Err(SessionError::StepNotRunning { step: 0, .. })
    ));
    let mut session = running_session();
    assert!(matches!(
        session.on_guest_message(&job_finished(JobResult::TimedOut { step: 7 })),
        Err(SessionError::StepNotRunning { step: 7, .. })
    ));
}

#[test]
fn invalid_job_is_not_sent() {
    let mut session = HostSession::new();
    session
        .on_guest_message(&GuestMessage::Hello(hello()))
        .unwrap();
    session.on_guest_message(&GuestMessage::Ready).unwrap();
    let mut job = sample_job();
    job.steps.clear();
    assert!(matches!(
        session.on_job_sent(&job),
        Err(SessionError::InvalidJob(_))
    ));
    assert_eq!(session.phase(), Phase::Ready);
}

#[test]
fn unknown_version_gets_a_rejection() {
    let err = FrameError::UnknownVersion {
        offered: 7,
        supported: PROTOCOL_VERSION,
    };
    assert!(matches!(
        HostSession::rejection_for(&err),
        Some(HostMessage::HelloRejected {
            supported_version: PROTOCOL_VERSION,
            ..
        })
    ));
    assert_eq!(HostSession::rejection_for(&FrameError::Closed), None);
    let mut session = HostSession::new();
    let mut old = hello();
    old.protocol_version = 0;
    assert!(matches!(
        session.on_guest_message(&GuestMessage::Hello(old)),
        Err(SessionError::Frame(FrameError::UnknownVersion {
            offered: 0,
            ..
        }))
    ));
}

/// Runs `guest_handshake` against a host thread answering with `answer`.
fn handshake_against(answer: HostMessage) -> Result<(), SessionError> {
    let (mut guest, mut host) = UnixStream::pair().unwrap();
    let host_thread = thread::spawn(move || {
        let first = read_frame::<GuestMessage>(&mut host).unwrap();
        let mut session = HostSession::new();
        session.on_guest_message(&first).unwrap();
        write_frame(&mut host, &answer).unwrap();
    });
    let result = guest_handshake(&mut guest, hello());
    host_thread.join().unwrap();
    result
}

#[test]
fn guest_handshake_accepted_rejected_or_confused() {
    handshake_against(HostMessage::HelloAck {
        protocol_version: PROTOCOL_VERSION,
    })
    .unwrap();
    let rejected = handshake_against(HostMessage::HelloRejected {
        reason: "too old".into(),
        supported_version: 3,
    });
    assert!(matches!(
        rejected,
        Err(SessionError::Rejected {
            supported_version: 3,
            ..
        })
    ));
    assert!(matches!(
        handshake_against(HostMessage::Shutdown),
        Err(SessionError::UnexpectedMessage {
            got: "Shutdown",
            ..
        })
    ));
}
