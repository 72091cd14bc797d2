//! The upstream of `bench/abuse.py`: `examples/bench_upstream.rs`'s answer (one thread,
//! HTTP/1.1 keep-alive, the same ~300-byte JSON to every request once its body has been read),
//! counting what reaches it, so that an attack's cost to the upstream can be read off:
//! connections accepted, connections open, requests, request-body frames and bytes, and socket
//! reads that returned data (each at least one write of the proxy's).
//!
//! `?delay_ms=N` in a request's query delays its answer by N ms (at most 10 s).
//!
//! The counters are served as one JSON object on a second address, whose own traffic is not
//! counted: `curl STATS_ADDR`.
//!
//! Usage: abuse_upstream ADDR STATS_ADDR

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// About 300 bytes, the size of a Cinder snapshot show (as in bench_upstream).
const ANSWER: &str = r#"{"snapshot":{"id":"2bb856e1-b3d8-4432-a858-09e4ce939389","status":"available","size":10,"name":"snap-001","description":"Daily backup","volume_id":"5aa119a8-d25b-45a7-8d1b-88e127885635","created_at":"2026-11-26T00:00:00.000000","updated_at":null,"metadata":{},"os-extended-snapshot-attributes:progress":"100%"}}"#;

static ACCEPTED: AtomicU64 = AtomicU64::new(0);
static OPEN: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static COMPLETED: AtomicU64 = AtomicU64::new(0);
static FRAMES: AtomicU64 = AtomicU64::new(0);
static BODY_BYTES: AtomicU64 = AtomicU64::new(0);
static READS: AtomicU64 = AtomicU64::new(0);

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A socket counting the reads that returned data.
struct Counted(TcpStream);

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.get_mut().0).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            count(&READS);
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// `?delay_ms=N` anywhere in the query: the answer waits N ms (at most 10 s), as a busy API
/// would.
fn delay(req: &Request<Incoming>) -> Option<Duration> {
    let query = req.uri().query()?;
    let ms = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("delay_ms="))?
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_millis(ms.min(10_000)))
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    count(&REQUESTS);
    let delay = delay(&req);
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    count(&FRAMES);
                    BODY_BYTES.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Err(_) => break,
        }
    }
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    count(&COMPLETED);
    let mut response = Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

fn stats() -> String {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    format!(
        r#"{{"accepted":{},"open":{},"requests":{},"completed":{},"body_frames":{},"body_bytes":{},"reads":{}}}"#,
        get(&ACCEPTED),
        get(&OPEN),
        get(&REQUESTS),
        get(&COMPLETED),
        get(&FRAMES),
        get(&BODY_BYTES),
        get(&READS)
    )
}

/// Answers one stats request (any request) and closes.
async fn serve_stats(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = stats();
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8776".to_owned());
    let stats_addr = args.next().unwrap_or_else(|| "127.0.0.1:8777".to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        let stats_listener = tokio::net::TcpListener::bind(&stats_addr).await?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = stats_listener.accept().await {
                tokio::spawn(serve_stats(stream));
            }
        });
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            count(&ACCEPTED);
            count(&OPEN);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(Counted(stream)), service_fn(answer))
                    .await;
                OPEN.fetch_sub(1, Ordering::Relaxed);
            });
        }
    })
}
