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
//! | `portcullis:lease:{<b>}:<sub>` | sorted set | one member per live connection of `sub`, in bucket `b` (see [`crate::session::leases`]) |
//! | `portcullis:evicted:{<b>}:<sub>` | sorted set | lease members evicted lately: re-assertion never re-adds them |
//! | `portcullis:hb:{<b>}` | hash | per instance, until when it vouches for its leases in bucket `b` |
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
//! One task per instance (`sync_loop`) owns the connection: it finds the
//! primary (the server holding `portcullis:revocations`: the URL's, the
//! master the sentinels name, or that key's slot owner on a cluster; see
//! [`crate::redis_link::target`]), opens a command connection and a
//! subscription to it, **resyncs** (pulls the whole set into the mirror,
//! then pushes and publishes every local revocation Redis lacks, such as
//! those made while cut off), and only then declares the link up
//! (`portcullis_store_up` 1). Every second it checks both connections and
//! that the primary is still the master of that key (`ROLE`, and a keyed
//! read that a moved slot answers with `MOVED`); a lost or silent
//! connection, a demoted primary, a sentinel's `+switch-master`, or
//! [`crate::redis_link::FAILURES_DOWN`] failed calls in a row take the link
//! down (gauge 0, callers fall back at once) and the task reconnects with
//! backoff and resyncs again. On a cluster, a change of the topology epoch
//! (a failover elsewhere) resyncs and makes the leases re-assert.
//!
//! # Why pub/sub, and why nothing is lost
//!
//! The broadcast is plain pub/sub, at-most-once by design, because it is
//! never the record: the sorted set is, and every way a message can be
//! missed ends in a resync that reads the set. A subscriber that falls
//! behind is disconnected by Redis (output buffer limit): a reconnect. A
//! failover or a slot move: the health check sees it, a reconnect. A
//! revocation acknowledged by a primary that died before replicating it:
//! the instance that made it keeps it in its mirror and pushes it again at
//! its own reconnect, which publishes it anew. Plain rather than sharded
//! pub/sub: revocations come at human rates, so a cluster-wide broadcast
//! costs nothing worth saving, and a plain subscription survives the key's
//! slot moving between shards (a sharded one is dropped). A stream read
//! from the last id would add a cursor per instance and trimming, and
//! would still need the resync after a failover that lost its tail.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Msg, Script, Value};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::file::FileStore;
use super::{Revocation, RevocationStore, StoreError};
use crate::config::Config;
use crate::config::RedisMode;
use crate::metrics::Metrics;
use crate::redis_link::target::{classify, connect as open_conn, LinkError, Target};
use crate::redis_link::{cluster, sentinel, Conn, RedisLink, BACKGROUND_TIMEOUT, EVICT_CHANNEL};

/// The sorted set of revocations (named in `redis_link`, which must find
/// its Cluster slot before the store exists).
pub use crate::redis_link::REVOCATIONS_KEY;
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
const CONNECT_TIMEOUT: Duration = crate::redis_link::target::CONNECT_TIMEOUT;
/// A credentials or TLS error that persists is logged again this often.
const FATAL_LOG_EVERY: Duration = Duration::from_secs(30);
/// Bound on a whole resync (pull and push), which may move many entries.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: doubles from the first to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));
/// How long start-up waits for the first connection attempt before it
/// serves from the local log alone.
const STARTUP_WAIT: Duration = Duration::from_secs(3);
/// Revocations pushed per script call at a resync.
const PUSH_CHUNK: usize = 256;
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
    /// What to connect to (mode, URL settings, TLS roots).
    target: Arc<Target>,
    /// On a cluster, the slot-aware connection the leases use (kept across
    /// reconnections of the primary: it follows the topology itself).
    cluster: tokio::sync::Mutex<Option<ClusterConnection>>,
    /// Sentinel mode: `+switch-master` announcements of our master.
    switches: Option<watch::Receiver<u64>>,
    /// The local mirror and write-through copy.
    file: FileStore,
    link: Arc<RedisLink>,
    /// Seconds a revocation is kept in Redis past when it was made.
    ttl_s: u64,
    /// A revocation may be missing from Redis (a push failed): the next
    /// health tick resyncs.
    needs_push: AtomicBool,
    /// Connection attempts so far (start-up waits for the first), and the
    /// last attempt's error if retrying cannot fix it (start-up refuses).
    attempts: watch::Sender<(u32, Option<String>)>,
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
        let target = Arc::new(Target::from_config(rc).map_err(StoreError::Backend)?);
        let file = FileStore::open(&rc.path, cfg.auth.max_token_ttl_s)?;
        metrics.set_store_up(false);
        let buckets = if rc.redis_mode == RedisMode::Cluster { cluster::LEASE_BUCKETS } else { 1 };
        let link = Arc::new(RedisLink::new(metrics, Duration::from_millis(rc.redis_timeout_ms), buckets));
        let mut tasks = Vec::new();
        let switches = if rc.redis_mode == RedisMode::Sentinel {
            let (tx, rx) = watch::channel(0);
            tasks.push(tokio::spawn(sentinel::watch(target.clone(), tx)));
            Some(rx)
        } else {
            None
        };
        let inner = Arc::new(Inner {
            target,
            cluster: tokio::sync::Mutex::new(None),
            switches,
            file,
            link: link.clone(),
            ttl_s: cfg.auth.max_token_ttl_s.saturating_add(cfg.auth.leeway_s),
            needs_push: AtomicBool::new(false),
            attempts: watch::channel((0, None)).0,
        });
        let mut attempts = inner.attempts.subscribe();
        let sync = tokio::spawn(sync_loop(inner.clone()));
        tasks.push(sync);
        let store = RedisStore { inner: inner.clone(), tasks: Arc::new(Tasks(std::sync::Mutex::new(tasks))) };
        let first = tokio::time::timeout(STARTUP_WAIT, attempts.wait_for(|(n, _)| *n >= 1)).await;
        if let Ok(Ok(a)) = first {
            if let Some(fatal) = a.1.clone() {
                // Wrong password, ACL, TLS roots: a start that cannot work.
                store.close();
                return Err(StoreError::Backend(fatal));
            }
        }
        if !inner.link.is_up() {
            tracing::warn!(
                url = %inner.target.redacted,
                "redis unreachable at start: serving revocations from the local log, per-user caps by \
                 limits.on_cap_store_error, until it connects"
            );
        }
        Ok(store)
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

/// Checks `revocation.redis_url` and `redis_ca_file` without connecting;
/// its error is what start-up and `check-config` report for them.
pub fn check_target(rc: &crate::config::Revocation) -> Result<(), StoreError> {
    Target::from_config(rc).map(|_| ()).map_err(StoreError::Backend)
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
    let mut fatal_logged: Option<(String, tokio::time::Instant)> = None;
    loop {
        let session = connect(&inner).await;
        let mut fatal = None;
        let up = match session {
            Ok(session) => match resync(&inner, session.conn.clone()).await {
                Ok((learnt, pushed)) => {
                    inner.link.set_up(session.commands.clone());
                    inner.attempts.send_modify(|(n, _)| *n += 1);
                    inner.link.reconnected.notify_one();
                    tracing::info!(learnt, pushed, primary = %session.addr, "redis link up; revocations resynced");
                    backoff = BACKOFF.0;
                    fatal_logged = None;
                    let why = watch_link(&inner, session).await;
                    inner.link.set_down();
                    inner.link.metrics.store_error("subscribe");
                    tracing::warn!(
                        why,
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
            Err(LinkError::Fatal(e)) => {
                // Never a silent retry: logged at error, again while it lasts.
                inner.link.metrics.store_error("subscribe");
                let again =
                    fatal_logged.as_ref().is_none_or(|(m, at)| *m != e || at.elapsed() >= FATAL_LOG_EVERY);
                if again {
                    tracing::error!(error = %e, "redis refused this instance's credentials or TLS; retrying");
                    fatal_logged = Some((e.clone(), tokio::time::Instant::now()));
                }
                fatal = Some(e);
                false
            }
            Err(LinkError::Retry(e)) => {
                inner.link.metrics.store_error("subscribe");
                if was_up {
                    tracing::warn!(error = %e, "redis unreachable; retrying");
                }
                false
            }
        };
        if !up {
            was_up = false;
            inner.attempts.send_modify(|(n, f)| {
                *n += 1;
                *f = fatal;
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// One connection to the primary: its command connection and
/// subscription, what the leases speak through, and its address.
struct Session {
    conn: MultiplexedConnection,
    sink: PubSubSink,
    stream: PubSubStream,
    commands: Conn,
    addr: String,
}

/// Finds the primary, checks it is the master, and opens the command
/// connection and the subscription (subscribed before the resync reads
/// the set, so nothing published in between is missed); on a cluster,
/// also the slot-aware connection if there is none yet.
async fn connect(inner: &Inner) -> Result<Session, LinkError> {
    let (client, addr) = inner.target.primary().await?;
    let mut conn = open_conn(&client, &format!("connecting to {addr}")).await?;
    let opened = tokio::time::timeout(CONNECT_TIMEOUT * 2, async {
        if !is_master(&mut conn).await.map_err(|e| classify("ROLE", &e))? {
            return Err(LinkError::Retry(format!("{addr} is not a master (yet)")));
        }
        let (mut sink, stream) =
            client.get_async_pubsub().await.map_err(|e| classify("subscribing", &e))?.split();
        sink.subscribe(&[REVOKED_CHANNEL, EVICT_CHANNEL]).await.map_err(|e| classify("subscribing", &e))?;
        Ok((sink, stream))
    })
    .await;
    let (sink, stream) = match opened {
        Ok(r) => r?,
        Err(_) => return Err(LinkError::Retry(format!("{addr}: subscribe timed out"))),
    };
    let commands = if inner.target.mode == RedisMode::Cluster {
        let mut slot = inner.cluster.lock().await;
        if slot.is_none() {
            *slot = Some(inner.target.cluster_connection().await?);
        }
        // Just set: `Some`.
        Conn::Cluster(slot.clone().ok_or_else(|| LinkError::Retry("cluster connection".into()))?)
    } else {
        Conn::Single(conn.clone())
    };
    Ok(Session { conn, sink, stream, commands, addr })
}

/// Does the server answer `ROLE` as a master?
async fn is_master(conn: &mut MultiplexedConnection) -> Result<bool, ::redis::RedisError> {
    let role: Value = match ::redis::cmd("ROLE").query_async(conn).await {
        Ok(v) => v,
        // An ACL user without `ROLE` (it is in `@dangerous`): the check is
        // left to the writes, which a replica answers with `READONLY`.
        Err(e) if e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoPerm) => {
            return Ok(true)
        }
        Err(e) => return Err(e),
    };
    Ok(match role {
        Value::Array(v) => match v.first() {
            Some(Value::BulkString(b)) => b.as_slice() == b"master",
            Some(Value::SimpleString(s)) => s == "master",
            _ => false,
        },
        _ => false,
    })
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

/// Serves the subscription until the link is lost (returning why):
/// messages into the mirror (or to the lease owner), and a health check
/// every [`HEALTH_EVERY`] or as soon as a caller reports a failure.
async fn watch_link(inner: &Inner, session: Session) -> &'static str {
    let Session { conn, mut sink, mut stream, commands, .. } = session;
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_resync = tokio::time::Instant::now();
    let mut switches = inner.switches.clone();
    if let Some(s) = switches.as_mut() {
        s.mark_unchanged();
    }
    let mut epoch = None;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(first) = msg else { return "subscription ended" };
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
                    return "subscription ended";
                }
                continue;
            }
            changed = async {
                match switches.as_mut() {
                    Some(s) => s.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if changed.is_ok() {
                    return "sentinel switched the master";
                }
                switches = None;
                continue;
            }
            _ = tick.tick() => {}
            _ = inner.link.suspect.notified() => {}
        }
        match healthy(&conn, &mut sink).await {
            Health::Ok => {}
            Health::Lost(why) => return why,
        }
        // Both connections answer: whatever callers reported was slowness,
        // not a lost link (their failures were counted); up, count cleared.
        inner.link.set_up(commands.clone());
        let mut resync_now =
            inner.needs_push.load(Ordering::Acquire) || last_resync.elapsed() >= RESYNC_EVERY;
        if inner.target.mode == RedisMode::Cluster {
            let mut c = conn.clone();
            if let Ok(Ok(e)) = tokio::time::timeout(HEALTH_TIMEOUT, cluster::epoch(&mut c)).await {
                if epoch.is_some_and(|old| old != e) {
                    // A failover or slot move somewhere: what the old
                    // primaries had not replicated may be gone.
                    tracing::info!(
                        epoch = e,
                        "redis cluster topology changed: leases re-asserted, revocations resynced"
                    );
                    inner.link.reconnected.notify_one();
                    resync_now = true;
                }
                epoch = Some(e);
            }
        }
        if resync_now {
            last_resync = tokio::time::Instant::now();
            match resync(inner, conn.clone()).await {
                Ok((learnt, pushed)) if learnt + pushed > 0 => {
                    tracing::info!(learnt, pushed, "revocations resynced")
                }
                Ok(_) => {}
                Err(e) => {
                    inner.link.metrics.store_error("resync");
                    tracing::warn!(error = %e, "redis resync failed");
                    return "resync failed";
                }
            }
        }
    }
}

enum Health {
    Ok,
    Lost(&'static str),
}

/// Both connections answer, and the primary is still the master of the
/// revocations' key (a demoted one answers `ROLE` as a replica; a moved
/// slot answers the keyed read with `MOVED`).
async fn healthy(conn: &MultiplexedConnection, sink: &mut PubSubSink) -> Health {
    let mut c = conn.clone();
    let checks = async {
        if !is_master(&mut c).await? {
            return Ok(Health::Lost("the primary is no longer a master"));
        }
        ::redis::cmd("EXISTS").arg(REVOCATIONS_KEY).query_async::<()>(&mut c).await?;
        sink.ping::<::redis::Value>().await?;
        Ok::<Health, ::redis::RedisError>(Health::Ok)
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, checks).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) if e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::Moved) => {
            Health::Lost("the revocations' slot moved")
        }
        Ok(Err(_)) => Health::Lost("a health check failed"),
        Err(_) => Health::Lost("a health check timed out"),
    }
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
}
