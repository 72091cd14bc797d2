//! The one body type snapguard sends in both directions.
//!
//! A buffered prefix followed by a stream: a passthrough body is a stream alone, a policed or
//! error body is a prefix alone, and an oversized body forwarded in audit mode is both (the part
//! read while policing, then the rest). One concrete type keeps the upstream client monomorphic
//! without boxing every body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

#[derive(Debug, Default)]
pub struct ProxyBody {
    prefix: Option<Bytes>,
    rest: Option<Incoming>,
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        Self {
            prefix: Some(bytes),
            rest: None,
        }
    }

    pub fn stream(body: Incoming) -> Self {
        Self {
            prefix: None,
            rest: Some(body),
        }
    }

    pub fn prefixed(prefix: Bytes, rest: Incoming) -> Self {
        Self {
            prefix: Some(prefix),
            rest: Some(rest),
        }
    }

    fn prefix_len(&self) -> u64 {
        self.prefix.as_ref().map_or(0, |p| p.len() as u64)
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
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
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
