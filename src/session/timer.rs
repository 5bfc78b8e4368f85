//! One timer for every session of a gateway.
//!
//! A session has one deadline at a time (the earliest of its rules). A
//! `tokio::time::Sleep` per session would hold it in 112 bytes for the
//! session's whole life; here a session keeps its deadline as one entry of
//! a shared ordered map (about 40 bytes, the map's share included), and one
//! driver task sleeps until the earliest entry, takes every entry that is
//! due and wakes those sessions. A woken session finds its own deadline
//! reached, acts, and arms its next one.
//!
//! Times are milliseconds since the gateway's epoch (`Timers::now`), so a
//! session and the driver agree on when an entry is due: the driver takes
//! an entry only at or after its time, and a session looks at the clock
//! after it is woken.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::registry::ConnInfo;

/// Milliseconds since the epoch of a [`Timers`].
pub type Ms = u64;
/// No deadline.
pub const NEVER: Ms = Ms::MAX;

/// The shared deadlines of a gateway's sessions.
pub struct Timers {
    epoch: Instant,
    /// (deadline, connection id) → the connection to wake. A session
    /// moves its entry only to an earlier deadline; an entry it has given
    /// up as due may stand a moment longer, until the driver takes it.
    entries: Mutex<BTreeMap<(Ms, u64), Arc<ConnInfo>>>,
    /// Tells the driver of a deadline earlier than the one it sleeps for,
    /// or that the timers are gone.
    wake: Arc<Notify>,
    /// The driver is started with the first entry, in the runtime that
    /// runs the sessions.
    driving: std::sync::atomic::AtomicBool,
}

impl Timers {
    pub fn new() -> Arc<Timers> {
        Arc::new(Timers {
            epoch: Instant::now(),
            entries: Mutex::new(BTreeMap::new()),
            wake: Arc::new(Notify::new()),
            driving: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Timers whose epoch was `age` ago: a binary upgrade's new process
    /// takes the old clock, so deadlines carried over keep their instants
    /// (both processes read the same monotonic clock). An age beyond the
    /// clock's own start (impossible between two processes of one boot)
    /// falls back to now.
    pub fn aged(age: std::time::Duration) -> Arc<Timers> {
        let epoch = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        Arc::new(Timers {
            epoch,
            entries: Mutex::new(BTreeMap::new()),
            wake: Arc::new(Notify::new()),
            driving: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Now, in this clock's milliseconds.
    pub fn now(&self) -> Ms {
        u64::try_from(Instant::now().saturating_duration_since(self.epoch).as_millis()).unwrap_or(NEVER - 1)
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<(Ms, u64), Arc<ConnInfo>>> {
        // Nothing panics while holding it; if something did, the map is
        // still a map of deadlines: go on with it.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Moves the entry of `conn` from `old` to `new` (either may be
    /// `NEVER`: none). The driver is told when `new` is the earliest.
    pub fn rearm(self: &Arc<Self>, conn: &Arc<ConnInfo>, old: Ms, new: Ms) {
        if old == new {
            return;
        }
        let earliest = {
            let mut map = self.entries();
            if old != NEVER {
                map.remove(&(old, conn.id));
            }
            if new == NEVER {
                return;
            }
            map.insert((new, conn.id), conn.clone());
            map.first_key_value().is_some_and(|((at, id), _)| *at == new && *id == conn.id)
        };
        if !self.driving.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tokio::spawn(drive(Arc::downgrade(self), self.wake.clone(), self.epoch));
        } else if earliest {
            self.wake.notify_one();
        }
    }

    /// Removes every entry due at `now`, wakes their sessions, and returns
    /// the next deadline.
    fn fire(&self, now: Ms) -> Option<Ms> {
        let (due, next) = {
            let mut map = self.entries();
            let later = map.split_off(&(now.saturating_add(1), 0));
            let due = std::mem::replace(&mut *map, later);
            (due, map.first_key_value().map(|((at, _), _)| *at))
        };
        // Woken outside the lock: a waker may run its task at once.
        for conn in due.into_values() {
            conn.wake();
        }
        next
    }

    /// Entries held (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries().len()
    }
}

impl Drop for Timers {
    fn drop(&mut self) {
        // The driver holds only a weak reference: it wakes and ends.
        self.wake.notify_one();
    }
}

/// The driver: sleeps until the earliest entry (or news of an earlier
/// one), fires what is due, until the timers are dropped.
async fn drive(timers: Weak<Timers>, wake: Arc<Notify>, epoch: Instant) {
    loop {
        let next = {
            let Some(t) = timers.upgrade() else { return };
            t.fire(t.now())
        };
        let until = match next {
            Some(at) => epoch + std::time::Duration::from_millis(at),
            // Nothing armed: the next entry's `rearm` tells us.
            None => Instant::now() + std::time::Duration::from_secs(3600),
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::session::registry::Registry;
    use std::future::poll_fn;
    use std::task::Poll;
    use std::time::Duration;

    #[tokio::test]
    async fn a_due_entry_wakes_its_session_once_and_is_gone() {
        let reg = Registry::new(Arc::new(Metrics::new()));
        let slot = reg
            .register("u", "127.0.0.1".parse().unwrap(), None, None, 8, crate::config::OnUserCap::Reject)
            .unwrap();
        let t = Timers::new();
        let at = t.now() + 30;
        // An entry moved later, then earlier: one entry, at the last time.
        t.rearm(&slot.info, NEVER, at + 1000);
        t.rearm(&slot.info, at + 1000, at);
        assert_eq!(t.len(), 1);
        let started = Instant::now();
        let mut polls = 0;
        poll_fn(|cx| {
            polls += 1;
            slot.info.watch(cx.waker());
            if t.now() >= at {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        assert!(started.elapsed() >= Duration::from_millis(25));
        assert!(polls <= 3, "woken {polls} times");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(t.len(), 0, "fired entries leave the map");
        // Disarming removes the entry.
        let later = t.now() + 60_000;
        t.rearm(&slot.info, NEVER, later);
        assert_eq!(t.len(), 1);
        t.rearm(&slot.info, later, NEVER);
        assert_eq!(t.len(), 0);
    }
}
