//! Idle upstream connections, and the lease that returns one when its exchange is done.
//!
//! A bounded lock-free queue shared by every worker thread: taking and returning a connection is
//! one compare-and-swap each, with no lock and no key to hash (there is one upstream). A
//! connection goes back only once its response has been read whole, so whatever the queue holds
//! can take a request at once; one the upstream closed meanwhile is skipped when it is taken.

use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1::SendRequest;

use crate::body::ProxyBody;
use crate::conn::{Activity, InFlight};

/// One keep-alive HTTP/1.1 connection: its sending half, and what its driver task watches to
/// close it after `upstream_idle` without a request.
pub struct Conn {
    pub sender: SendRequest<ProxyBody>,
    pub activity: Arc<Activity>,
}

pub struct Pool {
    idle: ArrayQueue<Conn>,
}

impl Pool {
    /// A pool keeping at most `capacity` idle connections; more are closed after their use.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            idle: ArrayQueue::new(capacity.max(1)),
        })
    }

    /// An idle connection still open, if there is one.
    pub fn take(&self) -> Option<Conn> {
        std::iter::from_fn(|| self.idle.pop()).find(|conn| !conn.sender.is_closed())
    }

    fn put(&self, conn: Conn) {
        if !conn.sender.is_closed() {
            // A full queue refuses it, and dropping it closes it.
            let _ = self.idle.push(conn);
        }
    }

    /// Lends `conn`, with a request in flight on it, to one exchange.
    pub fn lease(self: &Arc<Self>, conn: Conn, in_flight: InFlight) -> Lease {
        Lease {
            lent: Some((conn, in_flight)),
            pool: self.clone(),
        }
    }
}

/// A connection lent to one exchange. [`Lease::release`] returns it once the response has been
/// read whole; a lease dropped before that closes its connection, since an unread response
/// would be taken for the next one.
pub struct Lease {
    lent: Option<(Conn, InFlight)>,
    pool: Arc<Pool>,
}

impl Lease {
    /// Returns the connection to the pool: its response has been read whole.
    pub fn release(mut self) {
        if let Some((conn, in_flight)) = self.lent.take() {
            // Idle from now on, as far as its driver task is concerned.
            drop(in_flight);
            self.pool.put(conn);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("lent", &self.lent.is_some())
            .finish()
    }
}
