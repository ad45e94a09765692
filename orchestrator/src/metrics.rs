//! Prometheus metrics, served at `/metrics` in the text exposition format.
//!
//! Gauges of current state (jobs by state, queue length, VMs) are set from a
//! snapshot of the registry at scrape time, so they can never drift from
//! the truth; counters (submitted, finished by result, API errors by status)
//! count as things happen.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::registry::Counts;

/// Label set naming a job state or result.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// Label set naming an HTTP status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

/// The orchestrator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs: Family<StateLabel, Gauge>,
    queue_length: Gauge,
    vms: Gauge,
    waiting_vms: Gauge,
    submitted: Counter,
    finished: Family<StateLabel, Counter>,
    api_errors: Family<StatusLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `kindling_orchestrator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kindling_orchestrator");
        let jobs = Family::<StateLabel, Gauge>::default();
        let queue_length = Gauge::default();
        let vms = Gauge::default();
        let waiting_vms = Gauge::default();
        let submitted = Counter::default();
        let finished = Family::<StateLabel, Counter>::default();
        let api_errors = Family::<StatusLabel, Counter>::default();
        registry.register("jobs", "Active jobs by state", jobs.clone());
        registry.register(
            "queue_length",
            "Jobs waiting for a matching VM",
            queue_length.clone(),
        );
        registry.register("vms", "Registered VMs", vms.clone());
        registry.register(
            "waiting_vms",
            "VMs in an acquire long poll",
            waiting_vms.clone(),
        );
        registry.register("jobs_submitted", "Jobs accepted", submitted.clone());
        registry.register("jobs_finished", "Jobs ended, by result", finished.clone());
        registry.register(
            "api_errors",
            "API responses with an error status",
            api_errors.clone(),
        );
        Self {
            registry,
            jobs,
            queue_length,
            vms,
            waiting_vms,
            submitted,
            finished,
            api_errors,
        }
    }

    /// Counts an accepted job.
    pub fn job_submitted(&self) {
        self.submitted.inc();
    }

    /// Counts a job that ended in `state` (a [`crate::report::state_name`]).
    pub fn job_finished(&self, state: &'static str) {
        self.finished.get_or_create(&StateLabel { state }).inc();
    }

    /// Counts an error response.
    pub fn api_error(&self, status: u16) {
        self.api_errors.get_or_create(&StatusLabel { status }).inc();
    }

    /// The text exposition, with gauges set from `counts`.
    pub fn render(&self, counts: Counts) -> String {
        let gauge = |value: usize| i64::try_from(value).unwrap_or(i64::MAX);
        for (state, value) in [
            ("queued", counts.queued),
            ("assigned", counts.assigned),
            ("running", counts.running),
        ] {
            self.jobs
                .get_or_create(&StateLabel { state })
                .set(gauge(value));
        }
        self.queue_length.set(gauge(counts.queued));
        self.vms.set(gauge(counts.vms));
        self.waiting_vms.set(gauge(counts.waiting_vms));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_gauges_and_counters() {
        let metrics = Metrics::new();
        metrics.job_submitted();
        metrics.job_finished("succeeded");
        metrics.api_error(409);
        let text = metrics.render(Counts {
            queued: 3,
            assigned: 1,
            running: 2,
            vms: 5,
            waiting_vms: 1,
        });
        for line in [
            "kindling_orchestrator_jobs{state=\"queued\"} 3",
            "kindling_orchestrator_jobs{state=\"running\"} 2",
            "kindling_orchestrator_queue_length 3",
            "kindling_orchestrator_vms 5",
            "kindling_orchestrator_waiting_vms 1",
            "kindling_orchestrator_jobs_submitted_total 1",
            "kindling_orchestrator_jobs_finished_total{state=\"succeeded\"} 1",
            "kindling_orchestrator_api_errors_total{status=\"409\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
