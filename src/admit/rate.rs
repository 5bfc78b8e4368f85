//! Per-IP handshake rate: keyed GCRA (`governor`).
//!
//! Keys of IPs that went quiet are evicted by [`RateLimiter::housekeep`],
//! so an attacker rotating source addresses cannot grow memory without bound.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DashMapStateStore;
use governor::Quota;

use super::IpKey;

type Keyed = governor::RateLimiter<IpKey, DashMapStateStore<IpKey>, DefaultClock>;

/// A keyed rate limiter whose quota can be swapped live.
pub struct RateLimiter {
    /// The limiter and the (rate, burst) it was built for; rebuilt only when
    /// the quota changes.
    inner: ArcSwap<(Keyed, (f64, u32))>,
}

fn build(rate: f64, burst: u32) -> Keyed {
    // `rate` is bounded at config load; a value that slipped past (an
    // embedder's) gets the longest period rather than a panic.
    let period = Duration::try_from_secs_f64(1.0 / rate)
        .unwrap_or(Duration::from_secs(86_400))
        .clamp(Duration::from_nanos(1), Duration::from_secs(86_400));
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period).unwrap_or(Quota::per_second(NonZeroU32::MIN)).allow_burst(burst);
    governor::RateLimiter::dashmap(quota)
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter { inner: ArcSwap::from_pointee((build(rate, burst), (rate, burst))) }
    }

    /// Applies a new quota (SIGHUP); a changed quota starts every key afresh.
    pub fn set_quota(&self, rate: f64, burst: u32) {
        if self.inner.load().1 != (rate, burst) {
            self.inner.store(Arc::new((build(rate, burst), (rate, burst))));
        }
    }

    /// `Ok` to proceed, or `Err(seconds)` for `Retry-After` (at least 1).
    pub fn check(&self, key: IpKey) -> Result<(), u64> {
        let inner = self.inner.load();
        inner.0.check_key(&key).map_err(|not_until| {
            // The limiter's own clock: building a fresh `quanta` clock per
            // refusal re-probes the CPU and dominated the 429 path.
            let wait = not_until.wait_time_from(inner.0.clock().now());
            (wait.as_secs_f64().ceil() as u64).max(1)
        })
    }

    /// Forgets keys whose state is back to a full burst; call periodically.
    pub fn housekeep(&self) {
        let inner = self.inner.load();
        inner.0.retain_recent();
        inner.0.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.inner.load().0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let rl = RateLimiter::new(0.5, 3);
        let k = IpKey::new("127.0.0.9".parse().unwrap());
        for _ in 0..3 {
            assert!(rl.check(k).is_ok());
        }
        let retry = rl.check(k).unwrap_err();
        assert!((1..=2).contains(&retry), "{retry}");
        let other = IpKey::new("127.0.0.10".parse().unwrap());
        assert!(rl.check(other).is_ok(), "keys are independent");
    }

    #[test]
    fn fast_rates_still_say_at_least_one_second() {
        let rl = RateLimiter::new(1000.0, 1);
        let k = IpKey::new("127.0.0.9".parse().unwrap());
        rl.check(k).unwrap();
        assert_eq!(rl.check(k), Err(1));
    }
}
