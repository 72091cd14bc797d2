//! Memory given back to the system after a connection storm.
//!
//! Each connection holds some 28 KiB while it lives (hyper's buffers, its task); glibc's malloc
//! keeps what was freed in its heaps for reuse, so after 5,000 half-open connections closed,
//! snapguard held 145 MiB against 7 MiB idle (bench/abuse.py, attack e). `malloc_trim(0)` hands
//! the free pages back (7.0 MiB after the same storm). A storm is told by the connections that
//! closed since the last trim: looked at every [`EVERY`], trimmed when at least [`CLOSED`] have
//! gone from the most that were open since.
//! jemalloc, the other remedy measured, gave 11.8 MiB after but 30% more idle and peak RSS.

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// How often the connection count is looked at (an atomic read, unless there is a trim to do).
pub const EVERY: Duration = Duration::from_secs(1);
/// Connections that must have closed since the last trim (about 7 MiB of buffers) for another.
pub const CLOSED: u64 = 256;

/// Whether enough connections closed since the last trim, at whose peak `peak` were open and
/// now `open` are, to be worth returning their memory.
pub fn storm_passed(peak: u64, open: u64) -> bool {
    peak.saturating_sub(open) >= CLOSED
}

/// Trims the heap after every storm, for as long as the server runs.
pub async fn trim_after_storms(metrics: Arc<Metrics>) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut peak = 0;
    loop {
        every.tick().await;
        let (open, peak_since) = metrics.connections_since();
        peak = peak.max(peak_since);
        if storm_passed(peak, open) {
            // It walks the heap under malloc's locks: off the runtime's threads.
            let _ = tokio::task::spawn_blocking(release).await;
            tracing::debug!(peak, open, "returned freed memory to the system");
            peak = open;
        }
    }
}

/// Returns the free pages of every malloc arena to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release() {
    // SAFETY: malloc_trim only takes glibc's own arena locks and releases free pages; it has no
    // preconditions and touches no memory of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl's, the system's elsewhere) return free memory by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_a_storm_not_ordinary_churn() {
        assert!(!storm_passed(0, 0));
        assert!(!storm_passed(300, 100));
        assert!(storm_passed(5_000, 3));
        assert!(storm_passed(CLOSED, 0));
        // Connections that opened since the last look are no storm that passed.
        assert!(!storm_passed(4_000, 4_000));
    }
}
