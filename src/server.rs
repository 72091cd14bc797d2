//! Listeners, connections and shutdown.
//!
//! One accept loop serves HTTP/1.1 and HTTP/2 prior knowledge (h2c) on the same port; a
//! semaphore bounds concurrent connections (beyond it, connections wait in the kernel backlog).
//! On shutdown the loop stops accepting, readiness fails, and in-flight requests get
//! `shutdown_grace` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admin::{self, Readiness};
use crate::config::Config;
use crate::proxy::Proxy;
use crate::upstream::TlsError;

/// Why snapguard could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A bound, not yet running snapguard.
pub struct Server {
    listener: TcpListener,
    admin: TcpListener,
    proxy: Arc<Proxy>,
    ready: Readiness,
}

impl Server {
    /// Binds both listeners and builds the upstream client. Nothing is served until [`run`].
    ///
    /// [`run`]: Server::run
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let listener = bind(config.listen).await?;
        let admin = bind(config.admin).await?;
        let proxy = Arc::new(Proxy::new(Arc::new(config))?);
        Ok(Self {
            listener,
            admin,
            proxy,
            ready: Readiness::default(),
        })
    }

    /// The proxy listener's address (useful when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.proxy.config().listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| self.proxy.config().admin)
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            admin,
            proxy,
            ready,
        } = self;
        let config = proxy.config();
        let admin_task = tokio::spawn(admin::serve(admin, ready.clone()));

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.timeouts.request_header)
            .max_buf_size(config.limits.max_header_bytes);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(
                u32::try_from(config.limits.max_header_bytes).unwrap_or(u32::MAX),
            );

        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(config.limits.max_connections));
        tokio::pin!(shutdown);
        ready.set(true);
        tracing::info!(listen = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            upstream = %config.upstream.url, "snapguard serving");

        loop {
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and friends are transient: back off instead of spinning or dying.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let proxy = proxy.clone();
            let svc = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
            });
            let conn = graceful.watch(
                builder
                    .serve_connection(TokioIo::new(stream), svc)
                    .into_owned(),
            );
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                drop(permit);
            });
        }

        ready.set(false);
        drop(listener);
        let grace = config.timeouts.shutdown_grace;
        tracing::info!(in_flight = graceful.count(), ?grace, "draining");
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "grace period over; closing the remaining connections"
            );
        }
        admin_task.abort();
        tracing::info!("snapguard stopped");
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops snapguard");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
