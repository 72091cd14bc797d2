//! Idle upstream connections, and the lease that returns one when its exchange is done.
//!
//! A bounded lock-free queue shared by every worker thread: taking and returning a connection is
//! one compare-and-swap each, with no lock, no timer and no key to hash (there is one
//! upstream). A connection goes back only once its response has been read whole, so whatever
//! the queue holds can take a request at once; one the upstream closed meanwhile is skipped
//! when it is taken.
//!
//! The queue is first in, first out, so a steady trickle of requests would keep every pooled
//! connection in use by turns. [`Pool::reap`] closes, every `upstream_idle`, as many of the
//! least recently used connections as the queue never fell below during that time: those the
//! traffic did not need.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use hyper::body::Body;
use hyper::client::conn::http1::SendRequest;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::{Progress, Tracked};

pub type Sender = SendRequest<Tracked>;

pub struct Pool {
    /// Signalled when a connection is put back, for requests waiting to open one.
    returned: tokio::sync::Notify,
    idle: ArrayQueue<Sender>,
    /// The fewest connections the queue has held since the last reaping.
    low_water: AtomicUsize,
    /// Background drains of exchanges whose downstream went away, at most one per slot: of
    /// those abandoned before their response head (each holding its request's slot), and,
    /// apart so that they cannot crowd those out, of those abandoned mid-body.
    drains: Arc<Semaphore>,
    late_drains: Arc<Semaphore>,
}

/// How long, and how much of a response, a background drain may take.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);
pub const DRAIN_BYTES: u64 = 256 * 1024;

impl Pool {
    /// A pool keeping at most `capacity` idle connections; more are closed after their use.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            returned: tokio::sync::Notify::new(),
            idle: ArrayQueue::new(capacity.max(1)),
            low_water: AtomicUsize::new(0),
            drains: Arc::new(Semaphore::new(capacity)),
            late_drains: Arc::new(Semaphore::new(capacity)),
        })
    }

    /// An idle connection still open, if there is one.
    pub fn take(&self) -> Option<Sender> {
        let open = std::iter::from_fn(|| self.idle.pop()).find(|conn| !conn.is_closed());
        self.low_water.fetch_min(self.idle.len(), Ordering::Relaxed);
        open
    }

    fn put(&self, conn: Sender) {
        // A full queue refuses it, and dropping it closes it.
        if !conn.is_closed() && self.idle.push(conn).is_ok() {
            self.returned.notify_one();
        }
    }

    /// Completes when a connection is put back (or was since the last call).
    pub async fn returned(&self) {
        self.returned.notified().await;
    }

    /// Lends `conn` to one exchange.
    pub fn lease(self: &Arc<Self>, conn: Sender) -> Lease {
        Lease {
            lent: Some(conn),
            pool: self.clone(),
        }
    }

    /// Closes the connections that sat idle since the last reaping (see the module docs).
    fn reap(&self) {
        let unused = self
            .low_water
            .swap(self.idle.len(), Ordering::Relaxed)
            .min(self.idle.len());
        for _ in 0..unused {
            drop(self.idle.pop());
        }
    }

    /// Reaps `pool` every `idle` for as long as it is in use.
    pub async fn reap_every(pool: Weak<Pool>, idle: Duration) {
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + idle, idle);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            match pool.upgrade() {
                Some(pool) => pool.reap(),
                None => return,
            }
        }
    }
}

/// A connection lent to one exchange. [`Lease::release`] returns it once the response has been
/// read whole; a lease dropped before that closes its connection, since an unread response
/// would be taken for the next one.
pub struct Lease {
    lent: Option<Sender>,
    pool: Arc<Pool>,
}

impl Lease {
    /// Returns the connection to the pool: its response has been read whole.
    pub fn release(mut self) {
        if let Some(conn) = self.lent.take() {
            self.pool.put(conn);
        }
    }

    /// Finishes, in the background, an exchange whose downstream went away: `rest` reads what
    /// is left of its response ([`read_out`]), and if that ends within [`DRAIN_TIME`] and the
    /// request was sent whole, the connection goes back to the pool instead of being closed. A
    /// storm of abandoned requests must not become a storm of new upstream connections. At
    /// most one drain per slot runs at once, for each of the two kinds; past that, the
    /// connection is closed now. `slot` (the request's, while its response head has not come)
    /// is kept until the drain ends: the request is still in the upstream's hands.
    pub fn drain<F>(self, rest: F, request: Arc<Progress>, slot: Option<OwnedSemaphorePermit>)
    where
        F: Future<Output = Option<()>> + Send + 'static,
    {
        let drains = match slot {
            Some(_) => &self.pool.drains,
            None => &self.pool.late_drains,
        };
        let Ok(permit) = drains.clone().try_acquire_owned() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let _held = (permit, slot);
            let drained = tokio::time::timeout(DRAIN_TIME, rest).await;
            if matches!(drained, Ok(Some(()))) && request.sent_whole() {
                self.release();
            }
        });
    }
}

/// Reads `body` to its end, if it ends within [`DRAIN_BYTES`] and without an error.
pub async fn read_out<B>(mut body: B) -> Option<()>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut read = 0;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        read += frame.ok()?.data_ref().map_or(0, Bytes::len) as u64;
        if read > DRAIN_BYTES {
            return None;
        }
    }
    Some(())
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("lent", &self.lent.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An open HTTP/1 connection's sender, over an in-memory pipe nobody answers on.
    async fn conn() -> Sender {
        let (ours, theirs) = tokio::io::duplex(1024);
        let io = hyper_util::rt::TokioIo::new(ours);
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(async move {
            let _theirs = theirs;
            let _ = connection.await;
        });
        sender
    }

    #[tokio::test]
    async fn reaping_closes_the_connections_the_traffic_did_not_need() {
        let pool = Pool::new(8);
        for _ in 0..5 {
            pool.put(conn().await);
        }
        pool.reap(); // Starts a period with 5 idle.
        for _ in 0..10 {
            // Two at a time in use: three were never needed.
            let (a, b) = (pool.take().unwrap(), pool.take().unwrap());
            pool.lease(a).release();
            pool.lease(b).release();
        }
        pool.reap();
        assert_eq!(pool.idle.len(), 2);
        pool.reap();
        assert_eq!(pool.idle.len(), 0, "a period with no traffic needs none");
    }

    #[tokio::test]
    async fn an_unreleased_lease_is_not_pooled_and_a_full_pool_refuses_more() {
        let pool = Pool::new(1);
        drop(pool.lease(conn().await));
        assert!(pool.take().is_none());

        pool.lease(conn().await).release();
        pool.lease(conn().await).release();
        assert_eq!(pool.idle.len(), 1);
    }

    #[tokio::test]
    async fn closed_connections_are_skipped() {
        let pool = Pool::new(4);
        let (ours, theirs) = tokio::io::duplex(1024);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(ours))
                .await
                .unwrap();
        let driver = tokio::spawn(connection);
        pool.lease(sender).release();
        pool.lease(conn().await).release();
        // The upstream hangs up on the first.
        drop(theirs);
        let _ = driver.await;
        let taken = pool.take().unwrap();
        assert!(!taken.is_closed());
        assert!(pool.take().is_none());
    }
}
