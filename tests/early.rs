//! Refusals on arrival: a head that is whole when the connection is
//! accepted is judged by the accept loop itself. It must answer exactly
//! what the pipeline answers, byte for byte, count the same reason once,
//! leave no gauge behind, and close so that the answer arrives.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway where heads arrive with the accept: `TCP_DEFER_ACCEPT` makes
/// the kernel hand a connection over only once its first bytes are in.
fn arrival_config(dir: &std::path::Path) -> portcullis::Config {
    let mut c = config(dir);
    c.listen.defer_accept_s = 1;
    c
}

/// The whole request in one write: with defer-accept, on arrival.
async fn at_once(addr: std::net::SocketAddr, req: &[u8]) -> Answer {
    raw(addr, req).await
}

/// The request split after its first byte, the rest 100 ms later: the
/// connection is accepted on the first byte and the pipeline reads the
/// rest.
async fn in_two(addr: std::net::SocketAddr, req: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&req[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&req[1..]).await.unwrap();
    read_answer(&mut s).await
}

fn hs(secret: &[u8], claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn refusals_on_arrival_answer_what_the_pipeline_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = arrival_config(dir.path());
    cfg.auth.allowed_origins = vec!["https://app.example".into()];
    let gw = start(cfg).await;
    let bearer = |t: &str| format!("Bearer {t}");
    let forged = hs(b"wrong-secret", json!({ "sub": "a", "iat": now(), "exp": now() + 600 }));
    let expired = token_with(json!({ "iat": now() - 100, "exp": now() - 10 }));
    let long_lived = token_with(json!({ "exp": now() + 86_400 * 30 }));
    let bad_sub = token_with(json!({ "sub": "a\u{7}b" }));
    let cases: Vec<(&str, u16, Vec<u8>)> = vec![
        ("missing_token", 401, upgrade_request("/", &[]).into_bytes()),
        ("invalid_token", 401, upgrade_request("/", &[("Authorization", "Basic YTpi")]).into_bytes()),
        ("invalid_token", 401, upgrade_request("/", &[("Authorization", &bearer("not.a.jwt"))]).into_bytes()),
        ("invalid_token", 401, upgrade_request("/", &[("Authorization", &bearer(&forged))]).into_bytes()),
        ("invalid_token", 401, upgrade_request("/", &[("Authorization", &bearer(&long_lived))]).into_bytes()),
        ("invalid_token", 401, upgrade_request("/", &[("Authorization", &bearer(&bad_sub))]).into_bytes()),
        ("expired_token", 401, upgrade_request("/", &[("Authorization", &bearer(&expired))]).into_bytes()),
        ("bad_path", 404, upgrade_request("/elsewhere", &[]).into_bytes()),
        ("origin", 403, upgrade_request("/", &[("Origin", "https://evil.example")]).into_bytes()),
        (
            "bad_version",
            426,
            b"GET / HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec(),
        ),
        ("bad_request", 400, b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec()),
        ("bad_request", 400, b"GET / HTTP/1.1\r\nHost gw\r\n\r\n".to_vec()),
    ];
    for (reason, status, req) in &cases {
        let before = gw.rejected(reason).await;
        let fast = at_once(gw.public, req).await;
        let piped = in_two(gw.public, req).await;
        assert_eq!(fast.status, *status, "{reason}: {}", fast.text);
        assert_eq!(fast.ended, Ended::Closed);
        assert_eq!(fast.text, piped.text, "{reason}: the two paths answer differently");
        assert_eq!(gw.rejected(reason).await - before, 2.0, "{reason}: counted once per refusal");
    }
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn the_rate_refused_on_arrival_is_a_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = arrival_config(dir.path());
    cfg.limits.per_ip_rate = 0.01;
    cfg.limits.per_ip_burst = 1;
    let gw = start(cfg).await;
    let req = upgrade_request("/", &[]);
    assert_eq!(at_once(gw.public, req.as_bytes()).await.status, 401, "the burst's one");
    let fast = at_once(gw.public, req.as_bytes()).await;
    let piped = in_two(gw.public, req.as_bytes()).await;
    assert_eq!(fast.status, 429, "{}", fast.text);
    let retry: u64 = fast.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=100).contains(&retry), "{retry}");
    assert_eq!(piped.status, 429);
    assert_eq!(gw.rejected("ip_rate").await, 2.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_valid_head_on_arrival_is_upgraded_and_its_early_frames_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(arrival_config(dir.path())).await;
    // The head and a first masked text frame in one write: the accept loop
    // reads both; the pipeline must carry the frame over to the session.
    let mut bytes =
        upgrade_request("/", &[("Authorization", &format!("Bearer {}", token("alice")))]).into_bytes();
    bytes.extend_from_slice(&masked_text(b"early"));
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    // The 101 and the echo may come in one read.
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let frame_after_head = |b: &[u8]| {
        let end = b.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        (b.len() >= end + 7).then(|| b[end..end + 7].to_vec())
    };
    let frame = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Some(f) = frame_after_head(&got) {
                return f;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the 101 and the echo");
    assert!(got.starts_with(b"HTTP/1.1 101 "), "{}", String::from_utf8_lossy(&got));
    assert_eq!(frame, b"\x81\x05early", "the echo of the frame sent with the head");
    drop(s);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

/// Which close is which. A plain close with request bytes still unread
/// turns into a reset: the client's next write fails (and most HTTP
/// clients then report the reset, not the answer). So a refused client
/// that sent more than its head gets a lingering close: its writes keep
/// succeeding until it stops, then it reads the whole answer and a clean
/// end. A client that sent only its head gets the plain close: answer,
/// then end.
#[tokio::test]
async fn a_client_still_sending_gets_a_lingering_close_and_a_bare_head_a_plain_one() {
    // What a plain close does to a client that is still sending.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = plain.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut c, _) = plain.accept().unwrap();
        let mut head = [0u8; 16];
        c.read_exact(&mut head).unwrap();
        c.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n").unwrap();
        // Dropped with the rest of the request unread.
    });
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[b'x'; 4096]).await.unwrap();
    server.join().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reset = s.write_all(&[b'y'; 4096]).await.unwrap_err();
    assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset, "{reset}");

    // The gateway, same client: head and body in one write, more later.
    let dir = tempfile::tempdir().unwrap();
    let gw = start(arrival_config(dir.path())).await;
    let mut req = upgrade_request("/", &[("Content-Length", "100000")]).into_bytes();
    req.extend_from_slice(&[b'x'; 4096]);
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    s.write_all(&req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&[b'y'; 4096]).await.expect("no reset while the client is still sending");
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut answer))
        .await
        .expect("closed after the client's FIN")
        .expect("a clean end, not a reset");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401 "), "{text}");
    assert!(text.ends_with("missing_token\n"), "the whole answer: {text}");

    // A bare head: the answer, then the end, at once.
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    s.write_all(upgrade_request("/", &[]).as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut answer))
        .await
        .expect("closed at once")
        .expect("a clean end, not a reset");
    assert!(String::from_utf8_lossy(&answer).ends_with("missing_token\n"));

    assert_eq!(gw.rejected("missing_token").await, 2.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}
