//! Wire protocol between the host agent and the runner agent (vsock frames),
//! and the types of the orchestrator's HTTP API.
