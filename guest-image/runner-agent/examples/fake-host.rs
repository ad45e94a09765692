//! A minimal host-side test driver for the runner agent: the reference for
//! what a host agent (or an end-to-end test) must do to run one job.
//!
//! ```text
//! cargo run -p runner-agent --example fake-host -- --listen /tmp/vsock.sock_10000 \
//!     [--spec job.yaml] [--secret NAME=VALUE]...
//! ```
//!
//! It listens on a Unix socket (with our VMM, the guest's connection to
//! host port 10000 arrives on `<vsock uds_path>_10000`; with QEMU, point a
//! serial chardev at it), accepts one agent, and then:
//!
//! 1. reads `Hello`, answers `HelloAck` (via `HostSession`), reads `Ready`;
//! 2. sends the job (the YAML spec given, or a built-in three-step job);
//! 3. prints every guest message until `JobFinished`, checking each with
//!    the protocol's `HostSession` (order, step numbers, sequence numbers);
//! 4. sends `Shutdown` and closes the connection, which lets the guest
//!    power off at once (otherwise it waits a few seconds for the close).
//!
//! Exit status: 0 when `JobFinished` arrived, 1 otherwise.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use protocol::job::JobSpec;
use protocol::message::{GuestMessage, HostMessage, JobId, OutputStream, Secrets};
use protocol::session::HostSession;
use protocol::{read_frame, write_frame};

/// The job run when no spec is given: stderr output, a masked secret, and
/// a failing step (the job ends `Failed { step: 2 }`).
const DEFAULT_SPEC: &str = r#"
name: smoke
runs-on: [linux]
steps:
  - name: stderr
    run: echo "to stderr" >&2; echo "kernel $(uname -r)"
  - name: secret
    run: echo "the token is $API_TOKEN"
  - name: fail
    run: echo "failing now"; exit 3
  - name: never
    run: echo "must not run"
"#;

#[derive(Debug, Parser)]
#[command(about = "Fake host agent: runs one job on one runner agent.")]
struct Args {
    /// Unix socket to listen on (removed first if it exists).
    #[arg(long)]
    listen: PathBuf,
    /// Job spec (YAML); default: a built-in three-step job.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Secret given to the job, NAME=VALUE (repeatable); default API_TOKEN=hunter2.
    #[arg(long = "secret")]
    secrets: Vec<String>,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fake-host: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let text = match &args.spec {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => DEFAULT_SPEC.to_owned(),
    };
    let spec = JobSpec::from_yaml(&text).map_err(|e| format!("job spec: {e}"))?;
    let mut secrets = BTreeMap::new();
    for pair in &args.secrets {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--secret {pair:?} is not NAME=VALUE"))?;
        secrets.insert(name.to_owned(), value.to_owned());
    }
    if args.secrets.is_empty() {
        secrets.insert("API_TOKEN".to_owned(), "hunter2".to_owned());
    }
    let job = spec
        .to_job(JobId("fake-host-job".into()), Secrets(secrets))
        .map_err(|e| format!("job: {e}"))?;

    let _ = std::fs::remove_file(&args.listen);
    let listener = UnixListener::bind(&args.listen).map_err(|e| format!("bind: {e}"))?;
    eprintln!("fake-host: listening on {}", args.listen.display());
    let (mut stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let connected = Instant::now();
    let mut session = HostSession::new();
    let mut out = io::stdout().lock();
    let mut job_sent_at = None;
    loop {
        let msg: GuestMessage = read_frame(&mut stream).map_err(|e| format!("read: {e}"))?;
        let reply = session
            .on_guest_message(&msg)
            .map_err(|e| format!("protocol: {e}"))?;
        if let Some(reply) = reply {
            write_frame(&mut stream, &reply).map_err(|e| format!("write: {e}"))?;
        }
        let at = connected.elapsed().as_secs_f64();
        match &msg {
            GuestMessage::Hello(hello) => {
                let _ = writeln!(out, "[{at:7.3}] Hello {hello:?}");
            }
            GuestMessage::Ready => {
                let _ = writeln!(out, "[{at:7.3}] Ready; sending job {:?}", job.name);
                session.on_job_sent(&job).map_err(|e| format!("job: {e}"))?;
                write_frame(&mut stream, &HostMessage::Job(job.clone()))
                    .map_err(|e| format!("write: {e}"))?;
                job_sent_at = Some(Instant::now());
            }
            GuestMessage::LogChunk(chunk) => {
                let stream_name = match chunk.stream {
                    OutputStream::Stdout => "out",
                    OutputStream::Stderr => "err",
                };
                for line in String::from_utf8_lossy(&chunk.data).lines() {
                    let _ = writeln!(out, "[{at:7.3}] step {} {stream_name}| {line}", chunk.step);
                }
            }
            GuestMessage::Heartbeat => {}
            GuestMessage::JobFinished(finished) => {
                let took = job_sent_at
                    .map(|t| t.elapsed().as_secs_f64())
                    .unwrap_or(0.0);
                let _ = writeln!(
                    out,
                    "[{at:7.3}] JobFinished {:?} ({took:.3} s after the job was sent)",
                    finished.result
                );
                // Lets the guest power off now rather than after its linger
                // (a serial line cannot signal the close).
                let _ = write_frame(&mut stream, &HostMessage::Shutdown);
                return Ok(());
            }
            other => {
                let _ = writeln!(out, "[{at:7.3}] {other:?}");
            }
        }
    }
}
