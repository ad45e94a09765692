//! Keeps every pool at its size: one task per slot runs the slot's cycle
//! forever (or once, in single-shot mode):
//!
//! register with the orchestrator (VM id + token) -> spawn the VMM ->
//! wait for the runner agent's `Hello` and `Ready` -> long-poll for a job
//! with the VM's token -> relay the job -> tear down (kill the VMM, delete
//! its directory, deregister so the token dies) -> start over.
//!
//! Every failure on the way ends in the same teardown; a job that was
//! already handed to the VM is reported with a reason by the relay.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use orchestrator::client::ApiClient;
use protocol::api::{RegisterVmRequest, VmId, VmToken};
use protocol::message::{Job, JobResult};
use tokio::sync::watch;

use crate::config::{Config, PoolConfig, PoolNetwork};
use crate::log_rate::LogRateLimit;
use crate::metrics::Metrics;
use crate::net::{Network, VmNetwork};
use crate::relay::run_job;
use crate::sink::OrchestratorSink;
use crate::vm::{BASE_CMDLINE, RunningVm, VmSpec};

/// Long-poll wait per acquire request, in seconds.
const ACQUIRE_WAIT_SECS: u32 = 20;
/// Pause after a failed cycle before the next one, so a broken pool does
/// not spin.
const FAILURE_BACKOFF: Duration = Duration::from_secs(2);
/// How long the guest may take from `Hello` to `Ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Phase timings of one slot cycle, for logs and the single-shot summary.
#[derive(Debug, Clone, Default)]
pub struct CycleReport {
    /// The VM's name on this host.
    pub vm_name: String,
    /// VMM spawn to `Hello`.
    pub boot_to_hello: Option<Duration>,
    /// `Hello` to `Ready`.
    pub hello_to_ready: Option<Duration>,
    /// VM ready to job acquired (time the warm VM waited).
    pub idle: Option<Duration>,
    /// Job acquired to its first log chunk.
    pub dispatch_to_first_log: Option<Duration>,
    /// Job acquired to job finished.
    pub run: Option<Duration>,
    /// Teardown (kill, reap, delete, deregister).
    pub teardown: Option<Duration>,
    /// How the job ended, if the VM got one.
    pub result: Option<JobResult>,
    /// Why the cycle failed before a job, if it did.
    pub failure: Option<String>,
    /// The process spawned for the VM (to check that none is left).
    pub vmm: Option<crate::process::ProcessIdentity>,
}

/// What the slots share.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// Orchestrator client.
    pub client: ApiClient,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Becomes `true` when the agent stops taking jobs.
    pub draining: watch::Receiver<bool>,
    /// Guest networking (taps, addresses, policy), if any pool has a network.
    pub network: Option<Network>,
    next_cid: AtomicU32,
}

impl Shared {
    /// Bundles what the slots need.
    pub fn new(
        config: Config,
        client: ApiClient,
        metrics: Arc<Metrics>,
        draining: watch::Receiver<bool>,
        network: Option<Network>,
    ) -> Self {
        Self {
            config,
            client,
            metrics,
            draining,
            network,
            next_cid: AtomicU32::new(protocol::ports::FIRST_GUEST_CID),
        }
    }

    fn cid(&self) -> u32 {
        self.next_cid.fetch_add(1, Ordering::Relaxed)
    }
}

/// Runs one slot of `pool` until the agent drains (or after one cycle when
/// `once`); returns the report of every cycle.
pub async fn run_slot(
    shared: Arc<Shared>,
    pool: PoolConfig,
    slot: u32,
    once: bool,
) -> Vec<CycleReport> {
    let mut reports = Vec::new();
    loop {
        if *shared.draining.borrow() {
            break;
        }
        let report = cycle(&shared, &pool, slot).await;
        let failed = report.failure.is_some();
        if let Some(why) = &report.failure {
            tracing::warn!(pool = %pool.name, vm = %report.vm_name, "VM cycle failed: {why}");
        }
        reports.push(report);
        if once {
            break;
        }
        if failed {
            let mut draining = shared.draining.clone();
            tokio::select! {
                _ = tokio::time::sleep(FAILURE_BACKOFF) => {}
                _ = draining.wait_for(|d| *d) => {}
            }
        }
    }
    reports
}

async fn register(shared: &Shared, pool: &PoolConfig) -> Result<(VmId, VmToken), String> {
    let request = RegisterVmRequest {
        host_id: shared.config.host_id.clone(),
        labels: pool.labels.clone(),
        network: pool.network != PoolNetwork::None,
    };
    let response = shared
        .client
        .register_vm(&shared.config.orchestrator.host_credential, &request)
        .await
        .map_err(|e| {
            shared.metrics.orchestrator_errors.inc();
            format!("registering with the orchestrator failed: {e}")
        })?;
    Ok((response.vm_id, response.token))
}

async fn deregister(shared: &Shared, vm_id: &VmId) {
    if let Err(e) = shared
        .client
        .deregister_vm(&shared.config.orchestrator.host_credential, vm_id)
        .await
    {
        shared.metrics.orchestrator_errors.inc();
        tracing::warn!(vm = %vm_id, "deregistering failed: {e}");
    }
}

/// One VM's life.
async fn cycle(shared: &Shared, pool: &PoolConfig, slot: u32) -> CycleReport {
    let mut report = CycleReport::default();
    let (vm_id, token) = match register(shared, pool).await {
        Ok(r) => r,
        Err(e) => {
            report.failure = Some(e);
            return report;
        }
    };
    report.vm_name = format!("{}-{slot}-{}", pool.name, short(&vm_id.0));
    let cid = shared.cid();
    let jail = shared.config.jail.enabled.then(|| {
        shared
            .config
            .jail
            .for_vm(&report.vm_name, cid, pool.vcpus, pool.memory_mib)
    });
    // The jailed VMM opens its tap by name as its own uid.
    let owner = jail.as_ref().map(|j| (j.uid, j.gid));
    let network = match attach_network(shared, pool, owner).await {
        Ok(network) => network,
        Err(e) => {
            deregister(shared, &vm_id).await;
            report.failure = Some(e);
            return report;
        }
    };
    let mut cmdline = format!("{BASE_CMDLINE} {}", pool.cmdline_extra);
    if let Some(net) = &network {
        cmdline = format!("{cmdline} {}", net.kernel_param());
    }
    let spec = VmSpec {
        name: report.vm_name.clone(),
        vcpus: pool.vcpus,
        memory_mib: pool.memory_mib,
        kernel: pool.kernel.clone(),
        image: pool.image.clone(),
        cmdline: cmdline.trim().to_string(),
        cid,
        jail,
        network: network.clone(),
    };
    let metrics = &shared.metrics;
    metrics.vm_state(&pool.name, "booting", 1);
    metrics.boots.inc();
    let vm = RunningVm::spawn(&shared.config.vmm, &shared.config.state_dir, spec).await;
    let mut vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            metrics.vm_state(&pool.name, "booting", -1);
            detach_network(shared, network.as_ref()).await;
            deregister(shared, &vm_id).await;
            report.failure = Some(e.to_string());
            return report;
        }
    };
    report.vmm = vm.process();
    // If this agent dies, its successor's clean-up deregisters the VM.
    if let Err(e) = vm.record_vm_id(&vm_id.0) {
        tracing::warn!(vm = %report.vm_name, "cannot record the VM id: {e}");
    }
    let outcome = serve_vm(shared, pool, &mut vm, &vm_id, &token, &mut report).await;
    if let Err(e) = outcome {
        report.failure = Some(e);
    }
    let t = Instant::now();
    vm.destroy().await;
    detach_network(shared, network.as_ref()).await;
    deregister(shared, &vm_id).await;
    let teardown = t.elapsed();
    metrics.teardown_seconds.observe(teardown.as_secs_f64());
    report.teardown = Some(teardown);
    tracing::info!(vm = %report.vm_name, teardown_ms = teardown.as_millis() as u64, "VM destroyed");
    report
}

/// The VM's tap, address and policy, if its pool has a network.
async fn attach_network(
    shared: &Shared,
    pool: &PoolConfig,
    owner: Option<(u32, u32)>,
) -> Result<Option<VmNetwork>, String> {
    if pool.network == PoolNetwork::None {
        return Ok(None);
    }
    let network = shared
        .network
        .as_ref()
        .ok_or("pool has a network but the agent's networking is not started")?;
    network
        .attach(&pool.name, owner, pool.rate_limit.vmm_options())
        .await
        .map(Some)
        .map_err(|e| format!("setting up the VM's network: {e}"))
}

async fn detach_network(shared: &Shared, network: Option<&VmNetwork>) {
    if let (Some(net), Some(vm_net)) = (&shared.network, network) {
        net.detach(vm_net).await;
    }
}

/// Boot, wait for a job, run it. Keeps the per-state gauge in step.
async fn serve_vm(
    shared: &Shared,
    pool: &PoolConfig,
    vm: &mut RunningVm,
    vm_id: &VmId,
    token: &VmToken,
    report: &mut CycleReport,
) -> Result<(), String> {
    let metrics = &shared.metrics;
    let name = pool.name.as_str();
    let hello = vm
        .wait_hello(Duration::from_secs(pool.boot_timeout_secs))
        .await;
    metrics.vm_state(name, "booting", -1);
    let mut channel = hello.map_err(|e| e.to_string())?;
    let boot = vm.started.elapsed();
    report.boot_to_hello = Some(boot);
    metrics.boot_to_hello_seconds.observe(boot.as_secs_f64());
    tracing::info!(vm = %report.vm_name, boot_ms = boot.as_millis() as u64, agent = %channel.hello.agent_version, "runner agent said Hello");
    let t = Instant::now();
    channel
        .wait_ready(READY_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    report.hello_to_ready = Some(t.elapsed());

    metrics.vm_state(name, "idle", 1);
    let ready_at = Instant::now();
    let job = wait_for_job(shared, vm, vm_id, token).await;
    metrics.vm_state(name, "idle", -1);
    let job = job?;
    report.idle = Some(ready_at.elapsed());
    tracing::info!(vm = %report.vm_name, job = %job.id, "job acquired");

    metrics.vm_state(name, "running", 1);
    let acquired = Instant::now();
    let mut sink = OrchestratorSink::new(shared.client.clone(), job.id.clone(), token.clone());
    let log_rate = std::num::NonZeroU64::new(pool.log_kib_per_sec.saturating_mul(1024))
        .map(|rate| LogRateLimit::new(rate, Instant::now()));
    let outcome = run_job(vm, &mut channel, &job, &mut sink, log_rate).await;
    metrics.vm_state(name, "running", -1);
    report.dispatch_to_first_log = outcome.first_log.map(|t| t - acquired);
    report.run = Some(outcome.finished - acquired);
    metrics.job_outcome(result_label(&outcome.result));
    if outcome.final_post_error.is_some() {
        // Logged with the job's id by the relay.
        metrics.orchestrator_errors.inc();
    }
    tracing::info!(vm = %report.vm_name, job = %job.id, result = ?outcome.result, "job ended");
    report.result = Some(outcome.result);
    Ok(())
}

/// Long-polls until the orchestrator hands this VM a job; fails if the VM
/// dies meanwhile or the agent starts draining.
async fn wait_for_job(
    shared: &Shared,
    vm: &mut RunningVm,
    vm_id: &VmId,
    token: &VmToken,
) -> Result<Job, String> {
    let mut draining = shared.draining.clone();
    loop {
        tokio::select! {
            r = shared.client.acquire(vm_id, token, ACQUIRE_WAIT_SECS) => match r {
                Ok(Some(job)) => return Ok(job),
                Ok(None) => continue,
                Err(e) => {
                    shared.metrics.orchestrator_errors.inc();
                    return Err(format!("acquiring a job failed: {e}"));
                }
            },
            status = vm.exited() => return Err(format!("vm exited with {status} while idle{}", vm.log_tail())),
            _ = draining.wait_for(|d| *d) => return Err("agent is draining".into()),
        }
    }
}

fn result_label(result: &JobResult) -> &'static str {
    match result {
        JobResult::Succeeded => "succeeded",
        JobResult::Failed { .. } => "failed",
        JobResult::TimedOut { .. } => "timed_out",
        JobResult::Cancelled => "cancelled",
        JobResult::Error { .. } => "error",
    }
}

fn short(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect()
}

/// The state directory's VM directories (used by the startup clean-up).
pub fn vms_dir(config: &Config) -> PathBuf {
    config.state_dir.join("vms")
}
