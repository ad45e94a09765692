//! Every size, count and time bound of the protocol, in one place.
//!
//! Bounds exist so that a hostile guest or job submitter cannot make either
//! side allocate without limit, and so that every job the orchestrator accepts
//! is guaranteed to fit in one host -> guest frame.

/// Largest frame payload, in bytes, either side accepts (1 MiB).
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Largest number of output bytes carried by one `LogChunk` (64 KiB).
pub const MAX_LOG_CHUNK_BYTES: usize = 64 * 1024;

/// Fixed cost, in bytes, charged for every job event on top of the output
/// it carries: against the host agent's per-VM log rate and the
/// orchestrator's per-job log size. One event costs a frame, a relay batch
/// slot and a JSON line of about 90 bytes (an empty chunk's line), so a
/// flood of tiny events is paid for as if each were this big.
pub const EVENT_COST_BYTES: usize = 128;

/// Largest job spec document accepted by the parsers, in bytes (1 MiB).
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;

/// Most steps in one job.
pub const MAX_STEPS: usize = 256;

/// Longest job or step name, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Longest `run` script of one step, in bytes (64 KiB).
pub const MAX_RUN_LEN: usize = 64 * 1024;

/// Longest working-directory path, in bytes.
pub const MAX_PATH_LEN: usize = 4096;

/// Most entries in one environment map (job-level or step-level).
pub const MAX_ENV_VARS: usize = 256;

/// Longest environment variable (or secret) name, in bytes.
pub const MAX_ENV_NAME_LEN: usize = 256;

/// Longest environment variable value, in bytes (32 KiB).
pub const MAX_ENV_VALUE_LEN: usize = 32 * 1024;

/// Most secrets supplied with one job.
pub const MAX_SECRETS: usize = 100;

/// Longest secret value, in bytes (48 KiB, as GitHub Actions).
pub const MAX_SECRET_VALUE_LEN: usize = 48 * 1024;

/// Most labels in a `runs-on` list or a VM registration.
pub const MAX_LABELS: usize = 32;

/// Longest label, in bytes.
pub const MAX_LABEL_LEN: usize = 64;

/// Longest identifier (job id, VM id, host id, boot id), in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Longest free-text reason (cancel reason, error reason), in bytes.
pub const MAX_REASON_LEN: usize = 4096;

/// Job timeout applied when a spec does not set `timeout-minutes`.
pub const DEFAULT_JOB_TIMEOUT_MINUTES: u32 = 60;

/// Largest accepted `timeout-minutes` (24 hours), for jobs and steps.
pub const MAX_TIMEOUT_MINUTES: u32 = 24 * 60;

/// Largest accepted timeout on the wire, in seconds (24 hours).
pub const MAX_TIMEOUT_SECS: u64 = MAX_TIMEOUT_MINUTES as u64 * 60;

/// Most job events in one `POST .../events` request (with full log chunks,
/// about 22 MiB of JSON: an orchestrator's body limit must allow that).
pub const MAX_EVENTS_PER_POST: usize = 256;

/// Longest an acquire-job long poll may be asked to wait, in seconds.
pub const MAX_LONG_POLL_SECS: u32 = 60;

/// Long-poll wait used when an acquire request does not say.
pub const DEFAULT_LONG_POLL_SECS: u32 = 30;
