//! A request body on its way upstream, and how far it got.
//!
//! [`Progress`] is shared by the request's parts that need to know: the upstream deadline (the
//! upstream's time to answer counts from the body's last movement), the pool (a connection is
//! reused only once its request was sent whole) and the access record (bytes received).
//! [`Tracked`] is the body wrapper that keeps it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::ProxyBody;
use crate::lifetime::Stall;
use crate::upstream::BoxError;

/// How far a request body has got: the bytes received from downstream, and when it last moved
/// on its way upstream (a frame sent, or the body finished).
#[derive(Debug)]
pub struct Progress {
    epoch: Instant,
    received: AtomicU64,
    moved_ms: AtomicU64,
    /// Set once the request body has been handed on whole: only then may its upstream
    /// connection carry another request.
    sent_whole: AtomicBool,
    /// Set if the body broke off on its way upstream, with the stall if it was cut for its pace
    /// or framing: the exchange counts a cut once when it ends, whichever side noticed first,
    /// and does not blame the upstream for a response that broke because of it.
    broke: OnceLock<Option<Stall>>,
}

impl Progress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            received: AtomicU64::new(0),
            moved_ms: AtomicU64::new(0),
            sent_whole: AtomicBool::new(false),
            broke: OnceLock::new(),
        })
    }

    /// Whether the request body has been sent upstream to its end.
    pub fn sent_whole(&self) -> bool {
        self.sent_whole.load(Ordering::Acquire)
    }

    fn finished(&self) {
        self.sent_whole.store(true, Ordering::Release);
    }

    /// Whether the body broke off on its way upstream, and the stall if it was cut for its
    /// pace or framing.
    pub fn broke(&self) -> Option<Option<Stall>> {
        self.broke.get().copied()
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

/// A request body that reports its [`Progress`]: streamed bytes count as received (a prefix was
/// counted by whoever read it), every frame sent and the end of the body as movement, and the
/// end as sent whole.
#[derive(Debug)]
pub struct Tracked {
    inner: ProxyBody,
    progress: Arc<Progress>,
}

impl Tracked {
    pub fn new(inner: ProxyBody, progress: Arc<Progress>) -> Self {
        if inner.is_end_stream() {
            // An empty body is never polled: it is sent whole as it stands.
            progress.finished();
        }
        Self { inner, progress }
    }

    /// The whole body, when it is all in memory.
    pub fn buffered(&self) -> Option<&[u8]> {
        self.inner.buffered()
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let prefix = this.inner.prefix_pending();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref().filter(|_| !prefix) {
                    this.progress.add_received(data.len());
                }
                this.progress.moved();
                // A sized body ends with its last frame: hyper will not poll it again.
                if this.inner.is_end_stream() {
                    this.progress.finished();
                }
            }
            Poll::Ready(None) => this.progress.finished(),
            Poll::Ready(Some(Err(e))) => {
                let _ = this.progress.broke.set(Stall::find(e.as_ref()));
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

impl Drop for Tracked {
    fn drop(&mut self) {
        // Sent whole or abandoned: from now on the upstream's answer is what is awaited.
        self.progress.moved();
    }
}
