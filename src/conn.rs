//! Per-connection deadlines that the HTTP stacks do not keep on their own.
//!
//! hyper-util's protocol detection waits without limit for a connection's first bytes, and hyper
//! keeps an HTTP/2 connection with no streams open for ever: either would let silent peers hold
//! every connection slot. [`with_deadlines`] closes a connection whose first request has not
//! started within `first`, or that has had no request in flight for `idle`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// What a connection is doing, updated by its requests.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    started: AtomicU64,
    /// When the connection last went idle, in milliseconds since `opened`.
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    /// Marks a request in flight until the returned guard (held by its response body) drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// The instant the connection went idle, or `None` while a request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)))
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = u64::try_from(activity.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.idle_since_ms.store(now, Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Drives `conn` to its end, unless it sits idle past a deadline: `first` until its first
/// request starts, `idle` afterwards. `None` means the connection was closed for idling.
pub async fn with_deadlines<F: Future>(
    conn: F,
    activity: &Activity,
    first: Duration,
    idle: Duration,
) -> Option<F::Output> {
    tokio::pin!(conn);
    loop {
        let limit = if activity.started.load(Ordering::Relaxed) == 0 {
            first
        } else {
            idle
        };
        let deadline = activity
            .idle_since()
            .map_or_else(|| Instant::now() + idle, |t| t + limit);
        tokio::select! {
            out = &mut conn => return Some(out),
            () = tokio::time::sleep_until(deadline) => {
                let limit = if activity.started.load(Ordering::Relaxed) == 0 { first } else { idle };
                if activity.idle_since().is_some_and(|t| t + limit <= Instant::now()) {
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_starts_a_request_is_closed_after_first() {
        let activity = Activity::new();
        let closed = with_deadlines(
            std::future::pending::<()>(),
            &activity,
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        let started = Instant::now();
        assert!(closed.await.is_none());
        assert_eq!(started.elapsed().as_secs(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_the_connection_and_idle_counts_from_its_end() {
        let activity = Activity::new();
        let request = activity.begin();
        let started = Instant::now();
        let watch = with_deadlines(
            std::future::pending::<()>(),
            &activity,
            Duration::from_secs(1),
            Duration::from_secs(5),
        );
        let end = async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(request);
        };
        let (closed, ()) = tokio::join!(watch, end);
        assert!(closed.is_none());
        assert_eq!(
            started.elapsed().as_secs(),
            35,
            "30 s in flight, then 5 s idle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_by_itself_returns_its_output() {
        let activity = Activity::new();
        let conn = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            7
        };
        assert_eq!(
            with_deadlines(
                conn,
                &activity,
                Duration::from_secs(10),
                Duration::from_secs(60)
            )
            .await,
            Some(7)
        );
    }
}
