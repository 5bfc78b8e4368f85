//! Fleet-wide per-user caps: the [`UserCaps`] trait stage 5 asks before the
//! registry's own count, and its Redis implementation, [`RedisLeases`].
//!
//! # Leases owned by an instance's heartbeat
//!
//! Each live connection holds a lease: a member of the sorted set
//! `portcullis:lease:{<b>}:<sub>`, scored by when it was admitted (ms). The
//! member is `<admitted unix ms, 15 digits>/<instance node>/<conn id>`, so
//! members sort by age and name their owner. A lease is never renewed by
//! itself: it counts while its owner's **heartbeat** lives, a field
//! `<node>` of the hash `portcullis:hb:{<b>}` holding the Redis time (ms)
//! until which that instance vouches for every lease it holds in bucket
//! `b`. The keeper task extends each bucket's heartbeat every
//! `lease_ttl_ms / 3` (one tiny script per bucket, whatever the number of
//! connections), so Redis's cost follows instances, not connections.
//!
//! `b` is the user's bucket, a hash of `sub` modulo [`RedisLink::buckets`]
//! (1 on one server; on a cluster, [`crate::redis_link::cluster::LEASE_BUCKETS`]
//! spread over the slots). The braces make `b` the key's hash tag, so a
//! user's lease set, its evicted set and the bucket's heartbeats share one
//! slot and every script declares all the keys it touches.
//!
//! `CLAIM_LUA` does stage 5 atomically, in one round trip: it refuses to
//! count for an instance whose own heartbeat has lapsed (the caller falls
//! back per `limits.on_cap_store_error`), drops members whose owner's
//! heartbeat has lapsed (a dead instance's leases stop counting by
//! themselves within `lease_ttl_ms`), counts the rest, and either refuses,
//! or admits (adding the member), or, with `evict_oldest`, removes the
//! oldest members until the newcomer fits, records each in
//! `portcullis:evicted:{<b>}:<sub>`, publishes it on `portcullis:evict` (its
//! owner closes that connection with `evicted`), and admits.
//!
//! # Fencing and repair
//!
//! A heartbeat is extended only while it is still alive. When the keeper
//! finds it lapsed (Redis restarted empty, a failover lost it, or this
//! instance was cut off longer than `lease_ttl_ms`), others may already
//! have dropped this instance's leases: it **re-asserts** every lease it
//! holds in that bucket (re-adding each, unless an eviction recorded it:
//! that connection is closed instead, the notice may have been lost) and
//! only then sets the heartbeat again. Re-assertion also runs after every
//! reconnection and topology change the link reports, and every
//! [`REASSERT_EVERY`] as a safety net. Meanwhile this instance **fences**
//! itself: once `lease_ttl_ms - lease_ttl_ms / 10` has passed since it last
//! sent a heartbeat that succeeded, its claims fail at once
//! (`on_cap_store_error` applies), before its heartbeat could expire in
//! Redis and its leases be counted by others as free.
//!
//! A clean stop withdraws the instance's heartbeats: every lease it still
//! holds stops counting at once.
//!
//! # One lease per connection
//!
//! A connection's member is fixed when it is first claimed, so a claim is
//! idempotent (claiming a member already held admits again without
//! counting twice) and a connection never holds two leases. A claim that
//! timed out here may still run in Redis: its member is removed at once
//! (after the claim, on the same connection), and if the connection was
//! admitted on the local count meanwhile it is *adopted*: the keeper adds
//! that same member back at its next tick.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::Script;
use dashmap::DashMap;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::registry::ConnInfo;
use crate::config::OnUserCap;
use crate::redis_link::{cluster, conn_member, RedisLink, BACKGROUND_TIMEOUT, EVICT_CHANNEL};

/// Prefix of each user's lease set.
pub const LEASE_PREFIX: &str = "portcullis:lease:";
/// Prefix of each user's recently evicted members.
pub const EVICTED_PREFIX: &str = "portcullis:evicted:";
/// Prefix of each bucket's heartbeat hash (field: instance node).
pub const HEARTBEAT_PREFIX: &str = "portcullis:hb:";

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
    /// Shutdown: waits until releases issued so far have reached the store,
    /// and stops vouching for whatever this instance still holds.
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

/// Admission. KEYS[1] the user's lease set, KEYS[2] its evicted set,
/// KEYS[3] the bucket's heartbeats; ARGV: member, node, max, 1 to evict
/// the oldest at the cap, the eviction channel, the member's score
/// (admitted ms), ms an eviction record is kept. Returns `{1, evicted
/// members…}`, `{0}` at the cap, or `{-1}` when this instance's own
/// heartbeat has lapsed (it must re-assert before it counts again).
const CLAIM_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = redis.call('HGET', KEYS[3], ARGV[2])
if not mine or tonumber(mine) <= now then return {-1} end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1} end
local alive = {}
local live = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local node = string.match(m, '^[^/]*/([^/]*)/')
  local ok = false
  if node then
    ok = alive[node]
    if ok == nil then
      local hb = redis.call('HGET', KEYS[3], node)
      ok = (hb and tonumber(hb) > now) or false
      alive[node] = ok
    end
  end
  if ok then live[#live + 1] = m else redis.call('ZREM', KEYS[1], m) end
end
local max = tonumber(ARGV[3])
local out = {1}
if #live >= max then
  if ARGV[4] ~= '1' or max < 1 then return {0} end
  for i = 1, #live - max + 1 do
    redis.call('ZREM', KEYS[1], live[i])
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), live[i])
    redis.call('PUBLISH', ARGV[5], live[i])
    out[#out + 1] = live[i]
  end
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[7]))
end
redis.call('ZADD', KEYS[1], ARGV[6], ARGV[1])
return out
";

/// Extends a live heartbeat. KEYS[1] the bucket's heartbeats; ARGV node,
/// ttl ms. Returns 1 if it was alive (now extended), 0 if it had lapsed
/// (left alone: the caller re-asserts, which sets it).
const BEAT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hb = redis.call('HGET', KEYS[1], ARGV[1])
if not hb or tonumber(hb) <= now then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
return 1
";

/// Re-assertion of leases of one bucket. KEYS[1] the bucket's heartbeats,
/// then pairs (lease set, evicted set); ARGV node, ttl ms, 1 to set the
/// heartbeat after (the last chunk of a full re-assertion), then one member
/// per pair. Re-adds each member (scored by its admitted ms) unless an
/// eviction recorded it; returns the members found evicted.
const REASSERT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local evicted = {}
for i = 2, #KEYS, 2 do
  local m = ARGV[i / 2 + 3]
  redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', now)
  if redis.call('ZSCORE', KEYS[i + 1], m) then
    redis.call('ZREM', KEYS[i], m)
    evicted[#evicted + 1] = m
  else
    redis.call('ZADD', KEYS[i], tonumber(string.sub(m, 1, 15)) or now, m)
  end
end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2])) end
return evicted
";

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_LUA));
static BEAT: LazyLock<Script> = LazyLock::new(|| Script::new(BEAT_LUA));
static REASSERT: LazyLock<Script> = LazyLock::new(|| Script::new(REASSERT_LUA));

/// Leases re-asserted per script call.
const REASSERT_CHUNK: usize = 512;
/// Releases waiting for the keeper; past this a release is dropped (and
/// counted), and that lease stops counting when this instance stops.
const RELEASE_QUEUE: usize = 8192;
/// Releases removed per round trip.
const RELEASE_BATCH: usize = 512;
/// A full re-assertion even when nothing reported a loss: the safety net
/// for a loss nothing could see (a failover of another shard that kept
/// the heartbeats but lost recent claims). Its cost, one `ZADD` per lease
/// every five minutes, is a few thousandths of a µs per connection-second.
pub const REASSERT_EVERY: Duration = Duration::from_secs(300);
/// Eviction records outlive a lost notice by this many lease TTLs.
const EVICTED_TTLS: u64 = 10;

/// The bucket (hash tag) of a user: stable across instances.
pub fn bucket_of(sub: &str, buckets: u32) -> u32 {
    if buckets <= 1 {
        0
    } else {
        u32::from(cluster::crc16(sub.as_bytes())) % buckets
    }
}

pub fn lease_key(bucket: u32, sub: &str) -> String {
    format!("{LEASE_PREFIX}{{{bucket}}}:{sub}")
}

pub fn evicted_key(bucket: u32, sub: &str) -> String {
    format!("{EVICTED_PREFIX}{{{bucket}}}:{sub}")
}

pub fn heartbeat_key(bucket: u32) -> String {
    format!("{HEARTBEAT_PREFIX}{{{bucket}}}")
}

/// A lease this instance holds.
struct Held {
    bucket: u32,
    key: String,
    evicted_key: String,
    member: String,
    /// Not re-asserted once kicked (an evicted connection must not win its
    /// lease back while it closes).
    conn: Arc<ConnInfo>,
}

enum KeeperMsg {
    Release {
        key: String,
        member: String,
    },
    /// A connection admitted without a claim: add its lease (bucket).
    Adopted(u32),
    /// Shutdown: releases so far, then the heartbeats withdrawn.
    Stop(oneshot::Sender<()>),
}

/// The Redis [`UserCaps`], sharing the revocation store's link.
#[derive(Clone)]
pub struct RedisLeases {
    link: Arc<RedisLink>,
    ttl_ms: u64,
    /// Every lease this instance holds, by connection id: what the keeper
    /// re-asserts.
    held: Arc<DashMap<u64, Held>>,
    /// Per bucket, the local time (ms since `epoch`) until which this
    /// instance may count on its heartbeat: the send time of the last beat
    /// that succeeded plus the fence margin of the module notes. 0: not
    /// yet (claims fail until the first beat).
    fence: Arc<Vec<AtomicU64>>,
    epoch: tokio::time::Instant,
    /// Woken whenever a bucket's fence moves forward (a claim that came
    /// just before the first heartbeat waits for it).
    vouch_changed: Arc<tokio::sync::Notify>,
    keeper: mpsc::Sender<KeeperMsg>,
}

impl RedisLeases {
    /// The leases and their keeper task (heartbeats, re-assertion, release).
    pub fn start(link: Arc<RedisLink>, ttl_ms: u64) -> (RedisLeases, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(RELEASE_QUEUE);
        let fence = (0..link.buckets).map(|_| AtomicU64::new(0)).collect();
        let leases = RedisLeases {
            link,
            ttl_ms,
            held: Arc::new(DashMap::new()),
            fence: Arc::new(fence),
            epoch: tokio::time::Instant::now(),
            vouch_changed: Arc::new(tokio::sync::Notify::new()),
            keeper: tx,
        };
        let task = tokio::spawn(keeper(leases.clone(), rx));
        (leases, task)
    }

    /// Waits (at most `within`) until this instance vouches for every
    /// bucket: start-up, so the first claims are not refused for want of a
    /// first heartbeat. Returns at once while the link is down.
    pub async fn ready(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.link.is_up() && tokio::time::Instant::now() < deadline {
            if (0..self.link.buckets).all(|b| self.vouched(b)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn local_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Is this instance's heartbeat in `bucket` good for a claim now?
    fn vouched(&self, bucket: u32) -> bool {
        self.fence.get(bucket as usize).is_some_and(|f| self.local_ms() < f.load(Ordering::Acquire))
    }

    /// A beat sent at local `sent_ms` succeeded: vouched until its fence.
    fn beat_ok(&self, bucket: u32, sent_ms: u64) {
        let until = sent_ms + self.ttl_ms - self.ttl_ms / 10;
        if let Some(f) = self.fence.get(bucket as usize) {
            f.fetch_max(until, Ordering::AcqRel);
        }
        self.vouch_changed.notify_waiters();
    }

    /// Vouched for `bucket` now, or within `within` (the link just came up
    /// and the keeper is re-asserting).
    async fn vouched_within(&self, bucket: u32, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.vouch_changed.notified();
            if self.vouched(bucket) {
                return true;
            }
            if !self.link.is_up() || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.vouched(bucket);
            }
        }
    }

    fn unvouch(&self, bucket: u32) {
        if let Some(f) = self.fence.get(bucket as usize) {
            f.store(0, Ordering::Release);
        }
    }

    /// The connection's member: the one it already has (a claim again, an
    /// adoption after a claim timed out), else a new one, held from now on.
    fn hold(&self, conn: &Arc<ConnInfo>) -> (u32, String, String, String) {
        let held = self.held.entry(conn.id).or_insert_with(|| {
            let bucket = bucket_of(&conn.sub, self.link.buckets);
            Held {
                bucket,
                key: lease_key(bucket, &conn.sub),
                evicted_key: evicted_key(bucket, &conn.sub),
                member: conn_member(crate::clock::unix_ms(), &self.link.node, conn.id),
                conn: conn.clone(),
            }
        });
        (held.bucket, held.key.clone(), held.evicted_key.clone(), held.member.clone())
    }

    /// One heartbeat per bucket; a bucket found lapsed is re-asserted
    /// (which sets its heartbeat again).
    #[doc(hidden)]
    pub async fn beat_all(&self) {
        let Some(conn) = self.link.conn() else { return };
        let beats = (0..self.link.buckets).map(|b| {
            let mut c = conn.clone();
            async move {
                let sent = self.local_ms();
                let mut inv = BEAT.prepare_invoke();
                inv.key(heartbeat_key(b)).arg(&self.link.node).arg(self.ttl_ms);
                let r = tokio::time::timeout(BACKGROUND_TIMEOUT, inv.invoke_async::<i64>(&mut c)).await;
                (b, sent, r)
            }
        });
        let mut lapsed = Vec::new();
        for (b, sent, r) in futures_util::future::join_all(beats).await {
            match r {
                Ok(Ok(1)) => {
                    self.link.succeeded();
                    self.beat_ok(b, sent);
                }
                Ok(Ok(_)) => lapsed.push(b),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "lease heartbeat failed");
                    self.link.failed("lease_renew");
                }
                Err(_) => {
                    tracing::warn!("lease heartbeat timed out");
                    self.link.failed("lease_renew");
                }
            }
        }
        if !lapsed.is_empty() {
            tracing::info!(
                buckets = lapsed.len(),
                "lease heartbeat lapsed: re-asserting this instance's leases"
            );
            self.reassert(Some(&lapsed), true).await;
        }
    }

    /// Re-adds every lease of a live, unkicked connection in `buckets`
    /// (all when `None`), except those an eviction removed: their
    /// connections are closed instead. With `set_heartbeat`, each bucket's
    /// heartbeat is set once all its leases are back.
    #[doc(hidden)]
    pub async fn reassert(&self, buckets: Option<&[u32]>, set_heartbeat: bool) {
        let Some(conn) = self.link.conn() else { return };
        let mut by_bucket: HashMap<u32, Vec<(String, String, String)>> = HashMap::new();
        match buckets {
            Some(bs) => bs.iter().for_each(|b| {
                by_bucket.entry(*b).or_default();
            }),
            None => (0..self.link.buckets).for_each(|b| {
                by_bucket.entry(b).or_default();
            }),
        }
        for h in self.held.iter() {
            if h.conn.kicked_reason().is_some() {
                continue;
            }
            if let Some(v) = by_bucket.get_mut(&h.bucket) {
                v.push((h.key.clone(), h.evicted_key.clone(), h.member.clone()));
            }
        }
        let jobs = by_bucket.into_iter().map(|(b, leases)| {
            let mut c = conn.clone();
            async move {
                let sent = self.local_ms();
                let chunks: Vec<&[(String, String, String)]> =
                    if leases.is_empty() { vec![&[]] } else { leases.chunks(REASSERT_CHUNK).collect() };
                let last = chunks.len() - 1;
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let mut inv = REASSERT.prepare_invoke();
                    inv.key(heartbeat_key(b)).arg(&self.link.node).arg(self.ttl_ms);
                    inv.arg(u8::from(set_heartbeat && i == last));
                    for (key, evicted, member) in chunk {
                        inv.key(key).key(evicted).arg(member);
                    }
                    let call = inv.invoke_async::<Vec<String>>(&mut c);
                    match tokio::time::timeout(BACKGROUND_TIMEOUT, call).await {
                        Ok(Ok(evicted)) => {
                            self.link.succeeded();
                            for m in evicted {
                                self.link.on_evicted(&m);
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "lease re-assertion failed");
                            self.link.failed("lease_renew");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!("lease re-assertion timed out");
                            self.link.failed("lease_renew");
                            return;
                        }
                    }
                }
                if set_heartbeat {
                    self.beat_ok(b, sent);
                }
            }
        });
        futures_util::future::join_all(jobs).await;
    }

    async fn release_batch(&self, batch: &[(String, String)]) {
        let Some(mut conn) = self.link.conn() else {
            // Down: these leases stop counting when this instance's
            // heartbeat lapses, or are removed when it re-asserts (they are
            // no longer held).
            for _ in batch {
                self.link.metrics.store_error("lease_release");
            }
            return;
        };
        // One ZREM each, pipelined where they share a node (a cluster
        // connection splits a pipeline by slot).
        let mut pipe = ::redis::pipe();
        for (key, member) in batch {
            pipe.zrem(key, member).ignore();
        }
        match tokio::time::timeout(BACKGROUND_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => self.link.succeeded(),
            _ => self.link.failed("lease_release"),
        }
    }

    /// Withdraws this instance's heartbeats (a clean stop): whatever it
    /// still holds stops counting at once.
    async fn withdraw(&self) {
        for b in 0..self.link.buckets {
            self.unvouch(b);
        }
        let Some(conn) = self.link.conn() else { return };
        let dels = (0..self.link.buckets).map(|b| {
            let mut c = conn.clone();
            async move {
                let cmd = ::redis::cmd("HDEL").arg(heartbeat_key(b)).arg(&self.link.node).to_owned();
                tokio::time::timeout(BACKGROUND_TIMEOUT, cmd.query_async::<()>(&mut c)).await
            }
        });
        futures_util::future::join_all(dels).await;
    }
}

/// Beats every `ttl / 3` (and re-asserts everything right after a
/// reconnect and every [`REASSERT_EVERY`]), removes released leases as
/// they come, in one task, so a re-assertion never re-adds a lease whose
/// removal it has already sent.
async fn keeper(leases: RedisLeases, mut rx: mpsc::Receiver<KeeperMsg>) {
    let every = Duration::from_millis((leases.ttl_ms / 3).max(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut full = tokio::time::interval(REASSERT_EVERY);
    full.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    full.reset();
    let mut msgs = Vec::with_capacity(RELEASE_BATCH);
    let mut adopted: Vec<u32> = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut msgs, RELEASE_BATCH) => {
                if n == 0 {
                    return;
                }
                let mut batch = Vec::new();
                let mut stopped = Vec::new();
                for m in msgs.drain(..) {
                    match m {
                        KeeperMsg::Release { key, member } => batch.push((key, member)),
                        KeeperMsg::Adopted(b) => {
                            if !adopted.contains(&b) {
                                adopted.push(b);
                            }
                        }
                        KeeperMsg::Stop(done) => stopped.push(done),
                    }
                }
                if !batch.is_empty() {
                    leases.release_batch(&batch).await;
                }
                if !stopped.is_empty() {
                    leases.withdraw().await;
                    for done in stopped {
                        let _ = done.send(());
                    }
                    return;
                }
            }
            _ = tick.tick() => {
                if !adopted.is_empty() {
                    let bs = std::mem::take(&mut adopted);
                    leases.reassert(Some(&bs), false).await;
                }
                leases.beat_all().await;
            }
            _ = full.tick() => leases.reassert(None, true).await,
            _ = leases.link.reconnected.notified() => {
                adopted.clear();
                leases.reassert(None, true).await;
            }
        }
    }
}

#[async_trait::async_trait]
impl UserCaps for RedisLeases {
    async fn claim(&self, conn: &Arc<ConnInfo>, max: usize, policy: OnUserCap) -> Result<(), CapError> {
        let Some(mut c) = self.link.conn() else { return Err(CapError::Unavailable) };
        let bucket = bucket_of(&conn.sub, self.link.buckets);
        // Fenced: this instance could not keep its heartbeat; others may
        // soon (or already) count its leases as free.
        if !self.vouched_within(bucket, self.link.timeout).await {
            return Err(CapError::Unavailable);
        }
        let (bucket, key, evicted, member) = self.hold(conn);
        let mut inv = CLAIM.prepare_invoke();
        inv.key(&key)
            .key(&evicted)
            .key(heartbeat_key(bucket))
            .arg(&member)
            .arg(&self.link.node)
            .arg(max)
            .arg(u8::from(policy == OnUserCap::EvictOldest))
            .arg(EVICT_CHANNEL)
            .arg(member.get(..15).unwrap_or("0"))
            .arg(self.ttl_ms.saturating_mul(EVICTED_TTLS));
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
                // adopted with this same member and the keeper adds it back.
                self.link.failed("lease_claim");
                if self.keeper.try_send(KeeperMsg::Release { key, member }).is_err() {
                    self.link.metrics.store_error("lease_release");
                }
                return Err(CapError::Unavailable);
            }
        };
        self.link.succeeded();
        match out.first() {
            Some(::redis::Value::Int(1)) => {}
            Some(::redis::Value::Int(-1)) => {
                // Our heartbeat lapsed in Redis (restart, failover): the
                // keeper re-asserts; until then, the fallback.
                self.held.remove(&conn.id);
                self.unvouch(bucket);
                return Err(CapError::Unavailable);
            }
            _ => {
                self.held.remove(&conn.id);
                return Err(CapError::Full);
            }
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
        let (bucket, ..) = self.hold(conn);
        // Queue full: the next full re-assertion adds it.
        let _ = self.keeper.try_send(KeeperMsg::Adopted(bucket));
    }

    fn member(&self, id: u64) -> Option<String> {
        self.held.get(&id).map(|h| h.member.clone())
    }

    fn adopt_member(&self, conn: &Arc<ConnInfo>, member: Option<String>) {
        let Some(member) = member else { return self.adopt(conn) };
        // The lease keeps its name (this process took its predecessor's
        // node), so it stays one lease under the same heartbeat.
        let bucket = bucket_of(&conn.sub, self.link.buckets);
        self.held.insert(
            conn.id,
            Held {
                bucket,
                key: lease_key(bucket, &conn.sub),
                evicted_key: evicted_key(bucket, &conn.sub),
                member,
                conn: conn.clone(),
            },
        );
    }

    fn release(&self, conn: &ConnInfo) {
        let Some((_, held)) = self.held.remove(&conn.id) else { return };
        let msg = KeeperMsg::Release { key: held.key, member: held.member };
        if self.keeper.try_send(msg).is_err() {
            // Queue full (Redis slow): the lease stops counting when this
            // instance's heartbeat goes.
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
        if self.keeper.send(KeeperMsg::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_keys_share_one_hash_tag_with_its_buckets_heartbeats() {
        for buckets in [1, cluster::LEASE_BUCKETS] {
            let b = bucket_of("alice", buckets);
            assert!(b < buckets);
            let keys = [lease_key(b, "alice"), evicted_key(b, "alice"), heartbeat_key(b)];
            let slots: Vec<u16> = keys.iter().map(|k| cluster::slot(k)).collect();
            assert!(slots.iter().all(|s| *s == slots[0]), "{keys:?} {slots:?}");
        }
        assert_eq!(lease_key(0, "u"), "portcullis:lease:{0}:u");
        assert_eq!(heartbeat_key(7), "portcullis:hb:{7}");
        // A subject with braces of its own does not move its keys.
        let b = bucket_of("{x}", 64);
        assert_eq!(cluster::slot(&lease_key(b, "{x}")), cluster::slot(&heartbeat_key(b)));
        // Re-assertion walks KEYS two by two after the heartbeats, and
        // ARGV one by one after node, ttl and the flag.
        assert!(REASSERT_LUA.contains("for i = 2, #KEYS, 2 do") && REASSERT_LUA.contains("ARGV[i / 2 + 3]"));
    }

    #[test]
    fn users_spread_over_the_buckets() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            seen.insert(bucket_of(&format!("user-{i}"), cluster::LEASE_BUCKETS));
        }
        assert_eq!(seen.len() as u32, cluster::LEASE_BUCKETS);
    }
}
