//! Server configuration: where to listen, where to archive, the shared
//! credentials, and every bound the orchestrator enforces.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use protocol::limits;

use crate::auth::Credentials;
use crate::event_log::LogBounds;

/// Body limit of `POST /v1/jobs/{id}/events`: a full batch of
/// [`limits::MAX_EVENTS_PER_POST`] 64 KiB log chunks is about 22 MiB of JSON.
pub const EVENTS_BODY_LIMIT: usize = 24 * 1024 * 1024;

/// Body limit of `POST /v1/jobs`: a spec of at most [`limits::MAX_SPEC_BYTES`]
/// (about twice that as JSON) plus up to [`limits::MAX_SECRETS`] secrets of
/// [`limits::MAX_SECRET_VALUE_LEN`].
pub const SUBMIT_BODY_LIMIT: usize = 8 * 1024 * 1024;

/// Body limit of every other request.
pub const SMALL_BODY_LIMIT: usize = 64 * 1024;

/// A bound is zero where it must be positive.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A count or size limit is zero.
    #[error("{name} must be at least 1")]
    Zero {
        /// The option.
        name: &'static str,
    },
}

/// Every bound the orchestrator enforces. [`Limits::default`] suits a
/// production fleet; tests shrink the time bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most VMs registered at once.
    pub max_vms: usize,
    /// Most VMs waiting in an acquire long poll at once.
    pub max_waiting_vms: usize,
    /// Most jobs queued (submitted, not yet assigned) at once.
    pub max_queued_jobs: usize,
    /// Most log bytes stored per job (output plus
    /// [`limits::EVENT_COST_BYTES`] per event); later output is dropped with
    /// a notice.
    pub max_log_bytes: u64,
    /// Most events stored per job; later log chunks are dropped with a
    /// notice (step results and the job's end are always stored).
    pub max_log_events: u64,
    /// Most requests served at once, long polls aside; more wait up to
    /// `request_queue_wait` (at most as many again), then get 503.
    pub max_concurrent_requests: usize,
    /// How long a request may wait for one of `max_concurrent_requests`.
    pub request_queue_wait: Duration,
    /// Most long polls (acquire, event follows) open at once; more get 503.
    /// Kept apart from `max_concurrent_requests` so that idle waiting VMs
    /// and followers never starve event posts and submissions.
    pub max_long_polls: usize,
    /// Ceiling on every job's timeout: a spec asking for more gets this.
    pub max_job_timeout: Duration,
    /// How long after its timeout a job may stay without a completion from
    /// its VM before the orchestrator fails it.
    pub timeout_grace: Duration,
    /// How long a job may wait in the queue for a matching VM.
    pub max_queue_wait: Duration,
    /// How long a registered VM that neither polls nor runs a job is kept.
    pub vm_idle_timeout: Duration,
    /// Most events returned by one page of `GET /v1/jobs/{id}/events`.
    pub page_max_events: usize,
    /// Most output bytes returned by one page (at least one event is always
    /// returned).
    pub page_max_bytes: usize,
    /// How often timeouts are checked.
    pub reaper_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_vms: 10_000,
            max_waiting_vms: 10_000,
            max_queued_jobs: 10_000,
            max_log_bytes: 128 * 1024 * 1024,
            max_log_events: 1_000_000,
            max_concurrent_requests: 128,
            request_queue_wait: Duration::from_secs(2),
            max_long_polls: 20_000,
            max_job_timeout: Duration::from_secs(limits::MAX_TIMEOUT_SECS),
            timeout_grace: Duration::from_secs(60),
            max_queue_wait: Duration::from_secs(24 * 60 * 60),
            vm_idle_timeout: Duration::from_secs(10 * 60),
            page_max_events: limits::MAX_EVENTS_PER_POST,
            page_max_bytes: 4 * 1024 * 1024,
            reaper_interval: Duration::from_millis(250),
        }
    }
}

impl Limits {
    /// Checks that no count or size bound is zero.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let counts = [
            ("max_vms", self.max_vms),
            ("max_waiting_vms", self.max_waiting_vms),
            ("max_queued_jobs", self.max_queued_jobs),
            ("page_max_events", self.page_max_events),
            ("page_max_bytes", self.page_max_bytes),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("max_long_polls", self.max_long_polls),
            (
                "max_log_events",
                usize::try_from(self.max_log_events).unwrap_or(usize::MAX),
            ),
        ];
        for (name, value) in counts {
            if value == 0 {
                return Err(ConfigError::Zero { name });
            }
        }
        if self.max_job_timeout.as_secs() == 0 {
            return Err(ConfigError::Zero {
                name: "max_job_timeout (seconds)",
            });
        }
        if self.reaper_interval.is_zero() {
            return Err(ConfigError::Zero {
                name: "reaper_interval",
            });
        }
        Ok(())
    }

    /// The bounds of every job's log.
    pub fn log_bounds(&self) -> LogBounds {
        LogBounds {
            max_bytes: self.max_log_bytes,
            max_events: self.max_log_events,
        }
    }

    /// The timeout, in seconds, of a job whose spec asks for `spec_secs`.
    pub fn job_timeout_secs(&self, spec_secs: u64) -> u64 {
        spec_secs.min(self.max_job_timeout.as_secs()).max(1)
    }
}

/// Everything `orchestrator serve` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory of the archive sink.
    pub archive_dir: PathBuf,
    /// Shared credentials.
    pub credentials: Credentials,
    /// Bounds.
    pub limits: Limits,
    /// Serve TLS with this certificate and key; plain HTTP if `None`.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Serve plain HTTP on a non-loopback address (behind a TLS-terminating
    /// proxy, say); refused otherwise.
    pub allow_insecure_http: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_valid_and_zero_is_refused() {
        Limits::default().validate().unwrap();
        let limits = Limits {
            max_queued_jobs: 0,
            ..Limits::default()
        };
        let err = limits.validate().unwrap_err();
        assert_eq!(err.to_string(), "max_queued_jobs must be at least 1");
    }

    #[test]
    fn job_timeout_is_capped() {
        let limits = Limits {
            max_job_timeout: Duration::from_secs(90),
            ..Limits::default()
        };
        assert_eq!(limits.job_timeout_secs(600), 90);
        assert_eq!(limits.job_timeout_secs(60), 60);
    }

    #[test]
    fn events_body_limit_fits_a_full_batch() {
        // base64 inflates 4/3; allow 1 KiB of JSON framing per event.
        let full = limits::MAX_EVENTS_PER_POST * (limits::MAX_LOG_CHUNK_BYTES * 4 / 3 + 1024);
        assert!(EVENTS_BODY_LIMIT > full, "{full}");
    }
}
