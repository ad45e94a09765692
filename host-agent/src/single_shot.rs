//! `host-agent run job.yaml`: the whole lifecycle on one machine, once.
//!
//! Starts an embedded orchestrator on loopback with fresh credentials, a
//! one-VM pool whose labels are the job's `runs-on`, submits the job, prints
//! its logs live as they arrive, and after the VM is destroyed prints a
//! timing summary. Nothing may be left behind: once the VM is torn down,
//! what is still there (VMM processes, VM directories and records, taps,
//! nftables elements, cgroups) is measured *before* the state directory
//! (archive included) is removed (unless the caller named one); anything
//! left is listed, and the run exits with [`EXIT_LEFTOVERS`].

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use orchestrator::auth::{Credentials, random_hex};
use orchestrator::client::ApiClient;
use orchestrator::config::{Limits as OrchestratorLimits, ServerConfig};
use orchestrator::server::Server;
use protocol::api::{JobEventKind, JobState, SubmitJobRequest};
use protocol::job::JobSpec;
use protocol::message::{OutputStream, Secrets};

use crate::agent::Agent;
use crate::config::{
    Config, Limits, NetworkConfig, OrchestratorConfig, PoolConfig, PoolNetwork, RateLimitConfig,
};
use crate::pool::CycleReport;

/// What `host-agent run` needs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The job spec file (YAML or JSON).
    pub job: PathBuf,
    /// Secrets by name.
    pub secrets: Vec<(String, String)>,
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Root image.
    pub image: PathBuf,
    /// vCPUs of the VM.
    pub vcpus: u8,
    /// Memory of the VM in MiB.
    pub memory_mib: u32,
    /// State directory; a temporary one (removed at the end) if `None`.
    pub state_dir: Option<PathBuf>,
    /// Seconds to wait for the runner agent's Hello.
    pub boot_timeout_secs: u64,
    /// Start the VMM through the jailer (on unless `--no-jail`).
    pub jail: bool,
    /// The VM's network (a job with `network: false` gets none).
    pub network: PoolNetwork,
    /// Resolver for the guest's DNS path (default: the host's).
    pub dns: Option<std::net::Ipv4Addr>,
    /// The VM's rate limits.
    pub rate_limit: RateLimitConfig,
}

/// How long the job may take to show as ended once its VM is gone.
const VM_GONE_SETTLE: Duration = Duration::from_secs(5);
/// How long killed processes may take to be gone before they count as left.
const LEFTOVER_SETTLE: Duration = Duration::from_secs(3);
/// The exit code when something was left on the host (whatever the job's
/// result).
pub const EXIT_LEFTOVERS: i32 = 3;

/// Runs the job; returns the process exit code (0 succeeded, 1 failed, 2
/// other, [`EXIT_LEFTOVERS`] if anything was left on the host).
pub async fn run(opts: RunOptions) -> Result<i32, String> {
    let t0 = Instant::now();
    let text = std::fs::read_to_string(&opts.job)
        .map_err(|e| format!("cannot read {}: {e}", opts.job.display()))?;
    let spec = if opts.job.extension().is_some_and(|e| e == "json") {
        JobSpec::from_json(&text)
    } else {
        JobSpec::from_yaml(&text)
    }
    .map_err(|e| format!("{}: {e}", opts.job.display()))?;
    spec.validate()
        .map_err(|e| format!("{}: {e}", opts.job.display()))?;

    let temp_state = opts.state_dir.is_none();
    let state_dir = match &opts.state_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kindling-run-{}", std::process::id())),
    };
    let host_credential = random_hex(24).map_err(|e| e.to_string())?;
    let client_credential = random_hex(24).map_err(|e| e.to_string())?;
    let credentials =
        Credentials::new(&host_credential, &client_credential).map_err(|e| e.to_string())?;
    let server = Server::bind(ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        archive_dir: state_dir.join("archive"),
        credentials,
        limits: OrchestratorLimits::default(),
        tls: None,
        allow_insecure_http: false,
    })
    .await
    .map_err(|e| format!("starting the embedded orchestrator: {e}"))?;
    let url = format!("http://{}", server.local_addr().map_err(|e| e.to_string())?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));

    let labels = if spec.runs_on.is_empty() {
        vec!["default".to_string()]
    } else {
        spec.runs_on.clone()
    };
    let config = Config {
        host_id: "single-shot".into(),
        state_dir: state_dir.clone(),
        vmm: opts.vmm.clone(),
        metrics_listen: None,
        shutdown_grace_secs: 0,
        network: NetworkConfig {
            dns: opts.dns,
            ..NetworkConfig::default()
        },
        orchestrator: OrchestratorConfig {
            url: url.clone(),
            host_credential,
            ca_cert: None,
            allow_insecure_http: false,
        },
        limits: Limits {
            vcpus: u32::from(opts.vcpus),
            memory_mib: u64::from(opts.memory_mib),
        },
        pools: vec![PoolConfig {
            name: "run".into(),
            labels,
            size: 1,
            vcpus: opts.vcpus,
            memory_mib: opts.memory_mib,
            kernel: opts.kernel.clone(),
            image: opts.image.clone(),
            cmdline_extra: String::new(),
            boot_timeout_secs: opts.boot_timeout_secs,
            // One job, no neighbours to protect.
            log_kib_per_sec: 0,
            network: if spec.network {
                opts.network
            } else {
                PoolNetwork::None
            },
            allow: Vec::new(),
            rate_limit: opts.rate_limit,
            conntrack_limit: crate::config::DEFAULT_CONNTRACK_LIMIT,
        }],
        jail: crate::jail::JailConfig {
            enabled: opts.jail,
            ..crate::jail::JailConfig::default()
        },
    };
    config.validate().map_err(|e| e.to_string())?;
    let mut probe = crate::leftovers::Probe {
        state_dir: state_dir.clone(),
        nft: (config.pools[0].network != PoolNetwork::None).then(|| config.network.nft.clone()),
        ..Default::default()
    };
    let cgroup_parent = config
        .jail
        .enabled
        .then(|| config.jail.cgroup_parent.clone());
    let setup = t0.elapsed();

    eprintln!(
        "==> booting a microVM for job '{}' ({} step(s))",
        spec.name,
        spec.steps.len()
    );
    let agent = Agent::start(config, true)
        .await
        .map_err(|e| e.to_string())?;
    let client = ApiClient::new(&url).map_err(|e| e.to_string())?;
    let secrets = Secrets(opts.secrets.into_iter().collect());
    let submitted = Instant::now();
    let job_id = client
        .submit(&client_credential, &SubmitJobRequest { spec, secrets })
        .await
        .map_err(|e| format!("submitting the job: {e}"))?;
    let mut first_line: Option<Duration> = None;
    let (report, cycles) = {
        let follow = client.follow(&client_credential, &job_id, |event| {
            print_event(&event.event, submitted, &mut first_line);
        });
        tokio::pin!(follow);
        let join = agent.join();
        tokio::pin!(join);
        tokio::select! {
            report = &mut follow => (report.map_err(|e| format!("following the job: {e}")), join.await),
            cycles = &mut join => {
                // The VM's one cycle is over. If it ran the job, the job's
                // last event is posted already; if it failed before taking
                // it (boot failure), nothing will ever run the job.
                let report = match tokio::time::timeout(VM_GONE_SETTLE, &mut follow).await {
                    Ok(report) => report.map_err(|e| format!("following the job: {e}")),
                    Err(_) => Err(format!(
                        "the VM ended before it ran the job: {}",
                        cycles
                            .first()
                            .and_then(|c| c.failure.clone())
                            .unwrap_or_else(|| "no reason recorded".into())
                    )),
                };
                (report, cycles)
            }
        }
    };
    let _ = stop_tx.send(());
    let _ = server_task.await;
    // Measured before the state directory goes (it holds what is counted).
    probe.spawned = cycles.iter().filter_map(|c| c.vmm).collect();
    if let Some(parent) = &cgroup_parent {
        probe.cgroups = cycles
            .iter()
            .filter(|c| !c.vm_name.is_empty())
            .map(|c| parent.join(&c.vm_name))
            .collect();
    }
    let leftovers = crate::leftovers::measure_settled(&probe, LEFTOVER_SETTLE).await;
    if temp_state {
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            warn_leftovers(&leftovers);
            return Err(e);
        }
    };

    let code = match &report.status.state {
        _ if leftovers.total() > 0 => EXIT_LEFTOVERS,
        JobState::Succeeded => 0,
        JobState::Failed { .. } => 1,
        _ => 2,
    };
    eprintln!();
    eprintln!(
        "job {}: {}",
        job_id,
        describe(&report.status.state, report.detail.as_deref())
    );
    print_summary(
        setup,
        submitted.elapsed(),
        first_line,
        cycles.first(),
        &leftovers,
    );
    Ok(code)
}

fn print_event(event: &JobEventKind, submitted: Instant, first_line: &mut Option<Duration>) {
    match event {
        JobEventKind::StepStarted(s) => eprintln!("==> step {}: {}", s.step + 1, s.name),
        JobEventKind::LogChunk(chunk) => {
            first_line.get_or_insert_with(|| submitted.elapsed());
            let result = match chunk.stream {
                OutputStream::Stdout => std::io::stdout()
                    .write_all(&chunk.data)
                    .and_then(|_| std::io::stdout().flush()),
                OutputStream::Stderr => std::io::stderr().write_all(&chunk.data),
            };
            let _ = result;
        }
        JobEventKind::StepFinished(f) => {
            let how = match (f.exit_code, f.signal) {
                (Some(code), _) => format!("exit {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                (None, None) => "ended".into(),
            };
            eprintln!(
                "<== step {}: {how} in {:.2} s",
                f.step + 1,
                f.duration_ms as f64 / 1000.0
            );
        }
        JobEventKind::JobFinished(_) => {}
    }
}

fn describe(state: &JobState, detail: Option<&str>) -> String {
    let base = match state {
        JobState::Succeeded => "succeeded".to_string(),
        JobState::Failed { step } => format!("failed at step {}", step + 1),
        JobState::TimedOut { step } => format!("timed out in step {}", step + 1),
        JobState::Cancelled => "cancelled".into(),
        JobState::Error { reason } => format!("error: {reason}"),
        other => format!("{other:?}"),
    };
    match detail {
        Some(d) if !base.contains(d) => format!("{base} ({d})"),
        _ => base,
    }
}

fn print_summary(
    setup: Duration,
    total: Duration,
    first_line: Option<Duration>,
    cycle: Option<&CycleReport>,
    leftovers: &crate::leftovers::Leftovers,
) {
    let secs =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:>8.3} s", d.as_secs_f64()));
    eprintln!("timing summary:");
    eprintln!("  setup (orchestrator, config)      {}", secs(Some(setup)));
    if let Some(c) = cycle {
        eprintln!(
            "  boot: VMM start -> agent Hello    {}",
            secs(c.boot_to_hello)
        );
        eprintln!(
            "  agent Hello -> Ready              {}",
            secs(c.hello_to_ready)
        );
        eprintln!(
            "  dispatch: job -> first log chunk  {}",
            secs(c.dispatch_to_first_log)
        );
        eprintln!("  run: job -> job finished          {}", secs(c.run));
        eprintln!("  teardown                          {}", secs(c.teardown));
        if let Some(why) = &c.failure {
            eprintln!("  VM failure: {why}");
        }
    }
    eprintln!("  submit -> first log line (client) {}", secs(first_line));
    eprintln!("  submit -> VM destroyed            {}", secs(Some(total)));
    eprintln!(
        "  VMs left on this host             {:>8}",
        leftovers.total()
    );
    warn_leftovers(leftovers);
}

/// Lists what was left, if anything, with a warning.
fn warn_leftovers(leftovers: &crate::leftovers::Leftovers) {
    let left = leftovers.total();
    if left > 0 {
        for line in leftovers.breakdown() {
            eprintln!("    {line}");
        }
        eprintln!("WARNING: this run left {left} thing(s) on the host (listed above)");
    }
}
