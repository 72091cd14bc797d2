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
//!
//! A failed connection is logged with its cause in words ([`diagnose`]); a reload that changes
//! nothing the client is built from keeps it, and its warm connections ([`Upstream::same_client`]).

mod diagnose;
mod pool;

use std::path::PathBuf;
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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

pub use self::pool::{read_out, Lease, DRAIN_BYTES};
use self::pool::{Pool, Sender};
use crate::body::{Progress, Tracked};
use crate::config::{Config, UpstreamUrl};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read upstream.ca_file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A file of keys, or of anything but PEM certificates, would otherwise add no root at all,
    /// and every handshake would fail later with a less telling error.
    #[error(
        "upstream.ca_file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----): give \
         the CA that issued the upstream's certificate"
    )]
    NoCaCertificate { path: PathBuf },
    #[error("upstream.ca_file {path}: a certificate cannot be used as a root: {source}")]
    CaCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
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
    Connect(#[source] ConnectError),
    /// The exchange failed on an open connection; also when the request body broke off
    /// ([`hyper::Error::is_user`]).
    #[error("{0}")]
    Exchange(#[source] hyper::Error),
    /// No slot: the queue for one was full (`queue_full`) or waited on too long
    /// (`queue_timeout`).
    #[error("{0}")]
    Busy(&'static str),
}

/// No connection to the upstream could be made. It prints what failed, where, and the likely
/// fix, for the log ([`diagnose::explain`]); the downstream is told a fixed text instead.
pub struct ConnectError {
    inputs: Arc<Inputs>,
    source: BoxError,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = diagnose::Target {
            url: &self.inputs.url,
            ca_file: self.inputs.ca_file.as_ref().map(|(path, _)| path.as_path()),
            connect_timeout: self.inputs.connect_timeout,
        };
        f.write_str(&diagnose::explain(&target, &*self.source))
    }
}

// Written out: the derived one would print the CA bundle's bytes.
impl std::fmt::Debug for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectError")
            .field("upstream", &self.inputs.url.to_string())
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Everything of the config an [`Upstream`] is built from. A reload that changes none of it
/// keeps the client, and with it the warm connections and the slots in use.
#[derive(PartialEq, Eq)]
struct Inputs {
    url: UpstreamUrl,
    /// The CA bundle's path and its bytes as read: a bundle rotated in place is a change.
    ca_file: Option<(PathBuf, Vec<u8>)>,
    connect_timeout: Duration,
    tcp_keepalive: Duration,
    max_connections: usize,
    max_waiting: usize,
    queue_timeout: Duration,
    idle_timeout: Duration,
}

impl Inputs {
    /// Reads the CA bundle, if any: call it off the runtime.
    fn of(config: &Config) -> Result<Self, TlsError> {
        let ca_file = match &config.upstream.ca_file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => Some((path.clone(), bytes)),
                Err(e) => {
                    return Err(TlsError::CaFile {
                        path: path.clone(),
                        source: rustls_pki_types::pem::Error::Io(e),
                    })
                }
            },
            None => None,
        };
        let (t, l) = (&config.timeouts, &config.limits);
        Ok(Self {
            url: config.upstream.url.clone(),
            ca_file,
            connect_timeout: t.upstream_connect,
            tcp_keepalive: t.tcp_keepalive,
            max_connections: l.max_upstream_connections,
            max_waiting: l.max_upstream_waiting,
            queue_timeout: t.upstream_queue,
            idle_timeout: t.upstream_idle,
        })
    }
}

pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// The upstream's scheme and authority, which is all the connector reads.
    base: Uri,
    handshake: http1::Builder,
    pool: Arc<Pool>,
    /// One permit per request in the upstream's hands: `max_upstream_connections`. tokio's
    /// semaphore is fair, so waiters are served in order.
    slots: Arc<Semaphore>,
    /// Requests waiting for a slot, bounded by `max_waiting`.
    waiting: AtomicUsize,
    max_waiting: usize,
    queue_timeout: Duration,
    waiting_gauge: Gauge,
    idle_timeout: Duration,
    /// The pace new connections are opened at, and the longest a request waits for its turn.
    connects: ConnectPace,
    connect_wait: Duration,
    /// Starts the pool's reaper with the first connection (a runtime is needed to spawn it,
    /// and a pool with no connection has nothing to reap).
    reaper: Once,
    /// What it was built from, for [`Upstream::same_client`] and for connect errors to say.
    inputs: Arc<Inputs>,
}

impl Upstream {
    /// `waiting` counts the requests waiting for a connection, for the metrics.
    pub fn new(config: &Config, waiting: Gauge) -> Result<Self, TlsError> {
        let inputs = Arc::new(Inputs::of(config)?);
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
            .with_root_certificates(roots(&inputs)?)
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
            handshake: {
                // hyper's default read buffer grows to about 400 KiB per connection; a response
                // streaming to a slow reader would hold that much. 64 KiB reads keep memory per
                // stalled exchange small at no cost in throughput.
                let mut builder = http1::Builder::new();
                builder.max_buf_size(64 * 1024);
                builder
            },
            // Idle connections for as many requests as may be in the upstream's hands at once.
            pool: Pool::new(config.limits.max_upstream_connections),
            slots: Arc::new(Semaphore::new(config.limits.max_upstream_connections)),
            waiting: AtomicUsize::new(0),
            max_waiting: config.limits.max_upstream_waiting,
            queue_timeout: config.timeouts.upstream_queue,
            waiting_gauge: waiting,
            idle_timeout: config.timeouts.upstream_idle,
            // Twice as many at once as there are slots (a slot is given back with its response
            // head, so as many responses may still be streaming on connections of their own),
            // then at least 64 a second: far above what pooled traffic needs, far below a storm
            // (the 10 s of a reset storm open at most about 770 with the default limit).
            connects: {
                let n = config.limits.max_upstream_connections;
                ConnectPace::new(n.max(64), n.saturating_mul(2).max(32))
            },
            connect_wait: config
                .timeouts
                .upstream_connect
                .min(config.timeouts.upstream_queue),
            reaper: Once::new(),
            inputs,
        })
    }

    /// Whether `config` would build this very client: same upstream, CA bundle (path and
    /// content), connect and pool timeouts, and limits. A reload may then keep this one, and
    /// the connections it holds open. Reads the CA bundle: call it off the runtime.
    pub fn same_client(&self, config: &Config) -> bool {
        Inputs::of(config).is_ok_and(|inputs| inputs == *self.inputs)
    }

    fn connect_error(&self, source: BoxError) -> SendError {
        SendError::Connect(ConnectError {
            inputs: self.inputs.clone(),
            source,
        })
    }

    /// Sends `req` (in origin form) on a pooled or new connection, once a slot is free. The
    /// lease must go with the response body and be released when that body has been read whole.
    pub async fn send(
        &self,
        mut req: Request<Tracked>,
        request: &Arc<Progress>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        // Held until the response head has arrived, or, for an exchange the downstream
        // abandoned, until its background drain ends.
        let mut slot = Some(self.slot().await?);
        // Pooled connections that turn out closed are skipped; a request that never left
        // one is tried again, a bounded number of times.
        let mut retries = 3;
        loop {
            let (mut conn, reused) = match self.pool.take() {
                Some(conn) => (conn, true),
                // Boxed: rare, and its future would make every request's larger.
                None => Box::pin(self.connection()).await?,
            };
            // A pooled connection may still be settling its last exchange; one the upstream
            // has closed fails here, before anything is sent.
            if let Err(e) = conn.ready().await {
                if reused {
                    continue;
                }
                return Err(SendError::Exchange(e));
            }
            let mut exchange = Exchange {
                response: Some(Box::pin(conn.try_send_request(req))),
                lease: Some(self.pool.lease(conn)),
                slot: slot.take(),
                request: request.clone(),
            };
            match exchange.finish().await {
                Ok(done) => return Ok(done),
                // The upstream closed a pooled connection as the request went out, before any
                // of it was written: try again.
                Err(Failed::Unsent(unsent, _, held)) if reused && retries > 0 => {
                    retries -= 1;
                    req = *unsent;
                    slot = held;
                }
                Err(Failed::Unsent(_, error, _)) => return Err(SendError::Exchange(error)),
                Err(Failed::Failed(e)) => return Err(e),
            }
        }
    }

    /// A slot for one request: at once when one is free and nobody waits, else in turn
    /// behind the requests already waiting, within the queue's bounds.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, SendError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            // Never ahead of a waiter: tokio hands a freed permit to the first waiter, so a
            // free one means the queue is empty.
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SendError::Busy("queue_full"));
        }
        // Counted out by a guard: a request whose downstream goes away while it waits is
        // dropped here, and must not stay counted.
        let _waiting = Waiting::new(&self.waiting, &self.waiting_gauge);
        let acquired =
            tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await;
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            // Only a closed semaphore fails, and this one is never closed.
            Ok(Err(_)) | Err(_) => Err(SendError::Busy("queue_timeout")),
        }
    }

    /// A connection for a request that found the pool empty: one put back meanwhile, or a new
    /// one when the pace has a turn free, whichever comes first, within `connect_wait`
    /// (`connect_pace` after it). A turn is taken only to connect at once: a request dropped
    /// while it waits (an HTTP/2 stream reset) has cost no later request its turn.
    async fn connection(&self) -> Result<(Sender, bool), SendError> {
        let deadline = tokio::time::Instant::now() + self.connect_wait;
        loop {
            if let Some(conn) = self.pool.take() {
                return Ok((conn, true));
            }
            let wait = match self.connects.try_take(std::time::Instant::now()) {
                Ok(()) => return Ok((self.connect().await?, false)),
                Err(wait) => wait,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(SendError::Busy("connect_pace"));
            }
            tokio::select! {
                () = self.pool.returned() => {}
                () = tokio::time::sleep(wait) => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Opens a connection (the caller has had its turn at the pace).
    async fn connect(&self) -> Result<Sender, SendError> {
        let io = self
            .connector
            .clone()
            .call(self.base.clone())
            .await
            .map_err(|e| self.connect_error(e))?;
        let (sender, connection) = self
            .handshake
            .handshake(io)
            .await
            .map_err(|e| self.connect_error(e.into()))?;
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

type ResponseFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    Response<Incoming>,
                    hyper::client::conn::TrySendError<Request<Tracked>>,
                >,
            > + Send,
    >,
>;

/// An exchange in flight on a leased connection. If the request's future is dropped before the
/// response head arrives (an HTTP/2 stream reset by the downstream, a client gone), the exchange
/// is finished in the background within a small budget (a few seconds, 256 KiB of body) and the
/// connection pooled again, instead of thrown away: a storm of resets must not become a storm of
/// new upstream connections.
struct Exchange {
    response: Option<ResponseFuture>,
    lease: Option<Lease>,
    slot: Option<OwnedSemaphorePermit>,
    request: Arc<Progress>,
}

type Finished = (Response<Incoming>, Lease);

/// Why an exchange did not get its response head.
enum Failed {
    /// The request never left: it may be sent again, with the slot it held.
    Unsent(
        Box<Request<Tracked>>,
        hyper::Error,
        Option<OwnedSemaphorePermit>,
    ),
    Failed(SendError),
}

impl Exchange {
    /// Waits for the response head; the slot is given back with it (or handed back with an
    /// unsent request, for a retry).
    async fn finish(&mut self) -> Result<Finished, Failed> {
        // An exchange is built with both and finished once; were it not, this is an error,
        // not a panic.
        let (Some(response), Some(_)) = (self.response.as_mut(), self.lease.as_ref()) else {
            return Err(Failed::Failed(SendError::Busy("internal")));
        };
        let result = response.await;
        self.response = None;
        let slot = self.slot.take();
        match (result, self.lease.take()) {
            (Ok(response), Some(lease)) => Ok((response, lease)),
            (Ok(_), None) => Err(Failed::Failed(SendError::Busy("internal"))),
            (Err(mut e), _) => {
                let unsent = e.take_message();
                let error = e.into_error();
                match unsent {
                    Some(unsent) => Err(Failed::Unsent(Box::new(unsent), error, slot)),
                    None => Err(Failed::Failed(SendError::Exchange(error))),
                }
            }
        }
    }
}

/// Counts a request waiting for a slot, for as long as it waits (also when it is dropped).
struct Waiting<'a>(&'a AtomicUsize, &'a Gauge);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize, gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(count, gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.dec();
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let (Some(response), Some(lease)) = (self.response.take(), self.lease.take()) else {
            return;
        };
        // The request is still in the upstream's hands: it keeps its slot until drained.
        let rest = async move { pool::read_out(response.await.ok()?.into_body()).await };
        lease.drain(rest, self.request.clone(), self.slot.take());
    }
}

/// The pace new upstream connections are opened at: at most `burst` at once, then
/// `per_second` (a generic cell rate: each connection reserves the next instant). No downstream
/// behaviour can then turn into a connection storm on the upstream.
struct ConnectPace {
    interval: Duration,
    burst: Duration,
    next: std::sync::Mutex<std::time::Instant>,
}

impl ConnectPace {
    fn new(per_second: usize, burst: usize) -> Self {
        let per_second = u32::try_from(per_second.max(1)).unwrap_or(u32::MAX);
        let burst = u32::try_from(burst.max(1)).unwrap_or(u32::MAX);
        let interval = Duration::from_secs(1) / per_second;
        // Credit for `burst` connections at once: the last of them opens at `now`.
        let burst = interval * (burst - 1);
        // The credit is whole from the start: a pace that began empty let a proxy just
        // started (or whose upstream a reload had changed) open only `per_second` connections
        // in its first second, and made a burst of large responses wait for turns.
        let now = std::time::Instant::now();
        Self {
            interval,
            burst,
            next: std::sync::Mutex::new(now.checked_sub(burst).unwrap_or(now)),
        }
    }

    /// Takes a turn to open a connection now, or says how long until the next one is free.
    /// Nothing is reserved by asking.
    fn try_take(&self, now: std::time::Instant) -> Result<(), Duration> {
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = (*next).max(now.checked_sub(self.burst).unwrap_or(now));
        if at > now {
            return Err(at - now);
        }
        *next = at + self.interval;
        Ok(())
    }
}

/// System roots plus the configured bundle; none at all for a plain-http upstream.
fn roots(inputs: &Inputs) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    if inputs.url.scheme != http::uri::Scheme::HTTPS {
        return Ok(roots);
    }
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "could not load some system root certificates");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some((path, bytes)) = &inputs.ca_file {
        let certs = CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::CaFile {
                path: path.clone(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCaCertificate { path: path.clone() });
        }
        for cert in certs {
            roots.add(cert).map_err(|source| TlsError::CaCertificate {
                path: path.clone(),
                source,
            })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(roots)
}

#[cfg(test)]
mod pace_tests {
    use super::*;

    #[test]
    fn connections_open_in_a_burst_then_at_the_pace_and_asking_reserves_nothing() {
        let pace = ConnectPace::new(4, 4);
        let later = std::time::Instant::now() + Duration::from_secs(5);
        let turns: Vec<Result<(), Duration>> = (0..6).map(|_| pace.try_take(later)).collect();
        assert!(turns[..4].iter().all(Result::is_ok), "{turns:?}");
        // Refused turns are not queued: each asker is told the same wait.
        assert_eq!(turns[4], Err(Duration::from_millis(250)));
        assert_eq!(turns[5], Err(Duration::from_millis(250)));
        // Once it has passed, one turn (not two) is free.
        let then = later + Duration::from_millis(250);
        assert_eq!(pace.try_take(then), Ok(()));
        assert_eq!(pace.try_take(then), Err(Duration::from_millis(250)));
    }

    #[test]
    fn a_new_pace_has_its_whole_burst_at_once() {
        let pace = ConnectPace::new(4, 8);
        let now = std::time::Instant::now();
        let turns: Vec<Result<(), Duration>> = (0..9).map(|_| pace.try_take(now)).collect();
        assert!(turns[..8].iter().all(Result::is_ok), "{turns:?}");
        assert!(turns[8].is_err(), "{turns:?}");
    }
}
