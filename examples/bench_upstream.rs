//! The fixed upstream of `bench/run.py`: one thread, HTTP/1.1 keep-alive, and the same
//! ~300-byte JSON answer to every request once its body has been read and discarded.
//! `GET /bytes/N` streams N bytes instead (for the 1 GiB download).
//!
//! Usage: bench_upstream ADDR

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// About 300 bytes, the size of a Cinder snapshot show.
const ANSWER: &str = r#"{"snapshot":{"id":"2bb856e1-b3d8-4432-a858-09e4ce939389","status":"available","size":10,"name":"snap-001","description":"Daily backup","volume_id":"5aa119a8-d25b-45a7-8d1b-88e127885635","created_at":"2026-11-26T00:00:00.000000","updated_at":null,"metadata":{},"os-extended-snapshot-attributes:progress":"100%"}}"#;

/// N bytes in 64 KiB chunks.
struct Zeros(u64);

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        static CHUNK: [u8; 65536] = [0; 65536];
        if self.0 == 0 {
            return Poll::Ready(None);
        }
        let n = self.0.min(CHUNK.len() as u64);
        self.0 -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &CHUNK[..n as usize],
        )))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0)
    }
}

enum Answer {
    Json(Option<Bytes>),
    Zeros(Zeros),
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Answer::Json(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Answer::Zeros(z) => Pin::new(z).poll_frame(cx),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Answer::Json(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Answer::Zeros(z) => z.size_hint(),
        }
    }
}

async fn answer(req: Request<Incoming>) -> Result<Response<Answer>, Infallible> {
    let size = req
        .uri()
        .path()
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok());
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
    let answer = match size {
        Some(n) => Answer::Zeros(Zeros(n)),
        None => Answer::Json(Some(Bytes::from_static(ANSWER.as_bytes()))),
    };
    let mut response = Response::new(answer);
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8776".to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
            });
        }
    })
}
