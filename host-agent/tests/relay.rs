//! The relay against a scripted guest: a stand-in VMM process (a shell
//! script) and a thread that speaks the guest side of `protocol` on the
//! socket the VMM would deliver vsock connections to. No KVM needed.

use std::num::NonZeroU64;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use host_agent::log_rate::LogRateLimit;
use host_agent::relay::{EventSink, run_job};
use host_agent::vm::{RunningVm, VmSpec};
use protocol::api::JobEventKind;
use protocol::message::{
    GuestHello, GuestMessage, HostMessage, Job, JobFinished, JobId, JobResult, JobStep, LogChunk,
    OutputStream, PROTOCOL_VERSION, Secrets, StepFinished, StepStarted,
};
use protocol::ports::{RUNNER_AGENT_PORT, host_listener_path};
use protocol::{read_frame, write_frame};

#[derive(Default)]
struct MemorySink {
    events: Vec<JobEventKind>,
    cancel: bool,
}

impl MemorySink {
    /// Sequence numbers of the log chunks received, in order.
    fn log_seqs(&self) -> Vec<u64> {
        self.events
            .iter()
            .filter_map(|e| match e {
                JobEventKind::LogChunk(c) => Some(c.seq),
                _ => None,
            })
            .collect()
    }
}

impl EventSink for MemorySink {
    async fn post(&mut self, events: Vec<JobEventKind>) -> Result<bool, String> {
        self.events.extend(events);
        Ok(self.cancel)
    }
}

fn fake_vmm(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-vmm");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn spec(dir: &Path) -> VmSpec {
    VmSpec {
        name: "vm-test".into(),
        vcpus: 1,
        memory_mib: 128,
        kernel: dir.join("vmlinux"),
        image: dir.join("image"),
        cmdline: "console=ttyS0".into(),
        cid: 3,
        jail: None,
        network: None,
    }
}

fn job(steps: usize) -> Job {
    Job {
        id: JobId("job-1".into()),
        name: "test".into(),
        steps: (0..steps)
            .map(|i| JobStep {
                name: format!("step {i}"),
                run: "true".into(),
                working_directory: None,
                env: Default::default(),
                timeout_secs: None,
            })
            .collect(),
        env: Default::default(),
        secrets: Secrets::default(),
        timeout_secs: 60,
    }
}

/// Connects as the guest would, says Hello and Ready, and returns the stream.
fn guest_connect(vm_dir: &Path) -> UnixStream {
    let path = host_listener_path(&vm_dir.join("vsock.sock"), RUNNER_AGENT_PORT);
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A relay that stops reading fails the test instead of hanging it.
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let hello = GuestHello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        boot_id: "b".into(),
        kernel_release: "6.1".into(),
    };
    write_frame(&mut s, &GuestMessage::Hello(hello)).unwrap();
    assert!(matches!(
        read_frame::<HostMessage>(&mut s).unwrap(),
        HostMessage::HelloAck { .. }
    ));
    write_frame(&mut s, &GuestMessage::Ready).unwrap();
    s
}

/// Guest side: a step began.
fn step_started(s: &mut UnixStream, step: u32, name: impl Into<String>) {
    let msg = GuestMessage::StepStarted(StepStarted {
        step,
        name: name.into(),
    });
    write_frame(s, &msg).unwrap();
}

/// Guest side: a step ended with `exit_code`.
fn step_finished(s: &mut UnixStream, step: u32, exit_code: i32) {
    let msg = GuestMessage::StepFinished(StepFinished {
        step,
        exit_code: Some(exit_code),
        signal: None,
        duration_ms: 1,
    });
    write_frame(s, &msg).unwrap();
}

/// Guest side: the job succeeded.
fn job_succeeded(s: &mut UnixStream) {
    let msg = GuestMessage::JobFinished(JobFinished {
        result: JobResult::Succeeded,
    });
    write_frame(s, &msg).unwrap();
}

fn log(step: u32, seq: u64, text: &str) -> GuestMessage {
    GuestMessage::LogChunk(LogChunk {
        step,
        stream: OutputStream::Stdout,
        seq,
        data: text.as_bytes().to_vec(),
    })
}

async fn start(
    dir: &Path,
    vmm_body: &str,
) -> (
    RunningVm,
    host_agent::vm::GuestChannel,
    std::thread::JoinHandle<UnixStream>,
) {
    let vmm = fake_vmm(dir, vmm_body);
    let mut vm = RunningVm::spawn(&vmm, &dir.join("state"), spec(dir))
        .await
        .unwrap();
    let vm_dir = vm.dir.clone();
    let guest = std::thread::spawn(move || guest_connect(&vm_dir));
    let mut channel = vm.wait_hello(Duration::from_secs(10)).await.unwrap();
    channel.wait_ready(Duration::from_secs(10)).await.unwrap();
    (vm, channel, guest)
}

#[tokio::test]
async fn relays_events_in_order_and_the_guest_result() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, mut channel, guest) = start(dir.path(), "exec sleep 600").await;
    let driver = std::thread::spawn(move || {
        let mut s = guest.join().unwrap();
        let HostMessage::Job(job) = read_frame::<HostMessage>(&mut s).unwrap() else {
            panic!("no job")
        };
        assert_eq!(job.steps.len(), 2);
        let mut seq = 0;
        for step in 0..2u32 {
            step_started(&mut s, step, format!("step {step}"));
            for i in 0..100 {
                write_frame(&mut s, &log(step, seq, &format!("line {i}\n"))).unwrap();
                seq += 1;
            }
            step_finished(&mut s, step, 0);
        }
        job_succeeded(&mut s);
    });
    let mut sink = MemorySink::default();
    let outcome = run_job(&mut vm, &mut channel, &job(2), &mut sink, None).await;
    driver.join().unwrap();
    assert_eq!(outcome.result, JobResult::Succeeded);
    assert!(outcome.first_log.is_some());
    let seqs = sink.log_seqs();
    assert_eq!(seqs, (0..200).collect::<Vec<_>>());
    assert!(matches!(
        sink.events.last(),
        Some(JobEventKind::JobFinished(JobFinished {
            result: JobResult::Succeeded
        }))
    ));
    let vm_dir = vm.dir.clone();
    vm.destroy().await;
    assert!(!vm_dir.exists(), "teardown must remove the VM directory");
}

#[tokio::test]
async fn a_log_rate_limit_paces_the_relay_and_loses_nothing() {
    const CHUNKS: u64 = 40;
    const CHUNK: usize = 16 << 10;
    const RATE: u64 = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, mut channel, guest) = start(dir.path(), "exec sleep 600").await;
    let driver = std::thread::spawn(move || {
        let mut s = guest.join().unwrap();
        let _job = read_frame::<HostMessage>(&mut s).unwrap();
        step_started(&mut s, 0, "flood");
        let line = "x".repeat(CHUNK - 1) + "\n";
        for seq in 0..CHUNKS {
            write_frame(&mut s, &log(0, seq, &line)).unwrap();
        }
        step_finished(&mut s, 0, 0);
        job_succeeded(&mut s);
    });
    let mut sink = MemorySink::default();
    let t0 = std::time::Instant::now();
    let limit = LogRateLimit::new(NonZeroU64::new(RATE).unwrap(), t0);
    let outcome = run_job(&mut vm, &mut channel, &job(1), &mut sink, Some(limit)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    driver.join().unwrap();
    assert_eq!(outcome.result, JobResult::Succeeded);
    // 640 KiB at 256 KiB/s after a one-second (256 KiB) burst: 1.5 s.
    let expected = (CHUNKS as f64 * CHUNK as f64 - RATE as f64) / RATE as f64;
    assert!(
        elapsed >= expected * 0.9 && elapsed < expected + 5.0,
        "{elapsed} s, expected about {expected} s"
    );
    let seqs = sink.log_seqs();
    assert_eq!(seqs, (0..CHUNKS).collect::<Vec<_>>());
    vm.destroy().await;
}

#[tokio::test]
async fn a_vmm_crash_mid_job_fails_the_job_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    // The stand-in VMM dies on its own once the job has started.
    let (mut vm, mut channel, guest) = start(
        dir.path(),
        "echo 'guest crashed: triple fault' >&2; sleep 1; exit 3",
    )
    .await;
    let driver = std::thread::spawn(move || {
        let mut s = guest.join().unwrap();
        let _job = read_frame::<HostMessage>(&mut s).unwrap();
        step_started(&mut s, 0, "step 0");
        std::thread::sleep(Duration::from_secs(3));
        s
    });
    let mut sink = MemorySink::default();
    let outcome = run_job(&mut vm, &mut channel, &job(2), &mut sink, None).await;
    let JobResult::Error { reason } = &outcome.result else {
        panic!("{outcome:?}")
    };
    assert!(
        reason.contains("vm exited with exit status: 3 during step 1"),
        "{reason}"
    );
    assert!(reason.contains("triple fault"), "{reason}");
    assert!(matches!(
        sink.events.last(),
        Some(JobEventKind::JobFinished(_))
    ));
    driver.join().unwrap();
    vm.destroy().await;
}

#[tokio::test]
async fn a_vmm_killed_mid_job_is_reported_as_the_cause_not_the_closed_socket() {
    // A killed VMM closes the guest's socket first and is reaped a moment
    // later: the reason must name the exit, not the closed channel.
    let dir = tempfile::tempdir().unwrap();
    let closed = dir.path().join("socket-closed");
    let body = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; exit 9",
        closed.display()
    );
    let (mut vm, mut channel, guest) = start(dir.path(), &body).await;
    let driver = std::thread::spawn(move || {
        let mut s = guest.join().unwrap();
        let _job = read_frame::<HostMessage>(&mut s).unwrap();
        step_started(&mut s, 0, "step 0");
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        std::fs::write(closed, b"").unwrap();
    });
    let mut sink = MemorySink::default();
    let outcome = run_job(&mut vm, &mut channel, &job(1), &mut sink, None).await;
    let JobResult::Error { reason } = &outcome.result else {
        panic!("{outcome:?}")
    };
    assert!(
        reason.starts_with("vm exited with exit status: 9 during step 1"),
        "{reason}"
    );
    driver.join().unwrap();
    vm.destroy().await;
}

#[tokio::test]
async fn a_bad_frame_ends_the_job_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, mut channel, guest) = start(dir.path(), "exec sleep 600").await;
    let driver = std::thread::spawn(move || {
        let mut s = guest.join().unwrap();
        let _job = read_frame::<HostMessage>(&mut s).unwrap();
        // A 4 GiB length prefix.
        std::io::Write::write_all(&mut s, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    let mut sink = MemorySink::default();
    let outcome = run_job(&mut vm, &mut channel, &job(1), &mut sink, None).await;
    let JobResult::Error { reason } = &outcome.result else {
        panic!("{outcome:?}")
    };
    assert!(reason.contains("bad frame"), "{reason}");
    driver.join().unwrap();
    vm.destroy().await;
}

#[tokio::test]
async fn a_cancel_from_the_sink_reaches_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, mut channel, guest) = start(dir.path(), "exec sleep 600").await;
    let driver = std::thread::spawn(move || {
        let mut s = guest.join().unwrap();
        let _job = read_frame::<HostMessage>(&mut s).unwrap();
        step_started(&mut s, 0, "step 0");
        let msg = read_frame::<HostMessage>(&mut s).unwrap();
        assert!(matches!(msg, HostMessage::Cancel { .. }), "{msg:?}");
        write_frame(
            &mut s,
            &GuestMessage::StepFinished(StepFinished {
                step: 0,
                exit_code: None,
                signal: Some(9),
                duration_ms: 5,
            }),
        )
        .unwrap();
        write_frame(
            &mut s,
            &GuestMessage::JobFinished(JobFinished {
                result: JobResult::Cancelled,
            }),
        )
        .unwrap();
    });
    let mut sink = MemorySink {
        cancel: true,
        ..Default::default()
    };
    let outcome = run_job(&mut vm, &mut channel, &job(1), &mut sink, None).await;
    assert_eq!(outcome.result, JobResult::Cancelled);
    driver.join().unwrap();
    vm.destroy().await;
}

#[tokio::test]
async fn a_vmm_that_dies_before_hello_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = fake_vmm(dir.path(), "echo 'cannot open /dev/kvm' >&2; exit 1");
    let mut vm = RunningVm::spawn(&vmm, &dir.path().join("state"), spec(dir.path()))
        .await
        .unwrap();
    let err = vm
        .wait_hello(Duration::from_secs(10))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("before the runner agent said Hello"), "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
    vm.destroy().await;
    let vmm = fake_vmm(dir.path(), "exec sleep 600");
    let mut vm = RunningVm::spawn(&vmm, &dir.path().join("state"), spec(dir.path()))
        .await
        .unwrap();
    let err = vm
        .wait_hello(Duration::from_millis(300))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no Hello within"), "{err}");
    vm.destroy().await;
}
