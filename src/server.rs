//! Listeners, connections, reload and shutdown.
//!
//! One accept loop serves HTTP/1.1 and HTTP/2 prior knowledge (h2c) on the same port; a
//! semaphore bounds concurrent connections (beyond it, connections wait in the kernel backlog).
//! A [`Handle`] swaps in a reloaded configuration without dropping a request. On shutdown the
//! loop stops accepting, readiness fails, and in-flight requests get `shutdown_grace` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

use crate::admin::{self, Readiness};
use crate::config::{Config, ConfigError};
use crate::conn::{self, Activity, Closed, Socket};
use crate::headers;
use crate::lifetime::Pace;
use crate::metrics::Metrics;
use crate::proxy::BuildError;
use crate::proxy::{Proxy, Runtime};

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
    Runtime(#[from] BuildError),
}

/// Why a reload was refused; the configuration in force stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] BuildError),
}

/// A bound, not yet running snapguard.
pub struct Server {
    listener: TcpListener,
    admin: TcpListener,
    handle: Handle,
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
        let max_connections = config.limits.max_connections;
        let addresses = (config.listen, config.admin);
        let workers = config.workers;
        let metrics = Arc::new(Metrics::default());
        let proxy = Arc::new(Proxy::new(Runtime::new(config, &metrics)?, metrics));
        Ok(Self {
            listener,
            admin,
            handle: Handle {
                proxy,
                slots: Arc::new(Semaphore::new(max_connections)),
                max_connections: Arc::new(AtomicUsize::new(max_connections)),
                resized: Arc::new(Notify::new()),
                addresses,
                workers,
            },
            ready: Readiness::default(),
        })
    }

    /// The proxy listener's address (useful when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.handle.addresses.0)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.handle.addresses.1)
    }

    /// A handle to reload the running server.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            admin,
            handle,
            ready,
        } = self;
        let proxy = handle.proxy.clone();
        let metrics = proxy.metrics().clone();
        let admin_task = tokio::spawn(admin::serve(admin, ready.clone(), metrics.clone()));

        let graceful = GracefulShutdown::new();
        let mut runtime = proxy.runtime();
        let mut builder = connection_builder(&runtime.config);
        tokio::pin!(shutdown);
        ready.set(true);
        tracing::info!(listen = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            upstream = %runtime.config.upstream.url, "snapguard serving");

        // The semaphore's size, reconciled here (and only here) with the configured limit.
        let mut capacity = handle.max_connections.load(Ordering::Acquire);
        loop {
            let limit = handle.max_connections.load(Ordering::Acquire);
            if limit > capacity {
                handle.slots.add_permits(limit - capacity);
                capacity = limit;
            }
            let permit = tokio::select! {
                permit = handle.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = handle.resized.notified() => continue,
                () = &mut shutdown => break,
            };
            if limit < capacity {
                // Shrinking: retire a free slot instead of serving with it.
                permit.forget();
                capacity -= 1;
                continue;
            }
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
            keepalive(&stream, proxy.runtime().config.timeouts.tcp_keepalive);
            // Header limits and timeouts follow reloads, for connections accepted after them.
            let current = proxy.runtime();
            if !Arc::ptr_eq(&current, &runtime) {
                builder = connection_builder(&current.config);
                runtime = current;
            }
            let open = metrics.connection();
            let activity = Activity::new();
            let forwarded_for = headers::forwarded_for(peer.ip());
            let svc = {
                let (proxy, activity) = (proxy.clone(), activity.clone());
                service_fn(move |req| {
                    let (proxy, in_flight) = (proxy.clone(), activity.begin());
                    let forwarded_for = forwarded_for.clone();
                    async move {
                        let response = proxy.handle(req, &forwarded_for).await;
                        Ok::<_, Infallible>(response.map(|body| body.holding(in_flight)))
                    }
                })
            };
            let conn = graceful.watch(
                builder
                    .serve_connection(TokioIo::new(Socket::new(stream, activity.clone())), svc)
                    .into_owned(),
            );
            let timeouts = &runtime.config.timeouts;
            let (first, idle) = (timeouts.request_header, timeouts.idle);
            let pace = Pace::of(&runtime.config);
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match conn::with_deadlines(conn, &activity, first, idle, pace).await {
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, %peer, "connection ended with an error")
                    }
                    Ok(Ok(())) => {}
                    Err(Closed::Idle) => tracing::debug!(%peer, "idle connection closed"),
                    Err(closed) => {
                        metrics.cut(closed.reason());
                        tracing::info!(%peer, reason = closed.reason(), "connection cut: its responses stopped moving downstream");
                    }
                }
                drop((permit, open));
            });
        }

        ready.set(false);
        drop(listener);
        // The grace period in force now, reloads included.
        let grace = proxy.runtime().config.timeouts.shutdown_grace;
        tracing::info!(connections = graceful.count(), ?grace, "draining");
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

/// TCP keepalive probes after `idle` without traffic ("0s": off), so that a peer that vanished
/// without a FIN or RST is noticed by the kernel.
pub fn keepalive(stream: &tokio::net::TcpStream, idle: Duration) {
    if idle.is_zero() {
        return;
    }
    let probes = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(10));
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&probes) {
        tracing::debug!(error = %e, "could not set TCP keepalive");
    }
}

fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper runs this timer whenever it waits for a request head, so it also closes
        // keep-alive connections idle for that long. It starts only once hyper-util has told
        // HTTP/1 from HTTP/2; `conn::with_deadlines` bounds the time before that.
        .header_read_timeout(config.timeouts.request_header)
        .max_buf_size(config.limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Reloads a running server.
#[derive(Clone)]
pub struct Handle {
    proxy: Arc<Proxy>,
    slots: Arc<Semaphore>,
    max_connections: Arc<AtomicUsize>,
    /// Wakes the accept loop to apply a new connection limit.
    resized: Arc<Notify>,
    /// The configured listen and admin addresses, which only a restart changes.
    addresses: (SocketAddr, SocketAddr),
    /// The configured worker threads, which only a restart changes.
    workers: usize,
}

impl Handle {
    /// Swaps in a reloaded configuration, or keeps the one in force and says why. Requests in
    /// flight finish under the configuration they started with.
    pub fn reload(&self, loaded: Result<Config, ConfigError>) -> Result<(), ReloadError> {
        let applied = loaded
            .map_err(ReloadError::from)
            .and_then(|config| Ok(Runtime::new(config, self.proxy.metrics())?));
        let runtime = match applied {
            Ok(runtime) => runtime,
            Err(e) => {
                self.proxy.metrics().reload(false);
                tracing::error!("config reload failed, keeping the configuration in force: {e}");
                return Err(e);
            }
        };
        let config = &runtime.config;
        if (config.listen, config.admin) != self.addresses {
            tracing::warn!(
                listen = %config.listen,
                admin = %config.admin,
                "listen and admin addresses change only on restart; still serving the old ones"
            );
        }
        if config.workers != self.workers {
            tracing::warn!(workers = config.workers, "workers change only on restart");
        }
        self.resize(config.limits.max_connections);
        self.proxy.swap(runtime);
        self.proxy.metrics().reload(true);
        tracing::info!("config reloaded");
        Ok(())
    }

    /// Sets the connection limit; the accept loop grows or shrinks to it (shrinking as
    /// connections end).
    fn resize(&self, max: usize) {
        self.max_connections.store(max, Ordering::Release);
        self.resized.notify_one();
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
