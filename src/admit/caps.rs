//! Connection caps: global and per IP. Counters, not semaphores, so a
//! SIGHUP can change a cap without rebuilding anything. (Handshake slots,
//! which are shared fairly rather than first come, live in `slots`.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use super::IpKey;
use crate::reject::Reject;

#[derive(Default)]
pub struct Caps {
    /// Sockets held, handshaking or open (`limits.max_connections`).
    total: AtomicUsize,
    /// Sockets per client IP key (`limits.per_ip_max_connections`); an entry
    /// is removed at zero so idle IPs cost nothing.
    per_ip: DashMap<IpKey, usize>,
}

/// Increments `c` if it is below `cap`.
fn try_inc(c: &AtomicUsize, cap: usize) -> bool {
    c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1)).is_ok()
}

impl Caps {
    pub fn new() -> Arc<Caps> {
        Arc::new(Caps::default())
    }

    /// The global cap.
    pub fn admit(self: &Arc<Self>, max_total: usize) -> Result<ConnPermit, Reject> {
        if !try_inc(&self.total, max_total) {
            return Err(Reject::GlobalCap);
        }
        Ok(ConnPermit { caps: self.clone() })
    }

    /// The per-IP concurrent cap for `key`.
    pub fn admit_ip(self: &Arc<Self>, key: IpKey, max: usize) -> Result<IpPermit, Reject> {
        let mut n = self.per_ip.entry(key).or_insert(0);
        if *n >= max {
            drop(n);
            // Leave no zero entry behind for a refused first connection.
            self.per_ip.remove_if(&key, |_, v| *v == 0);
            return Err(Reject::IpCap);
        }
        *n += 1;
        Ok(IpPermit { caps: self.clone(), key })
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Distinct IP keys holding at least one socket.
    pub fn ips(&self) -> usize {
        self.per_ip.len()
    }
}

/// One slot of `limits.max_connections`, held for the connection's life.
pub struct ConnPermit {
    caps: Arc<Caps>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.caps.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One slot of the client IP's concurrent cap.
pub struct IpPermit {
    caps: Arc<Caps>,
    key: IpKey,
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        if let Some(mut n) = self.caps.per_ip.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
        self.caps.per_ip.remove_if(&self.key, |_, v| *v == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_release_on_drop() {
        let caps = Caps::new();
        let c1 = caps.admit(2).unwrap();
        let _c2 = caps.admit(2).unwrap();
        assert!(matches!(caps.admit(2), Err(Reject::GlobalCap)));
        drop(c1);
        assert_eq!(caps.total(), 1);

        let key = IpKey::new("127.0.0.2".parse().unwrap());
        let p = caps.admit_ip(key, 1).unwrap();
        assert!(matches!(caps.admit_ip(key, 1), Err(Reject::IpCap)));
        drop(p);
        assert_eq!(caps.ips(), 0);
    }
}
