//! Fair handshake slots: `limits.max_handshakes` shared between client
//! addresses, so that an attacker's share is bounded by the addresses it
//! controls, not by a pool it can fill.
//!
//! Four rules, all taken at accept under one short lock:
//! - an address holds at most `limits.per_ip_max_handshakes` slots;
//!   an arrival from an address at that bound takes the slot of that
//!   address's own least-advanced incomplete head (408, `handshake_shed`)
//!   if one is at least [`SHED_MIN_AGE`] old, so an address's slow heads
//!   never keep its fast ones out (a carrier NAT, an office); it is
//!   refused (`handshake_cap`) only when every head it holds is complete or
//!   younger than that;
//! - when every slot is taken, an arrival from an address under its fair
//!   share (`max_handshakes` / addresses holding slots) takes the slot of
//!   the least-advanced incomplete head of the address holding the most:
//!   that socket is *shed* (408, `handshake_shed`); an arrival at or over
//!   its share is refused (`handshake_cap`);
//!
//! *Least advanced*: the fewest bytes of head received, the oldest first
//! among equals. An honest head comes whole in one or two packets, so
//! the heads that lose their slot are the ones a slowloris trickles or
//! never starts.
//! - as occupancy rises past [`PRESSURE_THRESHOLD`], the deadline for an
//!   incomplete head shrinks linearly from `handshake_timeout_ms` to
//!   `handshake_timeout_min_ms` (at full occupancy), and applies to the
//!   heads already waiting, not only to new ones ([`Slots::sweep`]).
//!
//! A trusted proxy's own sockets take slots but are never limited per
//! address nor shed: their clients are keyed once the PROXY header names
//! them ([`HandshakePermit::rekey`]).
//!
//! The handshaking task learns that it was shed or timed out through its
//! [`Attempt`]: a state word and a `Notify`, no timer of its own.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::IpKey;
use crate::metrics::Metrics;
use crate::reject::Reject;

/// Occupancy above which the head deadline starts to shrink. Below half
/// full there is no pressure worth trading patience for.
pub const PRESSURE_THRESHOLD: f64 = 0.5;

/// The youngest an incomplete head may be when its own address's newcomer
/// takes its slot. It keeps a burst of honest handshakes from one address
/// (a page opening several sockets, a NAT's users reconnecting together)
/// from shedding each other while their heads are still arriving: a head
/// split over packets completes within a round trip or two. To keep all
/// of an address's slots younger than this, an attacker must open more
/// than `per_ip_max_handshakes` / 0.25 s = 64 sockets a second at the
/// default bound, past the default per-address rate (20 a second, burst
/// 40): those over it get the shortest deadline and count as strikes.
pub const SHED_MIN_AGE: Duration = Duration::from_millis(250);

/// How often [`Slots::sweep`] should run: the head deadline's precision.
pub const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// The attempt is still reading its head.
const READING: u8 = 0;
/// Its head is complete: neither shed nor subject to the shrinking deadline.
const HEAD_DONE: u8 = 1;
/// Another address's arrival took its slot.
const SHED: u8 = 2;
/// The deadline in force passed before its head was complete.
const EXPIRED: u8 = 3;

/// One socket's claim on a handshake slot, shared between the task that
/// reads its head and the table that may shed or expire it.
#[derive(Debug)]
pub struct Attempt {
    accepted: Instant,
    state: AtomicU8,
    /// This attempt's own bound on the head deadline, in ms (`u64::MAX`:
    /// none beyond the table's). A rate-limited socket gets the shortest.
    patience_ms: AtomicU64,
    /// Bytes of head received so far: how advanced the attempt is.
    received: AtomicU32,
    wake: Notify,
}

/// What became of an attempt while its task was waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Reading,
    Shed,
    Expired,
}

impl Attempt {
    pub fn new(accepted: Instant) -> Attempt {
        Attempt {
            accepted,
            state: AtomicU8::new(READING),
            patience_ms: AtomicU64::new(u64::MAX),
            received: AtomicU32::new(0),
            wake: Notify::new(),
        }
    }

    /// Bounds this attempt's head deadline to `d` from accept.
    pub fn limit_patience(&self, d: Duration) {
        self.patience_ms.fetch_min(d.as_millis().min(u64::MAX as u128) as u64, Ordering::AcqRel);
    }

    /// The head has `n` bytes so far.
    pub fn progress(&self, n: usize) {
        self.received.store(u32::try_from(n).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    /// Bytes of head received so far.
    pub fn received(&self) -> u32 {
        self.received.load(Ordering::Relaxed)
    }

    fn reading(&self) -> bool {
        self.state.load(Ordering::Acquire) == READING
    }

    fn due(&self, now: Instant, deadline: Duration) -> bool {
        let own = Duration::from_millis(self.patience_ms.load(Ordering::Acquire));
        now >= self.accepted + deadline.min(own)
    }

    pub fn verdict(&self) -> Verdict {
        match self.state.load(Ordering::Acquire) {
            SHED => Verdict::Shed,
            EXPIRED => Verdict::Expired,
            _ => Verdict::Reading,
        }
    }

    /// Resolves once the attempt is shed or expired (a notification sent
    /// before anyone waits is kept, so none is lost).
    pub async fn ended(&self) -> Verdict {
        loop {
            let v = self.verdict();
            if v != Verdict::Reading {
                return v;
            }
            self.wake.notified().await;
        }
    }

    /// The head is complete: from now on the attempt is neither shed nor
    /// expired by pressure. Returns false if it already was.
    pub fn head_done(&self) -> bool {
        self.state.compare_exchange(READING, HEAD_DONE, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Ends a reading attempt with `to`; false if it was not reading.
    fn end(&self, to: u8) -> bool {
        let ok = self.state.compare_exchange(READING, to, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if ok {
            self.wake.notify_one();
        }
        ok
    }
}

#[derive(Default)]
struct Table {
    /// Slots taken, by every key.
    total: usize,
    /// Attempts per client address, oldest first (`None`: trusted proxies'
    /// own sockets). An entry is removed once it holds nothing.
    by_key: HashMap<Option<IpKey>, VecDeque<Arc<Attempt>>>,
    /// (slots held, address) for every client address holding any: the
    /// last element is the address holding the most.
    order: BTreeSet<(usize, IpKey)>,
}

impl Table {
    fn held(&self, key: &Option<IpKey>) -> usize {
        self.by_key.get(key).map_or(0, VecDeque::len)
    }

    fn insert(&mut self, key: Option<IpKey>, attempt: Arc<Attempt>) {
        let q = self.by_key.entry(key).or_default();
        let before = q.len();
        q.push_back(attempt);
        if let Some(k) = key {
            self.order.remove(&(before, k));
            self.order.insert((before + 1, k));
        }
        self.total += 1;
    }

    /// Removes the attempt if the table still holds it (a shed one is
    /// already gone). Drops the address's entry at zero.
    fn remove(&mut self, key: Option<IpKey>, attempt: &Arc<Attempt>) -> bool {
        let Some(q) = self.by_key.get_mut(&key) else { return false };
        let Some(i) = q.iter().position(|a| Arc::ptr_eq(a, attempt)) else { return false };
        let before = q.len();
        q.remove(i);
        if q.is_empty() {
            self.by_key.remove(&key);
        }
        if let Some(k) = key {
            self.order.remove(&(before, k));
            if before > 1 {
                self.order.insert((before - 1, k));
            }
        }
        self.total -= 1;
        true
    }

    /// Sheds the least-advanced incomplete head of the address holding the
    /// most, if that address holds more than `newcomer_would_hold`.
    fn shed_one(&mut self, newcomer_would_hold: usize) -> bool {
        // Walk from the largest holder down: its heads may all be complete
        // (authenticating, connecting upstream), which are not shed.
        let candidates: Vec<(usize, IpKey)> =
            self.order.iter().rev().take_while(|(n, _)| *n > newcomer_would_hold).copied().collect();
        candidates.into_iter().any(|(_, k)| self.shed_of(k, |_| true))
    }

    /// Sheds `key`'s least-advanced incomplete head among those `eligible`.
    fn shed_of(&mut self, key: IpKey, eligible: impl Fn(&Attempt) -> bool) -> bool {
        let victim = self.by_key.get(&Some(key)).and_then(|q| {
            // Oldest first in the queue: `min_by_key` keeps the first of equals.
            q.iter().filter(|a| a.reading() && eligible(a)).min_by_key(|a| a.received()).cloned()
        });
        match victim {
            Some(v) if v.end(SHED) => self.remove(Some(key), &v),
            _ => false,
        }
    }
}

/// The fair handshake-slot table (see the module doc).
pub struct Slots {
    table: Mutex<Table>,
    metrics: Option<Arc<Metrics>>,
}

/// The limits the table applies, read from the live config at each call.
#[derive(Clone, Copy, Debug)]
pub struct SlotLimits {
    pub max: usize,
    pub per_ip: usize,
    pub timeout: Duration,
    pub timeout_min: Duration,
}

impl SlotLimits {
    pub fn from(l: &crate::config::Limits) -> SlotLimits {
        SlotLimits {
            max: l.max_handshakes,
            per_ip: l.per_ip_max_handshakes,
            timeout: l.handshake_timeout(),
            timeout_min: l.handshake_timeout_min(),
        }
    }

    /// The deadline for an incomplete head at occupancy `pressure`.
    pub fn deadline_at(&self, pressure: f64) -> Duration {
        if pressure <= PRESSURE_THRESHOLD {
            return self.timeout;
        }
        let f = ((pressure - PRESSURE_THRESHOLD) / (1.0 - PRESSURE_THRESHOLD)).min(1.0);
        let span = self.timeout.saturating_sub(self.timeout_min);
        self.timeout.saturating_sub(span.mul_f64(f)).max(self.timeout_min)
    }
}

impl Slots {
    pub fn new(metrics: Option<Arc<Metrics>>) -> Arc<Slots> {
        Arc::new(Slots { table: Mutex::new(Table::default()), metrics })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding this lock would be a bug in this module's
        // few lines of bookkeeping; the table stays usable regardless.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for a socket from `key` (`None`: a trusted proxy's own
    /// address), shedding another address's if this one is under its
    /// fair share and every slot is taken.
    pub fn admit(
        self: &Arc<Self>,
        key: Option<IpKey>,
        accepted: Instant,
        limits: SlotLimits,
    ) -> Result<HandshakePermit, Reject> {
        let attempt = Arc::new(Attempt::new(accepted));
        let mut t = self.lock();
        let held = t.held(&key);
        if let Some(k) = key.filter(|_| held >= limits.per_ip) {
            // The address's own slowest head makes room, if one is old
            // enough; the total is unchanged, so the global rule is moot.
            let old_enough = |a: &Attempt| accepted.saturating_duration_since(a.accepted) >= SHED_MIN_AGE;
            if !t.shed_of(k, old_enough) {
                return Err(Reject::HandshakeCap);
            }
            t.insert(key, attempt.clone());
            self.publish(&t, limits);
            drop(t);
            return Ok(HandshakePermit { slots: self.clone(), attempt, key });
        }
        if t.total >= limits.max {
            if key.is_none() {
                return Err(Reject::HandshakeCap);
            }
            let holders = t.order.len() + usize::from(held == 0);
            let fair = (limits.max / holders.max(1)).max(1);
            if held + 1 > fair || !t.shed_one(held + 1) {
                return Err(Reject::HandshakeCap);
            }
        }
        t.insert(key, attempt.clone());
        self.publish(&t, limits);
        drop(t);
        Ok(HandshakePermit { slots: self.clone(), attempt, key })
    }

    /// Expires every incomplete head older than the deadline in force:
    /// this is the head deadline of every socket (no timer of its own), so
    /// run it often ([`SWEEP_EVERY`]); one pass over at most
    /// `max_handshakes` attempts.
    pub fn sweep(&self, now: Instant, limits: SlotLimits) {
        let t = self.lock();
        self.publish(&t, limits);
        let deadline = limits.deadline_at(pressure(t.total, limits.max));
        for q in t.by_key.values() {
            for a in q {
                if a.due(now, deadline) {
                    // Its task removes it from the table when it ends.
                    a.end(EXPIRED);
                }
            }
        }
    }

    /// Slots in use.
    pub fn total(&self) -> usize {
        self.lock().total
    }

    /// Client addresses holding at least one slot.
    pub fn addresses(&self) -> usize {
        self.lock().by_key.len()
    }

    /// The deadline in force now for an incomplete head.
    pub fn deadline_now(&self, limits: SlotLimits) -> Duration {
        limits.deadline_at(pressure(self.total(), limits.max))
    }

    fn publish(&self, t: &Table, limits: SlotLimits) {
        if let Some(m) = &self.metrics {
            let p = pressure(t.total, limits.max);
            m.set_handshake_pressure(p, limits.deadline_at(p));
            m.handshaking().set(t.total as f64);
        }
    }
}

fn pressure(total: usize, max: usize) -> f64 {
    (total as f64 / max.max(1) as f64).min(1.0)
}

/// One handshake slot, held from accept to the verdict; dropping it frees
/// the slot (unless it was already shed).
pub struct HandshakePermit {
    slots: Arc<Slots>,
    attempt: Arc<Attempt>,
    key: Option<IpKey>,
}

impl HandshakePermit {
    pub fn attempt(&self) -> &Attempt {
        &self.attempt
    }

    /// Moves the slot to the client a PROXY header named, under that
    /// client's per-address bound (stage 1 for proxied clients).
    pub fn rekey(&mut self, key: IpKey, per_ip: usize) -> Result<(), Reject> {
        let mut t = self.slots.lock();
        let now = Instant::now();
        let old_enough = |a: &Attempt| now.saturating_duration_since(a.accepted) >= SHED_MIN_AGE;
        if t.held(&Some(key)) >= per_ip && !t.shed_of(key, old_enough) {
            return Err(Reject::HandshakeCap);
        }
        if t.remove(self.key, &self.attempt) {
            t.insert(Some(key), self.attempt.clone());
        }
        self.key = Some(key);
        Ok(())
    }
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let mut t = self.slots.lock();
        t.remove(self.key, &self.attempt);
        if let Some(m) = &self.slots.metrics {
            m.handshaking().set(t.total as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Option<IpKey> {
        Some(IpKey::new(std::net::IpAddr::from([127, 0, 0, n])))
    }

    fn limits(max: usize, per_ip: usize) -> SlotLimits {
        SlotLimits {
            max,
            per_ip,
            timeout: Duration::from_millis(5000),
            timeout_min: Duration::from_millis(500),
        }
    }

    #[test]
    fn per_address_bound_then_release() {
        let s = Slots::new(None);
        let now = Instant::now();
        let l = limits(100, 2);
        let a = s.admit(key(2), now, l).unwrap();
        let _b = s.admit(key(2), now, l).unwrap();
        assert_eq!(s.admit(key(2), now, l).err(), Some(Reject::HandshakeCap));
        assert!(s.admit(key(3), now, l).is_ok(), "another address is not affected");
        drop(a);
        assert!(s.admit(key(2), now, l).is_ok());
    }

    #[test]
    fn full_table_sheds_the_oldest_head_of_the_largest_holder() {
        let s = Slots::new(None);
        let now = Instant::now();
        let l = limits(4, 4);
        let hog: Vec<_> = (0..3).map(|_| s.admit(key(2), now, l).unwrap()).collect();
        let other = s.admit(key(3), now, l).unwrap();
        // Full. Address 4 holds nothing: under its share, it takes a slot
        // from address 2 (the oldest one).
        let newcomer = s.admit(key(4), now, l).unwrap();
        assert_eq!(hog[0].attempt().verdict(), Verdict::Shed);
        assert_eq!(hog[1].attempt().verdict(), Verdict::Reading);
        assert_eq!(s.total(), 4);
        // Address 3 holds 1 of a fair 4/3 = 1: at its share, refused.
        assert_eq!(s.admit(key(3), now, l).err(), Some(Reject::HandshakeCap));
        // Dropping the shed permit does not free a second slot.
        drop(hog);
        assert_eq!(s.total(), 2);
        drop((other, newcomer));
        assert_eq!((s.total(), s.addresses()), (0, 0), "nothing kept per address");
    }

    #[test]
    fn at_its_bound_an_address_sheds_its_own_least_advanced_old_head() {
        let s = Slots::new(None);
        let t0 = Instant::now();
        let l = limits(100, 3);
        let slow: Vec<_> = (0..3).map(|_| s.admit(key(2), t0, l).unwrap()).collect();
        slow[0].attempt().progress(40);
        slow[1].attempt().progress(3);
        slow[2].attempt().progress(3);
        // Too young to be shed: a burst of one address's heads is safe.
        let young = t0 + SHED_MIN_AGE - Duration::from_millis(1);
        assert_eq!(s.admit(key(2), young, l).err(), Some(Reject::HandshakeCap));
        let later = t0 + SHED_MIN_AGE;
        let fast = s.admit(key(2), later, l).unwrap();
        // The fewest bytes, the oldest among equals.
        assert_eq!(slow[1].attempt().verdict(), Verdict::Shed);
        assert_eq!(slow[0].attempt().verdict(), Verdict::Reading);
        assert_eq!(slow[2].attempt().verdict(), Verdict::Reading);
        assert_eq!(s.total(), 3);
        // A complete head is never shed, however old.
        assert!(fast.attempt().head_done());
        let b = s.admit(key(2), later + SHED_MIN_AGE, l).unwrap();
        assert_eq!(slow[2].attempt().verdict(), Verdict::Shed);
        let c = s.admit(key(2), later + SHED_MIN_AGE, l).unwrap();
        assert_eq!(slow[0].attempt().verdict(), Verdict::Shed);
        assert!(b.attempt().head_done() && c.attempt().head_done());
        assert_eq!(
            s.admit(key(2), later + SHED_MIN_AGE * 4, l).err(),
            Some(Reject::HandshakeCap),
            "{}",
            s.total()
        );
        drop((slow, fast, b, c));
        assert_eq!(s.total(), 0);
    }

    #[test]
    fn complete_heads_are_not_shed() {
        let s = Slots::new(None);
        let now = Instant::now();
        let l = limits(2, 2);
        let a = s.admit(key(2), now, l).unwrap();
        let b = s.admit(key(2), now, l).unwrap();
        assert!(a.attempt().head_done() && b.attempt().head_done());
        assert_eq!(s.admit(key(3), now, l).err(), Some(Reject::HandshakeCap));
    }

    #[test]
    fn trusted_proxy_sockets_are_neither_capped_per_address_nor_shed() {
        let s = Slots::new(None);
        let now = Instant::now();
        let l = limits(3, 1);
        let p: Vec<_> = (0..3).map(|_| s.admit(None, now, l).unwrap()).collect();
        assert_eq!(s.admit(key(2), now, l).err(), Some(Reject::HandshakeCap));
        assert!(p.iter().all(|p| p.attempt().verdict() == Verdict::Reading));
    }

    #[test]
    fn rekey_moves_the_slot_under_the_clients_bound() {
        let s = Slots::new(None);
        let now = Instant::now();
        let l = limits(10, 1);
        let mut a = s.admit(None, now, l).unwrap();
        a.rekey(IpKey::new([127, 0, 0, 9].into()), 1).unwrap();
        let mut b = s.admit(None, now, l).unwrap();
        assert_eq!(b.rekey(IpKey::new([127, 0, 0, 9].into()), 1).err(), Some(Reject::HandshakeCap));
        assert_eq!(s.total(), 2);
        drop((a, b));
        assert_eq!((s.total(), s.addresses()), (0, 0));
    }

    #[test]
    fn deadline_shrinks_past_the_threshold_and_sweep_expires_old_heads() {
        let l = limits(10, 10);
        assert_eq!(l.deadline_at(0.0), Duration::from_millis(5000));
        assert_eq!(l.deadline_at(0.5), Duration::from_millis(5000));
        assert_eq!(l.deadline_at(0.75), Duration::from_millis(2750));
        assert_eq!(l.deadline_at(1.0), Duration::from_millis(500));

        let s = Slots::new(None);
        let t0 = Instant::now();
        let held: Vec<_> = (0..8).map(|i| s.admit(key(i + 2), t0, l).unwrap()).collect();
        // 80 %: the deadline in force is 5000 - 4500 * 0.6 = 2300 ms.
        assert_eq!(s.deadline_now(l), Duration::from_millis(2300));
        s.sweep(t0 + Duration::from_millis(2000), l);
        assert!(held.iter().all(|p| p.attempt().verdict() == Verdict::Reading));
        held[0].attempt().head_done();
        s.sweep(t0 + Duration::from_millis(2300), l);
        assert_eq!(held[0].attempt().verdict(), Verdict::Reading, "a complete head is not expired");
        assert!(held[1..].iter().all(|p| p.attempt().verdict() == Verdict::Expired));
    }
}
