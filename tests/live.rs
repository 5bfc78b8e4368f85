//! Paths that had no test: an IPv6 client end to end, SIGHUP changing
//! `limits.*` and `heartbeat.*` under live traffic (the binary as a child
//! process), and a drain of a thousand connections.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

#[tokio::test]
async fn an_ipv6_client_is_served_end_to_end() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: ::1 is not available on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.listen.public = "[::1]:0".parse().unwrap();
    let gw = start(cfg).await;
    assert!(gw.public.is_ipv6());
    let mut c = ws(gw.public, &token("vic6")).await;
    echo(&mut c, "over v6").await;
    let list = body(&http(gw.admin, "GET", "/admin/connections", &[], "").await).to_string();
    assert!(list.contains("\"ip\":\"::1\""), "{list}");
    // Refusals over v6 answer and close like any other.
    assert_eq!(raw(gw.public, upgrade_request("/", &[]).as_bytes()).await.status, 401);
    // And a revocation finds the v6 connection.
    let r = gw.revoke(r#"{"sub":"vic6"}"#).await;
    assert!(body(&r).contains("\"closed\":1"), "{}", body(&r));
    assert_eq!(close_code(&mut c, Duration::from_secs(3)).await.0, Some(1008));
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

/// The `listening` line's addresses of a `serve` child.
fn addresses(p: &ChildProc) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Ok(line) = p.lines.recv_timeout(Duration::from_millis(200)) else { continue };
        if let Some(rest) = line.strip_prefix("listening ") {
            let mut it =
                rest.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(_, a)| a.parse().unwrap());
            return (it.next().unwrap(), it.next().unwrap());
        }
    }
    panic!("no listening line");
}

async fn wait_series(admin: std::net::SocketAddr, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = body(&http(admin, "GET", "/metrics", &[], "").await).to_string();
        if value_of(&m, series) == want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} never reached {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sighup_changes_limits_and_heartbeat_under_live_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let write = |limits: &str, heartbeat: &str| {
        std::fs::write(
            &path,
            format!(
                "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndefer_accept_s = 0\n[auth]\nhmac_secret = \"{SECRET}\"\n\
                 [revocation]\npath = \"{}\"\n[limits]\n{limits}[heartbeat]\n{heartbeat}",
                dir.path().join("r.log").display()
            ),
        )
        .unwrap()
    };
    write("max_message_bytes = 65536\n", "ping_interval_ms = 60000\n");
    let p = ChildProc::spawn(Command::new(BIN).args(["serve", "--config", path.to_str().unwrap()]));
    let (public, admin) = addresses(&p);
    let t = token("lou");
    let mut live = ws(public, &t).await;
    // Traffic flows on while the reload lands.
    let (mut tx, mut rx) = ws(public, &t).await.split();
    let pump = tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            if tx.send(Message::text(format!("m{n}"))).await.is_err() {
                return n;
            }
            match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => n += 1,
                Ok(Some(Ok(_))) => {}
                _ => return n,
            }
            if n == 200 {
                return n;
            }
        }
    });

    write(
        "max_message_bytes = 1024\nmax_outbound_bytes = 4096\nmax_connections = 2\n",
        "ping_interval_ms = 200\npong_timeout_ms = 5000\n",
    );
    p.signal("-HUP");
    wait_series(admin, "portcullis_config_reloads_total{result=\"ok\"}", 1.0).await;
    assert_eq!(pump.await.unwrap(), 200, "the traffic was interrupted by the reload");
    echo(&mut live, "untouched by the reload").await;

    // A new connection gets the new heartbeat (a ping within a few
    // intervals) and the new message limit (1009 above 1024 bytes). The
    // pump's connection must be gone first: the cap is now 2.
    wait_series(admin, "portcullis_connections{state=\"open\"}", 1.0).await;
    let mut fresh = ws(public, &t).await;
    let pinged = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match fresh.next().await {
                Some(Ok(Message::Ping(_))) => return true,
                Some(Ok(_)) => continue,
                _ => return false,
            }
        }
    })
    .await;
    assert_eq!(pinged, Ok(true), "no ping at the new interval");
    // And the new connection cap: two are open (the pump's has ended), a
    // third is closed unanswered.
    wait_series(admin, "portcullis_connections{state=\"open\"}", 2.0).await;
    // (The reset may even beat the connect's own return.)
    if let Ok(mut s) = tokio::net::TcpStream::connect(public).await {
        assert!(closed_without_answer(&mut s, Duration::from_secs(3)).await);
    }
    wait_series(admin, "portcullis_handshakes_total{outcome=\"rejected\",reason=\"global_cap\"}", 1.0).await;
    fresh.send(Message::text("x".repeat(2000))).await.unwrap();
    assert_eq!(close_code(&mut fresh, Duration::from_secs(3)).await.0, Some(1009));
    drop((live, p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_a_thousand_connections_with_1001_spread_over_time() {
    const N: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.listen.drain_timeout_s = 2;
    cfg.limits.per_ip_max_connections = 2 * N;
    cfg.limits.per_user_max_connections = 2 * N;
    cfg.limits.max_handshakes = 2 * N;
    let gw = start(cfg).await;
    let t = token("many");
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N {
        clients.push(ws(gw.public, &t).await);
    }
    gw.wait_metric("portcullis_connections{state=\"open\"}", N as f64).await;
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let (code, _) = close_code(&mut c, Duration::from_secs(10)).await;
                (code, Instant::now())
            })
        })
        .collect();
    let stopping = Instant::now();
    let admin = gw.admin;
    gw.stop().await;
    let stopped = stopping.elapsed();
    let mut times = Vec::with_capacity(N);
    for r in readers {
        let (code, at) = r.await.unwrap();
        assert_eq!(code, Some(1001));
        times.push(at);
    }
    times.sort();
    let spread = times[N - 1] - times[0];
    // Closes are spread over the first half of the 2 s timeout, not sent
    // at once (no reconnect storm); all within the timeout plus slack.
    assert!(spread >= Duration::from_millis(500), "all closed within {spread:?}");
    assert!(stopped <= Duration::from_secs(2) + Duration::from_secs(3), "drain took {stopped:?}");
    assert!(std::net::TcpStream::connect(admin).is_err(), "the admin listener is closed after the drain");
}
