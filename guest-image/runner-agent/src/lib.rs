//! The runner agent: PID 1 inside every microVM. It prepares the guest,
//! dials the host over vsock, runs exactly one job and then powers off.
//!
//! Modules, in the order of the agent's life:
//!
//! * [`init`]: PID-1 duties (mounts, overlay root, network, hostname) and
//!   [`init::power`] (ending the VM);
//! * [`cmdline`] and [`config`]: settings from kernel parameters or flags;
//! * [`channel`]: dialing the host (vsock, or a Unix socket in tests), the
//!   handshake, and the two directions of the stream;
//! * [`heartbeat`]: liveness frames;
//! * [`runner`]: the job supervisor, step processes and output pumps;
//! * [`mask`]: secret masking of the log stream;
//! * [`reaper`]: reaping every child, orphans included;
//! * [`process`]: signalling process groups and descendants;
//! * [`agent`]: the lifecycle tying them together.
//!
//! When the agent is not PID 1 (tests, debugging) the PID-1 duties are
//! skipped, it becomes a child subreaper instead, and flags choose the
//! endpoint (`--connect unix:PATH`), so the whole agent runs on a host
//! against a fake host agent.

pub mod agent;
pub mod channel;
pub mod cmdline;
pub mod config;
pub mod heartbeat;
pub mod init;
pub mod mask;
pub mod process;
pub mod reaper;
pub mod runner;

pub use agent::{AgentExit, run};
pub use config::{AgentConfig, Args};
