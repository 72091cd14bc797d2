//! Listeners, connections, reload and shutdown.
//!
//! One accept loop serves HTTP/1.1 and HTTP/2 prior knowledge (h2c) on the same port; a
//! semaphore bounds concurrent connections (beyond it, connections wait in the kernel backlog).
//! A [`Handle`] swaps in a reloaded configuration without dropping a request. On shutdown the
//! loop stops accepting, readiness fails, and in-flight requests get `shutdown_grace` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::admin::{self, Readiness};
use crate::body::Relayed;
use crate::config::{Config, ConfigError};
use crate::conn::{self, Activity, Closed, Socket};
use crate::headers::Peer;
use crate::lifetime::Pace;
use crate::metrics::Metrics;
use crate::policy::Mode;
use crate::proxy::BuildError;
use crate::proxy::{Proxy, Runtime};
use crate::tls::{Terminator, TlsFileError};

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
    #[error("[tls]: {0}")]
    Tls(#[from] TlsFileError),
}

/// Why a reload was refused; the configuration in force stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] BuildError),
    /// The reloaded config would be unsafe with what only a restart changes.
    #[error("{0}")]
    Unsafe(&'static str),
    /// The blocking thread that loads the file did not finish (it panicked).
    #[error("the reload did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
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
        let terminator = match &config.tls {
            Some(tls) => Some(Arc::new(Terminator::new(tls.clone())?)),
            None => None,
        };
        if let Some(t) = &terminator {
            metrics.tls_expiry(t.current().not_after);
        }
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
                terminator,
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
        let admin_addr = admin.local_addr().map_or(handle.addresses.1, |a| a);
        let admin_task = tokio::spawn(admin::serve(admin, ready.clone(), metrics.clone()));
        let trim_task = tokio::spawn(crate::memory::trim_after_storms(metrics.clone()));
        let terminator = handle.terminator.clone();
        let tls_reloads = terminator
            .clone()
            .map(|t| tokio::spawn(reload_tls_every(t, metrics.clone())));

        let drain = conn::Drain::new();
        let mut runtime = proxy.runtime();
        let mut builder = connection_builder(&runtime.config);
        tokio::pin!(shutdown);
        ready.set(true);
        tracing::info!(
            listen = %listener.local_addr().map_or(handle.addresses.0, |a| a),
            admin = %admin_addr,
            upstream = %runtime.config.upstream.url,
            mode = %mode_name(runtime.config.policy.mode),
            "snapguard serving"
        );

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
            bound_send_queue(&stream);
            // Header limits and timeouts follow reloads, for connections accepted after them.
            let current = proxy.runtime();
            if !Arc::ptr_eq(&current, &runtime) {
                builder = connection_builder(&current.config);
                runtime = current;
            }
            let open = metrics.connection();
            let client_ip = peer.ip();
            let trusted = runtime.config.forwarding.trusts(client_ip);
            let timeouts = &runtime.config.timeouts;
            let conn = Connection {
                proxy: proxy.clone(),
                builder: builder.clone(),
                watcher: drain.watcher(),
                metrics: metrics.clone(),
                first: timeouts.request_header,
                idle: timeouts.idle,
                pace: Pace::of(&runtime.config),
            };
            // The TLS configuration in force when the connection came: reloads do not disturb
            // handshakes in progress.
            let tls = terminator
                .as_ref()
                .map(|t| (t.current(), t.config().handshake_timeout));
            tokio::spawn(async move {
                let activity = Activity::new();
                let socket = Socket::new(stream, activity.clone());
                match tls {
                    None => {
                        let who = Peer::new(client_ip, false, trusted);
                        conn.serve(socket, who, activity, peer).await;
                    }
                    Some((loaded, timeout)) => {
                        let accept = TlsAcceptor::from(loaded.server.clone()).accept(socket);
                        match tokio::time::timeout(timeout, accept).await {
                            Ok(Ok(stream)) => {
                                let mut who = Peer::new(client_ip, true, trusted);
                                who.client = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|certs| certs.first())
                                    .and_then(crate::tls::subject)
                                    .map(Arc::from);
                                conn.serve(stream, who, activity, peer).await;
                            }
                            Ok(Err(e)) => {
                                let reason = handshake_failure(&e);
                                conn.metrics.tls_handshake_failure(reason);
                                tracing::debug!(%peer, reason, error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                conn.metrics.tls_handshake_failure("timeout");
                                tracing::debug!(%peer, "TLS handshake timed out");
                            }
                        }
                    }
                }
                drop((permit, open));
            });
        }

        ready.set(false);
        drop(listener);
        // The grace period in force now, reloads included.
        let grace = proxy.runtime().config.timeouts.shutdown_grace;
        tracing::info!(
            connections = drain.count(),
            grace = %humantime::format_duration(grace),
            "draining"
        );
        if tokio::time::timeout(grace, drain.drain()).await.is_err() {
            tracing::warn!(
                grace = %humantime::format_duration(grace),
                "grace period over; closing the remaining connections"
            );
        }
        admin_task.abort();
        trim_task.abort();
        if let Some(task) = tls_reloads {
            task.abort();
        }
        tracing::info!("snapguard stopped");
    }
}

/// Re-reads the TLS files when their directories change and every `reload_interval` (Kubernetes
/// swaps a mounted Secret's files without a signal) and swaps them in when they changed; a file
/// that fails keeps what is in force.
async fn reload_tls_every(terminator: Arc<Terminator>, metrics: Arc<Metrics>) {
    let config = terminator.config();
    let every = config.reload_interval;
    let files = [
        Some(&config.cert_file),
        Some(&config.key_file),
        config.client_ca_file.as_ref(),
    ];
    let changes =
        crate::watch::Changes::watch("TLS", files.into_iter().flatten().map(|p| p.as_path()));
    loop {
        changes.next(every).await;
        reload_tls(&terminator, &metrics).await;
    }
}

/// Re-reads the TLS files off the runtime's threads, and says what came of it.
pub async fn reload_tls(terminator: &Arc<Terminator>, metrics: &Metrics) {
    let t = terminator.clone();
    match tokio::task::spawn_blocking(move || t.reload()).await {
        Ok(Ok(true)) => {
            metrics.tls_reload(true);
            metrics.tls_expiry(terminator.current().not_after);
            tracing::info!("TLS certificate reloaded");
        }
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            metrics.tls_reload(false);
            tracing::warn!(error = %e, "TLS files could not be reloaded; the certificate in force stays");
        }
        Err(e) => tracing::warn!(error = %e, "TLS reload task failed"),
    }
}

/// What serving one accepted connection needs, moved into its task.
struct Connection {
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    watcher: conn::DrainWatch,
    metrics: Arc<Metrics>,
    first: Duration,
    idle: Duration,
    pace: Pace,
}

impl Connection {
    /// Serves HTTP/1.1 or HTTP/2 on `io` (plain or TLS) under the connection's deadlines.
    async fn serve<I>(self, io: I, who: Peer, activity: Arc<Activity>, peer: SocketAddr)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let who = Arc::new(who);
        let svc = {
            let (proxy, activity) = (self.proxy.clone(), activity.clone());
            service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                if req.version() == http::Version::HTTP_2 {
                    activity.speaks_http2();
                }
                let (proxy, in_flight, who) = (proxy.clone(), activity.begin(), who.clone());
                async move {
                    let response = proxy.handle(req, &who).await;
                    Ok::<_, Infallible>(response.map(|body| Relayed::new(body, in_flight)))
                }
            })
        };
        let conn = self
            .builder
            .serve_connection(TokioIo::new(io), svc)
            .into_owned();
        let graceful = |conn: Pin<&mut _>| auto::Connection::graceful_shutdown(conn);
        let watched = conn::with_deadlines(
            conn,
            &activity,
            &self.watcher,
            graceful,
            self.first,
            self.idle,
            self.pace,
        );
        match watched.await {
            Ok(Err(e)) => tracing::debug!(error = %e, %peer, "connection ended with an error"),
            Ok(Ok(())) => {}
            Err(Closed::Idle) => tracing::debug!(%peer, "idle connection closed"),
            Err(closed) => {
                self.metrics.cut(closed.reason());
                tracing::info!(%peer, reason = closed.reason(), "connection cut for breaking a deadline or budget");
            }
        }
    }
}

/// A low-cardinality reason for a failed TLS handshake, for the metrics.
fn handshake_failure(e: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => "no_client_certificate",
        Some(E::InvalidCertificate(_)) => "bad_client_certificate",
        Some(E::InvalidMessage(_)) => "not_tls",
        Some(E::PeerIncompatible(_) | E::NoApplicationProtocol) => "incompatible",
        Some(E::AlertReceived(_)) => "alert_received",
        Some(_) => "protocol",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        None => "io",
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

/// Bytes a downstream socket may hold unsent before it stops taking more (`TCP_NOTSENT_LOWAT`;
/// Linux). Without it the kernel grows a socket's send buffer to 4 MiB (`tcp_wmem`) whatever
/// the peer reads: 150 clients asking for 4 MiB each with a 4 KiB receive window had snapguard
/// move about 3 MiB each into the kernel at once, and everyone else wait 1.3 s. Data in flight
/// is not limited (the send buffer still grows with the window), only what waits behind it.
const SEND_QUEUE: u32 = 128 * 1024;

/// Bounds the data queued unsent on a downstream socket ([`SEND_QUEUE`]).
pub fn bound_send_queue(stream: &tokio::net::TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(SEND_QUEUE) {
        tracing::debug!(error = %e, "could not set TCP_NOTSENT_LOWAT");
    }
}

/// Streams an HTTP/2 connection may have open at once (hyper's default today).
const H2_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Streams reset by the peer before snapguard accepted them (h2's default today).
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams reset for the peer's errors (hyper's default today).
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // `conn::with_deadlines` closes an HTTP/1 connection that waits for a request head
        // longer than `request_header` (which also bounds keep-alive idleness): hyper's own
        // timer for it costs a boxed sleep per request.
        .header_read_timeout(None)
        .max_buf_size(config.limits.max_header_bytes);
    // HTTP/2's stream limits pinned here rather than left to hyper's and h2's defaults, which
    // are not part of their stability promise: streams at once per connection; streams a peer
    // may open and reset before they are accepted, and streams snapguard may reset for
    // the peer's protocol errors, before the connection is told to go away (GOAWAY
    // ENHANCE_YOUR_CALM). Streams reset after they were accepted are counted by the deadline
    // watch ([`crate::conn`]: past 100, and most of the connection's, it goes away too).
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
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
    /// TLS termination, when `[tls]` is set; its files are re-read, its table only on restart.
    terminator: Option<Arc<Terminator>>,
}

impl Handle {
    /// The runtime in force now.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.proxy.runtime()
    }

    /// Loads a configuration with `load` and builds what it needs (files read, patterns
    /// compiled, root certificates loaded) on a blocking thread, then swaps it in. That work
    /// takes a while, and on the runtime's threads it would stall every connection meanwhile,
    /// all of them with `workers = 1`. Returns the runtime now in force.
    pub async fn reload_with<F>(&self, load: F) -> Result<Arc<Runtime>, ReloadError>
    where
        F: FnOnce() -> Result<Config, ConfigError> + Send + 'static,
    {
        let proxy = self.proxy.clone();
        let built = tokio::task::spawn_blocking(move || build(load(), &proxy))
            .await
            .unwrap_or_else(|e| Err(e.into()));
        // The certificate files are re-read on SIGHUP too, whatever became of the config.
        if let Some(terminator) = &self.terminator {
            reload_tls(terminator, self.proxy.metrics()).await;
        }
        self.apply(built)?;
        Ok(self.proxy.runtime())
    }

    /// Swaps in a reloaded configuration, building it on the calling thread (which should not
    /// be the runtime's: see [`Handle::reload_with`]).
    pub fn reload(&self, loaded: Result<Config, ConfigError>) -> Result<(), ReloadError> {
        self.apply(build(loaded, &self.proxy))
    }

    /// Swaps in a built runtime, or keeps the one in force and says why. Requests in flight
    /// finish under the configuration they started with.
    fn apply(&self, built: Result<Runtime, ReloadError>) -> Result<(), ReloadError> {
        let runtime = match built {
            Ok(runtime) => runtime,
            Err(e) => {
                self.proxy.metrics().reload(false);
                tracing::error!(error = %e, "config reload failed, keeping the configuration in force");
                return Err(e);
            }
        };
        let config = &runtime.config;
        let (listen, admin) = self.addresses;
        // Checked against the listener in force: the reloaded `listen` applies only on restart.
        let lends_key = config
            .upstream
            .signing
            .as_ref()
            .is_some_and(|s| s.downstream == crate::signing::Downstream::None);
        if lends_key && !listen.ip().is_loopback() {
            let e = ReloadError::Unsafe(
                "upstream.signing.downstream = \"none\" while listening on a non-loopback \
                 address (listen changes only on restart)",
            );
            self.proxy.metrics().reload(false);
            tracing::error!(error = %e, "config reload failed, keeping the configuration in force");
            return Err(e);
        }
        for (key, in_force, reloaded) in [
            ("listen", listen, config.listen),
            ("admin", admin, config.admin),
        ] {
            if in_force != reloaded {
                tracing::warn!(
                    in_force = %in_force,
                    reloaded = %reloaded,
                    "{key} changes only on restart: still serving on the address in force, not \
                     the reloaded one"
                );
            }
        }
        if let Some(terminator) = &self.terminator {
            if config.tls.as_ref() != Some(terminator.config()) {
                tracing::warn!(
                    "[tls] changes only on restart: its files are re-read, the table in force stays"
                );
            }
        } else if config.tls.is_some() {
            tracing::warn!("[tls] changes only on restart: still serving plain HTTP");
        }
        if config.workers != self.workers {
            tracing::warn!(
                in_force = self.workers,
                reloaded = config.workers,
                "workers change only on restart: still running the number in force"
            );
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

/// Builds the runtime of a reloaded configuration: blocking work (files, patterns, roots).
fn build(loaded: Result<Config, ConfigError>, proxy: &Proxy) -> Result<Runtime, ReloadError> {
    let config = loaded?;
    let current = proxy.runtime();
    // The warm upstream pool is kept when nothing the client is built from changed.
    if current.upstream().same_client(&config) {
        return Ok(Runtime::with_upstream(config, current.upstream().clone())?);
    }
    Ok(Runtime::new(config, proxy.metrics())?)
}

/// The policy mode as the config spells it, for the start-up line.
fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
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
