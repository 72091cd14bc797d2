//! The one body type snapguard sends in both directions.
//!
//! A buffered prefix followed by a stream: a small or policed body is a prefix alone, a large
//! one a stream (or the part read while deciding to buffer it, then the rest). One concrete type
//! keeps the upstream client monomorphic without boxing every body. A stream is always held to
//! its [`Pace`] ([`crate::lifetime`]); the body also counts the bytes it carries for the access
//! record, and gives a response's upstream connection back once both directions are done.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::access::Exchange;
use crate::conn::InFlight;
use crate::gather::Gather;
use crate::lifetime::{Pace, Watched};
use crate::upstream::{BoxError, Lease};

/// A body's streamed part: its framing made sensible ([`Gather`]), held to its pace.
pub type Stream = Watched<Gather<Incoming>>;

#[derive(Debug, Default)]
pub struct ProxyBody {
    prefix: Option<Bytes>,
    rest: Option<Stream>,
    tally: Tally,
    /// Keeps the exchange counted as in flight on its connection until the body is done.
    in_flight: Option<InFlight>,
    /// The upstream connection a response body comes from, released as soon as it has been
    /// read whole and its request sent whole.
    lease: Option<(Lease, Arc<Progress>)>,
    /// Buffered bytes counted against `limits.buffer_memory` while this body holds them.
    budget: Option<crate::lifetime::Reservation>,
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
    /// Set once the request body has been handed on whole: only then may its upstream
    /// connection carry another request.
    sent_whole: std::sync::atomic::AtomicBool,
}

impl Progress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            received: AtomicU64::new(0),
            moved_ms: AtomicU64::new(0),
            sent_whole: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the request body has been sent upstream to its end.
    pub fn sent_whole(&self) -> bool {
        self.sent_whole.load(Ordering::Acquire)
    }

    fn finished(&self) {
        self.sent_whole.store(true, Ordering::Release);
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

    /// A body streamed as it comes, held to `pace`.
    pub fn stream(body: Gather<Incoming>, pace: Pace) -> Self {
        Self {
            rest: Some(Watched::new(body, pace)),
            ..Self::default()
        }
    }

    /// What was read of a body, then the rest of it streamed, held to `pace`.
    pub fn prefixed(prefix: Bytes, rest: Gather<Incoming>, pace: Pace) -> Self {
        Self {
            prefix: Some(prefix),
            rest: Some(Watched::new(rest, pace)),
            ..Self::default()
        }
    }

    /// What was read of a watched body, then the rest of it.
    pub fn prefixed_watched(prefix: Bytes, rest: Stream) -> Self {
        Self {
            prefix: Some(prefix),
            rest: Some(rest),
            ..Self::default()
        }
    }

    /// The whole body, when it is all in memory (an empty one included).
    pub fn buffered(&self) -> Option<&[u8]> {
        if !self.rest.as_ref().is_none_or(Body::is_end_stream) {
            return None;
        }
        Some(self.prefix.as_deref().unwrap_or_default())
    }

    /// Counts buffered bytes against the memory budget until this body is dropped.
    pub fn budgeted(mut self, reservation: crate::lifetime::Reservation) -> Self {
        self.budget = Some(reservation);
        self
    }

    /// Reports a request body's progress: streamed bytes count as received, and every frame
    /// sent (and the end of the body) as movement.
    pub fn tracking(mut self, progress: Arc<Progress>) -> Self {
        if self.is_end_stream() {
            // An empty body is never polled: it is sent whole as it stands.
            progress.finished();
        }
        self.tally = Tally::Request(progress);
        self
    }

    /// Counts the exchange as in flight on its connection until this body is dropped.
    /// It is a response being sent from now on, watched for the downstream taking it.
    pub fn holding(mut self, mut in_flight: InFlight) -> Self {
        in_flight.responding();
        self.in_flight = Some(in_flight);
        self
    }

    /// Returns `lease`'s connection to the pool once this (response) body has been read whole,
    /// if `request` has been sent whole by then; otherwise the connection is closed after the
    /// exchange, so that no request waits behind another's upload.
    pub fn leasing(mut self, lease: Lease, request: Arc<Progress>) -> Self {
        self.lease = Some((lease, request));
        self.release_if_read();
        self
    }

    /// Once the upstream body has ended, its connection can serve another request.
    fn release_if_read(&mut self) {
        if self.rest.as_ref().is_none_or(Body::is_end_stream) {
            if let Some((lease, request)) = self.lease.take() {
                if request.sent_whole() {
                    lease.release();
                }
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

    /// The stream has ended: a request body was sent whole, a response's connection may go back.
    fn ended(&mut self) {
        if let Tally::Request(progress) = &self.tally {
            progress.finished();
        }
        self.release_if_read();
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
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        // Polled: the downstream is taking the response. The upstream side is polled with a
        // waker that tells when its data is there.
        let relay = this
            .in_flight
            .as_mut()
            .and_then(|in_flight| in_flight.taken(cx.waker()));
        if let Some(prefix) = this.prefix.take().filter(|p| !p.is_empty()) {
            // A request prefix was counted by whoever read it; a response prefix is sent here.
            match &mut this.tally {
                Tally::None => {}
                Tally::Request(progress) => {
                    progress.moved();
                    if this.rest.as_ref().is_none_or(Body::is_end_stream) {
                        progress.finished();
                    }
                }
                Tally::Response(exchange) => exchange.bytes_out += prefix.len() as u64,
            }
            if let Some(in_flight) = &this.in_flight {
                in_flight.sent(prefix.len());
            }
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let Some(rest) = &mut this.rest else {
            return Poll::Ready(None);
        };
        let polled = match &relay {
            Some(waker) => Pin::new(rest).poll_frame(&mut Context::from_waker(waker)),
            None => Pin::new(rest).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.count(data.len());
                    if let Some(in_flight) = &this.in_flight {
                        in_flight.sent(data.len());
                    }
                }
                // A sized body ends with its last frame: hyper will not poll it again.
                if this.rest.as_ref().is_some_and(Body::is_end_stream) {
                    this.ended();
                }
            }
            Poll::Ready(None) => {
                this.rest = None;
                this.ended();
            }
            Poll::Pending => {
                if let Some(in_flight) = &this.in_flight {
                    in_flight.waiting_upstream();
                }
            }
            Poll::Ready(Some(Err(_))) => {}
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
