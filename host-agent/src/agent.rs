//! The daemon: cleans up after a previous run, serves metrics, runs every
//! pool slot, and on SIGTERM/SIGINT drains (no new jobs; running jobs get a
//! grace period) before tearing everything down.

use std::sync::Arc;
use std::time::Duration;

use orchestrator::client::ApiClient;
use protocol::api::VmId;
use tokio::sync::watch;

use crate::cleanup::remove_leftovers;
use crate::config::{Config, PoolNetwork};
use crate::metrics::Metrics;
use crate::net::Network;
use crate::pool::{CycleReport, Shared, Tuning, run_slot, vms_dir};

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory could not be prepared.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The orchestrator client could not be built.
    #[error("orchestrator client: {0}")]
    Client(#[from] orchestrator::client::ClientError),
    /// Guest networking could not be set up.
    #[error("guest networking: {0}")]
    Network(#[from] crate::net::NetError),
    /// The metrics address could not be bound.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A started agent: its slot tasks and the switch that drains them.
pub struct Agent {
    drain: watch::Sender<bool>,
    slots: tokio::task::JoinSet<Vec<CycleReport>>,
    shared: Arc<Shared>,
}

impl Agent {
    /// Cleans up, starts the metrics endpoint and every slot. With `once`,
    /// each slot runs a single VM cycle.
    pub async fn start(config: Config, once: bool) -> Result<Agent, AgentError> {
        Self::start_tuned(config, once, Tuning::default()).await
    }

    /// [`Agent::start`] with the slots' timing knobs (and test seam) set.
    pub async fn start_tuned(
        config: Config,
        once: bool,
        tuning: Tuning,
    ) -> Result<Agent, AgentError> {
        let vms = vms_dir(&config);
        let state_err = |source| AgentError::StateDir {
            path: config.state_dir.clone(),
            source,
        };
        let cleaned = remove_leftovers(&config.state_dir, jail_of(&config)).map_err(state_err)?;
        if cleaned.dirs > 0 {
            tracing::warn!(
                processes = cleaned.processes,
                dirs = cleaned.dirs,
                "removed what a previous run left behind"
            );
        }
        std::fs::create_dir_all(&vms).map_err(state_err)?;
        let network = start_network(&config).await?;
        let metrics = Arc::new(Metrics::new());
        if let Some(addr) = &config.metrics_listen {
            serve_metrics(addr, Arc::clone(&metrics)).await?;
        }
        let client =
            ApiClient::with_transport(&config.orchestrator.url, &config.orchestrator.transport())?;
        deregister_leftovers(&client, &config, &cleaned.vm_ids).await;
        let (drain, draining) = watch::channel(false);
        let shared = Arc::new(Shared::new(
            config, client, metrics, draining, network, tuning,
        ));
        let mut slots = tokio::task::JoinSet::new();
        for pool in &shared.config.pools {
            for slot in 0..pool.size {
                slots.spawn(run_slot(Arc::clone(&shared), pool.clone(), slot, once));
            }
        }
        Ok(Agent {
            drain,
            slots,
            shared,
        })
    }

    /// Waits until every slot has ended on its own (single-shot mode).
    pub async fn join(mut self) -> Vec<CycleReport> {
        let mut reports = Vec::new();
        while let Some(r) = self.slots.join_next().await {
            reports.extend(slot_reports(r));
        }
        if let Some(network) = &self.shared.network {
            network.shutdown();
        }
        reports
    }

    /// Stops taking jobs, lets running ones finish within `grace`, then
    /// tears down whatever is left.
    pub async fn shutdown(mut self, grace: Duration) -> Vec<CycleReport> {
        let _ = self.drain.send(true);
        let mut reports = Vec::new();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, self.slots.join_next()).await {
                Ok(Some(r)) => reports.extend(slot_reports(r)),
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("grace period over: killing the remaining VMs");
                    self.slots.shutdown().await;
                    break;
                }
            }
        }
        // Slots cut short by the grace period left their VMs registered.
        let config = &self.shared.config;
        match remove_leftovers(&config.state_dir, jail_of(config)) {
            Ok(cleaned) => deregister_leftovers(&self.shared.client, config, &cleaned.vm_ids).await,
            Err(e) => tracing::warn!("final clean-up failed: {e}"),
        }
        if let Some(network) = &self.shared.network {
            if let Err(e) = crate::net::remove_leftovers(&config.network.nft, false).await {
                tracing::warn!("final network clean-up failed: {e}");
            }
            network.shutdown();
        }
        reports
    }

    /// The metrics (for the single-shot summary and tests).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.shared.metrics)
    }
}

/// The start-up clean-up alone (`host-agent cleanup`): kills leftover
/// VMMs, removes VM directories, taps and the nftables table, and
/// deregisters the VMs; returns a one-line summary.
pub async fn clean_up(config: &Config) -> Result<String, AgentError> {
    let state_err = |source| AgentError::StateDir {
        path: config.state_dir.clone(),
        source,
    };
    let cleaned = remove_leftovers(&config.state_dir, jail_of(config)).map_err(state_err)?;
    let net = crate::net::remove_leftovers(&config.network.nft, false).await?;
    let client =
        ApiClient::with_transport(&config.orchestrator.url, &config.orchestrator.transport())?;
    deregister_leftovers(&client, config, &cleaned.vm_ids).await;
    Ok(format!(
        "removed {} VMM process(es), {} VM director(ies), {} tap(s) [{}]",
        cleaned.processes,
        cleaned.dirs,
        net.taps.len(),
        net.taps.join(" ")
    ))
}

/// Removes the network leftovers of a previous run and, if a pool has a
/// network, installs the policy. Without networked pools only the clean-up
/// runs (and a host without nftables is fine).
async fn start_network(config: &Config) -> Result<Option<Network>, AgentError> {
    let networked = config.pools.iter().any(|p| p.network != PoolNetwork::None);
    if !networked {
        crate::net::remove_leftovers(&config.network.nft, false).await?;
        return Ok(None);
    }
    Ok(Some(Network::start(config).await?))
}

/// Deregisters VMs whose directories the clean-up removed: revokes their
/// tokens and lets the orchestrator fail a job one of them still held.
async fn deregister_leftovers(client: &ApiClient, config: &Config, vm_ids: &[String]) {
    for id in vm_ids {
        let vm_id = VmId(id.clone());
        match client
            .deregister_vm(&config.orchestrator.host_credential, &vm_id)
            .await
        {
            Ok(()) => tracing::warn!(vm = %vm_id, "deregistered a VM left behind"),
            // Already gone (deregistered, or expired at the orchestrator).
            Err(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {}
            Err(e) => {
                tracing::warn!(vm = %vm_id, "cannot deregister a VM left behind: {e}; it expires at the orchestrator");
            }
        }
    }
}

async fn serve_metrics(addr: &str, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    let err = |source| AgentError::Metrics {
        addr: addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = Arc::clone(&metrics);
            async move { metrics.encode() }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics endpoint failed: {e}");
        }
    });
    Ok(())
}

/// The reports of a slot task that ended. Slots catch their cycles'
/// panics themselves; one that still died is logged, not swallowed.
fn slot_reports(ended: Result<Vec<CycleReport>, tokio::task::JoinError>) -> Vec<CycleReport> {
    ended.unwrap_or_else(|e| {
        if e.is_panic() {
            tracing::error!("a slot task died: {e}");
        }
        Vec::new()
    })
}

/// The jail settings, when VMMs are jailed.
fn jail_of(config: &Config) -> Option<&crate::jail::JailConfig> {
    config.jail.enabled.then_some(&config.jail)
}
