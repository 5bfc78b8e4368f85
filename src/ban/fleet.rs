//! Bans shared by the fleet (`revocation.backend = "redis"`): a ban made
//! on one instance is enforced by every instance within a second.
//!
//! | name | kind | what |
//! |---|---|---|
//! | `portcullis:{bans}:until` | sorted set | member: the key (`203.0.113.7/32`); score: unix second the ban ends |
//! | `portcullis:{bans}:meta` | hash | key → `reason level started` |
//! | `portcullis:{bans}:version` | integer | bumped by every change |
//!
//! The three share one hash tag, so each script touches one Cluster slot.
//!
//! Each instance polls the version every [`POLL_EVERY`] (one `GET`: Redis
//! cost follows instances, not connections or bans) and, when it moved,
//! reads the set whole and reconciles: bans it lacks start here (origin
//! `fleet`), bans it had from the fleet that are gone were lifted
//! elsewhere, and its own bans Redis lacks (made while Redis was out of
//! reach) are pushed. Polling rather than a channel: nothing is lost while
//! the link is down, a reconnect needs no resubscription, and the resync is
//! the normal path, not a special one.
//!
//! Fail open: while Redis is down, nothing new is learnt and the bans
//! already known run out as they would; a Redis outage never bans anyone.
//! A Redis that lost its data (no version key) gets every active local ban
//! pushed back rather than lifting them here.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::Script;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{BanKey, BanReason, Bans, Change, Entry, Origin};
use crate::config;
use crate::redis_link::{Conn, RedisLink, BACKGROUND_TIMEOUT};

pub const UNTIL_KEY: &str = "portcullis:{bans}:until";
pub const META_KEY: &str = "portcullis:{bans}:meta";
pub const VERSION_KEY: &str = "portcullis:{bans}:version";

/// How often each instance looks for changes: half the one-second bound.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// Local changes queued for Redis before new ones wait for the next resync.
const QUEUE: usize = 4096;

/// Adds or lengthens bans. KEYS: until, meta, version; ARGV: (key, until,
/// meta) triples. Returns the version after.
const PUSH_LUA: &str = r"
local changed = false
for i = 1, #ARGV, 3 do
  local cur = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if (not cur) or tonumber(cur) < tonumber(ARGV[i + 1]) then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
    changed = true
  end
end
if changed then redis.call('INCR', KEYS[3]) end
return redis.call('GET', KEYS[3])
";

/// Lifts bans. KEYS: until, meta, version; ARGV: keys.
const LIFT_LUA: &str = r"
for i = 1, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
redis.call('INCR', KEYS[3])
return redis.call('GET', KEYS[3])
";

/// Drops ended bans (by Redis's clock) and returns
/// {version, {key, until, ...}, {meta, ...}}. KEYS: until, meta, version.
const PULL_LUA: &str = r"
local now = tonumber(redis.call('TIME')[1])
local ended = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #ended > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(ended))
end
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local keys = {}
for i = 1, #all, 2 do keys[#keys + 1] = all[i] end
local meta = {}
if #keys > 0 then meta = redis.call('HMGET', KEYS[2], unpack(keys)) end
return {redis.call('GET', KEYS[3]), all, meta}
";

static PUSH: LazyLock<Script> = LazyLock::new(|| Script::new(PUSH_LUA));
static LIFT: LazyLock<Script> = LazyLock::new(|| Script::new(LIFT_LUA));
static PULL: LazyLock<Script> = LazyLock::new(|| Script::new(PULL_LUA));

/// Connects `bans` to the fleet: local changes are pushed at once, and
/// the fleet's polled. `ban_cfg` reads the `[ban]` section in force.
pub fn start(
    bans: Arc<Bans>,
    link: Arc<RedisLink>,
    ban_cfg: impl Fn() -> config::Ban + Send + Sync + 'static,
) -> JoinHandle<()> {
    let (tx, rx) = mpsc::channel::<Change>(QUEUE);
    bans.add_sink(Box::new(move |c| {
        if matches!(c, Change::Ban(_, e) if e.dry) {
            return;
        }
        // Full: the next resync pushes what this one would have.
        let _ = tx.try_send(c.clone());
    }));
    tokio::spawn(sync(bans, link, rx, ban_cfg))
}

async fn sync(
    bans: Arc<Bans>,
    link: Arc<RedisLink>,
    mut rx: mpsc::Receiver<Change>,
    ban_cfg: impl Fn() -> config::Ban,
) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The version last reconciled; `None`: resync at the next chance.
    let mut seen: Option<i64> = None;
    loop {
        tokio::select! {
            c = rx.recv() => {
                let Some(c) = c else { return };
                let mut batch = vec![c];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                if let Some(conn) = link.conn() {
                    match push_changes(conn, &bans, &batch).await {
                        Ok(()) => link.succeeded(),
                        Err(()) => { link.failed("ban_sync"); seen = None; }
                    }
                } else {
                    seen = None;
                }
            }
            _ = tick.tick() => {
                let Some(mut conn) = link.conn() else { seen = None; continue };
                let version = tokio::time::timeout(
                    BACKGROUND_TIMEOUT,
                    ::redis::cmd("GET").arg(VERSION_KEY).query_async::<Option<i64>>(&mut conn),
                ).await;
                let version = match version {
                    Ok(Ok(v)) => v,
                    _ => { link.failed("ban_sync"); seen = None; continue }
                };
                if seen.is_some() && seen == version {
                    continue;
                }
                match resync(conn, &bans, &ban_cfg()).await {
                    Ok(v) => { link.succeeded(); seen = v; }
                    Err(()) => { link.failed("ban_sync"); seen = None; }
                }
            }
        }
    }
}

fn meta(e: &Entry) -> String {
    format!("{} {} {}", e.reason.label(), e.level, e.started)
}

fn parse_entry(until: f64, meta: Option<&str>) -> Option<Entry> {
    let mut parts = meta?.split(' ');
    let reason = BanReason::parse(parts.next()?)?;
    let level = parts.next()?.parse().ok()?;
    let started = parts.next()?.parse().ok()?;
    Some(Entry {
        until: until as u32,
        started,
        level,
        reason,
        origin: Origin::Fleet,
        dry: false,
        synced: true,
        ended: false,
    })
}

async fn push_changes(mut conn: Conn, bans: &Bans, batch: &[Change]) -> Result<(), ()> {
    let mut push = PUSH.prepare_invoke();
    let mut lift = LIFT.prepare_invoke();
    let (mut pushes, mut lifts) = (Vec::new(), 0);
    for key in [UNTIL_KEY, META_KEY, VERSION_KEY] {
        push.key(key);
        lift.key(key);
    }
    for c in batch {
        match c {
            Change::Ban(k, e) => {
                push.arg(k.to_string()).arg(e.until).arg(meta(e));
                pushes.push(*k);
            }
            Change::Lift(k) => {
                lift.arg(k.to_string());
                lifts += 1;
            }
        }
    }
    // Lifts after bans: a ban then its lift in one batch ends lifted.
    if !pushes.is_empty() {
        call(push.invoke_async::<Option<i64>>(&mut conn)).await?;
        for k in pushes {
            bans.mark_synced(k);
        }
    }
    if lifts > 0 {
        call(lift.invoke_async::<Option<i64>>(&mut conn)).await?;
    }
    Ok(())
}

async fn call<T>(f: impl std::future::Future<Output = ::redis::RedisResult<T>>) -> Result<T, ()> {
    match tokio::time::timeout(BACKGROUND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "ban sync failed");
            Err(())
        }
        Err(_) => Err(()),
    }
}

/// Reads the fleet's bans whole and reconciles (module doc). Returns the
/// version it reconciled.
async fn resync(mut conn: Conn, bans: &Bans, cfg: &config::Ban) -> Result<Option<i64>, ()> {
    let mut pull = PULL.prepare_invoke();
    for key in [UNTIL_KEY, META_KEY, VERSION_KEY] {
        pull.key(key);
    }
    type Pulled = (Option<i64>, Vec<(String, f64)>, Vec<Option<String>>);
    let (version, all, metas): Pulled = call(pull.invoke_async(&mut conn)).await?;
    let mut fleet: HashMap<BanKey, Entry> = HashMap::with_capacity(all.len());
    for ((key, until), m) in all.iter().zip(metas.iter()) {
        if let (Ok(k), Some(e)) = (BanKey::parse(key), parse_entry(*until, m.as_deref())) {
            fleet.insert(k, e);
        }
    }
    let now = crate::clock::unix_now();
    let lost = version.is_none();
    let mut missing = Vec::new();
    for (k, e) in bans.snapshot() {
        if !e.active(now) || fleet.contains_key(&k) {
            continue;
        }
        if e.synced && !lost {
            bans.lifted_by_fleet(k);
        } else {
            missing.push(Change::Ban(k, e));
        }
    }
    for (k, e) in fleet {
        bans.from_fleet(cfg, k, e);
    }
    if !missing.is_empty() {
        tracing::info!(event = "ban_resync", pushed = missing.len(), "bans Redis lacked pushed to the fleet");
        push_changes(conn, bans, &missing).await?;
        // What we pushed moved the version: read it again next tick.
        return Ok(None);
    }
    Ok(version)
}
