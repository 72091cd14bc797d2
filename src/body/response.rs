//! A response body on its way downstream, in three wrappers with one concern each, composed
//! innermost first: [`Leased`] (the upstream connection it comes from), [`Logged`] (the
//! exchange's access record), [`Relayed`] (the downstream connection taking it).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::{Progress, ProxyBody};
use crate::access::{End, Exchange};
use crate::conn::InFlight;
use crate::lifetime::Stall;
use crate::upstream::{read_out, BoxError, Lease, DRAIN_BYTES};

/// A response body that holds the upstream connection it comes from, and gives it back to the
/// pool once the body has been read whole, if its request was sent whole by then; otherwise
/// the connection is closed after the exchange (dropping the lease), so that no request waits
/// behind another's upload. A body the downstream lets go of before its end is drained in the
/// background if what is left may be small ([`Lease::drain`]); one that broke is closed.
/// Error responses of snapguard's own hold none.
#[derive(Debug)]
pub struct Leased {
    inner: ProxyBody,
    lease: Option<(Lease, Arc<Progress>)>,
}

impl Leased {
    /// `inner`, read from `lease`'s connection, for the request whose progress is `request`.
    pub fn new(inner: ProxyBody, lease: Lease, request: Arc<Progress>) -> Self {
        let mut body = Self {
            inner,
            lease: Some((lease, request)),
        };
        body.release_if_read();
        body
    }

    /// A body that came from no upstream connection.
    pub fn own(inner: ProxyBody) -> Self {
        Self { inner, lease: None }
    }

    /// Whether the rest of the body is all in memory: it never waits for the upstream.
    pub fn is_buffered(&self) -> bool {
        self.inner.buffered().is_some()
    }

    fn release_if_read(&mut self) {
        if self.inner.is_end_stream() {
            if let Some((lease, request)) = self.lease.take() {
                if request.sent_whole() {
                    lease.release();
                }
            }
        }
    }
}

impl Body for Leased {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(_)) | None) => this.release_if_read(),
            // Broken: its connection is closed, never drained.
            Poll::Ready(Some(Err(_))) => this.lease = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        let Some((lease, request)) = self.lease.take() else {
            return;
        };
        // Let go of before its end (the downstream went away, or reset its stream): a rest that
        // is surely over the drain's budget is not worth reading, and closes the connection.
        if self.inner.size_hint().lower() <= DRAIN_BYTES {
            lease.drain(read_out(std::mem::take(&mut self.inner)), request, None);
        }
    }
}

/// A response body that counts what it sends for the exchange's access record, and ends the
/// exchange ([`Exchange::finish`]: the access line and the request metrics) with how it ended:
/// when its last frame has been handed on (at once for an empty body, or one that may not be
/// sent: a HEAD request's, a 204's or a 304's, which hyper never polls), when it breaks off on the upstream's side, or, if neither happens before hyper lets
/// go of it, as abandoned by the downstream: dropping is the only sign hyper gives of that.
#[derive(Debug)]
pub struct Logged {
    inner: Leased,
    exchange: Option<Box<Exchange>>,
}

impl Logged {
    pub fn new(inner: Leased, exchange: Option<Box<Exchange>>) -> Self {
        let mut body = Self { inner, exchange };
        let bodiless = body
            .exchange
            .as_ref()
            .is_some_and(|e| e.method == http::Method::HEAD || matches!(e.status, 204 | 304));
        if bodiless || body.inner.is_end_stream() {
            body.end(End::Complete);
        }
        body
    }

    /// Whether the rest of the body is all in memory: it never waits for the upstream.
    pub fn is_buffered(&self) -> bool {
        self.inner.is_buffered()
    }

    fn end(&mut self, end: End) {
        if let Some(exchange) = self.exchange.take() {
            exchange.finish(end);
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(exchange)) = (frame.data_ref(), &mut this.exchange) {
                    exchange.bytes_out += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.end(End::Complete);
                }
            }
            Poll::Ready(None) => this.end(End::Complete),
            Poll::Ready(Some(Err(e))) => {
                let kind = Stall::find(e.as_ref()).map_or("reset", Stall::reason);
                if let Some(exchange) = &this.exchange {
                    tracing::warn!(
                        error = %e,
                        request_id = exchange.request_id.to_str().unwrap_or("-"),
                        "the response body broke off"
                    );
                }
                this.end(End::Upstream(kind));
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // Let go of before its end (an ended exchange has no record left to write).
        self.end(End::Abandoned);
    }
}

/// A response body handed to a downstream connection, which watches it being taken
/// ([`InFlight`]): polled means taken, and the upstream side is polled with a waker that tells
/// the connection when its data is there; bytes handed on are counted for the send pace.
#[derive(Debug)]
pub struct Relayed {
    inner: Logged,
    in_flight: InFlight,
}

impl Relayed {
    /// Counts the exchange as in flight on its connection until this body is dropped; it is a
    /// response being sent from now on.
    pub fn new(inner: Logged, mut in_flight: InFlight) -> Self {
        in_flight.responding(inner.is_buffered());
        Self { inner, in_flight }
    }
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match this.in_flight.taken(cx.waker()) {
            Some(waker) => Pin::new(&mut this.inner).poll_frame(&mut Context::from_waker(&waker)),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.in_flight.sent(data.len());
                }
            }
            Poll::Pending => this.in_flight.waiting_upstream(),
            Poll::Ready(_) => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
