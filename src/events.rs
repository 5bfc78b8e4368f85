//! Every refusal and disconnect is recorded here, once: its metric and its
//! log line together, so the two can never disagree.
//!
//! Refusal lines are rate-limited: under attack a flood of identical lines
//! would fill disks and hide everything else, so past
//! [`REFUSAL_LINES_PER_S`] a second they are counted, and the count is
//! logged by the first refusal of a later second, or by the gateway's
//! housekeeping ([`LogLimiter::flush`]) when the flood has stopped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::Metrics;
use crate::reject::{CloseReason, Reject};

pub const REFUSAL_LINES_PER_S: u64 = 20;

/// A fixed-window limiter on refusal log lines, lock-free.
#[derive(Default)]
pub struct LogLimiter {
    /// (unix second << 20) | lines logged in that second.
    window: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// May a line be logged now? Returns how many were suppressed in earlier
    /// windows when a new window opens, so the caller can say so.
    fn admit(&self) -> (bool, u64) {
        let now = crate::clock::unix_now();
        let mut reported = 0;
        let mut cur = self.window.load(Ordering::Relaxed);
        loop {
            let (sec, n) = (cur >> 20, cur & 0xF_FFFF);
            let (next, ok) = if sec != now {
                ((now << 20) | 1, true)
            } else if n < REFUSAL_LINES_PER_S {
                (cur + 1, true)
            } else {
                (cur, false)
            };
            if !ok {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return (false, 0);
            }
            match self.window.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    if sec != now {
                        reported = self.suppressed.swap(0, Ordering::Relaxed);
                    }
                    return (true, reported);
                }
                Err(actual) => cur = actual,
            }
        }
    }
}

impl LogLimiter {
    /// Logs the count suppressed so far, if any; called periodically, so
    /// that the last second of a flood is reported without waiting for
    /// the next refusal.
    pub fn flush(&self) {
        log_suppressed(self.suppressed.swap(0, Ordering::Relaxed));
    }
}

fn log_suppressed(suppressed: u64) {
    if suppressed > 0 {
        tracing::warn!(event = "suppressed", suppressed, "refusal log lines suppressed (rate-limited)");
    }
}

/// Records a refusal: counter, latency histogram, rate-limited log line.
pub fn rejected(
    metrics: &Metrics,
    limiter: &LogLimiter,
    reason: Reject,
    client: SocketAddr,
    sub: Option<&str>,
    took: Duration,
) {
    metrics.handshake_rejected(reason, took);
    if reason == Reject::Banned {
        // Logged when the ban starts and ends, not per attempt.
        return;
    }
    let (log, suppressed) = limiter.admit();
    log_suppressed(suppressed);
    if log {
        tracing::info!(
            event = "rejected",
            reason = reason.label(),
            status = reason.status().unwrap_or(0),
            client = %client.ip(),
            sub = sub.unwrap_or(""),
            ms = took.as_millis() as u64,
        );
    }
}

pub fn accepted(metrics: &Metrics, client: SocketAddr, sub: &str, conn: u64, took: Duration) {
    metrics.handshake_accepted(took);
    tracing::debug!(event = "accepted", client = %client.ip(), sub, conn, ms = took.as_millis() as u64);
}

/// Records a disconnect: counter, duration histogram, one log line.
pub fn disconnected(
    metrics: &Metrics,
    reason: CloseReason,
    client: SocketAddr,
    sub: &str,
    conn: u64,
    lived: Duration,
) {
    metrics.disconnect(reason, lived);
    tracing::info!(
        event = "disconnected",
        reason = reason.label(),
        client = %client.ip(),
        sub,
        conn,
        secs = lived.as_secs(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_a_burst_then_counts() {
        let l = LogLimiter::default();
        let allowed = (0..100).filter(|_| l.admit().0).count() as u64;
        // A second boundary may fall inside the loop: at most two windows.
        assert!((REFUSAL_LINES_PER_S..=2 * REFUSAL_LINES_PER_S).contains(&allowed), "{allowed}");
    }
}
