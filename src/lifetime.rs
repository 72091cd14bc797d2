//! What bounds a request's life, in one place.
//!
//! | phase | bound | when it is broken |
//! |---|---|---|
//! | a request head: a connection's first, and each next one on HTTP/1 | `timeouts.request_header` ([`crate::conn`]) | connection closed |
//! | a small request body (up to `limits.buffer_request_body`, and every policed one), read whole before an upstream slot is taken | `timeouts.request_body` (one place: `Proxy::read_request_body` in [`crate::proxy`]) | 408, connection closed |
//! | waiting for an upstream slot, first come first served | `timeouts.upstream_queue`, at most `limits.max_upstream_waiting` waiting | 503 |
//! | connecting upstream | `timeouts.upstream_connect` | 502 |
//! | request sent to response head | `timeouts.upstream_response` ([`crate::proxy`]) | 504 |
//! | a small response body (up to `limits.buffer_response_body`), read whole before it is relayed | the [`Watched`] deadlines below | 502 |
//! | a streamed body, either way | [`Watched`]: `timeouts.body_idle` between frames, `limits.min_body_rate` on average after `timeouts.min_rate_grace` | the exchange is cut |
//! | a request body's framing, buffered or streamed | [`crate::gather`]: past 1,024 frames, 32 bytes a frame on average | 400, connection closed |
//! | a response the downstream does not take | the same, watched per connection ([`crate::conn`]) | connection closed |
//! | an HTTP/2 connection with no request in flight | `timeouts.idle` ([`crate::conn`]) | connection closed |
//! | HTTP/2 streams the peer resets | more than 100 abandoned and most of the connection's ([`crate::conn`]); h2's own limits, pinned in [`crate::server`] | GOAWAY, then reset 1 s later |
//!
//! Buffering the small bodies is what keeps a slow peer from holding anything but its own
//! connection: the upstream slot is taken only once the request is in memory, and given back as
//! soon as a small response is.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::config::Config;
use crate::upstream::BoxError;

/// How long a streamed body may stand still, and how fast it must move on average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// The longest time between two frames.
    pub idle: Duration,
    /// Bytes per second on average once `grace` has passed; 0 for no minimum.
    pub min_rate: u64,
    pub grace: Duration,
}

impl Pace {
    pub fn of(config: &Config) -> Self {
        Self {
            idle: config.timeouts.body_idle,
            min_rate: config.limits.min_body_rate,
            grace: config.timeouts.min_rate_grace,
        }
    }

    /// Whether `moved` bytes since `started` (and the last frame at `last`) keep the pace at
    /// `now`.
    pub fn check(
        &self,
        started: Instant,
        last: Instant,
        moved: u64,
        now: Instant,
    ) -> Result<(), Stall> {
        if now.saturating_duration_since(last) >= self.idle {
            return Err(Stall::Idle(self.idle));
        }
        let elapsed = now.saturating_duration_since(started);
        if self.min_rate > 0 && elapsed > self.grace {
            let owed = u128::from(self.min_rate) * elapsed.as_millis() / 1000;
            if u128::from(moved) < owed {
                return Err(Stall::TooSlow(self.min_rate));
            }
        }
        Ok(())
    }

    /// When, at the earliest, the pace could be broken if nothing more moves.
    pub fn next_check(&self, started: Instant, last: Instant, moved: u64) -> Instant {
        let idle = last + self.idle;
        if self.min_rate == 0 {
            return idle;
        }
        // `moved` bytes pay for `moved / min_rate` seconds from the start, and never less than
        // the grace period.
        let paid = Duration::from_millis(moved.saturating_mul(1000) / self.min_rate);
        idle.min(started + paid.max(self.grace) + Duration::from_millis(1))
    }
}

/// Why a body was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stall {
    #[error("the body did not move for {0:?}")]
    Idle(Duration),
    #[error("the body moved slower than {0} bytes/s on average")]
    TooSlow(u64),
    /// A request body in more frames than [`crate::gather`] lets through for its bytes.
    #[error("the body came in {0} frames averaging under {min} bytes", min = crate::gather::MIN_FRAME)]
    Fragmented(u64),
}

impl Stall {
    /// A low-cardinality name for logs and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Idle(_) => "body_idle",
            Self::TooSlow(_) => "body_too_slow",
            Self::Fragmented(_) => "body_fragmented",
        }
    }

    /// The stall behind an error of a body or of an exchange it was part of, if any.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<Stall> {
        let mut source = Some(error);
        while let Some(e) = source {
            if let Some(stall) = e.downcast_ref::<Stall>() {
                return Some(*stall);
            }
            source = e.source();
        }
        None
    }
}

/// A body held to a [`Pace`]: cut with a [`Stall`] error when it stands still for too long or
/// moves too slowly. The timer is armed only while the body waits for data.
///
/// Only the time the body is waited on counts: between handing a frame on and being polled
/// again, the time is its consumer's (hyper does not poll a response body while the downstream
/// is not taking what it has, nor a request body while the upstream is not), and the body's
/// clock stops. A peer is thus held to the pace for its own slowness, never for the other
/// side's, which [`crate::conn`] watches on the downstream's side.
#[derive(Debug)]
pub struct Watched<B> {
    inner: B,
    pace: Pace,
    /// Whether the body was polled yet: its clock starts then, not when it was wrapped (a
    /// request body may wait for an upstream slot and a connection first).
    polled: bool,
    started: Instant,
    last: Instant,
    moved: u64,
    /// When the last frame was handed on, while the consumer has not asked for the next.
    handed: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> Watched<B> {
    pub fn new(inner: B, pace: Pace) -> Self {
        let now = Instant::now();
        Self {
            inner,
            pace,
            polled: false,
            started: now,
            last: now,
            moved: 0,
            handed: None,
            timer: None,
        }
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if !std::mem::replace(&mut this.polled, true) {
            let now = Instant::now();
            (this.started, this.last) = (now, now);
        }
        if let Some(handed) = this.handed.take() {
            // The consumer's time since the last frame: the clock moves on past it.
            let theirs = Instant::now().saturating_duration_since(handed);
            this.started += theirs;
            this.last += theirs;
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let now = Instant::now();
                (this.last, this.handed) = (now, Some(now));
                if let Some(data) = frame.data_ref() {
                    this.moved += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let now = Instant::now();
                if let Err(stall) = this.pace.check(this.started, this.last, this.moved, now) {
                    return Poll::Ready(Some(Err(stall.into())));
                }
                let at = this.pace.next_check(this.started, this.last, this.moved);
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                // Woken at the deadline to check again (the data may still come first).
                if timer.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The bytes of response bodies buffered at once, shared by every exchange (and kept across
/// reloads), so that buffering cannot take more than `limits.buffer_memory` in all.
#[derive(Debug, Clone, Default)]
pub struct Budget {
    used: Arc<AtomicUsize>,
}

impl Budget {
    /// Reserves `n` bytes if that keeps the total within `cap`.
    pub fn reserve(&self, n: usize, cap: usize) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= cap)
            })
            .ok()?;
        Some(Reservation {
            used: self.used.clone(),
            n,
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Buffered bytes counted against the [`Budget`] until dropped.
#[derive(Debug)]
pub struct Reservation {
    used: Arc<AtomicUsize>,
    n: usize,
}

impl Reservation {
    /// Gives back what a body turned out not to need.
    pub fn shrink_to(&mut self, n: usize) {
        if n < self.n {
            self.used.fetch_sub(self.n - n, Ordering::AcqRel);
            self.n = n;
        }
    }

    /// `bytes`, counted against the budget until the last of them is dropped: once hyper has
    /// written them out, not when it took them from the body (a response handed to hyper in
    /// one frame waits in its write queue for as long as the reader takes).
    pub fn hold(mut self, bytes: Bytes) -> Bytes {
        self.shrink_to(bytes.len());
        Bytes::from_owner(Held {
            bytes,
            _reservation: self,
        })
    }
}

/// Bytes and the reservation that counts them, dropped together.
struct Held {
    bytes: Bytes,
    _reservation: Reservation,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACE: Pace = Pace {
        idle: Duration::from_secs(30),
        min_rate: 1000,
        grace: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn the_pace_is_broken_by_standing_still_or_by_moving_too_slowly() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(PACE.check(t0, t0, 0, s(9)), Ok(()), "within the grace");
        assert_eq!(PACE.check(t0, s(9), 0, s(11)), Err(Stall::TooSlow(1000)));
        assert_eq!(PACE.check(t0, s(9), 11_000, s(11)), Ok(()));
        assert_eq!(
            PACE.check(t0, s(1), 1_000_000, s(31)),
            Err(Stall::Idle(PACE.idle))
        );
        let off = Pace {
            min_rate: 0,
            ..PACE
        };
        assert_eq!(off.check(t0, s(20), 0, s(49)), Ok(()), "no minimum rate");
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_check_is_when_the_bytes_moved_stop_paying() {
        let t0 = Instant::now();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(PACE.next_check(t0, t0, 0), t0 + PACE.grace + ms(1));
        assert_eq!(PACE.next_check(t0, t0, 20_000), t0 + ms(20_001));
        assert_eq!(
            PACE.next_check(t0, t0, 1_000_000),
            t0 + PACE.idle,
            "the idle deadline comes first"
        );
    }

    /// A body that yields one frame, then waits for ever.
    struct OneThenNothing(bool);

    impl Body for OneThenNothing {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
            }
        }
    }

    #[test]
    fn the_budget_bounds_what_is_buffered_at_once() {
        let budget = Budget::default();
        let mut a = budget.reserve(60, 100).unwrap();
        assert!(budget.reserve(50, 100).is_none());
        a.shrink_to(10);
        let b = budget.reserve(90, 100).unwrap();
        assert_eq!(budget.used(), 100);
        drop((a, b));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watched_body_that_stops_is_cut_at_its_deadline() {
        use http_body_util::BodyExt;
        let pace = Pace {
            min_rate: 0,
            ..PACE
        };
        let mut body = Watched::new(OneThenNothing(false), pace);
        let started = Instant::now();
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        let err = body.frame().await.and_then(Result::err);
        let stall = err.as_deref().and_then(|e| Stall::find(e));
        assert_eq!(stall, Some(Stall::Idle(pace.idle)));
        assert_eq!(started.elapsed(), pace.idle);
    }

    /// A body with a frame ready at every poll but the second, which waits `wait` first.
    struct SlowOnce {
        polls: u32,
        wait: Option<Pin<Box<Sleep>>>,
    }

    impl Body for SlowOnce {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.polls == 1 {
                if let Some(wait) = self.wait.as_mut() {
                    if wait.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
            self.polls += 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[0; 1000])))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_time_a_body_is_waited_on_counts() {
        use http_body_util::BodyExt;
        // 1,000 bytes a frame against a minimum of 1,000 a second after 10 s, at most 30 s
        // idle. The consumer takes a frame, then comes back 100 s later (its own slowness:
        // a downstream not reading), and the body makes it wait 5 s for the next: neither
        // idle for 30 s nor under the rate in the time it was waited on.
        let mut body = Watched::new(
            SlowOnce {
                polls: 0,
                wait: None,
            },
            PACE,
        );
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        tokio::time::sleep(Duration::from_secs(100)).await;
        body.inner.wait = Some(Box::pin(tokio::time::sleep(Duration::from_secs(5))));
        assert!(
            body.frame().await.is_some_and(|f| f.is_ok()),
            "cut for the consumer's time"
        );
        // Waited on all along, the same body is cut: 1,000 bytes in 12 s is under the rate.
        body.inner.wait = Some(Box::pin(tokio::time::sleep(Duration::from_secs(12))));
        body.inner.polls = 1;
        let err = body.frame().await.and_then(Result::err);
        let stall = err.as_deref().and_then(|e| Stall::find(e));
        assert_eq!(stall, Some(Stall::TooSlow(PACE.min_rate)));
    }
}
