//! Kindling's reference orchestrator: an HTTP/JSON control plane that
//! queues jobs and hands each one to the first idle VM whose labels match.
//!
//! Host agents register their VMs (host credential) and get a VM id and a
//! token per VM; each VM long-polls for one job with its token, and its host
//! agent posts the job's events (logs, step results, completion) back,
//! numbered so that retries are idempotent. Clients submit jobs (client
//! credential) with their secrets, follow the logs live, and cancel. Only
//! active jobs and VM assignments live in memory; every finished job goes to
//! an archive directory (one JSON record and one event log per job) and
//! stays readable through the API from there.
//!
//! Modules, from the bottom up:
//! * [`auth`]: credentials, VM tokens, constant-time checks, random ids.
//! * [`config`]: listen address, archive directory, every bound.
//! * [`matching`]: the FIFO matchmaker between queued jobs and waiting VMs.
//! * [`registry`]: the in-memory state machines of jobs and VMs.
//! * [`event_log`]: a job's events on disk, appended live, read in pages.
//! * [`archive`]: the sink of finished jobs.
//! * [`report`]: the job report shown to clients and archived.
//! * [`service`]: the operations behind the routes, with long polls and timeouts.
//! * [`http`]: the axum routes and status codes.
//! * [`metrics`]: Prometheus metrics.
//! * [`tls`]: TLS on the server, trusted roots on the clients, plain HTTP
//!   for loopback only.
//! * [`server`]: binding, serving (TLS or plain), graceful shutdown.
//! * [`client`]: an HTTP client of the API.
//! * [`cli`]: the `orchestrator` command line.

pub mod archive;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod event_log;
pub mod http;
pub mod matching;
pub mod metrics;
pub mod registry;
pub mod report;
pub mod server;
pub mod service;
pub mod tls;
