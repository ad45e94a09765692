//! The host agent: keeps a warm pool of microVMs on one KVM host, takes jobs
//! from the orchestrator and relays them to the runner agent over vsock.
