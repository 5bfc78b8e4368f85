//! Stage 8: every way an upgraded connection ends, over real sockets, with
//! the close code, the counter, and the gauges back to zero.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

fn between(d: Duration, lo_ms: u64, hi_ms: u64) {
    assert!(
        d >= Duration::from_millis(lo_ms) && d <= Duration::from_millis(hi_ms),
        "{d:?} not in [{lo_ms}, {hi_ms}] ms"
    );
}

#[tokio::test]
async fn every_disconnect_reason_is_exported_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    for r in portcullis::CloseReason::ALL {
        assert_eq!(gw.disconnects(r.label()).await, 0.0);
    }
    for r in portcullis::Reject::ALL {
        assert_eq!(gw.rejected(r.label()).await, 0.0);
    }
    gw.stop().await;
}

#[tokio::test]
async fn echo_relays_text_and_binary_in_order_and_client_close_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let mut c = ws(gw.public, &token("alice")).await;
    for i in 0..100 {
        c.send(if i % 2 == 0 { Message::text(format!("t{i}")) } else { Message::binary(vec![i as u8; i]) })
            .await
            .unwrap();
    }
    for i in 0..100 {
        let m = c.next().await.unwrap().unwrap();
        let want =
            if i % 2 == 0 { Message::text(format!("t{i}")) } else { Message::binary(vec![i as u8; i]) };
        assert_eq!(m, want);
    }
    c.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).await.unwrap();
    let (code, _) = close_code(&mut c, Duration::from_secs(2)).await;
    assert_eq!(code, Some(1000));
    gw.wait_metric("portcullis_disconnects_total{reason=\"client_close\"}", 1.0).await;
    assert_eq!(gw.metric("portcullis_messages_total{direction=\"client_to_upstream\"}").await, 100.0);
    assert_eq!(gw.metric("portcullis_messages_total{direction=\"upstream_to_client\"}").await, 100.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.heartbeat.ping_interval_ms = 300;
    cfg.heartbeat.pong_timeout_ms = 300;
    let gw = start(cfg).await;
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    s.write_all(
        upgrade_request("/", &[("Authorization", &format!("Bearer {}", token("zombie")))]).as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(read_answer(&mut s).await.status, 101);
    let upgraded = Instant::now();
    // Read (so the kernel buffer never blocks the gateway) but never answer.
    let mut buf = [0u8; 1024];
    let mut saw = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.expect("reaped in time") {
            Ok(0) | Err(_) => break,
            Ok(n) => saw.extend_from_slice(&buf[..n]),
        }
    }
    between(upgraded.elapsed(), 550, 1500);
    assert_eq!(saw.first(), Some(&0x89), "a ping came first");
    let close = saw.iter().position(|b| *b == 0x88).expect("a close frame was sent best-effort");
    assert_eq!(saw[close + 2..close + 4], 1011u16.to_be_bytes(), "with 1011: {saw:?}");
    gw.wait_metric("portcullis_disconnects_total{reason=\"pong_timeout\"}", 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_answers_pings_stays() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.heartbeat.ping_interval_ms = 100;
    cfg.heartbeat.pong_timeout_ms = 200;
    let gw = start(cfg).await;
    let mut c = ws(gw.public, &token("alive")).await;
    // tungstenite answers pings while we read; nothing but pings arrives.
    let pings = tokio::time::timeout(Duration::from_millis(1000), async {
        let mut n = 0;
        while let Some(Ok(Message::Ping(_))) = c.next().await {
            n += 1;
        }
        n
    })
    .await;
    assert!(pings.is_err(), "the connection ended within 1 s of answered pings");
    // Pings keep coming (every 100 ms): skip them to find the echo.
    c.send(Message::text("ok")).await.unwrap();
    loop {
        match c.next().await.unwrap().unwrap() {
            Message::Ping(_) => continue,
            m => break assert_eq!(m, Message::text("ok")),
        }
    }
    drop(c);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn idle_connections_close_with_1000() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.heartbeat.idle_timeout_ms = 400;
    cfg.heartbeat.ping_interval_ms = 100;
    let gw = start(cfg).await;
    let mut c = ws(gw.public, &token("idler")).await;
    let (code, took) = close_code(&mut c, Duration::from_secs(3)).await;
    assert_eq!(code, Some(1000));
    between(took, 350, 1200);
    gw.wait_metric("portcullis_disconnects_total{reason=\"idle\"}", 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn token_expiry_closes_with_1008() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let exp = now() + 2;
    let mut c = ws(gw.public, &token_with(json!({ "sub": "shortlived", "exp": exp }))).await;
    echo(&mut c, "before").await;
    let (code, _) = close_code(&mut c, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1008));
    assert!(now() >= exp, "not before the token's exp");
    gw.wait_metric("portcullis_disconnects_total{reason=\"token_expired\"}", 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

/// `/admin/connections` shows when the client last sent something: still
/// then after a silence, later once it speaks again.
#[tokio::test]
async fn last_seen_follows_the_clients_last_frame() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let t0 = now();
    let mut c = ws(gw.public, &token("quiet")).await;
    echo(&mut c, "hello").await;
    let said = now();
    let last_seen = || async {
        let r = http(gw.admin, "GET", "/admin/connections?sub=quiet", &[], "").await;
        let list: serde_json::Value = serde_json::from_str(body(&r)).unwrap();
        assert_eq!(list.as_array().unwrap().len(), 1);
        list[0]["last_seen"].as_u64().unwrap()
    };
    // Two seconds of silence (bounded: the clock moves on its own).
    let deadline = Instant::now() + Duration::from_secs(4);
    while now() < said + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(now() >= said + 2);
    // Whole seconds on both sides of the subtraction: within one second
    // of when the client spoke, and before the clock now.
    let silent = last_seen().await;
    assert!((t0..=said + 1).contains(&silent), "last seen at {silent}, spoke in {t0}..={said}");
    let t1 = now();
    echo(&mut c, "again").await;
    let spoke = last_seen().await;
    assert!(spoke >= t1 && spoke <= now(), "last seen at {spoke}, spoke at {t1}");
    drop(c);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn revoke_closes_live_connections_within_a_second_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let t = token_with(json!({ "sub": "eve", "jti": "live-1" }));
    let mut a = ws(gw.public, &t).await;
    let mut other = ws(gw.public, &token("frank")).await;
    let list = body(&http(gw.admin, "GET", "/admin/connections?sub=eve", &[], "").await).to_string();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["sub"], "eve");
    assert_eq!(list[0]["ip"], "127.0.0.1");
    assert!(list[0]["since"].as_u64().unwrap() <= now() && list[0]["last_seen"].as_u64().is_some());
    assert!(list[0]["id"].as_str().is_some());

    let started = Instant::now();
    let r = gw.revoke(r#"{"jti":"live-1"}"#).await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(body(&r)).unwrap();
    assert_eq!(v, json!({ "revoked": { "jti": "live-1" }, "closed": 1 }));
    let (code, _) = close_code(&mut a, Duration::from_secs(1)).await;
    assert_eq!(code, Some(1008));
    assert!(started.elapsed() < Duration::from_secs(1));
    echo(&mut other, "untouched").await;
    gw.wait_metric("portcullis_disconnects_total{reason=\"revoked\"}", 1.0).await;

    // By subject: `before` defaults to now.
    let r = gw.revoke(r#"{"sub":"frank"}"#).await;
    let v: serde_json::Value = serde_json::from_str(body(&r)).unwrap();
    assert_eq!(v["closed"], 1);
    assert_eq!(v["revoked"]["sub"], "frank");
    assert!(v["revoked"]["before"].as_u64().unwrap() >= now() - 1);
    assert_eq!(close_code(&mut other, Duration::from_secs(1)).await.0, Some(1008));
    assert_eq!(gw.revoke(r#"{"nothing":1}"#).await.status, 400);
    assert_eq!(gw.revoke("{}").await.status, 400);
    gw.assert_gauges_zero().await;
    gw.stop().await;

    let gw = start(config(dir.path())).await;
    assert_eq!(
        raw(gw.public, upgrade_request("/", &[("Authorization", &format!("Bearer {t}"))]).as_bytes())
            .await
            .status,
        401
    );
    gw.stop().await;
}

#[tokio::test]
async fn evict_oldest_closes_the_oldest_with_1008() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.per_user_max_connections = 1;
    cfg.limits.on_user_cap = portcullis::config::OnUserCap::EvictOldest;
    let gw = start(cfg).await;
    let t = token("gina");
    let mut old = ws(gw.public, &t).await;
    let mut new = ws(gw.public, &t).await;
    assert_eq!(close_code(&mut old, Duration::from_secs(2)).await.0, Some(1008));
    echo(&mut new, "admitted").await;
    gw.wait_metric("portcullis_disconnects_total{reason=\"evicted\"}", 1.0).await;
    assert_eq!(gw.rejected("user_cap").await, 0.0);
    drop(new);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_message_bytes = 1024;
    cfg.limits.max_outbound_bytes = 8192;
    let gw = start(cfg).await;
    let mut c = ws(gw.public, &token("big")).await;
    echo(&mut c, &"x".repeat(1000)).await;
    c.send(Message::binary(vec![7u8; 2000])).await.unwrap();
    assert_eq!(close_code(&mut c, Duration::from_secs(2)).await.0, Some(1009));
    gw.wait_metric("portcullis_disconnects_total{reason=\"message_too_big\"}", 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn message_flood_closes_with_1008() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.per_conn_msgs_per_s = 5.0;
    let gw = start(cfg).await;
    let mut c = ws(gw.public, &token("flood")).await;
    for i in 0..50 {
        if c.send(Message::text(format!("{i}"))).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut c, Duration::from_secs(2)).await.0, Some(1008));
    gw.wait_metric("portcullis_disconnects_total{reason=\"msg_rate\"}", 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn max_lifetime_closes_with_1001() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_lifetime_s = 1;
    let gw = start(cfg).await;
    let mut c = ws(gw.public, &token("mortal")).await;
    let (code, took) = close_code(&mut c, Duration::from_secs(3)).await;
    assert_eq!(code, Some(1001));
    between(took, 900, 2000);
    gw.wait_metric("portcullis_disconnects_total{reason=\"max_lifetime\"}", 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn protocol_error_closes_with_1002() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    s.write_all(upgrade_request("/", &[("Authorization", &format!("Bearer {}", token("rude")))]).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s).await.status, 101);
    // An unmasked text frame from a client is a protocol error (RFC 6455 §5.1).
    s.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
    assert!(buf.windows(2).any(|w| w == 1002u16.to_be_bytes()), "{buf:?}");
    gw.wait_metric("portcullis_disconnects_total{reason=\"error\"}", 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn drain_closes_with_1001() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let mut c = ws(gw.public, &token("stayer")).await;
    let metrics_addr = gw.admin;
    let stopping = tokio::spawn(gw.stop());
    assert_eq!(close_code(&mut c, Duration::from_secs(3)).await.0, Some(1001));
    drop(c);
    stopping.await.unwrap();
    let _ = metrics_addr;
}

#[tokio::test]
async fn a_client_that_never_reads_is_a_slow_reader_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_message_bytes = 16 * 1024;
    cfg.limits.max_outbound_bytes = 64 * 1024;
    cfg.limits.write_timeout_ms = 500;
    let gw = start(cfg).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(gw.public).await.unwrap();
    s.write_all(upgrade_request("/", &[("Authorization", &format!("Bearer {}", token("sloth")))]).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s).await.status, 101);
    // Send 16 KiB messages to be echoed, never reading: the echo outbox
    // fills, the gateway stops reading us, then the write stall trips.
    let frame = {
        let payload = vec![b'z'; 16 * 1024];
        let mut f = vec![0x82, 0xFE, 0x40, 0x00, 1, 2, 3, 4];
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ [1u8, 2, 3, 4][i % 4]));
        f
    };
    let start = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            if s.write_all(&frame).await.is_err() {
                break;
            }
        }
    })
    .await;
    gw.wait_metric("portcullis_disconnects_total{reason=\"slow_reader\"}", 1.0).await;
    assert!(start.elapsed() < Duration::from_secs(5));
    gw.assert_gauges_zero().await;
    gw.stop().await;
}
