//! The admin listener: liveness, readiness and metrics, on a port apart from traffic.
//!
//! `/healthz` answers 200 while the process serves at all. `/readyz` answers 200 only while the
//! proxy listener accepts and is not draining, so a load balancer stops sending before shutdown.
//! `/metrics` is the Prometheus text exposition.
//!
//! In Kubernetes this port listens on all addresses (the kubelet probes the pod IP), so anyone
//! who can reach the pod can open connections to it. Fixed limits, with nothing to configure,
//! keep them from piling up:
//!
//! - a request head must arrive whole within [`HEADER_TIMEOUT`] (5 s) of the connection opening
//!   or of the previous response, else the connection is closed (hyper's header timer, which so
//!   also closes a keep-alive connection that waits that long for its next request);
//! - a connection on which no byte has moved either way for [`IDLE_TIMEOUT`] (30 s) is closed,
//!   whatever it was doing (a peer that stopped reading its response, say);
//! - at most [`MAX_CONNECTIONS`] (64) are served at once: further connections wait in the
//!   kernel's listen backlog, in order, until one ends, and the kernel refuses them once the
//!   backlog is full. So peers that hold every slot make probes wait, at most about
//!   [`HEADER_TIMEOUT`] per turn unless they keep sending, but cannot make snapguard hold more.
//!
//! Request bodies are never read (no endpoint takes one): hyper drops what is not already there
//! once the answer is written, and the connection with it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::metrics::Metrics;

/// How long a request head may take, from the connection opening or the previous response.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may go without a byte moving in either direction.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How many admin connections are served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Readiness, shared between the server (which flips it) and the admin endpoints.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The admin listener's bounds; [`serve`] uses the constants above, tests shorter ones.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header: Duration,
    idle: Duration,
    connections: usize,
}

const LIMITS: Limits = Limits {
    header: HEADER_TIMEOUT,
    idle: IDLE_TIMEOUT,
    connections: MAX_CONNECTIONS,
};

/// Serves the admin endpoints until the task is dropped (which closes its connections too).
pub async fn serve(listener: TcpListener, ready: Readiness, metrics: Arc<Metrics>) {
    serve_within(listener, ready, metrics, LIMITS).await;
}

async fn serve_within(
    listener: TcpListener,
    ready: Readiness,
    metrics: Arc<Metrics>,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    // Owned here, so that dropping this future drops every connection.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // A slot first, then a connection: beyond the limit they wait in the kernel's backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (ready, metrics) = (ready.clone(), metrics.clone());
        connections.spawn(async move {
            serve_connection(stream, ready, metrics, limits).await;
            drop(slot);
        });
    }
}

/// Serves one connection until it ends, or its header or idle deadline passes.
async fn serve_connection(
    stream: TcpStream,
    ready: Readiness,
    metrics: Arc<Metrics>,
    limits: Limits,
) {
    let svc = service_fn(move |req| {
        let response = respond(&req, &ready, &metrics);
        async move { Ok::<_, Infallible>(response) }
    });
    let moved = Moved::new();
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header)
        .serve_connection(
            TokioIo::new(Watched {
                stream,
                moved: moved.clone(),
            }),
            svc,
        );
    tokio::pin!(conn);
    loop {
        tokio::select! {
            ended = &mut conn => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "admin connection ended");
                }
                return;
            }
            () = tokio::time::sleep_until(moved.last() + limits.idle) => {
                if moved.last() + limits.idle <= Instant::now() {
                    tracing::debug!(idle = ?limits.idle, "admin connection idle, closed");
                    return;
                }
            }
        }
    }
}

/// When bytes last moved on a connection, in milliseconds since it opened.
#[derive(Debug, Clone)]
struct Moved {
    opened: Instant,
    ms: Arc<AtomicU64>,
}

impl Moved {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn now(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }
}

/// A socket that notes when bytes move through it, for the idle deadline.
struct Watched {
    stream: TcpStream,
    moved: Moved,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.moved.now();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.moved.now();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.moved.now();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

fn respond<B>(req: &Request<B>, ready: &Readiness, metrics: &Metrics) -> Response<ProxyBody> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    if get && req.uri().path() == "/metrics" {
        let mut response = Response::new(ProxyBody::full(Bytes::from(metrics.encode())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        return response;
    }
    let (status, text) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") if ready.get() => (StatusCode::OK, "ready\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        }
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(ProxyBody::full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    // Tests fail by panicking; the no-unwrap rule is for the request path.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n";

    async fn start(limits: Limits) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Readiness::default();
        let task = tokio::spawn(serve_within(
            listener,
            ready,
            Arc::new(Metrics::default()),
            limits,
        ));
        (addr, task)
    }

    /// How long until the peer closed `stream` (reading and discarding what it sends), if it
    /// did within `wait`.
    async fn closed_after(stream: &mut TcpStream, wait: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        let to_end = async {
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::time::timeout(wait, to_end)
            .await
            .ok()
            .map(|()| started.elapsed())
    }

    async fn answered(stream: &mut TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 1024];
        matches!(
            tokio::time::timeout(wait, stream.read(&mut buf)).await,
            Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/1.1 200")
        )
    }

    #[tokio::test]
    async fn a_request_head_trickled_slower_than_the_header_timeout_is_cut() {
        let (addr, task) = start(Limits {
            header: Duration::from_millis(400),
            idle: Duration::from_secs(60),
            connections: 4,
        })
        .await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        // One byte every 100 ms: bytes keep moving, but the head is not whole in time.
        let trickle = tokio::spawn(async move {
            for byte in GET {
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        let end = tokio::time::timeout(Duration::from_secs(3), read.read(&mut buf)).await;
        assert!(matches!(end, Ok(Ok(0) | Err(_))), "{end:?}");
        let closed = started.elapsed();
        assert!(
            closed >= Duration::from_millis(350) && closed < Duration::from_millis(1500),
            "closed after {closed:?}"
        );
        trickle.abort();
        task.abort();
    }

    #[tokio::test]
    async fn a_connection_on_which_nothing_moves_is_closed_after_the_idle_timeout() {
        let (addr, task) = start(Limits {
            header: Duration::from_secs(60),
            idle: Duration::from_millis(300),
            connections: 4,
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(GET).await.unwrap();
        assert!(answered(&mut stream, Duration::from_secs(5)).await);
        let closed = closed_after(&mut stream, Duration::from_secs(5)).await;
        let closed = closed.expect("closed within 5 s");
        assert!(closed >= Duration::from_millis(250), "{closed:?}");
        task.abort();
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_until_one_ends() {
        let (addr, task) = start(Limits {
            header: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            connections: 2,
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(GET).await.unwrap();
            assert!(answered(&mut stream, Duration::from_secs(5)).await);
            held.push(stream);
        }
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(GET).await.unwrap();
        assert!(
            !answered(&mut third, Duration::from_millis(500)).await,
            "a third connection was served beside two"
        );
        drop(held.pop());
        assert!(
            answered(&mut third, Duration::from_secs(5)).await,
            "served once a slot is free"
        );
        task.abort();
    }

    #[tokio::test]
    async fn dropping_the_listener_task_closes_its_connections() {
        let (addr, task) = start(LIMITS).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(GET).await.unwrap();
        assert!(answered(&mut stream, Duration::from_secs(5)).await);
        task.abort();
        assert!(closed_after(&mut stream, Duration::from_secs(5))
            .await
            .is_some());
    }
}
