//! Keeps every pool at its size: one task per slot runs the slot's cycle
//! forever (or once, in single-shot mode):
//!
//! register with the orchestrator (VM id + token) -> spawn the VMM ->
//! wait for the runner agent's `Hello` and `Ready` -> long-poll for a job
//! with the VM's token -> relay the job -> tear down (kill the VMM, delete
//! its directory, deregister so the token dies) -> start over.
//!
//! Every failure on the way ends in the same teardown; a job that was
//! already handed to the VM is reported with a reason by the relay, or, if
//! it never reached the guest, handed back to the orchestrator's queue.
//! While the VM waits for a job, the idle watch ([`crate::idle`]) reads
//! its guest channel and replaces a guest that went silent or died.
//!
//! A cycle that panics does not take its slot with it: what the cycle
//! holds (VM id, tap, VMM) lives outside its future, in [`Held`], so the
//! slot tears the VM down, logs and counts the panic
//! (`slot_restarts_total`) and starts a fresh cycle after a backoff.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use orchestrator::client::ApiClient;
use protocol::api::{RegisterVmRequest, VmId, VmToken};
use protocol::message::JobResult;
use protocol::session::HEARTBEAT_TIMEOUT;
use tokio::sync::watch;

use crate::config::{Config, PoolConfig, PoolNetwork};
use crate::idle;
use crate::log_rate::LogRateLimit;
use crate::metrics::Metrics;
use crate::net::{Network, VmNetwork};
use crate::relay::relay_sent_job;
use crate::sink::OrchestratorSink;
use crate::vm::{BASE_CMDLINE, RunningVm, VmSpec};

/// Pause after a failed cycle before the next one, so a broken pool does
/// not spin.
const FAILURE_BACKOFF: Duration = Duration::from_secs(2);
/// How long the guest may take from `Hello` to `Ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// First pause after a cycle panicked; doubles per panic in a row.
const PANIC_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause after panics in a row.
const MAX_PANIC_BACKOFF: Duration = Duration::from_secs(60);

/// Timing knobs of the slots, and a test seam. [`Tuning::default`] is
/// what the daemon uses.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Guest silence (no frame at all, heartbeats included) after which
    /// an idle VM is replaced.
    pub idle_silence: Duration,
    /// Test seam (fault injection): this many of the next cycles panic as
    /// soon as their VM is idle. Zero in the daemon.
    pub panics_when_idle: Arc<AtomicU32>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            idle_silence: HEARTBEAT_TIMEOUT,
            panics_when_idle: Arc::new(AtomicU32::new(0)),
        }
    }
}

impl Tuning {
    /// Takes one injected panic, if any is left.
    fn take_panic(&self) -> bool {
        self.panics_when_idle
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

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
    /// Timing knobs and the test seam.
    pub tuning: Tuning,
    next_cid: AtomicU32,
    /// The jailed VMMs' uids (one per live VM).
    uids: Arc<crate::jail::UidAllocator>,
}

impl Shared {
    /// Bundles what the slots need.
    pub fn new(
        config: Config,
        client: ApiClient,
        metrics: Arc<Metrics>,
        draining: watch::Receiver<bool>,
        network: Option<Network>,
        tuning: Tuning,
    ) -> Self {
        Self {
            uids: config.jail.uid_allocator(),
            config,
            client,
            metrics,
            draining,
            network,
            tuning,
            next_cid: AtomicU32::new(protocol::ports::FIRST_GUEST_CID),
        }
    }

    fn cid(&self) -> u32 {
        self.next_cid.fetch_add(1, Ordering::Relaxed)
    }
}

/// Runs one slot of `pool` until the agent drains (or after one cycle when
/// `once`); returns the report of every cycle. A cycle that panics is
/// logged and counted, its VM torn down, and the slot goes on after a
/// backoff (doubling while cycles keep panicking).
pub async fn run_slot(
    shared: Arc<Shared>,
    pool: PoolConfig,
    slot: u32,
    once: bool,
) -> Vec<CycleReport> {
    let mut reports = Vec::new();
    let mut panic_backoff = PANIC_BACKOFF;
    loop {
        if *shared.draining.borrow() {
            break;
        }
        let mut held = Held::default();
        let cycle = AssertUnwindSafe(cycle(&shared, &pool, slot, &mut held)).catch_unwind();
        let (mut report, backoff) = match cycle.await {
            Ok(report) => {
                panic_backoff = PANIC_BACKOFF;
                let backoff = report.failure.is_some().then_some(FAILURE_BACKOFF);
                (report, backoff)
            }
            Err(panic) => {
                let why = panic_message(panic.as_ref());
                tracing::error!(pool = %pool.name, slot, vm = %held.vm_name,
                    "slot task panicked: {why}; tearing its VM down and restarting the slot");
                shared.metrics.slot_restart(&pool.name);
                let report = CycleReport {
                    vm_name: held.vm_name.clone(),
                    failure: Some(format!("slot task panicked: {why}")),
                    ..CycleReport::default()
                };
                let backoff = panic_backoff;
                panic_backoff = (panic_backoff * 2).min(MAX_PANIC_BACKOFF);
                (report, Some(backoff))
            }
        };
        report.teardown = held.teardown(&shared).await;
        if let Some(why) = &report.failure {
            tracing::warn!(pool = %pool.name, slot, vm = %report.vm_name, "VM cycle failed: {why}");
        }
        reports.push(report);
        if once {
            break;
        }
        if let Some(backoff) = backoff {
            let mut draining = shared.draining.clone();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = draining.wait_for(|d| *d) => {}
            }
        }
    }
    reports
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// What a cycle has acquired and the slot must release when the cycle
/// ends, however it ends (also when it panicked).
#[derive(Default)]
struct Held {
    /// The VM's name on this host, once it has one.
    vm_name: String,
    /// Registered with the orchestrator.
    vm_id: Option<VmId>,
    /// Its tap, address and policy.
    network: Option<VmNetwork>,
    /// Its VMM.
    vm: Option<RunningVm>,
}

impl Held {
    /// Kills the VMM and deletes its directory, removes its network, and
    /// deregisters it (its token dies). Returns the time taken when there
    /// was a VM.
    async fn teardown(self, shared: &Shared) -> Option<Duration> {
        let t = Instant::now();
        let had_vm = self.vm.is_some();
        if let Some(vm) = self.vm {
            vm.destroy().await;
        }
        detach_network(shared, self.network.as_ref()).await;
        if let Some(vm_id) = &self.vm_id {
            deregister(shared, vm_id).await;
        }
        if !had_vm {
            return None;
        }
        let teardown = t.elapsed();
        shared
            .metrics
            .teardown_seconds
            .observe(teardown.as_secs_f64());
        tracing::info!(vm = %self.vm_name, teardown_ms = teardown.as_millis() as u64, "VM destroyed");
        Some(teardown)
    }
}

/// The VM's place in the per-state gauge; leaves it when dropped, so a
/// panicking cycle does not leave its VM counted.
struct StateGauge<'a> {
    metrics: &'a Metrics,
    pool: &'a str,
    state: Option<&'static str>,
}

impl<'a> StateGauge<'a> {
    fn new(metrics: &'a Metrics, pool: &'a str) -> Self {
        Self {
            metrics,
            pool,
            state: None,
        }
    }

    fn set(&mut self, state: Option<&'static str>) {
        if let Some(old) = self.state {
            self.metrics.vm_state(self.pool, old, -1);
        }
        if let Some(new) = state {
            self.metrics.vm_state(self.pool, new, 1);
        }
        self.state = state;
    }
}

impl Drop for StateGauge<'_> {
    fn drop(&mut self) {
        self.set(None);
    }
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

/// Releases the VM at the orchestrator before it is torn down: no job is
/// handed to it any more, and a job it acquired but never started goes
/// back to the queue. Returns that job's id.
async fn release(
    shared: &Shared,
    vm_id: &VmId,
    token: &VmToken,
) -> Option<protocol::message::JobId> {
    match shared.client.release_vm(vm_id, token).await {
        Ok(requeued) => requeued,
        Err(e) => {
            shared.metrics.orchestrator_errors.inc();
            tracing::warn!(vm = %vm_id, "releasing the VM failed: {e}");
            None
        }
    }
}

/// One VM's life up to its teardown: everything it acquires goes into
/// `held`, which the slot releases.
async fn cycle(shared: &Shared, pool: &PoolConfig, slot: u32, held: &mut Held) -> CycleReport {
    let mut report = CycleReport::default();
    let (vm_id, token) = match register(shared, pool).await {
        Ok(r) => r,
        Err(e) => {
            report.failure = Some(e);
            return report;
        }
    };
    held.vm_id = Some(vm_id.clone());
    report.vm_name = format!("{}-{slot}-{}", pool.name, short(&vm_id.0));
    held.vm_name = report.vm_name.clone();
    let cid = shared.cid();
    // The VM holds its uid until its spec is dropped, after teardown.
    let jail = match shared.config.jail.enabled.then(|| shared.uids.allocate()) {
        None => None,
        Some(Ok(uid)) => Some(shared.config.jail.for_vm(
            &report.vm_name,
            uid,
            pool.vcpus,
            pool.memory_mib,
        )),
        Some(Err(e)) => {
            deregister(shared, &vm_id).await;
            report.failure = Some(e.to_string());
            return report;
        }
    };
    let network = match attach_network(shared, pool).await {
        Ok(network) => network,
        Err(e) => {
            report.failure = Some(e);
            return report;
        }
    };
    held.network = network.clone();
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
        network,
    };
    let metrics = &shared.metrics;
    let mut state = StateGauge::new(metrics, &pool.name);
    state.set(Some("booting"));
    metrics.boots.inc();
    let vm = RunningVm::spawn(&shared.config.vmm, &shared.config.state_dir, spec).await;
    let vm = match vm {
        Ok(vm) => held.vm.insert(vm),
        Err(e) => {
            report.failure = Some(e.to_string());
            return report;
        }
    };
    report.vmm = vm.process();
    // If this agent dies, its successor's clean-up deregisters the VM.
    if let Err(e) = vm.record_vm_id(&vm_id.0) {
        tracing::warn!(vm = %report.vm_name, "cannot record the VM id: {e}");
    }
    let outcome = serve_vm(shared, pool, vm, &vm_id, &token, &mut state, &mut report).await;
    if let Err(e) = outcome {
        report.failure = Some(e);
    }
    report
}

/// The VM's tap, address and policy, if its pool has a network.
async fn attach_network(shared: &Shared, pool: &PoolConfig) -> Result<Option<VmNetwork>, String> {
    if pool.network == PoolNetwork::None {
        return Ok(None);
    }
    let network = shared
        .network
        .as_ref()
        .ok_or("pool has a network but the agent's networking is not started")?;
    network
        // No owner: the jailer (root) attaches the tap and hands the jailed
        // VMM its fd; no VMM attaches to a tap by name.
        .attach(&pool.name, None, pool.rate_limit.vmm_options())
        .await
        .map(Some)
        .map_err(|e| format!("setting up the VM's network: {e}"))
}

async fn detach_network(shared: &Shared, network: Option<&VmNetwork>) {
    if let (Some(net), Some(vm_net)) = (&shared.network, network) {
        net.detach(vm_net).await;
    }
}

/// Boot, wait for a job (watching the guest), run it. Keeps the
/// per-state gauge in step.
async fn serve_vm(
    shared: &Shared,
    pool: &PoolConfig,
    vm: &mut RunningVm,
    vm_id: &VmId,
    token: &VmToken,
    state: &mut StateGauge<'_>,
    report: &mut CycleReport,
) -> Result<(), String> {
    let metrics = &shared.metrics;
    let hello = vm
        .wait_hello(Duration::from_secs(pool.boot_timeout_secs))
        .await;
    state.set(None);
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

    state.set(Some("idle"));
    if shared.tuning.take_panic() {
        panic!("injected fault: the slot panics while its VM is idle");
    }
    let ready_at = Instant::now();
    let silence = shared.tuning.idle_silence;
    let job = idle::wait_for_job(shared, vm, &mut channel, vm_id, token, silence).await;
    let job = match job {
        Ok(job) => job,
        Err(end) => {
            state.set(None);
            // No job for this VM from now on; one matched to it meanwhile
            // goes back to the queue.
            if let Some(job) = release(shared, vm_id, token).await {
                metrics.jobs_handed_back.inc();
                tracing::warn!(vm = %report.vm_name, job = %job, "a job matched to the VM went back to the queue");
            }
            if end.guest_died() {
                metrics.idle_vms_replaced.inc();
            }
            return Err(end.to_string());
        }
    };
    report.idle = Some(ready_at.elapsed());
    tracing::info!(vm = %report.vm_name, job = %job.id, "job acquired");

    state.set(Some("running"));
    let acquired = Instant::now();
    if let Err(e) = idle::deliver(vm, &mut channel, &job).await {
        state.set(None);
        let requeued = release(shared, vm_id, token).await;
        let fate = if requeued.as_ref() == Some(&job.id) {
            metrics.jobs_handed_back.inc();
            "handed back to the queue"
        } else {
            "could not be handed back"
        };
        return Err(format!(
            "job {} never reached the guest ({e}); {fate}",
            job.id
        ));
    }
    let mut sink = OrchestratorSink::new(shared.client.clone(), job.id.clone(), token.clone());
    let log_rate = std::num::NonZeroU64::new(pool.log_kib_per_sec.saturating_mul(1024))
        .map(|rate| LogRateLimit::new(rate, Instant::now()));
    let outcome = relay_sent_job(vm, &mut channel, &job, &mut sink, log_rate).await;
    state.set(None);
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
