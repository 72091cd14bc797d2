//! The one body type snapguard sends in both directions.
//!
//! A buffered prefix followed by a stream: a passthrough body is a stream alone, a policed or
//! error body is a prefix alone, and an oversized body forwarded in audit mode is both (the part
//! read while policing, then the rest). One concrete type keeps the upstream client monomorphic
//! without boxing every body. It also counts the bytes it carries for the access record.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::access::Exchange;
use crate::conn::InFlight;
use crate::upstream::Lease;

#[derive(Debug, Default)]
pub struct ProxyBody {
    prefix: Option<Bytes>,
    rest: Option<Incoming>,
    tally: Tally,
    /// Keeps the exchange counted as in flight on its connection until the body is done.
    in_flight: Option<InFlight>,
    /// The upstream connection a response body comes from, released as soon as it has been
    /// read whole.
    lease: Option<Lease>,
}

/// Where the bytes a body carries are counted.
#[derive(Debug, Default)]
enum Tally {
    #[default]
    None,
    /// A request body on its way upstream: its progress, shared with the proxy.
    Request(Arc<Progress>),
    /// A response body: it owns the record, which is written when the body is dropped.
    Response(Box<Exchange>),
}

/// How far a request body has got: the bytes received from downstream, and when it last moved
/// on its way upstream (a frame sent, or the body finished).
#[derive(Debug)]
pub struct Progress {
    epoch: Instant,
    received: AtomicU64,
    moved_ms: AtomicU64,
}

impl Progress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            received: AtomicU64::new(0),
            moved_ms: AtomicU64::new(0),
        })
    }

    /// Bytes of request body received from downstream so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// When the body last moved towards the upstream.
    pub fn last_moved(&self) -> Instant {
        self.epoch + Duration::from_millis(self.moved_ms.load(Ordering::Relaxed))
    }

    fn moved(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.moved_ms.store(ms, Ordering::Relaxed);
    }
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        Self {
            prefix: Some(bytes),
            ..Self::default()
        }
    }

    pub fn stream(body: Incoming) -> Self {
        Self {
            rest: Some(body),
            ..Self::default()
        }
    }

    pub fn prefixed(prefix: Bytes, rest: Incoming) -> Self {
        Self {
            prefix: Some(prefix),
            rest: Some(rest),
            ..Self::default()
        }
    }

    /// Reports a request body's progress: streamed bytes count as received, and every frame
    /// sent (and the end of the body) as movement.
    pub fn tracking(mut self, progress: Arc<Progress>) -> Self {
        self.tally = Tally::Request(progress);
        self
    }

    /// Counts the exchange as in flight on its connection until this body is dropped.
    pub fn holding(mut self, in_flight: InFlight) -> Self {
        self.in_flight = Some(in_flight);
        self
    }

    /// Returns `lease`'s connection to the pool once this (response) body has been read whole.
    pub fn leasing(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self.release_if_read();
        self
    }

    /// Once the upstream body has ended, its connection can serve another request.
    fn release_if_read(&mut self) {
        if self.rest.as_ref().is_none_or(Body::is_end_stream) {
            if let Some(lease) = self.lease.take() {
                lease.release();
            }
        }
    }

    /// Attaches the exchange's record, written when this response body is dropped.
    pub fn finishing(mut self, exchange: Box<Exchange>) -> Self {
        self.tally = Tally::Response(exchange);
        self
    }

    fn prefix_len(&self) -> u64 {
        self.prefix.as_ref().map_or(0, |p| p.len() as u64)
    }

    fn count(&mut self, n: usize) {
        match &mut self.tally {
            Tally::None => {}
            Tally::Request(progress) => {
                progress.add_received(n);
                progress.moved();
            }
            Tally::Response(exchange) => exchange.bytes_out += n as u64,
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        // A request body sent whole (or abandoned): from now on the upstream's answer is what
        // is awaited.
        if let Tally::Request(progress) = self {
            progress.moved();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.take().filter(|p| !p.is_empty()) {
            // A request prefix was counted by whoever read it; a response prefix is sent here.
            match &mut this.tally {
                Tally::None => {}
                Tally::Request(progress) => progress.moved(),
                Tally::Response(exchange) => exchange.bytes_out += prefix.len() as u64,
            }
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let Some(rest) = &mut this.rest else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(rest).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.count(data.len());
                }
                // A sized body ends with its last frame: hyper will not poll it again.
                if this.lease.is_some() {
                    this.release_if_read();
                }
            }
            Poll::Ready(None) => {
                this.rest = None;
                this.release_if_read();
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.prefix_len() == 0 && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix_len();
        match &self.rest {
            None => SizeHint::with_exact(prefix),
            Some(rest) => {
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(prefix));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(prefix));
                }
                hint
            }
        }
    }
}
