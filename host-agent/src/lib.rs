//! The host agent: keeps a warm pool of microVMs on one KVM host, takes jobs
//! from the orchestrator and relays them to the runner agent over vsock.
//!
//! Modules: [`config`] (the TOML file), [`vm`] (one VM: directory, VMM
//! process, vsock channel), [`relay`] (one job on one VM), [`sink`] (the
//! orchestrator as the relay's event sink), [`pool`] (a slot's VM cycle),
//! [`idle`] (a warm VM's liveness while it waits for a job),
//! [`agent`] (the daemon), [`cleanup`] (what a crashed run left),
//! [`records`] (the agent's own bookkeeping of its VMs, outside the jail),
//! [`process`] (a pid and its start time), [`vmm_log`] (the VMM's log,
//! read through the agent's descriptor), [`reason`] (failure reasons that
//! fit the protocol), [`leftovers`] (what a run left on the host),
//! [`metrics`], [`net`] (taps, addresses and the nftables policy),
//! [`single_shot`] (`host-agent run job.yaml`), [`vcpu_load`] (whether a
//! silent guest is wedged or stopped).

pub mod agent;
pub mod cleanup;
pub mod config;
pub mod idle;
pub mod jail;
pub mod leftovers;
pub mod log_rate;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod process;
pub mod reason;
pub mod records;
pub mod relay;
pub mod single_shot;
pub mod sink;
pub mod vcpu_load;
pub mod vm;
pub mod vmm_log;
