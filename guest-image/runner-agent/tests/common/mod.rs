//! A fake host agent for the runner agent's integration tests.
//!
//! It runs the real `runner-agent` binary as a child process (so the
//! agent's reaper, subreaper and process-group handling work as in a guest,
//! without touching the test process), listens on a Unix socket the agent
//! dials with `--connect unix:PATH`, and checks every guest message with
//! the protocol crate's own [`HostSession`]: order, step numbering and log
//! sequence numbers are verified on every test.

#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use protocol::message::{
    GuestHello, GuestMessage, HostMessage, Job, JobId, JobResult, JobStep, LogChunk, OutputStream,
    Secrets, StepFinished,
};
use protocol::session::HostSession;
use protocol::{read_frame, write_frame};
use tempfile::TempDir;

/// How long any single wait in a test may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A running agent and the host side of its channel.
pub struct FakeHost {
    pub dir: TempDir,
    pub workspace: PathBuf,
    agent: Child,
    listener: UnixListener,
    log_path: PathBuf,
}

/// Builds a job from `(name, script)` pairs.
pub fn job(steps: &[(&str, &str)]) -> Job {
    Job {
        id: JobId("job-test".into()),
        name: "test job".into(),
        steps: steps
            .iter()
            .map(|(name, run)| JobStep {
                name: (*name).into(),
                run: (*run).into(),
                working_directory: None,
                env: BTreeMap::new(),
                timeout_secs: None,
            })
            .collect(),
        env: BTreeMap::new(),
        secrets: Secrets::default(),
        timeout_secs: 600,
    }
}

impl FakeHost {
    /// Listens, then starts the agent with test-friendly timings plus `extra`
    /// flags.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("host.sock");
        let workspace = dir.path().join("workspace");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let log_path = dir.path().join("agent.log");
        let connect = format!("unix:{}", socket.display());
        let agent = Command::new(env!("CARGO_BIN_EXE_runner-agent"))
            .args(["--connect", &connect, "--workspace"])
            .arg(&workspace)
            .args([
                "--kill-grace-ms",
                "500",
                "--linger-ms",
                "3000",
                "--heartbeat-ms",
                "200",
                "--connect-timeout-secs",
                "20",
                "--log",
                "debug",
            ])
            .args(extra)
            .env_remove("KINDLING_AGENT_CONNECT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        Self {
            dir,
            workspace,
            agent,
            listener,
            log_path,
        }
    }

    /// The agent's pid.
    pub fn agent_pid(&self) -> u32 {
        self.agent.id()
    }

    /// The agent's log so far (shown when a test fails).
    pub fn agent_log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Accepts the agent's connection and completes the handshake, up to
    /// and including the guest's `Ready`.
    pub fn accept(&mut self) -> Conn {
        let started = Instant::now();
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        started.elapsed() < PATIENCE,
                        "agent never connected\n{}",
                        self.agent_log()
                    );
                    thread::sleep(Duration::from_millis(10));
                }
                Err(err) => panic!("accept: {err}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut conn = Conn {
            stream,
            session: HostSession::new(),
            hello: None,
            heartbeats: 0,
        };
        match conn.next_raw() {
            GuestMessage::Hello(hello) => conn.hello = Some(hello),
            other => panic!("expected Hello, got {other:?}"),
        }
        assert!(matches!(conn.next(), GuestMessage::Ready));
        conn
    }

    /// Waits for the agent to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.agent.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "agent did not exit\n{}",
                self.agent_log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        if self.agent.try_wait().ok().flatten().is_none() {
            let _ = self.agent.kill();
            let _ = self.agent.wait();
        }
        if thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.agent_log());
        }
    }
}

/// The host end of one agent connection.
pub struct Conn {
    pub stream: UnixStream,
    pub session: HostSession,
    pub hello: Option<GuestHello>,
    pub heartbeats: u32,
}

impl Conn {
    /// Sends `job` (checked by the session first).
    pub fn send_job(&mut self, job: &Job) {
        self.session.on_job_sent(job).unwrap();
        write_frame(&mut self.stream, &HostMessage::Job(job.clone())).unwrap();
    }

    /// Sends any host message.
    pub fn send(&mut self, msg: &HostMessage) {
        write_frame(&mut self.stream, msg).unwrap();
    }

    /// The next guest message, validated by the session; answers `Hello`.
    fn next_raw(&mut self) -> GuestMessage {
        let msg: GuestMessage = read_frame(&mut self.stream).unwrap();
        if let Some(reply) = self.session.on_guest_message(&msg).unwrap() {
            write_frame(&mut self.stream, &reply).unwrap();
        }
        msg
    }

    /// The next guest message that is not a heartbeat.
    pub fn next(&mut self) -> GuestMessage {
        loop {
            match self.next_raw() {
                GuestMessage::Heartbeat => self.heartbeats += 1,
                msg => return msg,
            }
        }
    }

    /// Reads until `JobFinished`.
    pub fn finish(&mut self, mut transcript: Transcript) -> Transcript {
        loop {
            let msg = self.next();
            let done = matches!(msg, GuestMessage::JobFinished(_));
            transcript.messages.push(msg);
            if done {
                return transcript;
            }
        }
    }

    /// Reads until a log chunk of `step` contains `needle`.
    pub fn until_output(&mut self, step: u32, needle: &str) -> Transcript {
        let mut transcript = Transcript::default();
        loop {
            let msg = self.next();
            let found = matches!(&msg, GuestMessage::LogChunk(c)
                if c.step == step && String::from_utf8_lossy(&c.data).contains(needle));
            transcript.messages.push(msg);
            if found {
                return transcript;
            }
        }
    }

    /// Runs `job` to its end and returns everything the guest said.
    pub fn run(&mut self, job: &Job) -> Transcript {
        self.send_job(job);
        self.finish(Transcript::default())
    }
}

/// The guest's messages of one job, heartbeats left out.
#[derive(Debug, Default)]
pub struct Transcript {
    pub messages: Vec<GuestMessage>,
}

impl Transcript {
    pub fn chunks(&self) -> impl Iterator<Item = &LogChunk> {
        self.messages.iter().filter_map(|m| match m {
            GuestMessage::LogChunk(c) => Some(c),
            _ => None,
        })
    }

    /// Everything `step` wrote to `stream`, in order.
    pub fn output(&self, step: u32, stream: OutputStream) -> String {
        let bytes: Vec<u8> = self
            .chunks()
            .filter(|c| c.step == step && c.stream == stream)
            .flat_map(|c| c.data.iter().copied())
            .collect();
        String::from_utf8(bytes).unwrap()
    }

    pub fn started(&self) -> Vec<u32> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                GuestMessage::StepStarted(s) => Some(s.step),
                _ => None,
            })
            .collect()
    }

    pub fn finished(&self, step: u32) -> &StepFinished {
        self.messages
            .iter()
            .find_map(|m| match m {
                GuestMessage::StepFinished(f) if f.step == step => Some(f),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no StepFinished for step {step}: {self:#?}"))
    }

    pub fn result(&self) -> &JobResult {
        match self.messages.last() {
            Some(GuestMessage::JobFinished(f)) => &f.result,
            other => panic!("transcript does not end with JobFinished: {other:?}"),
        }
    }

    /// Index of the first message matching `pred`.
    pub fn position(&self, pred: impl Fn(&GuestMessage) -> bool) -> usize {
        self.messages
            .iter()
            .position(pred)
            .expect("no such message")
    }
}

/// Whether process `pid` is gone (or a zombie about to be reaped), waiting
/// up to `within`.
pub fn process_gone(pid: u32, within: Duration) -> bool {
    let started = Instant::now();
    loop {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"));
        let gone = match stat {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        };
        if gone {
            return true;
        }
        if started.elapsed() > within {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Parses `key=<pid>` out of a step's output.
pub fn pid_after(output: &str, key: &str) -> u32 {
    let start = output
        .find(key)
        .unwrap_or_else(|| panic!("{key} not in {output:?}"))
        + key.len();
    output[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Peak resident set size of process `pid`, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Writes a file in the test's directory (for scripts that need one).
pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    let mut file = File::create(&path).unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    path
}
