//! Live connections by id and by subject: what `/admin/connections` lists,
//! what revocation, eviction and drain kick, and what the per-user cap
//! (stage 5) counts.
//!
//! Stage 5 is [`Registry::admit`]: with a fleet-wide store ([`UserCaps`],
//! the Redis leases) it asks that first and the local count is only an
//! index; when the store cannot answer in time, `limits.on_cap_store_error`
//! picks the local count (`local`) or a refusal (`reject`). Without one,
//! the local count is the cap.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::Waker;

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use serde::Serialize;

use super::handover::{self, Handover, SessionState};
use super::leases::{CapError, UserCaps};
use super::timer::{Ms, Timers};
use crate::config::{Limits, OnCapStoreError, OnUserCap};
use crate::metrics::Metrics;
use crate::reject::{CloseReason, Reject};
use crate::revocation::{Revocation, RevocationStore};

pub use crate::clock::unix_now;

/// One live connection, shared by its session task and the registry.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    /// Shared with the registry's index by subject: one copy per
    /// connection, not two.
    pub sub: Arc<str>,
    pub ip: IpAddr,
    /// Unix seconds of admission.
    pub since: u64,
    pub jti: Option<String>,
    pub iat: Option<u64>,
    /// When the client last sent a byte, in the shared timers' clock
    /// (milliseconds): the session reads that clock anyway, and a wall
    /// clock read per message would cost as much as the rest of the
    /// bookkeeping. Turned into unix seconds only when listed.
    last_seen: AtomicU64,
    /// 0 = not kicked; else 1 + index in `CloseReason::ALL`. The first kick wins.
    kicked: AtomicU8,
    /// Where a binary upgrade stands with it (`handover::NONE`…`MOVED`).
    pause: AtomicU8,
    /// The session's waker, for a kick and for its deadline (the shared
    /// [`Timers`]). Registered at each poll: the session keeps no future
    /// (and no waiter node) while it idles.
    waker: AtomicWaker,
    /// Where it is registered, for its [`Slot`] to leave: kept here rather
    /// than in the slot, which the connection task holds (in more than one
    /// copy) for the whole session.
    registry: Arc<Registry>,
}

impl ConnInfo {
    /// Asks the session to close with `reason`; false if already kicked.
    pub fn kick(&self, reason: CloseReason) -> bool {
        let v = reason as u8 + 1;
        let first = self.kicked.compare_exchange(0, v, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if first {
            // A kick before the session first polls is not lost: the
            // session reads `kicked` after registering its waker.
            self.waker.wake();
        }
        first
    }

    pub fn kicked_reason(&self) -> Option<CloseReason> {
        match self.kicked.load(Ordering::Acquire) {
            0 => None,
            v => CloseReason::ALL.get(usize::from(v - 1)).copied(),
        }
    }

    /// Has a kick or the timers wake `waker` (replacing the last one).
    /// The session registers before it looks at `kicked_reason` and the
    /// clock, so neither a kick nor a deadline in between is missed.
    pub fn watch(&self, waker: &Waker) {
        self.waker.register(waker);
    }

    /// Asks the session to pause for a binary upgrade; false if it is
    /// already asked (or paused).
    pub fn ask_pause(&self) -> bool {
        let asked = self
            .pause
            .compare_exchange(handover::NONE, handover::ASKED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if asked {
            self.waker.wake();
        }
        asked
    }

    /// The upgrade failed: a paused session goes on where it stopped.
    pub fn resume(&self) {
        self.pause.store(handover::RESUME, Ordering::Release);
        self.waker.wake();
    }

    /// The new process has the session: it ends here without a word.
    pub fn moved_away(&self) {
        self.pause.store(handover::MOVED, Ordering::Release);
        self.waker.wake();
    }

    /// Did the session move to a new process (so its end is not one)?
    pub fn moved(&self) -> bool {
        self.pause.load(Ordering::Acquire) == handover::MOVED
    }

    pub(super) fn pause_state(&self) -> u8 {
        self.pause.load(Ordering::Acquire)
    }

    pub(super) fn set_pause(&self, v: u8) {
        self.pause.store(v, Ordering::Release);
    }

    /// Where its session leaves its state when paused.
    pub(super) fn handover(&self) -> &Handover {
        &self.registry.handover
    }

    pub(super) fn last_seen_ms(&self) -> Ms {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Wakes the session (its deadline is due).
    pub(super) fn wake(&self) {
        self.waker.wake();
    }

    /// The timers of the gateway this connection belongs to.
    pub(super) fn timers(&self) -> &Arc<Timers> {
        &self.registry.timers
    }

    /// The client sent something at `now`, in the timers' clock.
    pub(super) fn touch(&self, now: Ms) {
        self.last_seen.store(now, Ordering::Relaxed);
    }

    /// Unix seconds of the client's last byte (never before `since`).
    pub fn last_seen(&self) -> u64 {
        let ago_ms = self.timers().now().saturating_sub(self.last_seen.load(Ordering::Relaxed));
        unix_now().saturating_sub(ago_ms / 1000).max(self.since)
    }
}

/// What `/admin/connections` shows of a connection.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ConnView {
    pub id: String,
    pub sub: String,
    pub ip: String,
    pub since: u64,
    pub last_seen: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("instance", &self.instance).finish_non_exhaustive()
    }
}

pub struct Registry {
    /// Tells this instance's ids from another's in logs and admin output.
    instance: String,
    next_id: AtomicU64,
    conns: DashMap<u64, Arc<ConnInfo>>,
    /// sub → its connection ids, oldest first. The per-user cap counts this
    /// list under the entry's shard lock, so check-and-insert is atomic.
    by_sub: DashMap<Arc<str>, Ids>,
    metrics: Arc<Metrics>,
    /// Set by the drain: a connection admitted from then on is kicked at once.
    closing: AtomicBool,
    /// The fleet-wide per-user cap (Redis backend), asked before the local
    /// count; `None`: the local count is the cap.
    caps: Option<Arc<dyn UserCaps>>,
    /// Every session's deadline.
    timers: Arc<Timers>,
    /// Paused sessions' states, during a binary upgrade.
    pub handover: Handover,
    /// Revocations an admin call is counting the closes of (see
    /// [`Registry::revoke_counting`]): every path that kicks a connection
    /// as `revoked` records it in each one that covers it. Short-lived
    /// and few (one per `/admin/revoke` in flight).
    counting: std::sync::Mutex<Vec<Arc<Counting>>>,
}

/// The connections one revocation closed, whichever path closed them.
struct Counting {
    r: Revocation,
    ids: std::sync::Mutex<std::collections::HashSet<u64>>,
}

/// One subject's connection ids, oldest first. Most subjects hold a
/// single connection: it is kept inline, with no allocation.
#[derive(Debug)]
enum Ids {
    One(u64),
    Many(Vec<u64>),
}

impl Default for Ids {
    fn default() -> Ids {
        Ids::Many(Vec::new())
    }
}

impl Ids {
    fn as_slice(&self) -> &[u64] {
        match self {
            Ids::One(id) => std::slice::from_ref(id),
            Ids::Many(v) => v,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    fn push(&mut self, id: u64) {
        match self {
            Ids::One(first) => *self = Ids::Many(vec![*first, id]),
            Ids::Many(v) if v.is_empty() => *self = Ids::One(id),
            Ids::Many(v) => v.push(id),
        }
    }

    fn take_oldest(&mut self) -> Option<u64> {
        let oldest = *self.as_slice().first()?;
        self.remove(oldest);
        Some(oldest)
    }

    /// Removes `id`; back to inline (or nothing) when one (or none) is left.
    fn remove(&mut self, id: u64) {
        match self {
            Ids::One(only) if *only == id => *self = Ids::default(),
            Ids::One(_) => {}
            Ids::Many(v) => {
                v.retain(|i| *i != id);
                match v.as_slice() {
                    [] => *self = Ids::default(),
                    [only] => *self = Ids::One(*only),
                    _ => {}
                }
            }
        }
    }
}

/// A registered connection; dropping it unregisters (releasing the per-user
/// slot), however the connection ended.
pub struct Slot {
    pub info: Arc<ConnInfo>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let registry = &self.info.registry;
        registry.remove(&self.info);
        // A connection that moved to a new process keeps its fleet lease:
        // the new process holds it now.
        if self.info.moved() {
            return;
        }
        if let Some(caps) = &registry.caps {
            caps.release(&self.info);
        }
    }
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Registry> {
        Registry::with_caps(metrics, None)
    }

    /// A registry whose stage 5 asks `caps` (fleet-wide) before its own count.
    pub fn with_caps(metrics: Arc<Metrics>, caps: Option<Arc<dyn UserCaps>>) -> Arc<Registry> {
        Registry::inheriting(metrics, caps, None)
    }

    /// As [`with_caps`](Registry::with_caps); with `inherit`, a binary
    /// upgrade's new process: the old one's instance name (so moved
    /// connections keep their ids) and a clock whose epoch is the old
    /// one's, `age` ago (so their deadlines keep their instants).
    pub fn inheriting(
        metrics: Arc<Metrics>,
        caps: Option<Arc<dyn UserCaps>>,
        inherit: Option<(String, std::time::Duration)>,
    ) -> Arc<Registry> {
        let (instance, timers) = match inherit {
            Some((instance, age)) => (instance, Timers::aged(age)),
            None => (format!("{:06x}", rand::random::<u32>() & 0xff_ffff), Timers::new()),
        };
        Arc::new(Registry {
            instance,
            next_id: AtomicU64::new(1),
            conns: DashMap::new(),
            by_sub: DashMap::new(),
            metrics,
            closing: AtomicBool::new(false),
            caps,
            timers,
            handover: Handover::default(),
            counting: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Registers a connection moved here by a binary upgrade, with its id,
    /// admission time and place in its user's evict order (restore in id
    /// order: oldest first). Never refused: it was admitted already. Its
    /// fleet lease, if any, is this instance's to keep from now on.
    pub fn restore(self: &Arc<Self>, s: &SessionState, lease: Option<String>) -> Slot {
        self.next_id.fetch_max(s.id + 1, Ordering::Relaxed);
        let info = Arc::new(ConnInfo {
            id: s.id,
            sub: Arc::from(s.sub.as_str()),
            ip: s.ip,
            since: s.since,
            jti: s.jti.clone(),
            iat: s.iat,
            last_seen: AtomicU64::new(s.last_seen),
            kicked: AtomicU8::new(0),
            pause: AtomicU8::new(handover::NONE),
            waker: AtomicWaker::new(),
            registry: self.clone(),
        });
        if let Some(caps) = &self.caps {
            caps.adopt_member(&info, lease);
        }
        self.by_sub.entry(info.sub.clone()).or_default().push(info.id);
        self.conns.insert(info.id, info.clone());
        self.metrics.set_users_connected(self.by_sub.len());
        Slot { info }
    }

    /// The fleet lease name of connection `id` (a binary upgrade carries it).
    pub fn lease_member(&self, id: u64) -> Option<String> {
        self.caps.as_ref().and_then(|c| c.member(id))
    }

    /// The next connection id this registry hands out.
    pub fn next_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// Ids from `floor` on (a binary upgrade's new process: above every id
    /// the old process may still hand out meanwhile).
    pub fn ids_from(&self, floor: u64) {
        self.next_id.fetch_max(floor, Ordering::Relaxed);
    }

    /// The clock every session's deadline is kept in (milliseconds since
    /// its epoch).
    pub fn clock_ms(&self) -> Ms {
        self.timers.now()
    }

    /// Stage 5: admits a connection of `sub` within
    /// `limits.per_user_max_connections`, fleet-wide when a [`UserCaps`]
    /// is configured (see the module notes), else on this instance.
    pub async fn admit(
        self: &Arc<Self>,
        sub: &str,
        ip: IpAddr,
        jti: Option<String>,
        iat: Option<u64>,
        limits: &Limits,
    ) -> Result<Slot, Reject> {
        let (max, policy) = (limits.per_user_max_connections, limits.on_user_cap);
        let Some(caps) = &self.caps else {
            return self.register(sub, ip, jti, iat, max, policy);
        };
        let info = self.new_conn(sub, ip, jti, iat);
        match caps.claim(&info, max, policy).await {
            // The fleet counted it (and evicted for it): locally it is
            // only indexed, never counted a second time.
            Ok(()) => Ok(self.insert(info, usize::MAX, policy)?),
            Err(CapError::Full) => Err(Reject::UserCap),
            Err(CapError::Unavailable) => match limits.on_cap_store_error {
                OnCapStoreError::Reject => {
                    // Never admitted: whatever the timed-out claim left goes.
                    caps.release(&info);
                    Err(Reject::UserCap)
                }
                OnCapStoreError::Local => match self.insert(info.clone(), max, policy) {
                    Ok(slot) => {
                        caps.adopt(&slot.info);
                        Ok(slot)
                    }
                    Err(r) => {
                        caps.release(&info);
                        Err(r)
                    }
                },
            },
        }
    }

    /// Stage 5 on the local count alone: admits a connection of `sub`
    /// within `max_per_user`. With `EvictOldest`, the user's oldest
    /// connection is kicked (`evicted`) and leaves the count at once, so the
    /// newcomer is admitted.
    pub fn register(
        self: &Arc<Self>,
        sub: &str,
        ip: IpAddr,
        jti: Option<String>,
        iat: Option<u64>,
        max_per_user: usize,
        policy: OnUserCap,
    ) -> Result<Slot, Reject> {
        let info = self.new_conn(sub, ip, jti, iat);
        self.insert(info, max_per_user, policy)
    }

    fn new_conn(
        self: &Arc<Self>,
        sub: &str,
        ip: IpAddr,
        jti: Option<String>,
        iat: Option<u64>,
    ) -> Arc<ConnInfo> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = unix_now();
        Arc::new(ConnInfo {
            id,
            sub: Arc::from(sub),
            ip,
            since: now,
            jti,
            iat,
            last_seen: AtomicU64::new(self.timers.now()),
            kicked: AtomicU8::new(0),
            pause: AtomicU8::new(handover::NONE),
            waker: AtomicWaker::new(),
            registry: self.clone(),
        })
    }

    /// Indexes `info`, counting it against `max_per_user` on this instance.
    fn insert(
        self: &Arc<Self>,
        info: Arc<ConnInfo>,
        max_per_user: usize,
        policy: OnUserCap,
    ) -> Result<Slot, Reject> {
        let (id, sub) = (info.id, &*info.sub);
        {
            let mut ids = self.by_sub.entry(info.sub.clone()).or_default();
            while ids.len() >= max_per_user {
                if policy == OnUserCap::Reject {
                    let empty = ids.is_empty();
                    drop(ids);
                    if empty {
                        self.by_sub.remove_if(sub, |_, v| v.is_empty());
                    }
                    return Err(Reject::UserCap);
                }
                let Some(oldest) = ids.take_oldest() else { break };
                if let Some(c) = self.conns.get(&oldest) {
                    c.kick(CloseReason::Evicted);
                }
            }
            ids.push(id);
        }
        self.conns.insert(id, info.clone());
        if self.closing.load(Ordering::Acquire) {
            info.kick(CloseReason::Drain);
        }
        self.metrics.set_users_connected(self.by_sub.len());
        Ok(Slot { info })
    }

    fn remove(&self, info: &ConnInfo) {
        self.conns.remove(&info.id);
        if let Some(mut ids) = self.by_sub.get_mut(&*info.sub) {
            ids.remove(info.id);
        }
        self.by_sub.remove_if(&*info.sub, |_, v| v.is_empty());
        self.metrics.set_users_connected(self.by_sub.len());
    }

    /// Kicks one live connection by id (an eviction named it); false if it
    /// is gone or was already kicked.
    pub fn kick_id(&self, id: u64, reason: CloseReason) -> bool {
        self.conns.get(&id).is_some_and(|c| c.kick(reason))
    }

    /// Ids of this instance's connections evicted by another admission
    /// (fleet-wide caps only).
    pub fn evictions(&self) -> Option<tokio::sync::broadcast::Receiver<u64>> {
        self.caps.as_ref().map(|c| c.evictions())
    }

    /// Is the fleet-wide cap store answering? (`true` without one.)
    pub fn caps_up(&self) -> bool {
        self.caps.as_ref().is_none_or(|c| c.is_up())
    }

    /// Waits until released leases have reached the fleet store (shutdown).
    pub async fn flush_caps(&self) {
        if let Some(c) = &self.caps {
            c.flush().await;
        }
    }

    /// Kicks every live connection `r` covers; returns how many were kicked.
    pub fn kick_revoked(&self, r: &Revocation) -> usize {
        self.kick_covered(r).len()
    }

    /// Kicks every live connection `r` covers; returns the ones this call
    /// kicked (not those some earlier kick had already closed).
    fn kick_covered(&self, r: &Revocation) -> Vec<Arc<ConnInfo>> {
        self.covered(r).into_iter().filter(|c| self.kick_revoked_conn(c)).collect()
    }

    /// Kicks `c` as `revoked` (any revocation path: the handler, the
    /// broadcast, the re-check after a lagging broadcast); a first kick is
    /// recorded for every revocation being counted that covers it.
    pub fn kick_revoked_conn(&self, c: &Arc<ConnInfo>) -> bool {
        if !c.kick(CloseReason::Revoked) {
            return false;
        }
        // A poisoned lock only means a panicking counter; the list is intact.
        let counting = self.counting.lock().unwrap_or_else(|e| e.into_inner());
        for k in counting.iter().filter(|k| Self::covers(&k.r, c)) {
            k.ids.lock().unwrap_or_else(|e| e.into_inner()).insert(c.id);
        }
        true
    }

    fn covers(r: &Revocation, c: &ConnInfo) -> bool {
        r.matches(&c.sub, c.jti.as_deref(), c.iat)
            || matches!(r, Revocation::Subject { sub, before } if **sub == *c.sub && c.since <= *before)
    }

    /// Live connections `r` covers. A subject revocation covers every
    /// connection of `sub` admitted up to its cut-off, whatever its token's
    /// `iat` (a token issued a little in the future, within the leeway,
    /// still belongs to a connection that existed when the call was made),
    /// and every one whose token it covers.
    fn covered(&self, r: &Revocation) -> Vec<Arc<ConnInfo>> {
        let ids: Vec<u64> = match r {
            Revocation::Subject { sub, .. } => {
                self.by_sub.get(sub.as_str()).map(|v| v.as_slice().to_vec()).unwrap_or_default()
            }
            Revocation::Jti { .. } => self.conns.iter().map(|e| *e.key()).collect(),
        };
        ids.iter()
            .filter_map(|id| self.conns.get(id).map(|c| c.clone()))
            .filter(|c| Self::covers(r, c))
            .collect()
    }

    /// Records a revocation with `persist` (the store's `revoke`, which
    /// also broadcasts it, so the kicker task may close connections before
    /// this returns) and kicks what it covers. Returns exactly how many
    /// live connections of this instance it closed, whichever path kicked
    /// them: the count is registered before `persist`, and every kick as
    /// `revoked` of a connection it covers is recorded in it
    /// ([`kick_revoked_conn`](Self::kick_revoked_conn)), so neither a kick
    /// by the broadcast that won the race nor a connection registered
    /// while `persist` ran (and gone before this looked) is missed; a
    /// connection an earlier revocation had already closed is not counted.
    pub async fn revoke_counting<E>(
        &self,
        r: &Revocation,
        persist: impl std::future::Future<Output = Result<(), E>>,
    ) -> Result<usize, E> {
        let counter = Arc::new(Counting { r: r.clone(), ids: Default::default() });
        self.counting.lock().unwrap_or_else(|e| e.into_inner()).push(counter.clone());
        let persisted = persist.await;
        if persisted.is_ok() {
            self.kick_covered(r);
        }
        self.counting.lock().unwrap_or_else(|e| e.into_inner()).retain(|k| !Arc::ptr_eq(k, &counter));
        persisted?;
        let n = counter.ids.lock().unwrap_or_else(|e| e.into_inner()).len();
        Ok(n)
    }

    /// Every live connection, optionally of one subject, oldest first.
    pub fn list(&self, sub: Option<&str>) -> Vec<ConnView> {
        let mut v: Vec<Arc<ConnInfo>> = match sub {
            Some(s) => self
                .by_sub
                .get(s)
                .map(|ids| {
                    ids.as_slice().iter().filter_map(|id| self.conns.get(id).map(|c| c.clone())).collect()
                })
                .unwrap_or_default(),
            None => self.conns.iter().map(|e| e.value().clone()).collect(),
        };
        v.sort_by_key(|c| c.id);
        v.iter()
            .map(|c| ConnView {
                id: format!("{}-{}", self.instance, c.id),
                sub: c.sub.to_string(),
                ip: c.ip.to_string(),
                since: c.since,
                last_seen: c.last_seen(),
            })
            .collect()
    }

    /// From now on, every newly registered connection is kicked (`drain`).
    pub fn start_closing(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// Handles of every live connection (for drain).
    pub fn all(&self) -> Vec<Arc<ConnInfo>> {
        self.conns.iter().map(|e| e.value().clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Is connection `id` still registered?
    pub fn contains(&self, id: u64) -> bool {
        self.conns.contains_key(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Live connections of `sub`.
    pub fn count_of(&self, sub: &str) -> usize {
        self.by_sub.get(sub).map_or(0, |v| v.len())
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }
}

/// The second revocation check, after stage 5 registered the connection
/// and before the 101.
///
/// Stage 4 looks revocations up before the connection is registered, and
/// only a registered connection can be kicked: a revocation landing in
/// between (a Redis lease claim widens that window) would otherwise miss
/// it and leave a live session until the token expires. Checked once
/// registered, every revocation is caught by one side or the other: it is
/// in the store by now, or its kick (which runs after the store has it)
/// will find the registered connection. A kick that already landed counts
/// too. Custom authenticators, which need not consult the store
/// themselves, are covered by this check as well.
pub fn recheck(store: &dyn RevocationStore, conn: &ConnInfo) -> Result<(), Reject> {
    let kicked = conn.kicked_reason() == Some(crate::reject::CloseReason::Revoked);
    if kicked || store.is_revoked(&conn.sub, conn.jti.as_deref(), conn.iat) {
        return Err(Reject::RevokedToken);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Arc<Registry> {
        Registry::new(Arc::new(Metrics::new()))
    }
    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn cap_rejects_then_frees_on_drop() {
        let r = reg();
        let a = r.register("u", IP, None, None, 2, OnUserCap::Reject).unwrap();
        let _b = r.register("u", IP, None, None, 2, OnUserCap::Reject).unwrap();
        assert_eq!(r.register("u", IP, None, None, 2, OnUserCap::Reject).err(), Some(Reject::UserCap));
        drop(a);
        assert!(r.register("u", IP, None, None, 2, OnUserCap::Reject).is_ok());
    }

    #[test]
    fn evict_oldest_kicks_the_oldest() {
        let r = reg();
        let a = r.register("u", IP, None, None, 1, OnUserCap::EvictOldest).unwrap();
        let b = r.register("u", IP, None, None, 1, OnUserCap::EvictOldest).unwrap();
        assert_eq!(a.info.kicked_reason(), Some(CloseReason::Evicted));
        assert_eq!(b.info.kicked_reason(), None);
        assert_eq!(r.count_of("u"), 1);
        drop(a);
        assert_eq!(r.count_of("u"), 1, "dropping the evicted one leaves the newcomer");
    }

    #[test]
    fn revocation_kicks_matching_only() {
        let r = reg();
        let a = r.register("u", IP, Some("j1".into()), Some(100), 8, OnUserCap::Reject).unwrap();
        let b = r.register("u", IP, Some("j2".into()), Some(300), 8, OnUserCap::Reject).unwrap();
        assert_eq!(r.kick_revoked(&Revocation::Subject { sub: "u".into(), before: 200 }), 1);
        assert_eq!(a.info.kicked_reason(), Some(CloseReason::Revoked));
        assert_eq!(r.kick_revoked(&Revocation::Jti { jti: "j2".into() }), 1);
        assert_eq!(b.info.kicked_reason(), Some(CloseReason::Revoked));
        assert_eq!(r.list(Some("u")).len(), 2);
    }

    #[test]
    fn a_subject_revocation_now_covers_this_seconds_tokens_and_connections() {
        let r = reg();
        let now = unix_now();
        // Minted this very second, and one "issued" a little in the future
        // (within the leeway): both exist when the call is made.
        let a = r.register("u", IP, None, Some(now), 8, OnUserCap::Reject).unwrap();
        let b = r.register("u", IP, None, Some(now + 5), 8, OnUserCap::Reject).unwrap();
        assert_eq!(r.kick_revoked(&Revocation::Subject { sub: "u".into(), before: now }), 2);
        assert_eq!(a.info.kicked_reason(), Some(CloseReason::Revoked));
        assert_eq!(b.info.kicked_reason(), Some(CloseReason::Revoked));
    }

    #[tokio::test]
    async fn revoke_counting_counts_kicks_that_came_first() {
        let r = reg();
        let a = r.register("u", IP, None, Some(100), 8, OnUserCap::Reject).unwrap();
        let _b = r.register("u", IP, None, Some(100), 8, OnUserCap::Reject).unwrap();
        let rev = Revocation::Subject { sub: "u".into(), before: 200 };
        // The store's broadcast kicks one before the handler counts.
        let persist = async {
            r.kick_revoked_conn(&a.info);
            Ok::<(), ()>(())
        };
        assert_eq!(r.revoke_counting(&rev, persist).await, Ok(2));
        // Nothing left to close: a second call counts nothing.
        assert_eq!(r.revoke_counting(&rev, async { Ok::<(), ()>(()) }).await, Ok(0));
    }
}
