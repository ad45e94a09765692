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
use protocol::api::{JobEvent, JobEventKind, PostJobEventsRequest};
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

/// A sink that refuses what the orchestrator refuses (it validates every
/// post as the server does), and can fail its first final posts.
#[derive(Default)]
struct StrictSink {
    events: Vec<JobEventKind>,
    next_seq: u64,
    /// Posts with `JobFinished` left to fail (transport trouble).
    fail: u32,
    /// Posts with `JobFinished` seen.
    final_posts: u32,
}

impl EventSink for StrictSink {
    async fn post(&mut self, events: Vec<JobEventKind>) -> Result<bool, String> {
        if events
            .iter()
            .any(|e| matches!(e, JobEventKind::JobFinished(_)))
        {
            self.final_posts += 1;
            if self.fail > 0 {
                self.fail -= 1;
                return Err("connection refused".into());
            }
        }
        let request = PostJobEventsRequest {
            events: events
                .iter()
                .enumerate()
                .map(|(i, event)| JobEvent {
                    seq: self.next_seq + i as u64,
                    event: event.clone(),
                })
                .collect(),
        };
        request
            .validate()
            .map_err(|e| format!("400 Bad Request: {e}"))?;
        self.next_seq += events.len() as u64;
        self.events.extend(events);
        Ok(false)
    }
}

impl StrictSink {
    /// The reason of the job's `JobFinished`, if it was stored.
    fn final_reason(&self) -> Option<String> {
        match self.events.last() {
            Some(JobEventKind::JobFinished(JobFinished {
                result: JobResult::Error { reason },
            })) => Some(reason.clone()),
            _ => None,
        }
    }
}

/// The VM directory `start` creates under `dir`.
fn vm_dir_of(dir: &Path) -> PathBuf {
    dir.join("state/vms/vm-test")
}

/// Runs a one-step job whose VMM does `hostile` (shell, in its VM
/// directory) once the step started and then exits 3; returns the
/// outcome and what the sink stored. Aborts (instead of hanging) if the
/// relay does not end within 60 s.
async fn run_against_hostile_vmm(
    dir: &Path,
    hostile: &str,
    sink: StrictSink,
) -> (host_agent::relay::RelayOutcome, StrictSink) {
    let started = dir.join("step-started");
    let body = format!(
        "echo 'vmm: the real reason is here' >&2\n\
         while [ ! -e {started} ]; do sleep 0.05; done\n\
         cd {vm_dir} || exit 99\n\
         {hostile}\n\
         exit 3",
        started = started.display(),
        vm_dir = vm_dir_of(dir).display(),
    );
    let (mut vm, mut channel, guest) = start(dir, &body).await;
    let driver = std::thread::spawn(move || {
        let mut s = guest.join().unwrap();
        let _job = read_frame::<HostMessage>(&mut s).unwrap();
        step_started(&mut s, 0, "step 0");
        std::fs::write(started, b"").unwrap();
        // Keeps the socket open until the relay gives up on the VM.
        let _ = read_frame::<HostMessage>(&mut s);
    });
    let relay = tokio::spawn(async move {
        let mut sink = sink;
        let outcome = run_job(&mut vm, &mut channel, &job(1), &mut sink, None).await;
        drop(channel);
        vm.destroy().await;
        (outcome, sink)
    });
    // A relay stuck on what the VMM left (a blocking read in a worker
    // thread cannot be timed out from the runtime) aborts the test binary.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watched = std::sync::Arc::clone(&done);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        if !watched.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("the relay hung on what the VMM left in its directory: aborting");
            std::process::abort();
        }
    });
    let result = relay.await.unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    driver.join().unwrap();
    result
}

/// The reason must name the real failure and stay within the protocol.
fn assert_honest_reason(outcome: &host_agent::relay::RelayOutcome, sink: &StrictSink) {
    let JobResult::Error { reason } = &outcome.result else {
        panic!("{outcome:?}")
    };
    assert!(
        reason.starts_with("vm exited with exit status: 3 during step 1"),
        "{reason}"
    );
    assert!(reason.contains("the real reason is here"), "{reason}");
    assert!(reason.len() <= protocol::limits::MAX_REASON_LEN);
    assert_eq!(
        sink.final_reason().as_deref(),
        Some(reason.as_str()),
        "the orchestrator did not get the reason"
    );
    assert!(outcome.final_post_error.is_none(), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_log_swapped_for_a_symlink_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("shadow");
    std::fs::write(&secret, "root:$6$SECRET-HASH:19000:0:99999:7:::\n").unwrap();
    let hostile = format!("rm -f vmm.log; ln -s {} vmm.log", secret.display());
    let (outcome, sink) =
        run_against_hostile_vmm(dir.path(), &hostile, StrictSink::default()).await;
    assert_honest_reason(&outcome, &sink);
    let JobResult::Error { reason } = &outcome.result else {
        unreachable!()
    };
    assert!(!reason.contains("SECRET-HASH"), "secret leaked: {reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_log_swapped_for_a_fifo_hangs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, sink) = run_against_hostile_vmm(
        dir.path(),
        "rm -f vmm.log; mkfifo vmm.log",
        StrictSink::default(),
    )
    .await;
    assert_honest_reason(&outcome, &sink);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_sparse_vmm_log_costs_a_bounded_read() {
    let dir = tempfile::tempdir().unwrap();
    // An 8 GiB sparse file under the name, and the VMM's own log (its
    // stderr) grown to 8 GiB of zeros after the real reason.
    let hostile = "rm -f vmm.log; truncate -s 8G vmm.log; \
                   echo 'vmm: the real reason is here' >&2; truncate -s 8G /dev/stderr";
    let t = std::time::Instant::now();
    let (outcome, sink) = run_against_hostile_vmm(dir.path(), hostile, StrictSink::default()).await;
    assert!(t.elapsed() < Duration::from_secs(20));
    // The tail is the zeros at the end (replaced), not the reason line
    // 8 GiB earlier: it must still fit the protocol.
    let JobResult::Error { reason } = &outcome.result else {
        panic!("{outcome:?}")
    };
    assert!(
        reason.starts_with("vm exited with exit status: 3 during step 1"),
        "{reason}"
    );
    assert!(!reason.contains('\0'));
    assert_eq!(sink.final_reason().as_deref(), Some(reason.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_vmm_log_still_gives_the_orchestrator_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    // 20 KiB lines: the old reason (the whole last five lines) was refused
    // by the orchestrator, and the job ended as "VM deregistered".
    let hostile = "i=0; while [ $i -lt 5 ]; do head -c 20000 /dev/zero | tr '\\0' x >&2; echo >&2; \
                   i=$((i+1)); done; echo 'vmm: the real reason is here' >&2";
    let (outcome, sink) = run_against_hostile_vmm(dir.path(), hostile, StrictSink::default()).await;
    assert_honest_reason(&outcome, &sink);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_post_is_retried_and_its_failure_reported() {
    use host_agent::relay::FINAL_POST_ATTEMPTS;
    // Fails twice, then stores: the job's end still reaches the sink.
    let dir = tempfile::tempdir().unwrap();
    let sink = StrictSink {
        fail: 2,
        ..Default::default()
    };
    let (outcome, sink) = run_against_hostile_vmm(dir.path(), "true", sink).await;
    assert_honest_reason(&outcome, &sink);
    assert_eq!(sink.final_posts, 3);
    // Always fails: bounded attempts, and the outcome says so.
    let dir = tempfile::tempdir().unwrap();
    let sink = StrictSink {
        fail: u32::MAX,
        ..Default::default()
    };
    let (outcome, sink) = run_against_hostile_vmm(dir.path(), "true", sink).await;
    assert_eq!(sink.final_posts, FINAL_POST_ATTEMPTS);
    assert!(
        outcome
            .final_post_error
            .as_deref()
            .is_some_and(|e| e.contains("connection refused")),
        "{outcome:?}"
    );
}
