//! The upstream client: keep-alive HTTP/1.1 connections to the one upstream, over TCP or
//! rustls, kept in a lock-free idle [`pool`].
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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
}

pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// The upstream's scheme and authority, which is all the connector reads.
    base: Uri,
    handshake: http1::Builder,
    pool: Arc<Pool>,
    /// One permit per open connection, held by its driver task: `max_upstream_connections`.
    slots: Arc<Semaphore>,
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
            // Room for every connection the limit allows.
            pool: Pool::new(config.limits.max_upstream_connections, waiting),
            slots: Arc::new(Semaphore::new(config.limits.max_upstream_connections)),
            idle_timeout: config.timeouts.upstream_idle,
            reaper: Once::new(),
        })
    }

    /// Sends `req` (in origin form) on a pooled or new connection. The lease must go with the
    /// response body and be released when that body has been read whole.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        // Pooled connections that turn out closed are skipped; a request that never left
        // one is tried again, a bounded number of times.
        let mut retries = 3;
        loop {
            let (mut conn, reused) = match self.pool.take() {
                Some(conn) => (conn, true),
                // Boxed: rare, and its future would make every request's larger.
                None => Box::pin(self.checkout()).await?,
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

    /// A new connection when the limit allows one; else the first one returned to the pool or
    /// the first slot freed, whichever comes first. `true` for a connection that was pooled.
    async fn checkout(&self) -> Result<(Sender, bool), SendError> {
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    let freed = self.slots.clone().acquire_owned();
                    tokio::select! {
                        conn = self.pool.released() => match conn {
                            Some(conn) => return Ok((conn, true)),
                            None => continue,
                        },
                        slot = freed => match slot {
                            Ok(slot) => slot,
                            // Only a closed semaphore fails, and this one is never closed.
                            Err(_) => continue,
                        },
                    }
                }
            };
            return Ok((self.connect(slot).await?, false));
        }
    }

    /// Opens a connection, which holds `slot` until it closes.
    async fn connect(&self, slot: OwnedSemaphorePermit) -> Result<Sender, SendError> {
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
            let _slot = slot;
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
