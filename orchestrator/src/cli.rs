//! The `orchestrator` command line: `serve`, and the client commands
//! `submit`, `status`, `logs`, `cancel`.
//!
//! `submit --follow` prints the job's output live (its stdout to stdout, its
//! stderr to stderr, step markers prefixed `[kindling]` on stderr) and exits
//! with the job's result: 0 succeeded, 1 a step failed, 2 anything else
//! (timed out, cancelled, error, or the client itself failed).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use protocol::api::{JobEvent, JobEventKind, JobState, SubmitJobRequest};
use protocol::job::JobSpec;
use protocol::limits;
use protocol::message::{JobId, OutputStream, Secrets};

use crate::auth::Credentials;
use crate::client::{ApiClient, ClientError};
use crate::config::{Limits, ServerConfig};
use crate::report::{JobReport, state_name};
use crate::server::{Server, termination_signal};
use crate::tls::TlsFiles;

/// Exit code of a job that succeeded.
pub const EXIT_SUCCEEDED: u8 = 0;
/// Exit code of a job whose step failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code of a job that timed out, was cancelled or hit an error, and
/// of a client failure.
pub const EXIT_OTHER: u8 = 2;

/// Kindling's reference orchestrator and its client.
#[derive(Debug, Parser)]
#[command(name = "orchestrator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the orchestrator server.
    Serve(ServeArgs),
    /// Submit a job spec (YAML, or JSON if the file ends in .json).
    Submit(SubmitArgs),
    /// Print a job's status as JSON.
    Status(JobArgs),
    /// Print a job's logs, following it until it ends.
    Logs(JobArgs),
    /// Cancel a job.
    Cancel(CancelArgs),
}

/// Options of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Archive directory for finished jobs (records and logs).
    #[arg(long, default_value = "orchestrator-archive")]
    pub archive: PathBuf,
    /// Credential of host agents (at least 16 bytes).
    #[arg(long, env = "KINDLING_HOST_CREDENTIAL", hide_env_values = true)]
    pub host_credential: String,
    /// Credential of job submitters (at least 16 bytes).
    #[arg(long, env = "KINDLING_CLIENT_CREDENTIAL", hide_env_values = true)]
    pub client_credential: String,
    /// Most VMs registered at once.
    #[arg(long, default_value_t = Limits::default().max_vms)]
    pub max_vms: usize,
    /// Most VMs waiting for a job at once.
    #[arg(long, default_value_t = Limits::default().max_waiting_vms)]
    pub max_waiting_vms: usize,
    /// Most jobs waiting in the queue.
    #[arg(long, default_value_t = Limits::default().max_queued_jobs)]
    pub max_queued_jobs: usize,
    /// Most log bytes kept per job (output plus a fixed cost per event).
    #[arg(long, default_value_t = Limits::default().max_log_bytes)]
    pub max_log_bytes: u64,
    /// Most events kept per job (later log chunks are dropped).
    #[arg(long, default_value_t = Limits::default().max_log_events)]
    pub max_log_events: u64,
    /// Most requests served at once, long polls aside (more get 503).
    #[arg(long, default_value_t = Limits::default().max_concurrent_requests)]
    pub max_concurrent_requests: usize,
    /// Most long polls (acquire, log follows) open at once (more get 503).
    #[arg(long, default_value_t = Limits::default().max_long_polls)]
    pub max_long_polls: usize,
    /// Ceiling on every job's timeout (e.g. "2h").
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub max_job_timeout: Duration,
    /// Time after a job's timeout before the orchestrator fails a job whose
    /// VM did not report completion.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub timeout_grace: Duration,
    /// Longest a job waits for a matching VM.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub max_queue_wait: Duration,
    /// Forget a VM that neither polls nor runs a job for this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub vm_idle_timeout: Duration,
    /// Serve TLS with this certificate chain (PEM, leaf first).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on a non-loopback address (only behind a proxy that
    /// terminates TLS).
    #[arg(long)]
    pub allow_insecure_http: bool,
}

/// Where the server is and the client credential.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Orchestrator URL.
    #[arg(long, env = "KINDLING_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Client credential.
    #[arg(long, env = "KINDLING_CLIENT_CREDENTIAL", hide_env_values = true)]
    pub credential: String,
    /// Trust only this CA certificate (PEM) for an https:// server.
    #[arg(long, env = "KINDLING_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Allow http:// to a non-loopback server.
    #[arg(long)]
    pub allow_insecure_http: bool,
}

impl ClientArgs {
    /// A client of the server these arguments name.
    pub fn client(&self) -> Result<ApiClient, ClientError> {
        ApiClient::with_transport(
            &self.server,
            &crate::client::Transport {
                ca_cert: self.ca_cert.clone(),
                allow_insecure_http: self.allow_insecure_http,
            },
        )
    }
}

/// Options of `submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job spec file.
    pub file: PathBuf,
    /// A secret for the job: NAME=VALUE, or NAME to take the value from the
    /// environment variable NAME (keeps it out of the process list).
    #[arg(long = "secret", value_name = "NAME[=VALUE]")]
    pub secrets: Vec<String>,
    /// Print the job's logs live and exit with its result.
    #[arg(long)]
    pub follow: bool,
    /// Server and credential.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options naming one job.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job id.
    pub job_id: String,
    /// Server and credential.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The job id.
    pub job_id: String,
    /// Why (shown with the job).
    #[arg(long)]
    pub reason: Option<String>,
    /// Server and credential.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Why a command failed before a job result was known.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The spec file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The spec is invalid.
    #[error("{path}: {message}")]
    Spec {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A `--secret` is malformed or names an unset variable.
    #[error("--secret {0}")]
    Secret(String),
    /// A credential is unusable.
    #[error(transparent)]
    Credentials(#[from] crate::auth::AuthError),
    /// The server failed.
    #[error(transparent)]
    Serve(#[from] crate::server::ServeError),
    /// A call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Printing failed.
    #[error("cannot print: {0}")]
    Print(std::io::Error),
}

/// Runs a command; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(args).await.map(|()| EXIT_SUCCEEDED),
        Command::Submit(args) => submit(args).await,
        Command::Status(args) => status(args).await.map(|()| EXIT_SUCCEEDED),
        Command::Logs(args) => logs(args).await,
        Command::Cancel(args) => cancel(args).await.map(|()| EXIT_SUCCEEDED),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("orchestrator: {err}");
            ExitCode::from(EXIT_OTHER)
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let credentials = Credentials::new(&args.host_credential, &args.client_credential)?;
    let limits = Limits {
        max_vms: args.max_vms,
        max_waiting_vms: args.max_waiting_vms,
        max_queued_jobs: args.max_queued_jobs,
        max_log_bytes: args.max_log_bytes,
        max_log_events: args.max_log_events,
        max_concurrent_requests: args.max_concurrent_requests,
        max_long_polls: args.max_long_polls,
        max_job_timeout: args.max_job_timeout,
        timeout_grace: args.timeout_grace,
        max_queue_wait: args.max_queue_wait,
        vm_idle_timeout: args.vm_idle_timeout,
        ..Limits::default()
    };
    let server = Server::bind(ServerConfig {
        listen: args.listen,
        archive_dir: args.archive,
        credentials,
        limits,
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        },
        allow_insecure_http: args.allow_insecure_http,
    })
    .await?;
    server.run(termination_signal()).await?;
    Ok(())
}

/// Reads and validates a spec file: JSON if it ends in `.json`, else YAML.
pub fn read_spec(path: &Path) -> Result<JobSpec, CliError> {
    let read_error = |source| CliError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut text = String::new();
    file.take(limits::MAX_SPEC_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    let parsed = if path.extension().is_some_and(|ext| ext == "json") {
        JobSpec::from_json(&text)
    } else {
        JobSpec::from_yaml(&text)
    };
    parsed.map_err(|err| CliError::Spec {
        path: path.to_owned(),
        message: err.to_string(),
    })
}

/// Parses `--secret` values: `NAME=VALUE`, or `NAME` read from the environment.
pub fn parse_secrets(args: &[String]) -> Result<Secrets, CliError> {
    parse_secrets_with(args, |name| std::env::var(name).ok())
}

/// [`parse_secrets`] with `lookup` standing in for the environment.
fn parse_secrets_with(
    args: &[String],
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Secrets, CliError> {
    let mut secrets = BTreeMap::new();
    for arg in args {
        let (name, value) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => {
                let value = lookup(arg).ok_or_else(|| {
                    CliError::Secret(format!("{arg}: no '=' and no such environment variable"))
                })?;
                (arg.clone(), value)
            }
        };
        if secrets.insert(name.clone(), value).is_some() {
            return Err(CliError::Secret(format!("{name}: given twice")));
        }
    }
    let secrets = Secrets(secrets);
    secrets
        .validate()
        .map_err(|err| CliError::Secret(err.to_string()))?;
    Ok(secrets)
}

async fn submit(args: SubmitArgs) -> Result<u8, CliError> {
    let spec = read_spec(&args.file)?;
    let secrets = parse_secrets(&args.secrets)?;
    let client = args.client.client()?;
    let credential = &args.client.credential;
    let job_id = client
        .submit(credential, &SubmitJobRequest { spec, secrets })
        .await?;
    if !args.follow {
        println!("{job_id}");
        return Ok(EXIT_SUCCEEDED);
    }
    eprintln!("[kindling] submitted job {job_id}");
    follow(&client, credential, &job_id).await
}

async fn logs(args: JobArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    follow(&client, &args.client.credential, &JobId(args.job_id)).await
}

/// Prints a job's events live and returns the exit code of its result.
async fn follow(client: &ApiClient, credential: &str, job_id: &JobId) -> Result<u8, CliError> {
    let mut printer = Printer::default();
    let report = client
        .follow(credential, job_id, |event| printer.print(event))
        .await?;
    printer
        .error
        .map_or(Ok(()), |err| Err(CliError::Print(err)))?;
    let state = &report.status.state;
    match &report.detail {
        Some(detail) => eprintln!("[kindling] job {job_id} {}: {detail}", state_name(state)),
        None => eprintln!("[kindling] job {job_id} {}", state_name(state)),
    }
    Ok(exit_code(&report))
}

/// The exit code for a job's final report.
pub fn exit_code(report: &JobReport) -> u8 {
    match report.status.state {
        JobState::Succeeded => EXIT_SUCCEEDED,
        JobState::Failed { .. } => EXIT_FAILED,
        _ => EXIT_OTHER,
    }
}

/// Writes job events to stdout/stderr, remembering the first write error.
#[derive(Default)]
struct Printer {
    error: Option<std::io::Error>,
}

impl Printer {
    fn print(&mut self, event: &JobEvent) {
        if self.error.is_some() {
            return;
        }
        let written = match &event.event {
            JobEventKind::LogChunk(chunk) => match chunk.stream {
                OutputStream::Stdout => write_flush(&mut std::io::stdout().lock(), &chunk.data),
                OutputStream::Stderr => write_flush(&mut std::io::stderr().lock(), &chunk.data),
            },
            JobEventKind::StepStarted(started) => {
                let line = format!("[kindling] step {} {:?}\n", started.step, started.name);
                write_flush(&mut std::io::stderr().lock(), line.as_bytes())
            }
            JobEventKind::StepFinished(finished) => {
                let how = match (finished.exit_code, finished.signal) {
                    (Some(code), _) => format!("exit code {code}"),
                    (None, Some(signal)) => format!("signal {signal}"),
                    (None, None) => "no status".to_owned(),
                };
                let line = format!(
                    "[kindling] step {} finished: {how} in {}\n",
                    finished.step,
                    humantime::format_duration(Duration::from_millis(finished.duration_ms))
                );
                write_flush(&mut std::io::stderr().lock(), line.as_bytes())
            }
            JobEventKind::JobFinished(_) => Ok(()),
        };
        self.error = written.err();
    }
}

fn write_flush(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(bytes)?;
    out.flush()
}

async fn status(args: JobArgs) -> Result<(), CliError> {
    let client = args.client.client()?;
    let report = client
        .job(&args.client.credential, &JobId(args.job_id))
        .await?;
    print_json(&report)
}

async fn cancel(args: CancelArgs) -> Result<(), CliError> {
    let client = args.client.client()?;
    let report = client
        .cancel(&args.client.credential, &JobId(args.job_id), args.reason)
        .await?;
    print_json(&report)
}

fn print_json(report: &JobReport) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(report)
        .map_err(|err| CliError::Print(std::io::Error::other(err)))?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_from_arguments_and_environment() {
        let env = |name: &str| (name == "FROM_ENV").then(|| "from-env".to_owned());
        let secrets =
            parse_secrets_with(&["TOKEN=a=b".to_owned(), "FROM_ENV".to_owned()], env).unwrap();
        assert_eq!(secrets.0["TOKEN"], "a=b");
        assert_eq!(secrets.0["FROM_ENV"], "from-env");
        assert!(parse_secrets_with(&["UNSET".to_owned()], env).is_err());
        assert!(parse_secrets(&["A=1".to_owned(), "A=2".to_owned()]).is_err());
        let err = parse_secrets(&["1BAD=x".to_owned()]).unwrap_err();
        assert!(err.to_string().contains("1BAD"), "{err}");
        assert!(!err.to_string().contains("=x"), "values are never echoed");
    }

    #[test]
    fn spec_files_are_parsed_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("job.yaml");
        std::fs::write(&yaml, "name: a\nruns-on: linux\nsteps:\n  - run: echo hi\n").unwrap();
        assert_eq!(read_spec(&yaml).unwrap().runs_on, ["linux"]);
        let json = dir.path().join("job.json");
        std::fs::write(
            &json,
            r#"{"name":"a","runs-on":["x"],"steps":[{"run":"true"}]}"#,
        )
        .unwrap();
        assert_eq!(read_spec(&json).unwrap().runs_on, ["x"]);
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "name: a\nruns-on: linux\nsteps: []\n").unwrap();
        let err = read_spec(&bad).unwrap_err().to_string();
        assert!(err.contains("steps: must not be empty"), "{err}");
    }

    #[test]
    fn cli_parses_the_documented_commands() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "orchestrator",
            "submit",
            "job.yaml",
            "--server",
            "http://127.0.0.1:1",
            "--credential",
            "c",
            "--secret",
            "A=1",
            "--follow",
        ])
        .unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit");
        };
        assert!(args.follow);
        assert_eq!(args.secrets, ["A=1"]);
    }
}
