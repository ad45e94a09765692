//! The reference orchestrator: an HTTP/JSON control plane that queues jobs
//! and hands each one to the first idle VM whose labels match.
