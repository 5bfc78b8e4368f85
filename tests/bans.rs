//! Automatic bans and no lockout behind one address: real gateways on port
//! 0, real sockets from 127.0.0.x source addresses (each test its own, so
//! tests running at once never share an address's score).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use portcullis::config::Config;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

const HANDSHAKING: &str = "portcullis_connections{state=\"handshaking\"}";
const BANS: &str = "portcullis_bans";

fn ban_config(dir: &std::path::Path) -> Config {
    let mut c = config(dir);
    c.ban.enabled = true;
    c
}

async fn connect_from(gw: SocketAddr, ip: IpAddr) -> Option<TcpStream> {
    let sock = if ip.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.ok()?;
    sock.bind(SocketAddr::new(ip, 0)).ok()?;
    sock.connect(gw).await.ok()
}

fn v4(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// A full upgrade from `ip` with `token`: the answer.
async fn upgrade_from(gw: SocketAddr, ip: IpAddr, token: &str) -> Answer {
    let Some(mut s) = connect_from(gw, ip).await else {
        return Answer { status: 0, text: String::new(), ended: Ended::Closed };
    };
    let req = upgrade_request("/", &[("Authorization", &format!("Bearer {token}"))]);
    if s.write_all(req.as_bytes()).await.is_err() {
        return Answer { status: 0, text: String::new(), ended: Ended::Closed };
    }
    read_answer(&mut s).await
}

fn forged() -> String {
    let t = token("mallory");
    format!("{}AAAA", &t[..t.len() - 4])
}

/// A socket the gateway closed without answering a byte (banned).
async fn refused_unread(gw: SocketAddr, ip: IpAddr) -> bool {
    let a = upgrade_from(gw, ip, &token("anyone")).await;
    a.status == 0 && a.text.is_empty() && a.ended == Ended::Closed
}

async fn admin(gw: &TestGateway, method: &str, path: &str, body: &str) -> Answer {
    http(gw.admin, method, path, &[], body).await
}

async fn bans_listed(gw: &TestGateway) -> Vec<serde_json::Value> {
    let a = admin(gw, "GET", "/admin/bans", "").await;
    assert_eq!(a.status, 200, "{}", a.text);
    serde_json::from_str(body(&a)).unwrap()
}

#[tokio::test]
async fn one_addresss_slow_heads_never_keep_its_fast_ones_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // The shipped slot bound (16 per address); heads given long enough that
    // only shedding can free a slot during the test.
    cfg.limits.handshake_timeout_ms = 10_000;
    cfg.limits.handshake_timeout_min_ms = 10_000;
    cfg.limits.per_user_max_connections = 100;
    let gw = start(cfg).await;
    let nat = v4(40);

    // 200 sockets from the address each send the start of a head and stall.
    let mut slow = Vec::new();
    for _ in 0..200 {
        if let Some(mut s) = connect_from(gw.public, nat).await {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
            slow.push(s);
        }
    }
    gw.wait_metric(HANDSHAKING, 16.0).await;
    // The attacker keeps opening more, 50 a second, while the others come.
    let gw_addr = gw.public;
    let attacker = tokio::spawn(async move {
        let mut more = Vec::new();
        for _ in 0..150 {
            if let Some(mut s) = connect_from(gw_addr, nat).await {
                let _ = s.write_all(b"GET / HTTP/1.1\r\n").await;
                more.push(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        more
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 20 users behind the same address: every one gets in, promptly.
    let mut open = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        let a = upgrade_from(gw.public, nat, &token(&format!("user{i}"))).await;
        assert_eq!(a.status, 101, "user {i}: {}", a.text);
        assert!(started.elapsed() < Duration::from_secs(1), "user {i} took {:?}", started.elapsed());
        open.push(a);
    }
    assert_eq!(gw.metric("portcullis_handshakes_total{outcome=\"accepted\",reason=\"ok\"}").await, 20.0);
    let m = gw.metrics().await;
    let shed = value_of(&m, "portcullis_handshakes_total{outcome=\"rejected\",reason=\"handshake_shed\"}");
    // The first one sheds a slow head; later ones may find the slot a
    // finished one freed before the attacker takes it.
    assert!(shed >= 1.0, "the address's own slow heads made room: {shed}\n{m}");
    let more = attacker.await.unwrap();
    drop((slow, more, open));
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_forger_is_banned_within_a_second_and_refused_unread_its_neighbour_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(ban_config(dir.path())).await;
    let (mallory, neighbour) = (v4(41), v4(42));
    let bad = forged();
    let started = Instant::now();
    let mut answered = 0;
    // About 200 a second, until the gateway stops answering.
    loop {
        assert!(started.elapsed() < Duration::from_secs(1), "not banned within 1 s ({answered} answered)");
        let a = upgrade_from(gw.public, mallory, &bad).await;
        if a.status == 0 {
            break;
        }
        assert_eq!(a.status, 401, "{}", a.text);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!((19..=21).contains(&answered), "banned at the threshold of 20: {answered}");

    // Closed with no byte answered, counted as banned, logged once.
    for _ in 0..5 {
        assert!(refused_unread(gw.public, mallory).await);
    }
    assert!(gw.rejected("banned").await >= 5.0);
    assert_eq!(gw.metric(BANS).await, 1.0);
    assert_eq!(gw.metric("portcullis_bans_total{reason=\"strikes\"}").await, 1.0);
    let listed = bans_listed(&gw).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["key"], "127.0.0.41/32");
    assert_eq!(listed[0]["reason"], "strikes");
    assert_eq!(listed[0]["origin"], "local");
    let until = listed[0]["until"].as_u64().unwrap();
    assert!((now() + 55..=now() + 67).contains(&until), "a first ban of about 60 s: {until}");

    // The neighbour in the same /24 is not touched.
    let a = upgrade_from(gw.public, neighbour, &token("neighbour")).await;
    assert_eq!(a.status, 101, "{}", a.text);
    drop(a);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn honest_addresses_are_never_banned_nor_expired_tokens_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ban_config(dir.path());
    cfg.limits.per_user_max_connections = 1000;
    let gw = start(cfg).await;
    let (office, retrier) = (v4(43), v4(44));
    // 100 honest handshakes with a few strikes between them.
    let bad = forged();
    for i in 0..100 {
        let a = upgrade_from(gw.public, office, &token(&format!("u{i}"))).await;
        assert_eq!(a.status, 101, "{}", a.text);
        if i % 10 == 0 {
            assert_eq!(upgrade_from(gw.public, office, &bad).await.status, 401);
        }
    }
    // An honest client retrying with its expired token, over and over.
    let expired = token_with(json!({ "sub": "late", "exp": now() - 10, "iat": now() - 100 }));
    for _ in 0..200 {
        let a = upgrade_from(gw.public, retrier, &expired).await;
        assert_eq!(a.status, 401, "{}", a.text);
        assert!(a.text.contains("expired"), "{}", a.text);
    }
    assert!(bans_listed(&gw).await.is_empty());
    assert_eq!(gw.metric(BANS).await, 0.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn allowed_addresses_are_never_banned_and_a_dry_run_refuses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ban_config(dir.path());
    cfg.ban.allow = vec!["127.0.0.45/32".parse().unwrap()];
    let gw = start(cfg).await;
    let bad = forged();
    for _ in 0..60 {
        assert_eq!(upgrade_from(gw.public, v4(45), &bad).await.status, 401);
    }
    assert!(bans_listed(&gw).await.is_empty(), "the allow-list is never banned");
    gw.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ban_config(dir.path());
    cfg.ban.dry_run = true;
    let gw = start(cfg).await;
    for _ in 0..60 {
        assert_eq!(upgrade_from(gw.public, v4(46), &bad).await.status, 401, "dry run refuses nothing");
    }
    assert_eq!(gw.metric("portcullis_ban_dry_run_total").await, 1.0, "counted once per would-be ban");
    assert_eq!(gw.metric(BANS).await, 0.0);
    assert!(bans_listed(&gw).await.is_empty());
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_ban_expires_on_time_and_a_repeat_doubles() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ban_config(dir.path());
    cfg.ban.duration_s = 2;
    cfg.ban.max_duration_s = 8;
    let gw = start(cfg).await;
    let ip = v4(47);
    let bad = forged();
    let ban = || async {
        for _ in 0..25 {
            if upgrade_from(gw.public, ip, &bad).await.status == 0 {
                break;
            }
        }
        Instant::now()
    };
    let banned_at = ban().await;
    let first = bans_listed(&gw).await[0]["until"].as_u64().unwrap();
    assert!((now() + 1..=now() + 3).contains(&first), "{first}");
    // Not lifted before its end; lifted by its end + the sweep's second.
    while refused_unread(gw.public, ip).await {
        assert!(banned_at.elapsed() < Duration::from_secs(5), "still banned after 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(banned_at.elapsed() >= Duration::from_millis(1000), "lifted early: {:?}", banned_at.elapsed());
    // A repeat within a day: twice as long.
    ban().await;
    let second = bans_listed(&gw).await[0]["until"].as_u64().unwrap();
    assert!((now() + 3..=now() + 5).contains(&second), "doubled to about 4 s: {second} (now {})", now());
    gw.stop().await;
}

#[tokio::test]
async fn admin_lists_bans_and_lifts_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let ip = v4(48);
    let a = admin(&gw, "POST", "/admin/bans", r#"{"key": "127.0.0.48", "duration_s": 600}"#).await;
    assert_eq!(a.status, 200, "{}", a.text);
    // Manual bans hold even with automatic bans off (this config).
    assert!(refused_unread(gw.public, ip).await);
    let listed = bans_listed(&gw).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["key"], "127.0.0.48/32");
    assert_eq!(listed[0]["reason"], "manual");
    assert_eq!(listed[0]["origin"], "local");
    assert!((now() + 598..=now() + 601).contains(&listed[0]["until"].as_u64().unwrap()));
    assert_eq!(gw.metric("portcullis_bans_total{reason=\"manual\"}").await, 1.0);

    // A range: every address in it, none outside.
    let a = admin(&gw, "POST", "/admin/bans", r#"{"key": "127.0.1.0/24", "duration_s": 60}"#).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(refused_unread(gw.public, IpAddr::from([127, 0, 1, 9])).await);
    assert_eq!(upgrade_from(gw.public, v4(49), &token("x")).await.status, 101);
    assert_eq!(gw.metric(BANS).await, 2.0);

    let a = admin(&gw, "DELETE", "/admin/bans?key=127.0.0.48", "").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(upgrade_from(gw.public, ip, &token("back")).await.status, 101);
    let a = admin(&gw, "DELETE", "/admin/bans?key=127.0.1.0%2F24", "").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(bans_listed(&gw).await.is_empty());
    assert_eq!(admin(&gw, "DELETE", "/admin/bans?key=127.0.0.48", "").await.status, 404);

    for (body, names) in [
        ("", "expected"),
        ("{", "expected"),
        (r#"{"key": "not-an-address"}"#, "key"),
        (r#"{"key": "10.0.0.1/40"}"#, "key"),
        (r#"{"key": "10.0.0.1", "duration_s": 0}"#, "duration_s"),
        (r#"{"key": "10.0.0.1", "duration_s": -5}"#, "duration_s"),
        (r#"{"key": "10.0.0.1", "until": 5}"#, "until"),
    ] {
        let a = admin(&gw, "POST", "/admin/bans", body).await;
        assert_eq!(a.status, 400, "{body}: {}", a.text);
        assert!(body_of(&a).contains(names), "{body}: {}", a.text);
    }
    assert_eq!(admin(&gw, "DELETE", "/admin/bans", "").await.status, 400);
    assert_eq!(admin(&gw, "DELETE", "/admin/bans?key=zzz", "").await.status, 400);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

fn body_of(a: &Answer) -> String {
    body(a).to_string()
}

#[tokio::test]
async fn a_ban_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(ban_config(dir.path())).await;
    let bad = forged();
    for _ in 0..25 {
        upgrade_from(gw.public, v4(50), &bad).await;
    }
    assert!(refused_unread(gw.public, v4(50)).await);
    gw.stop().await;
    // The log is written off the handshake path: give it its moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gw = start(ban_config(dir.path())).await;
    assert!(refused_unread(gw.public, v4(50)).await, "the ban came back with the restart");
    let listed = bans_listed(&gw).await;
    assert_eq!(listed[0]["key"], "127.0.0.50/32");
    assert_eq!(gw.metric(BANS).await, 1.0);
    gw.stop().await;
}

/// `fd00:0:0:77::/64` on `lo`, when this host lets the test add it.
fn add_v6(addr: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-6", "addr", "add", &format!("{addr}/128"), "dev", "lo", "nodad"])
        .output()
        .is_ok_and(|o| o.status.success() || String::from_utf8_lossy(&o.stderr).contains("exists"))
}

#[tokio::test]
async fn ipv6_is_banned_per_64() {
    let (a, b, other) = ("fd00:0:0:77::a", "fd00:0:0:77::b", "fd00:0:0:78::a");
    if !(add_v6(a) && add_v6(b) && add_v6(other)) {
        eprintln!("skipped: cannot add IPv6 addresses to lo on this host (needs CAP_NET_ADMIN)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ban_config(dir.path());
    cfg.listen.public = "[::]:0".parse().unwrap();
    let gw = start(cfg).await;
    let port = gw.public.port();
    let target = SocketAddr::new("::1".parse().unwrap(), port);
    let bad = forged();
    for _ in 0..25 {
        upgrade_from(target, a.parse().unwrap(), &bad).await;
    }
    // Another address of the same /64 is the same key; the next /64 is not.
    assert!(refused_unread(target, b.parse().unwrap()).await);
    assert_eq!(upgrade_from(target, other.parse().unwrap(), &token("v6")).await.status, 101);
    assert_eq!(bans_listed(&gw).await[0]["key"], "fd00:0:0:77::/64");
    gw.stop().await;
}

/// A `redis-server` of this test's own on a unix socket; killed on drop.
struct Redis(std::process::Child, std::path::PathBuf);

impl Redis {
    fn start(dir: &std::path::Path) -> Redis {
        let socket = dir.join("redis.sock");
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (./scripts/test.sh installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis(child, socket)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn two_instances_share_a_ban_through_redis_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let instance = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut c = ban_config(&d);
        c.revocation.backend = portcullis::config::RevocationBackend::Redis;
        c.revocation.redis_url = format!("unix://{}", redis.1.display());
        c
    };
    let a = start(instance("a")).await;
    let b = start(instance("b")).await;
    a.wait_metric("portcullis_store_up", 1.0).await;
    b.wait_metric("portcullis_store_up", 1.0).await;
    let bad = forged();
    for _ in 0..25 {
        upgrade_from(a.public, v4(51), &bad).await;
    }
    let banned = Instant::now();
    assert!(refused_unread(a.public, v4(51)).await);
    // B enforces it within a second, as a ban of the fleet.
    while !refused_unread(b.public, v4(51)).await {
        assert!(banned.elapsed() < Duration::from_secs(1), "not shared within 1 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = bans_listed(&b).await;
    assert_eq!(
        (listed[0]["key"].as_str(), listed[0]["origin"].as_str()),
        (Some("127.0.0.51/32"), Some("fleet"))
    );
    assert_eq!(b.metric("portcullis_bans_total{reason=\"fleet\"}").await, 1.0);

    // Lifted on B: lifted on A too, within a second.
    assert_eq!(admin(&b, "DELETE", "/admin/bans?key=127.0.0.51", "").await.status, 200);
    let lifted = Instant::now();
    while refused_unread(a.public, v4(51)).await {
        assert!(lifted.elapsed() < Duration::from_secs(1), "lift not shared within 1 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A manual ban on B reaches A.
    let r = admin(&b, "POST", "/admin/bans", r#"{"key": "127.0.0.52", "duration_s": 60}"#).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let t = Instant::now();
    while !refused_unread(a.public, v4(52)).await {
        assert!(t.elapsed() < Duration::from_secs(1), "manual ban not shared within 1 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop().await;
    b.stop().await;
    drop(redis);
}

#[tokio::test]
async fn a_banned_socket_is_closed_before_anything_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let r = admin(&gw, "POST", "/admin/bans", r#"{"key": "127.0.0.53"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Connect, send nothing: closed at once (not after a head deadline).
    let mut s = connect_from(gw.public, v4(53)).await.unwrap();
    let t = Instant::now();
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await.expect("closed at once");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(t.elapsed() < Duration::from_millis(400), "{:?}", t.elapsed());
    assert_eq!(gw.metric(HANDSHAKING).await, 0.0);
    assert!(gw.rejected("banned").await >= 1.0);
    gw.stop().await;
}
