//! Binding and running the server: archive, listener, router, reaper, and
//! a graceful shutdown that ends active jobs and wakes every long poll.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::archive::{Archive, ArchiveError};
use crate::config::{ConfigError, ServerConfig};
use crate::http::router;
use crate::service::Orchestrator;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A limit is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The archive directory is unusable.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// Serving failed.
    #[error("server failed: {0}")]
    Serve(io::Error),
    /// A blocking task died.
    #[error("startup task failed: {0}")]
    Task(String),
}

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    service: Arc<Orchestrator>,
}

impl Server {
    /// Opens the archive (cleaning an interrupted run's leftovers) and binds
    /// the listen address (port 0 picks a free port).
    pub async fn bind(config: ServerConfig) -> Result<Self, ServeError> {
        config.limits.validate()?;
        let dir = config.archive_dir.clone();
        let (archive, removed) = tokio::task::spawn_blocking(move || Archive::open(dir))
            .await
            .map_err(|err| ServeError::Task(err.to_string()))??;
        if removed > 0 {
            tracing::warn!(removed, dir = %config.archive_dir.display(),
                "removed logs of jobs a previous run did not finish");
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let service = Arc::new(Orchestrator::new(
            archive,
            config.credentials,
            config.limits,
        ));
        Ok(Self { listener, service })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(ServeError::Serve)
    }

    /// The service behind the routes.
    pub fn service(&self) -> Arc<Orchestrator> {
        Arc::clone(&self.service)
    }

    /// Serves until `shutdown` completes, then ends active jobs, wakes long
    /// polls and waits for in-flight requests.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let addr = self.local_addr()?;
        tracing::info!(%addr, "orchestrator listening");
        let reaper = tokio::spawn(Arc::clone(&self.service).run_reaper());
        let service = Arc::clone(&self.service);
        let result = axum::serve(self.listener, router(Arc::clone(&self.service)))
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("shutting down");
                service.shutdown().await;
            })
            .await
            .map_err(ServeError::Serve);
        reaper.abort();
        result
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(%err, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
