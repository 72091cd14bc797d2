//! Per-connection deadlines that the HTTP stacks do not keep on their own.
//!
//! hyper-util's protocol detection waits without limit for a connection's first bytes, and hyper
//! keeps an HTTP/2 connection with no streams open for ever: either would let silent peers hold
//! every connection slot. [`with_deadlines`] closes a connection whose first request has not
//! started within `first`, or that has had no request in flight for `idle` (HTTP/2) or `first`
//! (HTTP/1, which is then waiting for a request head: the header read timeout, kept here rather
//! than by hyper, whose own costs a boxed timer per request). And hyper polls a
//! response body only when the downstream takes what was written, so a peer that stops reading
//! (or an HTTP/2 stream whose window stays at 0) would hold its exchange for ever: the
//! connection is also closed when its responses stop moving at the [`Pace`] of
//! [`crate::lifetime`] while none of them waits on the upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lifetime::{Pace, Stall};

/// What a connection is doing, updated by its requests.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    started: AtomicU64,
    /// When the connection last went idle, in milliseconds since `opened`.
    idle_since_ms: AtomicU64,
    /// Response bodies being sent, and of those, how many wait for the upstream's data.
    sending: AtomicUsize,
    upstream_waits: AtomicUsize,
    /// Since when responses have been sent without pause (ms since `opened`), how many bytes
    /// since then, and when a response body was last taken by the downstream.
    sending_since_ms: AtomicU64,
    sent: AtomicU64,
    taken_ms: AtomicU64,
    /// Wakes the deadline watch when the connection abandons too many requests.
    abandoning: Notify,
    /// Set when the connection is cut: its socket is reset when dropped.
    reset: AtomicBool,
    /// Requests abandoned before their response (HTTP/2 streams reset by the peer).
    abandoned: AtomicU64,
    /// Set once a request came over HTTP/2.
    http2: AtomicBool,
}

/// Abandoned requests a connection may have before it is cut, if they are also most of its
/// requests: a client that resets every stream right after sending it (the rapid-reset pattern)
/// costs the upstream a request each time, the client almost nothing.
const ABANDON_BUDGET: u64 = 100;

/// How long a connection told to go away for abandoning too many requests (an HTTP/2 GOAWAY,
/// through hyper's graceful shutdown) has to finish before its socket is reset.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// Requests such a connection may still abandon meanwhile. hyper's graceful GOAWAY first names
/// the highest stream id and waits for a PING's answer before it refuses new streams, so a peer
/// that does not answer could go on opening and resetting streams for the whole grace.
const GOAWAY_SLACK: u64 = 20;

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            sending: AtomicUsize::new(0),
            upstream_waits: AtomicUsize::new(0),
            sending_since_ms: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            taken_ms: AtomicU64::new(0),
            abandoning: Notify::new(),
            reset: AtomicBool::new(false),
            abandoned: AtomicU64::new(0),
            http2: AtomicBool::new(false),
        })
    }

    /// Marks a request in flight until the returned guard (held by its response body) drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            activity: self.clone(),
            responding: false,
            relay: None,
        }
    }

    /// The connection speaks HTTP/2: with no request in flight it is idle, not waiting for a
    /// request head.
    pub fn speaks_http2(&self) {
        self.http2.store(true, Ordering::Relaxed);
    }

    /// Whether the peer abandons more requests than it lets finish, past the budget.
    fn abandons_too_many(&self) -> bool {
        let abandoned = self.abandoned.load(Ordering::Acquire);
        abandoned > ABANDON_BUDGET && abandoned * 2 > self.started.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: &AtomicU64) -> Instant {
        self.opened + Duration::from_millis(ms.load(Ordering::Acquire))
    }

    /// Whether the responses being sent keep `pace`, and when to look again; `None` while no
    /// response is being sent. One that waits for the upstream (whose own pace is watched on
    /// the body itself) is not the downstream's fault, but is looked at again within the idle
    /// deadline, since it may be the downstream's the moment the upstream's data arrives.
    fn sending_pace(&self, pace: &Pace) -> Option<(Result<(), Stall>, Instant)> {
        if self.sending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let (since, taken) = (self.at(&self.sending_since_ms), self.at(&self.taken_ms));
        let sent = self.sent.load(Ordering::Acquire);
        let next = pace.next_check(since, taken, sent);
        if self.upstream_waits.load(Ordering::Acquire) > 0 {
            // Not more often than once a second while it waits.
            let soonest = Instant::now() + pace.idle.min(Duration::from_secs(1));
            return Some((Ok(()), next.max(soonest)));
        }
        Some((pace.check(since, taken, sent, Instant::now()), next))
    }

    /// The instant the connection went idle, or `None` while a request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)))
    }
}

/// A request in flight on a connection; once its response is being sent, the sending of it.
#[derive(Debug)]
pub struct InFlight {
    activity: Arc<Activity>,
    /// Set once the response is being sent.
    responding: bool,
    /// For a response that may wait for the upstream's data: what tells whose turn it is.
    relay: Option<Arc<Relay>>,
}

/// Whether a response being sent waits for the upstream or for the downstream.
///
/// The response body is polled with this as its waker: once it has said it waits for the
/// upstream's data, the upstream's wake-up is what says the data is there, and from then on a
/// body that is not polled again is the downstream's doing (hyper polls a body only when it
/// can write more of it).
#[derive(Debug)]
struct Relay {
    activity: Arc<Activity>,
    waiting: AtomicBool,
    /// The connection's own waker, passed on.
    downstream: Mutex<Option<Waker>>,
}

impl Relay {
    fn stop_waiting(&self) {
        if self.waiting.swap(false, Ordering::AcqRel) {
            self.activity.upstream_waits.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.stop_waiting();
        let downstream = self
            .downstream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(waker) = downstream.as_ref() {
            waker.wake_by_ref();
        }
    }
}

impl InFlight {
    /// The response body is handed to the connection: from now on it must keep moving. A body
    /// held whole in memory (`buffered`) never waits for the upstream, so whatever holds it up
    /// is the downstream, and it needs no relay.
    pub fn responding(&mut self, buffered: bool) {
        if self.responding {
            return;
        }
        self.responding = true;
        let a = &self.activity;
        if a.sending.fetch_add(1, Ordering::AcqRel) == 0 {
            let now = a.now_ms();
            a.sent.store(0, Ordering::Release);
            a.sending_since_ms.store(now, Ordering::Release);
            a.taken_ms.store(now, Ordering::Release);
        }
        if !buffered {
            self.relay = Some(Arc::new(Relay {
                activity: a.clone(),
                waiting: AtomicBool::new(false),
                downstream: Mutex::new(None),
            }));
        }
    }

    /// The downstream took (or is ready to take) more of the response: it polled the body,
    /// waking with `waker`. Returns the waker to poll the upstream side with.
    pub fn taken(&mut self, waker: &Waker) -> Option<Waker> {
        let a = &self.activity;
        a.taken_ms.store(a.now_ms(), Ordering::Release);
        let relay = self.relay.as_ref()?;
        relay.stop_waiting();
        let mut downstream = relay
            .downstream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match downstream.as_mut() {
            Some(known) if known.will_wake(waker) => {}
            _ => *downstream = Some(waker.clone()),
        }
        drop(downstream);
        Some(Waker::from(relay.clone()))
    }

    /// The response waits for the upstream's data, not for the downstream.
    pub fn waiting_upstream(&self) {
        if let Some(relay) = &self.relay {
            if !relay.waiting.swap(true, Ordering::AcqRel) {
                self.activity.upstream_waits.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// `n` bytes of the response were handed to the connection.
    pub fn sent(&self, n: usize) {
        self.activity.sent.fetch_add(n as u64, Ordering::AcqRel);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.activity;
        if self.responding {
            if let Some(relay) = self.relay.take() {
                relay.stop_waiting();
            }
            activity.sending.fetch_sub(1, Ordering::AcqRel);
        } else {
            // Dropped before a response was handed over: the peer abandoned the request.
            activity.abandoned.fetch_add(1, Ordering::AcqRel);
            if activity.abandons_too_many() {
                activity.abandoning.notify_one();
            }
        }
        activity
            .idle_since_ms
            .store(activity.now_ms(), Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A downstream socket that is reset (RST, `SO_LINGER` 0) instead of closed when its connection
/// was cut, so that a peer that stopped reading does not keep its unsent data in the kernel.
pub struct Socket {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl Socket {
    pub fn new(stream: TcpStream, activity: Arc<Activity>) -> Self {
        Self { stream, activity }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if self.activity.reset.load(Ordering::Acquire) {
            let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
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

/// Why a connection was closed by its deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No request in flight for too long (or none started at all).
    Idle,
    /// Its responses stopped moving, or moved too slowly, on the downstream's side.
    Sending(Stall),
    /// It abandoned most of its requests, past the budget.
    Abandoning,
}

impl Closed {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Sending(Stall::Idle(_)) => "send_idle",
            // Responses are never judged on their framing; the pace is all there is to break.
            Self::Sending(Stall::TooSlow(_) | Stall::Fragmented(_)) => "send_too_slow",
            Self::Abandoning => "reset_flood",
        }
    }
}

/// Tells every connection to finish what it is doing and close (a graceful shutdown), and says
/// when they all have. In the manner of hyper-util's `GracefulShutdown`, but looked at the way
/// the deadline watch looks at everything else: a connection is woken for it once, and checks a
/// flag whenever it wakes anyway, where a watch channel polled at every wake-up cost some 300
/// instructions a request.
#[derive(Debug, Default)]
pub struct Drain {
    state: Arc<DrainState>,
}

#[derive(Debug, Default)]
struct DrainState {
    draining: AtomicBool,
    /// Wakes every connection when draining starts.
    started: Notify,
    open: AtomicUsize,
    /// Wakes the drainer when the last connection has closed.
    closed: Notify,
}

/// One connection's part in a [`Drain`]: counted open until dropped.
#[derive(Debug)]
pub struct DrainWatch {
    state: Arc<DrainState>,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// A connection's part, for [`with_deadlines`].
    pub fn watcher(&self) -> DrainWatch {
        self.state.open.fetch_add(1, Ordering::AcqRel);
        DrainWatch {
            state: self.state.clone(),
        }
    }

    /// Connections open now.
    pub fn count(&self) -> usize {
        self.state.open.load(Ordering::Acquire)
    }

    /// Tells every connection to finish and close, and completes once all have.
    pub async fn drain(&self) {
        self.state.draining.store(true, Ordering::Release);
        self.state.started.notify_waiters();
        loop {
            let closed = self.state.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for DrainWatch {
    fn drop(&mut self) {
        if self.state.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.closed.notify_waiters();
        }
    }
}

/// Drives `conn` to its end, unless it sits idle past a deadline: `first` until its first
/// request starts, and between requests on HTTP/1 (the next request head must come within it);
/// `idle` between requests on HTTP/2; or its responses stop keeping `pace` on the downstream's
/// side; or it abandons too many requests (then `graceful` tells it to go away, an HTTP/2
/// GOAWAY, and it is reset if it has not closed [`GOAWAY_GRACE`] later). Once `drain` says so,
/// `graceful` asks `conn` to finish its exchanges and close.
///
/// Hand-polled rather than a `select!`: the connection's task wakes a few times a request, and
/// each of the deadline timer, the abandon signal and the drain signal is polled only to be
/// registered (once) or when it may have fired, not at every wake-up. The deadlines are looked
/// at before the connection is polled, as a `select!` might have.
pub async fn with_deadlines<F: Future>(
    conn: F,
    activity: &Activity,
    drain: &DrainWatch,
    mut graceful: impl FnMut(Pin<&mut F>),
    first: Duration,
    idle: Duration,
    pace: Pace,
) -> Result<F::Output, Closed> {
    let limit = || {
        if activity.http2.load(Ordering::Relaxed) {
            idle
        } else {
            first
        }
    };
    // The watch looks at least this often, so that a response that started being sent is
    // checked before its pace could first be broken (after the grace period, or after
    // `pace.idle` standing still), without being woken for every response: a wake-up every few
    // seconds per connection instead of one per request.
    // And at least every `first`, so that a connection that went idle since the last look is
    // closed `first` after it did, not up to a look later.
    let look = pace
        .idle
        .min(pace.grace)
        .min(first)
        .max(Duration::from_secs(1));
    let next_deadline = || {
        let next_look = Instant::now() + look;
        let mut deadline = activity
            .idle_since()
            .map_or(next_look, |t| (t + limit()).min(next_look));
        if let Some((_, next)) = activity.sending_pace(&pace) {
            deadline = deadline.min(next);
        }
        deadline
    };
    tokio::pin!(conn);
    let timer = tokio::time::sleep_until(next_deadline());
    let abandoning = activity.abandoning.notified();
    let draining = drain.state.started.notified();
    tokio::pin!(timer, abandoning, draining);
    let (mut armed, mut drain_armed, mut abandon_armed, mut drained) = (false, false, false, false);
    // Set once the connection was told to go away for abandoning too many requests, to the
    // requests it had abandoned then: how it ends from then on, it was cut.
    let mut sent_away: Option<u64> = None;
    std::future::poll_fn(|cx| {
        // The timer is polled to register it and once it has fired, not at every wake-up;
        // first, while the task's cooperative budget is whole: a poll refused for want of
        // budget registers nothing, and is made again at the next wake-up.
        while !armed || timer.is_elapsed() {
            if armed {
                if sent_away.is_some() {
                    activity.reset.store(true, Ordering::Release);
                    return Poll::Ready(Err(Closed::Abandoning));
                }
                if activity
                    .idle_since()
                    .is_some_and(|t| t + limit() <= Instant::now())
                {
                    return Poll::Ready(Err(Closed::Idle));
                }
                if let Some((Err(stall), _)) = activity.sending_pace(&pace) {
                    // Reset rather than closed: what the peer did not read is dropped at once
                    // instead of waiting in the kernel for it.
                    activity.reset.store(true, Ordering::Release);
                    return Poll::Ready(Err(Closed::Sending(stall)));
                }
                timer.as_mut().reset(next_deadline());
            }
            armed = tokio::task::coop::has_budget_remaining();
            if timer.as_mut().poll(cx).is_pending() {
                break;
            }
        }
        // Draining is terminal: one registration for it is enough, then the flag says.
        if !drain_armed {
            drain_armed = true;
            let _ = draining.as_mut().poll(cx);
        }
        if !drained && drain.state.draining.load(Ordering::Acquire) {
            drained = true;
            graceful(conn.as_mut());
        }
        if let Poll::Ready(out) = conn.as_mut().poll(cx) {
            return Poll::Ready(if sent_away.is_some() {
                Err(Closed::Abandoning)
            } else {
                Ok(out)
            });
        }
        // Registered once; polled again only once the connection has abandoned past its
        // budget, where its signal matters (a notification consumed while the share of
        // abandoned requests had dropped again must not leave the watch deaf).
        if !abandon_armed || activity.abandoned.load(Ordering::Acquire) > ABANDON_BUDGET {
            abandon_armed = true;
            if abandoning.as_mut().poll(cx).is_ready() {
                abandoning.set(activity.abandoning.notified());
                let _ = abandoning.as_mut().poll(cx);
            }
        }
        if let Some(then) = sent_away {
            // Still resetting streams after being told to go away: reset now.
            if activity.abandoned.load(Ordering::Acquire) > then + GOAWAY_SLACK {
                activity.reset.store(true, Ordering::Release);
                return Poll::Ready(Err(Closed::Abandoning));
            }
        } else if activity.abandons_too_many() {
            // Told to go away (GOAWAY: no new streams; the ones it has may end), then given
            // GOAWAY_GRACE to close before the timer resets it.
            sent_away = Some(activity.abandoned.load(Ordering::Acquire));
            graceful(conn.as_mut());
            timer.as_mut().reset(Instant::now() + GOAWAY_GRACE);
            armed = tokio::task::coop::has_budget_remaining();
            if timer.as_mut().poll(cx).is_ready() || !armed {
                cx.waker().wake_by_ref();
            }
            // Polled again at once, so that the GOAWAY is written.
            if conn.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Closed::Abandoning));
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `with_deadlines` outside any drain.
    async fn watched<F: Future>(
        conn: F,
        activity: &Activity,
        first: Duration,
        idle: Duration,
        pace: Pace,
    ) -> Result<F::Output, Closed> {
        let drain = Drain::new();
        with_deadlines(conn, activity, &drain.watcher(), |_| {}, first, idle, pace).await
    }

    /// `conn` watched (outside any drain, `graceful` telling it to go away) while its peer
    /// starts requests and abandons each at once, until the watch ends.
    async fn under_abandon_storm<F: Future>(
        conn: F,
        activity: &Arc<Activity>,
        graceful: impl FnMut(Pin<&mut F>),
    ) -> Result<F::Output, Closed> {
        let drain = Drain::new();
        let watcher = drain.watcher();
        let first = Duration::from_secs(10);
        let watch = with_deadlines(conn, activity, &watcher, graceful, first, 6 * first, PACE);
        let storm = async {
            loop {
                drop(activity.begin());
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            closed = watch => closed,
            () = storm => unreachable!(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_asks_each_connection_to_finish_and_waits_for_all_of_them() {
        let drain = Drain::new();
        let asked = Arc::new(AtomicUsize::new(0));
        // A connection that ends 2 s after it is asked to finish, and one that ends by itself.
        let slow = {
            let (watch, activity, asked) = (drain.watcher(), Activity::new(), asked.clone());
            async move {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let mut tx = Some(tx);
                let conn = async move {
                    let _ = rx.await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                };
                let graceful = |_: Pin<&mut _>| {
                    asked.fetch_add(1, Ordering::Relaxed);
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                };
                let out = with_deadlines(
                    conn,
                    &activity,
                    &watch,
                    graceful,
                    Duration::from_secs(60),
                    Duration::from_secs(60),
                    PACE,
                )
                .await;
                drop(watch);
                out
            }
        };
        let quick = {
            let watch = drain.watcher();
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(watch);
            }
        };
        assert_eq!(drain.count(), 2);
        let started = Instant::now();
        let slow = tokio::spawn(slow);
        tokio::task::yield_now().await;
        tokio::join!(drain.drain(), quick);
        assert_eq!(started.elapsed().as_secs(), 2, "waited for the slow one");
        assert_eq!(drain.count(), 0);
        assert_eq!(slow.await.unwrap(), Ok(()));
        assert_eq!(asked.load(Ordering::Relaxed), 1, "asked once");
    }

    const PACE: Pace = Pace {
        idle: Duration::from_secs(30),
        min_rate: 1000,
        grace: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_starts_a_request_is_closed_after_first() {
        let activity = Activity::new();
        let closed = watched(
            std::future::pending::<()>(),
            &activity,
            Duration::from_secs(10),
            Duration::from_secs(60),
            PACE,
        );
        let started = Instant::now();
        assert_eq!(closed.await, Err(Closed::Idle));
        assert_eq!(started.elapsed().as_secs(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_the_connection_and_idle_counts_from_its_end() {
        // HTTP/2 waits `idle` (5 s) for its next request; HTTP/1 waits for a request head,
        // within `first` (1 s).
        for (http2, closed_at) in [(true, 35), (false, 31)] {
            let activity = Activity::new();
            if http2 {
                activity.speaks_http2();
            }
            let request = activity.begin();
            let started = Instant::now();
            let watch = watched(
                std::future::pending::<()>(),
                &activity,
                Duration::from_secs(1),
                Duration::from_secs(5),
                PACE,
            );
            let end = async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(request);
            };
            let (closed, ()) = tokio::join!(watch, end);
            assert_eq!(closed, Err(Closed::Idle));
            assert_eq!(
                started.elapsed().as_secs(),
                closed_at,
                "30 s in flight, then idle (HTTP/2: {http2})"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_connection_idle_since_the_last_look_is_closed_on_time() {
        // Looks every 10 s at most (the pace's grace); a request ending 2 s into a look must
        // still close the connection `first` (3 s) after it ended, not at the next look.
        let activity = Activity::new();
        let request = activity.begin();
        let started = Instant::now();
        let watch = watched(
            std::future::pending::<()>(),
            &activity,
            Duration::from_secs(3),
            Duration::from_secs(60),
            PACE,
        );
        let end = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(request);
        };
        let (closed, ()) = tokio::join!(watch, end);
        assert_eq!(closed, Err(Closed::Idle));
        assert_eq!(started.elapsed().as_secs(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_by_itself_returns_its_output() {
        let activity = Activity::new();
        let conn = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            7
        };
        assert_eq!(
            watched(
                conn,
                &activity,
                Duration::from_secs(10),
                Duration::from_secs(60),
                PACE,
            )
            .await,
            Ok(7)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_the_downstream_stops_taking_closes_the_connection() {
        let activity = Activity::new();
        let mut response = activity.begin();
        // Held whole in memory: nothing but the downstream can hold it up.
        response.responding(true);
        response.sent(4096);
        let started = Instant::now();
        let closed = watched(
            std::future::pending::<()>(),
            &activity,
            Duration::from_secs(1),
            Duration::from_secs(300),
            Pace {
                min_rate: 0,
                ..PACE
            },
        )
        .await;
        assert_eq!(closed, Err(Closed::Sending(Stall::Idle(PACE.idle))));
        assert_eq!(started.elapsed(), PACE.idle);
        drop(response);
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_waiting_on_the_upstream_is_not_the_downstream_s_fault() {
        let activity = Activity::new();
        let mut response = activity.begin();
        response.responding(false);
        response.waiting_upstream();
        let watch = watched(
            std::future::pending::<()>(),
            &activity,
            Duration::from_secs(1),
            Duration::from_secs(300),
            PACE,
        );
        let outcome = tokio::time::timeout(Duration::from_secs(200), watch).await;
        assert!(outcome.is_err(), "still open after 200 s: {outcome:?}");
        response.taken(Waker::noop());
        drop(response);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_abandons_most_requests_is_told_to_go_away_then_cut() {
        let activity = Activity::new();
        let drain = Drain::new();
        let told = AtomicUsize::new(0);
        let watcher = drain.watcher();
        let watch = with_deadlines(
            std::future::pending::<()>(),
            &activity,
            &watcher,
            |_| {
                told.fetch_add(1, Ordering::Relaxed);
            },
            Duration::from_secs(10),
            Duration::from_secs(60),
            PACE,
        );
        tokio::pin!(watch);
        let storm = async {
            for i in 0..1000 {
                if told.load(Ordering::Relaxed) > 0 {
                    return i;
                }
                drop(activity.begin());
                tokio::task::yield_now().await;
            }
            1000
        };
        let abandoned = tokio::select! {
            closed = &mut watch => panic!("cut without being told to go away: {closed:?}"),
            abandoned = storm => abandoned,
        };
        assert!(abandoned <= ABANDON_BUDGET + 2, "told after {abandoned}");
        assert_eq!(told.load(Ordering::Relaxed), 1);
        // A connection that does not close when told is reset GOAWAY_GRACE later.
        let started = Instant::now();
        assert_eq!(watch.await, Err(Closed::Abandoning));
        assert_eq!(started.elapsed(), GOAWAY_GRACE);
        assert!(activity.reset.load(Ordering::Acquire));

        // One that goes on abandoning requests once told is reset at once, not GOAWAY_GRACE
        // later.
        let activity = Activity::new();
        let started = Instant::now();
        let closed = under_abandon_storm(std::future::pending::<()>(), &activity, |_| {}).await;
        assert_eq!(closed, Err(Closed::Abandoning));
        assert!(started.elapsed() < GOAWAY_GRACE);
        let abandoned = activity.abandoned.load(Ordering::Acquire);
        assert!(
            abandoned <= ABANDON_BUDGET + GOAWAY_SLACK + 3,
            "reset after {abandoned}"
        );
        assert!(activity.reset.load(Ordering::Acquire));

        // One that closes when told (its GOAWAY written) is cut all the same, without a reset.
        let activity = Activity::new();
        let closing = std::sync::atomic::AtomicBool::new(false);
        let conn = std::future::poll_fn(|_| {
            if closing.load(Ordering::Relaxed) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let closed =
            under_abandon_storm(conn, &activity, |_| closing.store(true, Ordering::Relaxed)).await;
        assert_eq!(closed, Err(Closed::Abandoning));
        assert!(!activity.reset.load(Ordering::Acquire));

        // A peer whose requests mostly finish keeps its connection.
        let activity = Activity::new();
        for _ in 0..300 {
            activity.begin().responding(true);
        }
        for _ in 0..200 {
            drop(activity.begin());
        }
        assert!(!activity.abandons_too_many());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_cut_by_the_minimum_rate() {
        let activity = Activity::new();
        let mut response = activity.begin();
        response.responding(false);
        let reader = async {
            // 100 bytes a second against a minimum of 1000.
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                response.taken(Waker::noop());
                response.sent(100);
            }
        };
        let started = Instant::now();
        let watch = watched(
            std::future::pending::<()>(),
            &activity,
            Duration::from_secs(1),
            Duration::from_secs(300),
            PACE,
        );
        let closed = tokio::select! {
            closed = watch => closed,
            () = reader => unreachable!(),
        };
        assert_eq!(closed, Err(Closed::Sending(Stall::TooSlow(1000))));
        assert!(started.elapsed() <= PACE.grace + Duration::from_secs(1));
    }
}
