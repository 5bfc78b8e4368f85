//! The shared store (`revocation.backend = "redis"`): revocations and
//! per-user connection leases kept in Redis, so a fleet of gateways behind
//! one load balancer revokes and caps as one.
//!
//! # What lives in Redis
//!
//! | name | kind | what |
//! |---|---|---|
//! | `portcullis:revocations` | sorted set | member: the revocation as JSON (`{"jti":"…"}` or `{"sub":"…","before":T}`); score: unix second it expires (see below) |
//! | `portcullis:revoked` | channel | a member, published when it is first added |
//! | `portcullis:lease:<sub>` | sorted set | one member per live connection of `sub` (see [`crate::session::leases`]) |
//! | `portcullis:evicted:<sub>` | sorted set | lease members evicted lately: renewal never re-adds them |
//! | `portcullis:evict` | channel | a lease member whose connection its owner must close (`evict_oldest`) |
//!
//! A revocation expires `auth.max_token_ttl_s` + `auth.leeway_s` after it
//! was made (a `jti`) or after its cut-off (a subject): no token it could
//! match is accepted after that.
//!
//! # The local mirror
//!
//! Lookups never touch Redis. Each instance keeps every revocation in the
//! [`FileStore`] at `revocation.path` (memory + fsync'd log): its own, those
//! heard on the channel and those read at a resync. So the handshake path
//! reads memory only, an instance starts with what it knew, and a Redis
//! restart without persistence loses nothing: every instance pushes what
//! Redis lacks back at its next resync.
//!
//! # The link
//!
//! One task per instance (`sync_loop`) owns the connection: it opens a
//! command connection and a subscription, **resyncs** (pulls the whole set
//! into the mirror, then pushes and publishes every local revocation Redis
//! lacks, such as those made while cut off), and only then declares the
//! link up (`portcullis_store_up` 1). It pings both connections every
//! second; a lost or silent connection, or [`crate::redis_link::FAILURES_DOWN`]
//! failed calls in a row, take the link down (gauge 0, callers fall back at once) and the task
//! reconnects with backoff and resyncs again. Messages published while the
//! link was down are thus never needed: the resync reads the set itself.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use ::redis::io::tcp::TcpSettings;
use ::redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, Msg, Script};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::file::FileStore;
use super::{Revocation, RevocationStore, StoreError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::redis_link::{RedisLink, BACKGROUND_TIMEOUT, EVICT_CHANNEL};

/// The sorted set of revocations.
pub const REVOCATIONS_KEY: &str = "portcullis:revocations";
/// Where a newly added revocation is announced.
pub const REVOKED_CHANNEL: &str = "portcullis:revoked";

/// A full resync even while the link stays up: a safety net for whatever
/// the channel cannot announce (Redis evicting the set under `maxmemory`,
/// a message lost without the connection dropping).
const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// How often the link is pinged (both connections).
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// A ping slower than this takes the link down.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on opening a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on a whole resync (pull and push), which may move many entries.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: doubles from the first to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));
/// How long start-up waits for the first connection attempt before it
/// serves from the local log alone.
const STARTUP_WAIT: Duration = Duration::from_secs(3);
/// Revocations pushed per script call at a resync.
const PUSH_CHUNK: usize = 256;
/// Commands the multiplexed connection may queue (a handshake burst claims
/// leases concurrently; the default of 50 would make them queue).
const PIPELINE_BUFFER: usize = 4096;
/// Channel messages handled together (one fsync for their revocations).
const MESSAGE_BATCH: usize = 1024;

/// Adds revocations (`ZADD NX`) and publishes each one that was new, so a
/// repeated push neither duplicates nor re-announces. The key then lives
/// until its last entry expires. KEYS[1] the set; ARGV[1] the channel,
/// then (expiry score, member) pairs.
const PUSH_LUA: &str = r"
local added = 0
for i = 2, #ARGV, 2 do
  if redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('PUBLISH', ARGV[1], ARGV[i + 1])
    added = added + 1
  end
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(last[2]))) end
return added
";

/// Drops expired revocations (by Redis's clock) and returns the rest as
/// a flat member, score list. KEYS[1] the set.
const PULL_LUA: &str = r"
local now = redis.call('TIME')[1]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
";

/// Scripts are hashed once; `invoke_async` runs them by hash (EVALSHA) and
/// loads them on a `NOSCRIPT` answer (a restarted Redis).
static PUSH: LazyLock<Script> = LazyLock::new(|| Script::new(PUSH_LUA));
static PULL: LazyLock<Script> = LazyLock::new(|| Script::new(PULL_LUA));

fn now() -> u64 {
    crate::clock::unix_now()
}

/// A revocation as a set member and channel message.
pub fn member(r: &Revocation) -> String {
    // Serializing an enum of strings and integers cannot fail.
    serde_json::to_string(r).unwrap_or_default()
}

/// The revocation a member or message names, if it is well-formed.
pub fn parse_member(m: &str) -> Option<Revocation> {
    match serde_json::from_str::<Revocation>(m).ok()? {
        Revocation::Jti { jti } if !jti.is_empty() => Some(Revocation::Jti { jti }),
        Revocation::Subject { sub, before } if !sub.is_empty() => Some(Revocation::Subject { sub, before }),
        _ => None,
    }
}

struct Inner {
    client: Client,
    /// The local mirror and write-through copy.
    file: FileStore,
    link: Arc<RedisLink>,
    /// Seconds a revocation is kept in Redis past when it was made.
    ttl_s: u64,
    /// A revocation may be missing from Redis (a push failed): the next
    /// health tick resyncs.
    needs_push: AtomicBool,
    /// Connection attempts so far (start-up waits for the first).
    attempts: watch::Sender<u32>,
}

/// The Redis-backed [`RevocationStore`]; also hands out the fleet-wide
/// per-user cap ([`crate::session::leases::RedisLeases`]) shares its
/// [`link`](RedisStore::link).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
    /// The sync task and the lease keeper, stopped by [`close`](Self::close)
    /// or when the last handle to the store goes (a gateway that failed to
    /// start, or was never run, leaves no task reconnecting forever).
    tasks: Arc<Tasks>,
}

struct Tasks(std::sync::Mutex<Vec<JoinHandle<()>>>);

impl Tasks {
    fn abort(&self) {
        // A poisoned lock only means a panicking closer; the handles are still valid.
        let tasks = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            t.abort();
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.abort();
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("file", &self.inner.file)
            .field("up", &self.inner.link.is_up())
            .finish()
    }
}

impl RedisStore {
    /// Loads the local log, starts the link, and waits (at most a few
    /// seconds) for the first connection and resync; if Redis is not
    /// there yet the gateway serves from the local log and connects later.
    pub async fn open(cfg: &Config, metrics: Arc<Metrics>) -> Result<RedisStore, StoreError> {
        let rc = &cfg.revocation;
        let client = client_for(&rc.redis_url)?;
        let file = FileStore::open(&rc.path, cfg.auth.max_token_ttl_s)?;
        metrics.set_store_up(false);
        let link = Arc::new(RedisLink::new(metrics, Duration::from_millis(rc.redis_timeout_ms)));
        let inner = Arc::new(Inner {
            client,
            file,
            link: link.clone(),
            ttl_s: cfg.auth.max_token_ttl_s.saturating_add(cfg.auth.leeway_s),
            needs_push: AtomicBool::new(false),
            attempts: watch::channel(0).0,
        });
        let mut attempts = inner.attempts.subscribe();
        let sync = tokio::spawn(sync_loop(inner.clone()));
        let _ = tokio::time::timeout(STARTUP_WAIT, attempts.wait_for(|n| *n >= 1)).await;
        if !inner.link.is_up() {
            tracing::warn!(
                url = %redact(&rc.redis_url),
                "redis unreachable at start: serving revocations from the local log, per-user caps by \
                 limits.on_cap_store_error, until it connects"
            );
        }
        Ok(RedisStore { inner, tasks: Arc::new(Tasks(std::sync::Mutex::new(vec![sync]))) })
    }

    /// The link this store keeps up, for the leases to share.
    pub fn link(&self) -> Arc<RedisLink> {
        self.inner.link.clone()
    }

    /// Ties a task using the link (the lease keeper) to this store's life:
    /// stopped by [`close`](Self::close) or with the last handle.
    pub fn own_task(&self, task: JoinHandle<()>) {
        self.tasks.0.lock().unwrap_or_else(|e| e.into_inner()).push(task);
    }

    /// The local mirror and write-through log (compacted by housekeeping).
    pub fn file(&self) -> &FileStore {
        &self.inner.file
    }

    /// Is the link to Redis up?
    pub fn is_up(&self) -> bool {
        self.inner.link.is_up()
    }

    /// Stops the link's tasks (the gateway has stopped).
    pub fn close(&self) {
        self.tasks.abort();
        self.inner.link.set_down();
    }
}

/// The client for `revocation.redis_url` (no connection made yet); its
/// error is what start-up and `check-config` report for a bad URL.
pub fn client_for(url: &str) -> Result<Client, StoreError> {
    let bad_url = |e: ::redis::RedisError| StoreError::Backend(format!("revocation.redis_url: {e}"));
    // TCP_NODELAY: a lease claim is one small request a handshake waits
    // for; Nagle would hold it back behind the previous one's ACK.
    let info = url
        .into_connection_info()
        .map_err(bad_url)?
        .set_tcp_settings(TcpSettings::default().set_nodelay(true));
    Client::open(info).map_err(bad_url)
}

/// `redis://user:password@host` → `redis://host` for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[async_trait::async_trait]
impl RevocationStore for RedisStore {
    fn is_revoked(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool {
        self.inner.file.set().is_revoked(sub, jti, iat)
    }

    /// Durable in the local log first (that is what the caller waits for);
    /// then added to Redis and published, bounded. A Redis failure is
    /// counted (`store_errors_total{op="revoke"}`) and left to the resync,
    /// which pushes whatever Redis lacks: never an error for the caller.
    async fn revoke(&self, r: Revocation) -> Result<(), StoreError> {
        self.inner.file.revoke(r.clone()).await?;
        let score = expiry(&r, now(), self.inner.ttl_s);
        let Some(mut conn) = self.inner.link.conn() else {
            self.inner.needs_push.store(true, Ordering::Release);
            self.inner.link.metrics.store_error("revoke");
            return Ok(());
        };
        let mut inv = PUSH.prepare_invoke();
        inv.key(REVOCATIONS_KEY).arg(REVOKED_CHANNEL).arg(score).arg(member(&r));
        let call = inv.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(BACKGROUND_TIMEOUT, call).await {
            Ok(Ok(_)) => self.inner.link.succeeded(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "revocation not published to redis; the resync will push it");
                self.inner.needs_push.store(true, Ordering::Release);
                self.inner.link.failed("revoke");
            }
            Err(_) => {
                tracing::warn!("revocation publish to redis timed out; the resync will push it");
                self.inner.needs_push.store(true, Ordering::Release);
                self.inner.link.failed("revoke");
            }
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.inner.file.set().len()
    }

    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        // The file store broadcasts every revocation it records: local
        // ones, those heard on the channel and those a resync brings.
        self.inner.file.subscribe()
    }
}

/// The unix second a revocation made at `at` stops mattering: `ttl_s`
/// after it was made (a `jti`), or after its cut-off (a subject, whose
/// tokens were all issued before `before`).
/// Capped at the end of year 9999, which Redis accepts as an expiry (an
/// admin's absurd `before` must not make every push fail).
fn expiry(r: &Revocation, at: u64, ttl_s: u64) -> u64 {
    const LATEST: u64 = 253_402_300_799;
    match r {
        Revocation::Jti { .. } => at.saturating_add(ttl_s),
        Revocation::Subject { before, .. } => (*before).saturating_add(ttl_s),
    }
    .min(LATEST)
}

/// The link's life: connect, resync, watch; on any loss, back off and
/// start over. Never returns (aborted by [`RedisStore::close`]).
async fn sync_loop(inner: Arc<Inner>) {
    let mut backoff = BACKOFF.0;
    let mut was_up = true; // so the first failure is logged
    loop {
        let session = connect(&inner.client).await;
        let up = match session {
            Ok((conn, sink, stream)) => match resync(&inner, conn.clone()).await {
                Ok((learnt, pushed)) => {
                    inner.link.set_up(conn.clone());
                    inner.attempts.send_modify(|n| *n += 1);
                    inner.link.reconnected.notify_one();
                    tracing::info!(learnt, pushed, "redis link up; revocations resynced");
                    backoff = BACKOFF.0;
                    watch_link(&inner, conn, sink, stream).await;
                    inner.link.set_down();
                    inner.link.metrics.store_error("subscribe");
                    tracing::warn!(
                        "redis link lost: revocations served from the local mirror, per-user caps by \
                         limits.on_cap_store_error, until it reconnects"
                    );
                    was_up = false;
                    true
                }
                Err(e) => {
                    inner.link.metrics.store_error("resync");
                    if was_up {
                        tracing::warn!(error = %e, "redis resync failed; retrying");
                    }
                    false
                }
            },
            Err(e) => {
                inner.link.metrics.store_error("subscribe");
                if was_up {
                    tracing::warn!(error = %e, "redis unreachable; retrying");
                }
                false
            }
        };
        if !up {
            was_up = false;
            inner.attempts.send_modify(|n| *n += 1);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

type Session = (MultiplexedConnection, PubSubSink, PubSubStream);

/// Opens the command connection and the subscription (subscribed before
/// the resync reads the set, so nothing published in between is missed).
async fn connect(client: &Client) -> Result<Session, String> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None)
        .set_pipeline_buffer_size(PIPELINE_BUFFER);
    let opened = tokio::time::timeout(CONNECT_TIMEOUT * 2, async {
        let conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        let (mut sink, stream) = client.get_async_pubsub().await?.split();
        sink.subscribe(&[REVOKED_CHANNEL, EVICT_CHANNEL]).await?;
        Ok::<_, ::redis::RedisError>((conn, sink, stream))
    })
    .await;
    match opened {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

/// Pulls Redis's set into the mirror (kicking live connections it covers,
/// through the broadcast), then pushes every unexpired local revocation
/// Redis lacks. Returns (learnt, pushed).
async fn resync(inner: &Inner, mut conn: MultiplexedConnection) -> Result<(usize, usize), String> {
    let work = async {
        let flat: Vec<String> =
            PULL.key(REVOCATIONS_KEY).invoke_async(&mut conn).await.map_err(|e| format!("pull: {e}"))?;
        let mut remote = HashSet::with_capacity(flat.len() / 2);
        let mut items = Vec::new();
        for pair in flat.chunks_exact(2) {
            let Some(r) = parse_member(&pair[0]) else { continue };
            let score = pair[1].parse::<f64>().map_or(0, |s| s as u64);
            let at = match &r {
                Revocation::Jti { .. } => score.saturating_sub(inner.ttl_s).min(now()),
                Revocation::Subject { before, .. } => *before,
            };
            items.push((r, at));
            remote.insert(pair[0].clone());
        }
        inner.needs_push.store(false, Ordering::Release);
        let learnt = inner.file.absorb(items).await.map_err(|e| e.to_string())?.len();
        let now = now();
        let missing: Vec<(u64, String)> = inner
            .file
            .set()
            .entries()
            .into_iter()
            .map(|(r, at)| (expiry(&r, at, inner.ttl_s), member(&r)))
            .filter(|(exp, m)| *exp > now && !remote.contains(m))
            .collect();
        let mut pushed = 0;
        for chunk in missing.chunks(PUSH_CHUNK) {
            let mut inv = PUSH.prepare_invoke();
            inv.key(REVOCATIONS_KEY).arg(REVOKED_CHANNEL);
            for (score, m) in chunk {
                inv.arg(*score).arg(m);
            }
            pushed += inv.invoke_async::<usize>(&mut conn).await.map_err(|e| format!("push: {e}"))?;
        }
        Ok((learnt, pushed))
    };
    match tokio::time::timeout(RESYNC_TIMEOUT, work).await {
        Ok(r) => {
            if r.is_err() {
                inner.needs_push.store(true, Ordering::Release);
            }
            r
        }
        Err(_) => {
            inner.needs_push.store(true, Ordering::Release);
            Err("resync timed out".into())
        }
    }
}

/// Serves the subscription until the link is lost: messages into the
/// mirror (or to the lease owner), and a ping of both connections every
/// [`HEALTH_EVERY`] or as soon as a caller reports a failure.
async fn watch_link(
    inner: &Inner,
    conn: MultiplexedConnection,
    mut sink: PubSubSink,
    mut stream: PubSubStream,
) {
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_resync = tokio::time::Instant::now();
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(first) = msg else { return };
                // Take what else has arrived: a burst (another instance's
                // resync pushing many) costs one fsync, not one each.
                let mut batch = vec![first];
                let mut ended = false;
                while batch.len() < MESSAGE_BATCH {
                    match stream.next().now_or_never() {
                        Some(Some(m)) => batch.push(m),
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                on_messages(inner, &batch).await;
                if ended {
                    return;
                }
                continue;
            }
            _ = tick.tick() => {}
            _ = inner.link.suspect.notified() => {}
        }
        if !healthy(&conn, &mut sink).await {
            return;
        }
        // Both connections answer: whatever callers reported was slowness,
        // not a lost link (their failures were counted); up, count cleared.
        inner.link.set_up(conn.clone());
        if inner.needs_push.load(Ordering::Acquire) || last_resync.elapsed() >= RESYNC_EVERY {
            last_resync = tokio::time::Instant::now();
            match resync(inner, conn.clone()).await {
                Ok((learnt, pushed)) if learnt + pushed > 0 => {
                    tracing::info!(learnt, pushed, "revocations resynced")
                }
                Ok(_) => {}
                Err(e) => {
                    inner.link.metrics.store_error("resync");
                    tracing::warn!(error = %e, "redis resync failed");
                    return;
                }
            }
        }
    }
}

async fn healthy(conn: &MultiplexedConnection, sink: &mut PubSubSink) -> bool {
    let mut c = conn.clone();
    let pings = async {
        ::redis::cmd("PING").query_async::<()>(&mut c).await?;
        sink.ping::<::redis::Value>().await?;
        Ok::<(), ::redis::RedisError>(())
    };
    matches!(tokio::time::timeout(HEALTH_TIMEOUT, pings).await, Ok(Ok(())))
}

async fn on_messages(inner: &Inner, batch: &[Msg]) {
    let mut revoked = Vec::new();
    for m in batch {
        let Ok(payload) = m.get_payload::<String>() else { continue };
        match m.get_channel_name() {
            REVOKED_CHANNEL => match parse_member(&payload) {
                Some(r) => revoked.push((r, now())),
                None => tracing::warn!("malformed revocation on the redis channel ignored"),
            },
            EVICT_CHANNEL => inner.link.on_evicted(&payload),
            _ => {}
        }
    }
    if revoked.is_empty() {
        return;
    }
    if let Err(e) = inner.file.absorb(revoked).await {
        // Not in memory either (absorb inserts after the write): the
        // resync at the next health tick brings them again.
        inner.needs_push.store(true, Ordering::Release);
        tracing::error!(error = %e, "revocations from redis not recorded locally");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_round_trip_and_refuse_junk() {
        for r in [Revocation::Jti { jti: "j1".into() }, Revocation::Subject { sub: "bob".into(), before: 7 }]
        {
            assert_eq!(parse_member(&member(&r)), Some(r));
        }
        assert_eq!(member(&Revocation::Jti { jti: "a".into() }), r#"{"jti":"a"}"#);
        for junk in ["", "{}", r#"{"jti":""}"#, r#"{"sub":"","before":1}"#, r#"{"sub":"x"}"#, "nope"] {
            assert_eq!(parse_member(junk), None, "{junk}");
        }
    }

    #[test]
    fn expiry_follows_the_longest_token_a_revocation_can_match() {
        assert_eq!(expiry(&Revocation::Jti { jti: "a".into() }, 100, 50), 150);
        assert_eq!(expiry(&Revocation::Subject { sub: "s".into(), before: 300 }, 100, 50), 350);
        assert_eq!(expiry(&Revocation::Subject { sub: "s".into(), before: u64::MAX }, 1, 1), 253_402_300_799);
    }

    #[test]
    fn urls_are_redacted_for_logs() {
        assert_eq!(redact("redis://u:secret@h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact("unix:///tmp/r.sock"), "unix:///tmp/r.sock");
    }
}
