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
use crate::tls::TlsListener;

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
    /// The TLS certificate, key or settings are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Plain HTTP on a network address, not allowed.
    #[error(
        "refusing plain HTTP on {0}: credentials, VM tokens and secrets would cross the \
         network in clear; give --tls-cert and --tls-key, listen on loopback, or pass \
         --allow-insecure-http (behind a TLS-terminating proxy)"
    )]
    InsecureListen(SocketAddr),
}

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    service: Arc<Orchestrator>,
}

impl Server {
    /// Opens the archive (cleaning an interrupted run's leftovers) and binds
    /// the listen address (port 0 picks a free port).
    pub async fn bind(config: ServerConfig) -> Result<Self, ServeError> {
        config.limits.validate()?;
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::server_config)
            .transpose()?;
        if tls.is_none()
            && !config.allow_insecure_http
            && !crate::tls::is_loopback_listen(&config.listen)
        {
            return Err(ServeError::InsecureListen(config.listen));
        }
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
        Ok(Self {
            listener,
            tls,
            service,
        })
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "orchestrator listening");
        let reaper = tokio::spawn(Arc::clone(&self.service).run_reaper());
        let service = Arc::clone(&self.service);
        let shutdown = async move {
            shutdown.await;
            tracing::info!("shutting down");
            service.shutdown().await;
        };
        let app = router(Arc::clone(&self.service));
        let result = match self.tls {
            Some(config) => {
                let listener =
                    TlsListener::new(self.listener, config).map_err(ServeError::Serve)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            None => {
                axum::serve(self.listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        };
        reaper.abort();
        result.map_err(ServeError::Serve)
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
