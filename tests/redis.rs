//! The Redis backend against a real `redis-server` that each test starts
//! on a unix socket in a temp dir (no persistence, killed on drop): several
//! gateway instances share revocations and per-user caps through it, and
//! keep serving when it goes away.
//!
//! `redis-server` must be installed (`./scripts/test.sh` installs it); a
//! missing one fails these tests, it never skips them.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use portcullis::config::{Config, OnCapStoreError, OnUserCap, RevocationBackend};
use tokio::time::Instant;

/// A `redis-server` of our own; killed on drop.
struct Redis {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        let mut r = Redis { dir: dir.to_owned(), socket: dir.join("redis.sock"), child: None };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Starts it (again, empty: no persistence) and waits until it answers.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let spawned = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args(["--unixsocketperm", "700", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed, and the Redis tests need a real one: install it \
                 (Debian: apt-get install redis-server) or run ./scripts/test.sh, which does"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "redis-server did not answer within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(&self.socket) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// One command, its raw RESP reply (waits out a `CLIENT PAUSE`).
    fn cmd(&self, args: &[&str]) -> String {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// The number of members of a sorted set.
    fn zcard(&self, key: &str) -> u64 {
        let r = self.cmd(&["ZCARD", key]);
        r.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("ZCARD {key}: {r:?}"))
    }

    /// Kills it (SIGKILL: an outage, not a shutdown).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An instance's configuration: its own log in `dir/<name>`, the shared Redis.
fn instance(dir: &Path, name: &str, redis: &Redis) -> Config {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let mut c = config(&d);
    c.revocation.backend = RevocationBackend::Redis;
    c.revocation.redis_url = redis.url();
    c.revocation.lease_ttl_ms = 1000;
    c
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// A handshake's HTTP status (the socket is dropped right after).
async fn status(addr: SocketAddr, token: &str) -> u16 {
    raw(addr, upgrade_request("/", &[("Authorization", &bearer(token))]).as_bytes()).await.status
}

async fn readyz(gw: &TestGateway) -> (u16, serde_json::Value) {
    let a = http(gw.admin, "GET", "/readyz", &[], "").await;
    (a.status, serde_json::from_str(body(&a)).unwrap())
}

const UP: &str = "portcullis_store_up";

fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

#[tokio::test]
async fn revoking_on_one_instance_closes_connections_on_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let a = start(instance(dir.path(), "a", &redis)).await;
    let b = start(instance(dir.path(), "b", &redis)).await;
    assert_eq!(a.metric(UP).await, 1.0);
    assert_eq!(readyz(&b).await.1["store"], "up");

    // By subject: revoked on A, the connection lives on B.
    let bob = token("bob");
    let mut on_b = ws(b.public, &bob).await;
    echo(&mut on_b, "hi").await;
    // `before` a second ahead: a token minted this very second counts.
    let answer = a.revoke(&format!(r#"{{"sub":"bob","before":{}}}"#, now() + 1)).await;
    assert_eq!(answer.status, 200);
    assert!(body(&answer).contains(r#""closed":0"#), "{}", body(&answer));
    let (code, took) = close_code(&mut on_b, Duration::from_secs(2)).await;
    assert_eq!(code, Some(1008));
    assert!(took < Duration::from_secs(1), "closed on B after {took:?}");
    // B's mirror refuses the token from now on, without asking Redis.
    assert_eq!(status(b.public, &bob).await, 401);

    // By jti, the other way round.
    let t = token_with(serde_json::json!({ "sub": "eve", "jti": "j-42" }));
    let mut on_a = ws(a.public, &t).await;
    assert_eq!(b.revoke(r#"{"jti":"j-42"}"#).await.status, 200);
    let (code, took) = close_code(&mut on_a, Duration::from_secs(2)).await;
    assert_eq!(code, Some(1008));
    assert!(took < Duration::from_secs(1), "closed on A after {took:?}");
    a.wait_metric("portcullis_disconnects_total{reason=\"revoked\"}", 1.0).await;
    b.wait_metric("portcullis_disconnects_total{reason=\"revoked\"}", 1.0).await;
    a.wait_metric("portcullis_revocations", 2.0).await;
    b.wait_metric("portcullis_revocations", 2.0).await;

    // Each instance wrote both through to its own log.
    for name in ["a", "b"] {
        let log = std::fs::read_to_string(dir.path().join(name).join("revocations.log")).unwrap();
        assert!(log.contains(r#""sub":"bob""#) && log.contains(r#""jti":"j-42""#), "{name}: {log}");
    }
    // A third instance starting now learns both at its first sync.
    let c = start(instance(dir.path(), "c", &redis)).await;
    assert_eq!(c.metric("portcullis_revocations").await, 2.0);
    assert_eq!(status(c.public, &t).await, 401);
    // Across a health tick or two (pings on a subscribed connection), no
    // Redis call fails anywhere: checked all along, not after a sleep.
    let until = Instant::now() + Duration::from_millis(1100);
    while Instant::now() < until {
        for g in [&a, &b, &c] {
            assert_eq!(g.metric(UP).await, 1.0);
            assert_eq!(g.metric("portcullis_store_errors_total{op=\"subscribe\"}").await, 0.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for g in [a, b, c] {
        g.assert_gauges_zero().await;
        assert_eq!(g.metric(UP).await, 1.0);
        for op in ["revoke", "resync", "subscribe", "lease_claim", "lease_renew", "lease_release"] {
            assert_eq!(g.metric(&format!("portcullis_store_errors_total{{op=\"{op}\"}}")).await, 0.0, "{op}");
        }
        g.stop().await;
    }
}

#[tokio::test]
async fn the_per_user_cap_holds_across_instances() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let mut cfg = instance(dir.path(), "a", &redis);
    cfg.limits.per_user_max_connections = 2;
    let a = start(cfg).await;
    let mut cfg = instance(dir.path(), "b", &redis);
    cfg.limits.per_user_max_connections = 2;
    let b = start(cfg).await;

    let t = token("carol");
    let mut first = ws(a.public, &t).await;
    let mut second = ws(b.public, &t).await;
    // The third is refused on either instance, though each holds only one.
    assert_eq!(status(a.public, &t).await, 429);
    assert_eq!(status(b.public, &t).await, 429);
    assert_eq!(a.rejected("user_cap").await, 1.0);
    assert_eq!(b.rejected("user_cap").await, 1.0);
    // Another user is not affected.
    assert_eq!(status(b.public, &token("dan")).await, 101);
    echo(&mut first, "still here").await;
    echo(&mut second, "me too").await;

    // One ends: its lease is released (not left to expire: well before
    // the 1 s lease TTL), and a connection is admitted again.
    first.close(None).await.unwrap();
    drop(first);
    let closed = Instant::now();
    loop {
        if status(b.public, &t).await == 101 {
            break;
        }
        assert!(closed.elapsed() < Duration::from_millis(700), "lease not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(second);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn evict_oldest_closes_the_oldest_connection_wherever_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let gw = |name: &str| {
        let mut cfg = instance(dir.path(), name, &redis);
        cfg.limits.per_user_max_connections = 2;
        cfg.limits.on_user_cap = OnUserCap::EvictOldest;
        start(cfg)
    };
    let (a, b) = (gw("a").await, gw("b").await);
    let t = token("frank");
    // Leases sort by admission millisecond: each admission in a later one.
    let next_ms = || async {
        let ms = unix_ms();
        while unix_ms() == ms {
            tokio::task::yield_now().await;
        }
    };
    let mut oldest = ws(a.public, &t).await;
    next_ms().await;
    let mut middle = ws(b.public, &t).await;
    next_ms().await;
    // The third, on B, evicts the oldest, which A holds.
    let mut newest = ws(b.public, &t).await;
    let (code, took) = close_code(&mut oldest, Duration::from_secs(2)).await;
    assert_eq!(code, Some(1008));
    assert!(took < Duration::from_secs(1), "evicted after {took:?}");
    a.wait_metric("portcullis_disconnects_total{reason=\"evicted\"}", 1.0).await;
    echo(&mut middle, "kept").await;
    echo(&mut newest, "admitted").await;

    // A fourth, on A, evicts the now-oldest, on B.
    let mut fourth = ws(a.public, &t).await;
    let (code, _) = close_code(&mut middle, Duration::from_secs(1)).await;
    assert_eq!(code, Some(1008));
    b.wait_metric("portcullis_disconnects_total{reason=\"evicted\"}", 1.0).await;
    echo(&mut newest, "kept").await;
    echo(&mut fourth, "admitted").await;
    assert_eq!(a.rejected("user_cap").await + b.rejected("user_cap").await, 0.0);
    drop((newest, fourth));
    a.stop().await;
    b.stop().await;
}

/// A `portcullis serve` child process: an instance that can be killed.
struct Proc {
    proc: ChildProc,
    public: SocketAddr,
}

fn spawn_instance(dir: &Path, redis: &Redis, extra: &str) -> Proc {
    let log = dir.join("proc-revocations.log");
    let path = dir.join("proc.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [limits]\nper_ip_rate = 1000.0\nper_ip_burst = 1000\n{extra}\n\
             [auth]\nhmac_secret = \"{SECRET}\"\nleeway_s = 0\n\
             [revocation]\nbackend = \"redis\"\nredis_url = \"{}\"\npath = \"{}\"\nlease_ttl_ms = 1500\n",
            redis.url(),
            log.display()
        ),
    )
    .unwrap();
    let proc = ChildProc::spawn(
        Command::new(env!("CARGO_BIN_EXE_portcullis")).args(["serve", "--config"]).arg(&path),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let public = loop {
        assert!(std::time::Instant::now() < deadline, "the instance printed no address");
        let Ok(line) = proc.lines.recv_timeout(Duration::from_millis(200)) else { continue };
        if let Some(rest) = line.strip_prefix("listening public=") {
            break rest.split_whitespace().next().unwrap_or("").to_string();
        }
    };
    Proc { proc, public: public.parse().unwrap() }
}

#[tokio::test]
async fn a_dead_instances_leases_expire_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let mut cfg = instance(dir.path(), "a", &redis);
    cfg.limits.per_user_max_connections = 2;
    cfg.revocation.lease_ttl_ms = 1500;
    let a = start(cfg).await;
    let mut b = spawn_instance(dir.path(), &redis, "per_user_max_connections = 2");

    let t = token("grace");
    let _one = ws(b.public, &t).await;
    let _two = ws(b.public, &t).await;
    assert_eq!(status(a.public, &t).await, 429);
    // Once a heartbeat has been extended (the hash moves), kill B:
    // nothing releases its leases, they count until its heartbeat lapses.
    let scores = || redis.cmd(&["HGETALL", "portcullis:hb:{0}"]);
    let first = scores();
    let deadline = Instant::now() + Duration::from_secs(3);
    while scores() == first {
        assert!(Instant::now() < deadline, "no heartbeat was extended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.proc.child.kill().unwrap();
    b.proc.child.wait().unwrap();
    let killed = Instant::now();
    assert_eq!(status(a.public, &t).await, 429, "the leases outlive their instance for a while");
    // B's heartbeat was last extended at most a third of the TTL before the kill,
    // so they expire between 1.0 s and 1.5 s after it.
    let admitted = loop {
        if status(a.public, &t).await == 101 {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_millis(2500), "leases never expired");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    // Not before: 1.0 s in theory; 0.5 s leaves room for a late renewal
    // on a loaded machine while still proving the leases outlived B.
    assert!(admitted >= Duration::from_millis(500), "admitted after {admitted:?}: leases dropped too early");
    drop(b);
    a.stop().await;
}

#[tokio::test]
async fn a_redis_outage_degrades_to_local_caps_and_resyncs_revocations() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path());
    let gw = |name: &str| {
        let mut cfg = instance(dir.path(), name, &redis);
        cfg.limits.per_user_max_connections = 2;
        cfg.limits.on_cap_store_error = OnCapStoreError::Local;
        start(cfg)
    };
    let (a, b) = (gw("a").await, gw("b").await);
    let heidi = token("heidi");
    let mut heidi_on_b = ws(b.public, &heidi).await;

    redis.stop();
    a.wait_metric(UP, 0.0).await;
    b.wait_metric(UP, 0.0).await;
    let (code, ready) = readyz(&a).await;
    assert_eq!((code, ready["store"].as_str()), (200, Some("down")), "local policy: still ready");

    // Handshakes go on, each within a bounded time, capped per instance.
    let ivan = token("ivan");
    let mut held = Vec::new();
    for addr in [a.public, a.public, b.public] {
        let started = Instant::now();
        held.push(ws(addr, &ivan).await);
        assert!(started.elapsed() < Duration::from_millis(500), "handshake took {:?}", started.elapsed());
    }
    let started = Instant::now();
    assert_eq!(status(a.public, &ivan).await, 429, "A's own count is at the cap");
    assert!(started.elapsed() < Duration::from_millis(500));

    // A revocation on A, cut off: A has it, B cannot know yet.
    assert_eq!(a.revoke(&format!(r#"{{"sub":"heidi","before":{}}}"#, now() + 1)).await.status, 200);
    assert!(a.metric("portcullis_store_errors_total{op=\"revoke\"}").await >= 1.0);
    assert_eq!(status(a.public, &heidi).await, 401);
    echo(&mut heidi_on_b, "B has not heard").await;

    // Redis comes back empty. Both resync: A pushes what it revoked, B
    // applies it to its live connection.
    redis.restart();
    let back = Instant::now();
    let (code, _) = close_code(&mut heidi_on_b, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1008));
    assert!(back.elapsed() < Duration::from_secs(3), "applied {:?} after Redis came back", back.elapsed());
    a.wait_metric(UP, 1.0).await;
    b.wait_metric(UP, 1.0).await;
    assert_eq!(status(b.public, &heidi).await, 401);
    assert!(a.metric("portcullis_store_errors_total{op=\"subscribe\"}").await >= 1.0);

    // The three connections admitted on local counts re-asserted their
    // leases: the fleet sees ivan over his cap, so a fourth is refused on B.
    let deadline = Instant::now() + Duration::from_secs(2);
    while status(b.public, &ivan).await != 429 {
        assert!(Instant::now() < deadline, "leases not re-asserted after the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for ws in &mut held {
        echo(ws, "alive").await;
    }
    drop(held);
    for g in [a, b] {
        g.assert_gauges_zero().await;
        g.stop().await;
    }
}

#[tokio::test]
async fn the_reject_policy_refuses_while_redis_is_down_and_reports_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path());
    let mut cfg = instance(dir.path(), "a", &redis);
    cfg.limits.on_cap_store_error = OnCapStoreError::Reject;
    let a = start(cfg).await;
    assert_eq!(status(a.public, &token("judy")).await, 101);
    assert_eq!(readyz(&a).await.0, 200);

    redis.stop();
    a.wait_metric(UP, 0.0).await;
    let started = Instant::now();
    assert_eq!(status(a.public, &token("judy")).await, 429);
    assert!(started.elapsed() < Duration::from_millis(500));
    let (code, ready) = readyz(&a).await;
    assert_eq!((code, ready["store"].as_str()), (503, Some("down")));

    redis.restart();
    a.wait_metric(UP, 1.0).await;
    assert_eq!(status(a.public, &token("judy")).await, 101);
    assert_eq!(readyz(&a).await.0, 200);
    a.stop().await;
}

#[tokio::test]
async fn an_instance_starts_without_redis_and_connects_when_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    // Not started yet: the socket does not exist.
    let mut redis = Redis { dir: dir.path().to_owned(), socket: dir.path().join("redis.sock"), child: None };
    let started = Instant::now();
    let a = start(instance(dir.path(), "a", &redis)).await;
    assert!(started.elapsed() < Duration::from_secs(4), "start-up waited {:?}", started.elapsed());
    assert_eq!(a.metric(UP).await, 0.0);
    assert_eq!(status(a.public, &token("ken")).await, 101, "local policy by default");
    redis.restart();
    a.wait_metric(UP, 1.0).await;
    assert_eq!(readyz(&a).await.1["store"], "up");
    a.stop().await;
}

#[tokio::test]
async fn revoke_reports_what_it_closed_even_when_the_broadcast_kicked_first() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let a = start(instance(dir.path(), "a", &redis)).await;
    for round in 0..3 {
        let sub = format!("zoe{round}");
        let t = token(&sub);
        let mut cs = Vec::new();
        for _ in 0..3 {
            cs.push(ws(a.public, &t).await);
        }
        // Revoked "now": the connections of tokens minted this second too.
        let answer = a.revoke(&serde_json::json!({ "sub": sub }).to_string()).await;
        assert_eq!(answer.status, 200);
        assert!(body(&answer).contains(r#""closed":3"#), "round {round}: {}", body(&answer));
        for c in &mut cs {
            assert_eq!(close_code(c, Duration::from_secs(2)).await.0, Some(1008));
        }
    }
    a.assert_gauges_zero().await;
    a.stop().await;
}

#[tokio::test]
async fn a_slow_claim_falls_back_alone_and_leaves_exactly_one_lease() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let mut cfg = instance(dir.path(), "a", &redis);
    cfg.revocation.redis_timeout_ms = 100;
    cfg.revocation.lease_ttl_ms = 3000;
    let a = start(cfg).await;
    assert_eq!(a.metric(UP).await, 1.0);
    // Redis stalls every client for a moment (a slow script, a fork).
    redis.cmd(&["CLIENT", "PAUSE", "700", "ALL"]);
    let mut c = ws(a.public, &token("sly")).await;
    // That one claim timed out and fell back to the local count; the link
    // is not down for everyone else.
    assert_eq!(a.metric("portcullis_store_errors_total{op=\"lease_claim\"}").await, 1.0);
    assert_eq!(a.metric(UP).await, 1.0, "one slow claim took the link down");
    assert_eq!(readyz(&a).await.1["store"], "up");
    // The claim still ran in Redis once the pause ended; the connection
    // must hold one lease then, never two (watched across a renewal).
    let key = "portcullis:lease:{0}:sly";
    let until = Instant::now() + Duration::from_millis(2500);
    let (mut most, mut last) = (0, 0);
    while Instant::now() < until {
        last = redis.zcard(key);
        most = most.max(last);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(most <= 1, "the connection held {most} leases");
    assert_eq!(last, 1, "the adopted connection is counted fleet-wide again");
    echo(&mut c, "served all along").await;
    drop(c);
    let until = Instant::now() + Duration::from_secs(5);
    while redis.zcard(key) != 0 {
        assert!(Instant::now() < until, "the lease was not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.assert_gauges_zero().await;
    a.stop().await;
}

#[tokio::test]
async fn a_reassertion_never_brings_back_a_lease_an_eviction_removed() {
    use portcullis::revocation::redis::RedisStore;
    use portcullis::session::leases::{RedisLeases, UserCaps};
    use portcullis::session::registry::Registry;
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let metrics = std::sync::Arc::new(portcullis::metrics::Metrics::new());
    let (sa, sb) = (
        RedisStore::open(&instance(dir.path(), "a", &redis), metrics.clone()).await.unwrap(),
        RedisStore::open(&instance(dir.path(), "b", &redis), metrics.clone()).await.unwrap(),
    );
    // Short leases: the keeper beats every 200 ms on its own as well.
    let (la, _ka) = RedisLeases::start(sa.link(), 600);
    let (lb, _kb) = RedisLeases::start(sb.link(), 600);
    la.ready(Duration::from_secs(2)).await;
    lb.ready(Duration::from_secs(2)).await;
    let mut evicted_on_a = la.evictions();
    // Nothing here closes an evicted connection: A still holds it.
    let reg = Registry::new(metrics);
    let ip = "127.0.0.1".parse().unwrap();
    let c1 = reg.register("ugo", ip, None, None, 8, OnUserCap::Reject).unwrap();
    let c2 = reg.register("ugo", ip, None, None, 8, OnUserCap::Reject).unwrap();
    la.claim(&c1.info, 1, OnUserCap::EvictOldest).await.unwrap();
    lb.claim(&c2.info, 1, OnUserCap::EvictOldest).await.unwrap();
    la.reassert(None, true).await;
    let until = Instant::now() + Duration::from_millis(700);
    while Instant::now() < until {
        assert_eq!(redis.zcard("portcullis:lease:{0}:ugo"), 1, "the evicted lease came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = tokio::time::timeout(Duration::from_secs(2), evicted_on_a.recv()).await.unwrap().unwrap();
    assert_eq!(id, c1.info.id);
    // A claim of a member already held is idempotent: still one lease.
    lb.claim(&c2.info, 1, OnUserCap::EvictOldest).await.unwrap();
    assert_eq!(redis.zcard("portcullis:lease:{0}:ugo"), 1);
    sa.close();
    sb.close();
}
