//! The host agent: keeps a warm pool of microVMs on one KVM host, takes jobs
//! from the orchestrator and relays them to the runner agent over vsock.
//!
//! Modules: [`config`] (the TOML file), [`vm`] (one VM: directory, VMM
//! process, vsock channel), [`relay`] (one job on one VM).

pub mod config;
pub mod relay;
pub mod vm;
