//! The upstream client: keep-alive HTTP/1.1 connections to the one upstream, over TCP or
//! rustls, kept in a lock-free idle [`pool`].
//!
//! `limits.max_upstream_connections` bounds the requests in the upstream's hands at once: a
//! request holds a slot from the moment it is sent until its response head arrives (the part of
//! an exchange that costs the upstream work). Slots are handed out first come, first served;
//! at most `limits.max_upstream_waiting` requests wait, each for at most
//! `timeouts.upstream_queue`, and one more gets 503 at once. A response that streams on to a
//! slow reader keeps its connection but not its slot, so slow readers cannot starve everyone
//! else; they are bounded by the body deadlines ([`crate::lifetime`]) instead.
//!
//! hyper's own connection type does the HTTP; hyper-util's connector does DNS, connect timeout
//! and TCP_NODELAY, and hyper-rustls the TLS. What hyper-util's general-purpose pooled client
//! added on top (a locked map of pools keyed by host, a spawned task per request to watch for
//! the connection's return) cost more per request than the policy does, so it is not used.
//!
//! Certificate verification is always on: the system roots, plus an optional CA bundle for
//! private gateways. The ring provider is used explicitly so the build pulls no second crypto
//! library.

mod pool;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use prometheus_client::metrics::gauge::Gauge;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::sync::{Semaphore, SemaphorePermit};
use tower_service::Service;

pub use self::pool::Lease;
use self::pool::{Pool, Sender};
use crate::body::ProxyBody;
use crate::config::Config;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA bundle {path}: {source}")]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error(
        "no trusted root certificate: install the system CA certificates or set upstream.ca_file"
    )]
    NoRoots,
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: refused, unreachable, timed out, or the TLS handshake failed.
    #[error("{0}")]
    Connect(#[source] BoxError),
    /// The exchange failed on an open connection; also when the request body broke off
    /// ([`hyper::Error::is_user`]).
    #[error("{0}")]
    Exchange(#[source] hyper::Error),
    /// No slot: the queue for one was full (`queue_full`) or waited on too long
    /// (`queue_timeout`).
    #[error("{0}")]
    Busy(&'static str),
}

pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// The upstream's scheme and authority, which is all the connector reads.
    base: Uri,
    handshake: http1::Builder,
    pool: Arc<Pool>,
    /// One permit per request in the upstream's hands: `max_upstream_connections`. tokio's
    /// semaphore is fair, so waiters are served in order.
    slots: Semaphore,
    /// Requests waiting for a slot, bounded by `max_waiting`.
    waiting: AtomicUsize,
    max_waiting: usize,
    queue_timeout: Duration,
    waiting_gauge: Gauge,
    idle_timeout: Duration,
    /// Starts the pool's reaper with the first connection (a runtime is needed to spawn it,
    /// and a pool with no connection has nothing to reap).
    reaper: Once,
}

impl Upstream {
    /// `waiting` counts the requests waiting for a connection, for the metrics.
    pub fn new(config: &Config, waiting: Gauge) -> Result<Self, TlsError> {
        let mut http = HttpConnector::new();
        // The https connector below decides the scheme; the TCP connector must not refuse https.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeouts.upstream_connect));
        let keepalive = config.timeouts.tcp_keepalive;
        http.set_keepalive((!keepalive.is_zero()).then_some(keepalive));

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(config)?)
            .with_no_client_auth();
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let url = &config.upstream.url;
        let base = Uri::builder()
            .scheme(url.scheme.clone())
            .authority(url.authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        Ok(Self {
            connector,
            base,
            handshake: http1::Builder::new(),
            // Idle connections for as many requests as may be in the upstream's hands at once.
            pool: Pool::new(config.limits.max_upstream_connections),
            slots: Semaphore::new(config.limits.max_upstream_connections),
            waiting: AtomicUsize::new(0),
            max_waiting: config.limits.max_upstream_waiting,
            queue_timeout: config.timeouts.upstream_queue,
            waiting_gauge: waiting,
            idle_timeout: config.timeouts.upstream_idle,
            reaper: Once::new(),
        })
    }

    /// Sends `req` (in origin form) on a pooled or new connection, once a slot is free. The
    /// lease must go with the response body and be released when that body has been read whole.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        // Held until the response head has arrived.
        let _slot = self.slot().await?;
        // Pooled connections that turn out closed are skipped; a request that never left
        // one is tried again, a bounded number of times.
        let mut retries = 3;
        loop {
            let (mut conn, reused) = match self.pool.take() {
                Some(conn) => (conn, true),
                // Boxed: rare, and its future would make every request's larger.
                None => (Box::pin(self.connect()).await?, false),
            };
            // A pooled connection may still be settling its last exchange; one the upstream
            // has closed fails here, before anything is sent.
            if let Err(e) = conn.ready().await {
                if reused {
                    continue;
                }
                return Err(SendError::Exchange(e));
            }
            let response = conn.try_send_request(req);
            let lease = self.pool.lease(conn);
            match response.await {
                Ok(response) => return Ok((response, lease)),
                Err(mut e) => match e.take_message() {
                    // The upstream closed a pooled connection as the request went out, before
                    // any of it was written: try again.
                    Some(unsent) if reused && retries > 0 => {
                        retries -= 1;
                        req = unsent;
                    }
                    _ => return Err(SendError::Exchange(e.into_error())),
                },
            }
        }
    }

    /// A slot for one request: at once when one is free and nobody waits, else in turn
    /// behind the requests already waiting, within the queue's bounds.
    async fn slot(&self) -> Result<SemaphorePermit<'_>, SendError> {
        if let Ok(permit) = self.slots.try_acquire() {
            // Never ahead of a waiter: tokio hands a freed permit to the first waiter, so a
            // free one means the queue is empty.
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SendError::Busy("queue_full"));
        }
        self.waiting_gauge.inc();
        let acquired = tokio::time::timeout(self.queue_timeout, self.slots.acquire()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.waiting_gauge.dec();
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            // Only a closed semaphore fails, and this one is never closed.
            Ok(Err(_)) | Err(_) => Err(SendError::Busy("queue_timeout")),
        }
    }

    /// Opens a connection.
    async fn connect(&self) -> Result<Sender, SendError> {
        let io = self
            .connector
            .clone()
            .call(self.base.clone())
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = self
            .handshake
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        // The connection runs until the upstream closes it or its sender is dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        self.reaper.call_once(|| {
            tokio::spawn(Pool::reap_every(
                Arc::downgrade(&self.pool),
                self.idle_timeout,
            ));
        });
        Ok(sender)
    }
}

/// System roots plus the configured bundle; none at all for a plain-http upstream.
fn roots(config: &Config) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    if config.upstream.url.scheme != http::uri::Scheme::HTTPS {
        return Ok(roots);
    }
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "could not load some system root certificates");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &config.upstream.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::CaFile {
                path: path.clone(),
                source,
            })?;
        for cert in certs {
            roots.add(cert)?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(roots)
}
