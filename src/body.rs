//! The bodies snapguard sends, built from wrappers with one concern each.
//!
//! [`ProxyBody`] is the source: a buffered prefix followed by a stream (a small or policed body
//! is a prefix alone, a large one a stream, or the part read while deciding to buffer it and
//! then the rest); its stream has its framing made sensible ([`crate::gather`]) and is held to
//! its pace ([`crate::lifetime::Watched`]). Around it, for a request, [`request::Tracked`]
//! reports how far it got; for a response, [`response::Leased`] gives the upstream connection
//! back once both directions are done, [`response::Logged`] writes the access record at the end
//! of the exchange, and [`response::Relayed`] watches the downstream take it
//! ([`crate::conn`]). One concrete type each way keeps hyper's client and server monomorphic
//! without boxing every body.

pub mod request;
pub mod response;

pub use request::{Progress, Tracked};
pub use response::{Leased, Logged, Relayed};

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::gather::Gather;
use crate::lifetime::{Pace, Watched};
use crate::upstream::BoxError;

/// A body's streamed part: its framing made sensible ([`Gather`]), held to its pace.
pub type Stream = Watched<Gather<Incoming>>;

/// A buffered prefix, then a stream.
#[derive(Debug, Default)]
pub struct ProxyBody {
    prefix: Option<Bytes>,
    /// Boxed: a stream is some 300 bytes, and a body is moved several times on its way, while
    /// most bodies (every small one, every GET's) have none.
    rest: Option<Box<Stream>>,
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        Self {
            prefix: Some(bytes),
            ..Self::default()
        }
    }

    /// A body streamed as it comes, held to `pace`; an empty one is kept as no stream at all.
    pub fn stream(body: Gather<Incoming>, pace: Pace) -> Self {
        if body.is_end_stream() {
            return Self::default();
        }
        Self {
            rest: Some(Box::new(Watched::new(body, pace))),
            ..Self::default()
        }
    }

    /// What was read of a body, then the rest of it streamed, held to `pace`.
    pub fn prefixed(prefix: Bytes, rest: Gather<Incoming>, pace: Pace) -> Self {
        Self {
            prefix: Some(prefix),
            rest: Some(Box::new(Watched::new(rest, pace))),
        }
    }

    /// What was read of a watched body, then the rest of it.
    pub fn prefixed_watched(prefix: Bytes, rest: Stream) -> Self {
        Self {
            prefix: Some(prefix),
            rest: Some(Box::new(rest)),
        }
    }

    /// The whole body, when it is all in memory (an empty one included).
    pub fn buffered(&self) -> Option<&[u8]> {
        if !self.rest.as_ref().is_none_or(Body::is_end_stream) {
            return None;
        }
        Some(self.prefix.as_deref().unwrap_or_default())
    }

    /// Whether the next frame is the buffered prefix (counted by whoever read it).
    pub fn prefix_pending(&self) -> bool {
        self.prefix_len() > 0
    }

    fn prefix_len(&self) -> u64 {
        self.prefix.as_ref().map_or(0, |p| p.len() as u64)
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
        if let Some(prefix) = this.prefix.take().filter(|p| !p.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let Some(rest) = &mut this.rest else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut **rest).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.rest = None;
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
