//! Fleet-wide per-user caps: the [`UserCaps`] trait stage 5 asks before the
//! registry's own count, and its Redis implementation, [`RedisLeases`].
//!
//! # Leases
//!
//! Each live connection holds a lease: a member of the sorted set
//! `portcullis:lease:<sub>`, scored by when it expires (Redis's clock, ms).
//! The member is `<admitted unix ms, 15 digits>/<instance node>/<conn id>`,
//! so members sort by age and name their owner. `CLAIM_LUA` does stage 5
//! atomically: it drops expired members, counts the rest, and either
//! refuses, or admits (adding the member), or, with `evict_oldest`, removes
//! the oldest members until the newcomer fits, publishes each on
//! `portcullis:evict` (its owner closes that connection with `evicted`),
//! and admits.
//!
//! One keeper task per instance renews every lease it holds in one batched
//! script call every `lease_ttl_ms / 3`, and removes released ones; an
//! instance that dies stops renewing and its leases expire by themselves
//! within `lease_ttl_ms`. Renewal re-adds a missing lease, so after a
//! Redis restart, an expiry while Redis was slow, or an outage during
//! which connections were admitted on the local count, the fleet's count
//! heals at the next renewal (a user may then briefly hold more than the
//! cap: nothing is closed to enforce it after the fact) — but never a
//! lease an eviction removed: an eviction also records the member in
//! `portcullis:evicted:<sub>` (for three lease TTLs), and a renewal that
//! finds its member there closes that connection instead (the eviction
//! notice may have been lost).
//!
//! # One lease per connection
//!
//! A connection's member is fixed when it is first claimed, so a claim is
//! idempotent (claiming a member already held refreshes it) and a
//! connection never holds two leases. A claim that timed out here may
//! still run in Redis: its member is removed at once (after the claim, on
//! the same connection), and if the connection was admitted on the local
//! count meanwhile, the next renewal adds that same member back.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::Script;
use dashmap::DashMap;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::registry::ConnInfo;
use crate::config::OnUserCap;
use crate::redis_link::{conn_member, RedisLink, BACKGROUND_TIMEOUT, EVICT_CHANNEL};

/// Prefix of each user's lease set.
pub const LEASE_PREFIX: &str = "portcullis:lease:";
/// Prefix of each user's recently evicted members.
pub const EVICTED_PREFIX: &str = "portcullis:evicted:";

/// Why a claim did not admit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapError {
    /// The user is at the cap (and the policy is `reject`).
    Full,
    /// The count could not be had in time: the caller applies
    /// `limits.on_cap_store_error`.
    Unavailable,
}

/// A store that counts a user's connections across instances. The
/// registry asks it first in stage 5 and keeps its own per-instance count
/// as the fallback; kicks and `/admin/connections` stay local.
#[async_trait::async_trait]
pub trait UserCaps: Send + Sync + 'static {
    /// Counts `conn` against `max` live connections of `conn.sub`, applying
    /// `policy` at the cap (an eviction of another instance's connection is
    /// carried out by that instance). `Ok`: admitted and held until
    /// [`release`](UserCaps::release). Bounded in time.
    async fn claim(&self, conn: &Arc<ConnInfo>, max: usize, policy: OnUserCap) -> Result<(), CapError>;
    /// Holds a connection admitted without a claim (the store was
    /// unavailable, policy `local`), so the fleet counts it once it can.
    fn adopt(&self, conn: &Arc<ConnInfo>);
    /// The connection ended. Never blocks.
    fn release(&self, conn: &ConnInfo);
    /// Ids of this instance's connections another admission evicted.
    fn evictions(&self) -> broadcast::Receiver<u64>;
    /// Is the store answering (for `/readyz`)?
    fn is_up(&self) -> bool;
    /// Waits until releases issued so far have reached the store (shutdown).
    async fn flush(&self);
    /// The name connection `id` holds its lease under, for a binary
    /// upgrade to carry over (`None`: not held, or no names).
    fn member(&self, _id: u64) -> Option<String> {
        None
    }
    /// Holds a connection moved here by a binary upgrade, under the name
    /// its lease already has (no second lease, no gap in the count).
    fn adopt_member(&self, conn: &Arc<ConnInfo>, member: Option<String>) {
        let _ = member;
        self.adopt(conn);
    }
}

/// Admission, bounded by `redis_timeout_ms`. KEYS[1] the user's lease set,
/// KEYS[2] its evicted set; ARGV: member, ttl ms, max, 1 to evict the
/// oldest at the cap, the eviction channel. Returns `{1, evicted members…}`
/// or `{0}`. A member already held is refreshed, not counted again.
const CLAIM_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  return {1}
end
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local n = #members
local out = {1}
if n >= max then
  if ARGV[4] ~= '1' or max < 1 then return {0} end
  table.sort(members)
  for i = 1, n - max + 1 do
    redis.call('ZREM', KEYS[1], members[i])
    redis.call('ZADD', KEYS[2], now + 3 * ttl, members[i])
    redis.call('PUBLISH', ARGV[5], members[i])
    out[#out + 1] = members[i]
  end
  redis.call('PEXPIRE', KEYS[2], 3 * ttl)
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return out
";

/// Renewal of many leases: KEYS pairs of (lease set, evicted set),
/// ARGV[1] ttl ms, then one member per pair. Re-adds a missing member
/// unless an eviction removed it (see the module notes); returns the
/// members found evicted. The set lives as long as its latest lease.
const RENEW_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local evicted = {}
for i = 1, #KEYS, 2 do
  local m = ARGV[(i + 1) / 2 + 1]
  redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', now)
  if redis.call('ZSCORE', KEYS[i + 1], m) then
    redis.call('ZREM', KEYS[i], m)
    evicted[#evicted + 1] = m
  else
    redis.call('ZADD', KEYS[i], now + ttl, m)
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
return evicted
";

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_LUA));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LUA));

/// Leases renewed per script call.
const RENEW_CHUNK: usize = 512;
/// Releases waiting for the keeper; past this a release is dropped (and
/// counted), and that lease expires by itself.
const RELEASE_QUEUE: usize = 8192;
/// Releases removed per round trip.
const RELEASE_BATCH: usize = 512;

fn lease_key(sub: &str) -> String {
    format!("{LEASE_PREFIX}{sub}")
}

fn evicted_key(sub: &str) -> String {
    format!("{EVICTED_PREFIX}{sub}")
}

/// A lease this instance holds.
struct Held {
    key: String,
    evicted_key: String,
    member: String,
    /// Not renewed once kicked (an evicted connection must not win its
    /// lease back while it closes).
    conn: Arc<ConnInfo>,
}

enum KeeperMsg {
    Release { key: String, member: String },
    Flush(oneshot::Sender<()>),
}

/// The Redis [`UserCaps`], sharing the revocation store's link.
#[derive(Clone)]
pub struct RedisLeases {
    link: Arc<RedisLink>,
    ttl_ms: u64,
    /// Every lease this instance holds, by connection id: what the keeper
    /// renews.
    held: Arc<DashMap<u64, Held>>,
    keeper: mpsc::Sender<KeeperMsg>,
}

impl RedisLeases {
    /// The leases and their keeper task (renewal and release).
    pub fn start(link: Arc<RedisLink>, ttl_ms: u64) -> (RedisLeases, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(RELEASE_QUEUE);
        let leases = RedisLeases { link, ttl_ms, held: Arc::new(DashMap::new()), keeper: tx };
        let task = tokio::spawn(keeper(leases.clone(), rx));
        (leases, task)
    }

    /// The connection's member: the one it already has (a claim again, an
    /// adoption after a claim timed out), else a new one, held from now on.
    fn hold(&self, conn: &Arc<ConnInfo>) -> (String, String) {
        let held = self.held.entry(conn.id).or_insert_with(|| Held {
            key: lease_key(&conn.sub),
            evicted_key: evicted_key(&conn.sub),
            member: conn_member(crate::clock::unix_ms(), &self.link.node, conn.id),
            conn: conn.clone(),
        });
        (held.key.clone(), held.member.clone())
    }

    /// Renews (re-adds) every lease of a live, unkicked connection, except
    /// those an eviction removed: their connections are closed instead.
    #[doc(hidden)]
    pub async fn renew_all(&self) {
        let Some(mut conn) = self.link.conn() else { return };
        let batch: Vec<(String, String, String)> = self
            .held
            .iter()
            .filter(|h| h.conn.kicked_reason().is_none())
            .map(|h| (h.key.clone(), h.evicted_key.clone(), h.member.clone()))
            .collect();
        for chunk in batch.chunks(RENEW_CHUNK) {
            let mut inv = RENEW.prepare_invoke();
            inv.arg(self.ttl_ms);
            for (key, evicted, member) in chunk {
                inv.key(key).key(evicted).arg(member);
            }
            match tokio::time::timeout(BACKGROUND_TIMEOUT, inv.invoke_async::<Vec<String>>(&mut conn)).await {
                Ok(Ok(evicted)) => {
                    self.link.succeeded();
                    for m in evicted {
                        self.link.on_evicted(&m);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    self.link.failed("lease_renew");
                    return;
                }
                Err(_) => {
                    tracing::warn!("lease renewal timed out");
                    self.link.failed("lease_renew");
                    return;
                }
            }
        }
    }

    async fn release_batch(&self, batch: &[(String, String)]) {
        let Some(mut conn) = self.link.conn() else {
            // Down: these leases expire by themselves.
            for _ in batch {
                self.link.metrics.store_error("lease_release");
            }
            return;
        };
        let mut pipe = ::redis::pipe();
        for (key, member) in batch {
            pipe.zrem(key, member).ignore();
        }
        match tokio::time::timeout(BACKGROUND_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => self.link.succeeded(),
            _ => self.link.failed("lease_release"),
        }
    }
}

/// Renews every `ttl / 3` (and right after a reconnect), removes released
/// leases as they come, in one task, so a renewal never re-adds a lease
/// whose removal it has already sent.
async fn keeper(leases: RedisLeases, mut rx: mpsc::Receiver<KeeperMsg>) {
    let every = Duration::from_millis((leases.ttl_ms / 3).max(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut msgs = Vec::with_capacity(RELEASE_BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut msgs, RELEASE_BATCH) => {
                if n == 0 {
                    return;
                }
                let mut batch = Vec::new();
                let mut flushed = Vec::new();
                for m in msgs.drain(..) {
                    match m {
                        KeeperMsg::Release { key, member } => batch.push((key, member)),
                        KeeperMsg::Flush(done) => flushed.push(done),
                    }
                }
                if !batch.is_empty() {
                    leases.release_batch(&batch).await;
                }
                for done in flushed {
                    let _ = done.send(());
                }
            }
            _ = tick.tick() => leases.renew_all().await,
            _ = leases.link.reconnected.notified() => leases.renew_all().await,
        }
    }
}

#[async_trait::async_trait]
impl UserCaps for RedisLeases {
    async fn claim(&self, conn: &Arc<ConnInfo>, max: usize, policy: OnUserCap) -> Result<(), CapError> {
        let Some(mut c) = self.link.conn() else { return Err(CapError::Unavailable) };
        let (key, member) = self.hold(conn);
        let mut inv = CLAIM.prepare_invoke();
        inv.key(&key)
            .key(evicted_key(&conn.sub))
            .arg(&member)
            .arg(self.ttl_ms)
            .arg(max)
            .arg(u8::from(policy == OnUserCap::EvictOldest))
            .arg(EVICT_CHANNEL);
        let call = inv.invoke_async::<Vec<::redis::Value>>(&mut c);
        let out = match tokio::time::timeout(self.link.timeout, call).await {
            Ok(Ok(out)) => out,
            failed => {
                if let Ok(Err(e)) = failed {
                    tracing::warn!(error = %e, "lease claim failed");
                }
                // Slow is not down (see `redis_link`). The claim may still
                // run in Redis: remove its member after it, on the same
                // connection. If the connection is admitted locally, it is
                // adopted with this same member and renewal adds it back.
                self.link.failed("lease_claim");
                if self.keeper.try_send(KeeperMsg::Release { key, member }).is_err() {
                    self.link.metrics.store_error("lease_release");
                }
                return Err(CapError::Unavailable);
            }
        };
        self.link.succeeded();
        if !matches!(out.first(), Some(::redis::Value::Int(1))) {
            self.held.remove(&conn.id);
            return Err(CapError::Full);
        }
        // Evicted connections of our own are closed now; others' owners
        // hear it on the channel (so do we, and a second kick is a no-op).
        for v in &out[1..] {
            if let Ok(m) = ::redis::from_redis_value_ref::<String>(v) {
                self.link.on_evicted(&m);
            }
        }
        Ok(())
    }

    fn adopt(&self, conn: &Arc<ConnInfo>) {
        self.hold(conn);
    }

    fn member(&self, id: u64) -> Option<String> {
        self.held.get(&id).map(|h| h.member.clone())
    }

    fn adopt_member(&self, conn: &Arc<ConnInfo>, member: Option<String>) {
        let Some(member) = member else { return self.adopt(conn) };
        self.held.insert(
            conn.id,
            Held {
                key: lease_key(&conn.sub),
                evicted_key: evicted_key(&conn.sub),
                member,
                conn: conn.clone(),
            },
        );
    }

    fn release(&self, conn: &ConnInfo) {
        let Some((_, held)) = self.held.remove(&conn.id) else { return };
        let msg = KeeperMsg::Release { key: held.key, member: held.member };
        if self.keeper.try_send(msg).is_err() {
            // Queue full (Redis slow): the lease expires by itself.
            self.link.metrics.store_error("lease_release");
        }
    }

    fn evictions(&self) -> broadcast::Receiver<u64> {
        self.link.evicted.subscribe()
    }

    fn is_up(&self) -> bool {
        self.link.is_up()
    }

    async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.keeper.send(KeeperMsg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_pair_keys_with_their_evicted_sets() {
        assert_eq!(lease_key("u"), "portcullis:lease:u");
        assert_eq!(evicted_key("u"), "portcullis:evicted:u");
        // Renewal walks KEYS two by two and ARGV one by one after the TTL.
        assert!(RENEW_LUA.contains("for i = 1, #KEYS, 2 do") && RENEW_LUA.contains("ARGV[(i + 1) / 2 + 1]"));
    }
}
