//! Prometheus metrics of the host agent (prometheus-client), served as text
//! at `/metrics` on the configured address.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the per-pool VM state gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmStateLabels {
    /// Pool name.
    pub pool: String,
    /// booting, idle or running.
    pub state: String,
}

/// Labels of the job outcome counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// succeeded, failed, timed_out, cancelled or error.
    pub outcome: String,
}

/// Labels of the per-pool slot restart counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Pool name.
    pub pool: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    vms: Family<VmStateLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    /// VMMs spawned.
    pub boots: Counter<u64, AtomicU64>,
    /// VMM spawn to runner-agent `Hello`.
    pub boot_to_hello_seconds: Histogram,
    jobs: Family<OutcomeLabels, Counter<u64, AtomicU64>>,
    /// Kill + reap + delete + deregister.
    pub teardown_seconds: Histogram,
    /// Failed calls to the orchestrator.
    pub orchestrator_errors: Counter<u64, AtomicU64>,
    slot_restarts: Family<PoolLabels, Counter<u64, AtomicU64>>,
    /// Warm VMs replaced before taking a job (guest silent, channel
    /// closed or VMM exited while idle).
    pub idle_vms_replaced: Counter<u64, AtomicU64>,
    /// Jobs handed back to the orchestrator because they never reached
    /// the guest.
    pub jobs_handed_back: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kindling_host_agent");
        let vms = Family::<VmStateLabels, Gauge<i64, std::sync::atomic::AtomicI64>>::default();
        registry.register("vms", "VMs by pool and state", vms.clone());
        let boots = Counter::<u64, AtomicU64>::default();
        registry.register("boots", "VMMs spawned", boots.clone());
        let boot_to_hello_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        registry.register(
            "boot_to_hello_seconds",
            "VMM spawn to runner-agent Hello",
            boot_to_hello_seconds.clone(),
        );
        let jobs = Family::<OutcomeLabels, Counter<u64, AtomicU64>>::default();
        registry.register("jobs", "Jobs by outcome", jobs.clone());
        let teardown_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "teardown_seconds",
            "VM teardown time",
            teardown_seconds.clone(),
        );
        let orchestrator_errors = Counter::<u64, AtomicU64>::default();
        registry.register(
            "orchestrator_errors",
            "Failed calls to the orchestrator",
            orchestrator_errors.clone(),
        );
        let slot_restarts = Family::<PoolLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "slot_restarts",
            "Slot tasks that died (panicked) and were restarted",
            slot_restarts.clone(),
        );
        let idle_vms_replaced = Counter::<u64, AtomicU64>::default();
        registry.register(
            "idle_vms_replaced",
            "Warm VMs found dead or silent while idle and replaced",
            idle_vms_replaced.clone(),
        );
        let jobs_handed_back = Counter::<u64, AtomicU64>::default();
        registry.register(
            "jobs_handed_back",
            "Jobs given back to the orchestrator's queue because they never reached the guest",
            jobs_handed_back.clone(),
        );
        Self {
            registry,
            vms,
            boots,
            boot_to_hello_seconds,
            jobs,
            teardown_seconds,
            orchestrator_errors,
            slot_restarts,
            idle_vms_replaced,
            jobs_handed_back,
        }
    }

    /// Adds `delta` to the number of VMs of `pool` in `state`.
    pub fn vm_state(&self, pool: &str, state: &str, delta: i64) {
        self.vms
            .get_or_create(&VmStateLabels {
                pool: pool.to_string(),
                state: state.to_string(),
            })
            .inc_by(delta);
    }

    /// Counts one job outcome.
    pub fn job_outcome(&self, outcome: &str) {
        self.jobs
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a restart of a slot of `pool` whose task died.
    pub fn slot_restart(&self, pool: &str) {
        self.slot_restarts
            .get_or_create(&PoolLabels {
                pool: pool.to_string(),
            })
            .inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_what_was_recorded() {
        let m = Metrics::new();
        m.vm_state("small", "idle", 1);
        m.job_outcome("succeeded");
        m.boots.inc();
        m.slot_restart("small");
        let text = m.encode();
        assert!(
            text.contains(r#"kindling_host_agent_vms{pool="small",state="idle"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kindling_host_agent_jobs_total{outcome="succeeded"} 1"#),
            "{text}"
        );
        assert!(text.contains("kindling_host_agent_boots_total 1"), "{text}");
        assert!(
            text.contains(r#"kindling_host_agent_slot_restarts_total{pool="small"} 1"#),
            "{text}"
        );
    }
}
