//! Every refusal reason of stages 1–6, provoked over a real socket: the
//! status (or the silent close), the counter, and the gauges back to zero.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

fn auth(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn global_cap_closes_without_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_connections = 1;
    let gw = start(cfg).await;
    let _held = TcpStream::connect(gw.public).await.unwrap();
    gw.wait_metric("portcullis_connections{state=\"handshaking\"}", 1.0).await;
    let mut second = TcpStream::connect(gw.public).await.unwrap();
    assert!(closed_without_answer(&mut second, Duration::from_secs(2)).await);
    gw.wait_metric("portcullis_handshakes_total{outcome=\"rejected\",reason=\"global_cap\"}", 1.0).await;
    drop(_held);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn handshake_cap_closes_without_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_handshakes = 1;
    let gw = start(cfg).await;
    let held = TcpStream::connect(gw.public).await.unwrap();
    gw.wait_metric("portcullis_connections{state=\"handshaking\"}", 1.0).await;
    let mut second = TcpStream::connect(gw.public).await.unwrap();
    assert!(closed_without_answer(&mut second, Duration::from_secs(2)).await);
    assert_eq!(gw.rejected("handshake_cap").await, 1.0);
    drop(held);
    gw.assert_gauges_zero().await;
    // With the slot free again, a client is admitted.
    let mut ws = ws(gw.public, &token("alice")).await;
    echo(&mut ws, "after").await;
    drop(ws);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn ip_cap_counts_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.per_ip_max_connections = 1;
    let gw = start(cfg).await;
    let held = TcpStream::connect(gw.public).await.unwrap();
    gw.wait_metric("portcullis_connections{state=\"handshaking\"}", 1.0).await;
    let mut second = TcpStream::connect(gw.public).await.unwrap();
    assert!(closed_without_answer(&mut second, Duration::from_secs(2)).await);
    assert_eq!(gw.rejected("ip_cap").await, 1.0);
    // Another source address is its own key.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = sock.connect(gw.public).await.unwrap();
    other
        .write_all(upgrade_request("/", &[("Authorization", &auth(&token("bob")))]).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut other).await.status, 101);
    drop((held, other));
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn proxy_header_missing_or_untrusted_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.listen.proxy_protocol = true;
    cfg.listen.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let gw = start(cfg).await;
    // Trusted peer, but no PROXY header: refused.
    let a = raw(gw.public, upgrade_request("/", &[]).as_bytes()).await;
    assert_eq!(a.status, 0, "no answer: {}", a.text);
    // Untrusted peer: refused before reading.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut s = sock.connect(gw.public).await.unwrap();
    s.write_all(b"PROXY TCP4 1.2.3.4 127.0.0.1 1111 80\r\n").await.unwrap();
    assert!(closed_without_answer(&mut s, Duration::from_secs(2)).await);
    gw.wait_metric("portcullis_handshakes_total{outcome=\"rejected\",reason=\"proxy_header\"}", 2.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn ip_rate_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.per_ip_rate = 0.5;
    cfg.limits.per_ip_burst = 2;
    let gw = start(cfg).await;
    let req = upgrade_request("/", &[("Authorization", &auth(&token("alice")))]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.public).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        assert_eq!(read_answer(&mut s).await.status, 101);
        held.push(s);
    }
    let a = raw(gw.public, req.as_bytes()).await;
    assert_eq!(a.status, 429, "{}", a.text);
    let retry: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(gw.rejected("ip_rate").await, 1.0);
    assert_eq!(
        gw.metric("portcullis_auth_cache_total{result=\"miss\"}").await,
        1.0,
        "no verification for a rate-limited client"
    );
    drop(held);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn silent_client_is_closed_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let start = Instant::now();
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    assert!(closed_without_answer(&mut s, Duration::from_secs(3)).await);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(1500), "{took:?}");
    assert_eq!(gw.rejected("handshake_timeout").await, 1.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn slowloris_trickling_a_byte_every_200ms_gets_408_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let req = upgrade_request("/", &[]);
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    let start = Instant::now();
    let mut answer = None;
    for b in req.as_bytes() {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if start.elapsed() > Duration::from_millis(700) {
            answer = Some(read_answer(&mut s).await);
            break;
        }
    }
    let a = answer.expect("cut before the head was complete");
    assert_eq!(a.status, 408, "{}", a.text);
    assert_eq!(a.ended, Ended::Closed, "answered, then closed");
    assert_eq!(gw.rejected("handshake_timeout").await, 1.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn oversized_head_is_431() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_header_bytes = 512;
    let gw = start(cfg).await;
    let big = "x".repeat(1000);
    let a = raw(gw.public, upgrade_request("/", &[("X-Pad", &big)]).as_bytes()).await;
    assert_eq!(a.status, 431);
    assert_eq!(gw.rejected("header_too_large").await, 1.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn malformed_upgrades_are_400_and_426() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let good = upgrade_request("/", &[]);
    for bad in [
        good.replace("Upgrade: websocket\r\n", ""),
        good.replace("Connection: Upgrade", "Connection: keep-alive"),
        good.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
        good.replace("GET", "PUT"),
        "NOT HTTP AT ALL\r\n\r\n".to_string(),
    ] {
        let a = raw(gw.public, bad.as_bytes()).await;
        assert_eq!(a.status, 400, "{bad:?} -> {}", a.text);
    }
    assert_eq!(gw.rejected("bad_request").await, 5.0);
    let a = raw(gw.public, good.replace("Version: 13", "Version: 8").as_bytes()).await;
    assert_eq!(a.status, 426);
    assert_eq!(a.header("sec-websocket-version").as_deref(), Some("13"));
    assert_eq!(gw.rejected("bad_version").await, 1.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn unknown_path_is_404_and_anything_else_too() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    assert_eq!(raw(gw.public, upgrade_request("/nope", &[]).as_bytes()).await.status, 404);
    assert_eq!(http(gw.public, "GET", "/favicon.ico", &[], "").await.status, 404);
    assert_eq!(http(gw.public, "POST", "/login", &[], "{}").await.status, 404, "login is off by default");
    assert_eq!(gw.rejected("bad_path").await, 3.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn origin_outside_the_allow_list_is_403() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.auth.allowed_origins = vec!["https://app.example".into()];
    let gw = start(cfg).await;
    let t = auth(&token("alice"));
    let a = raw(
        gw.public,
        upgrade_request("/", &[("Origin", "https://evil.example"), ("Authorization", &t)]).as_bytes(),
    )
    .await;
    assert_eq!(a.status, 403);
    assert_eq!(gw.rejected("origin").await, 1.0);
    assert_eq!(
        gw.metric("portcullis_auth_cache_total{result=\"miss\"}").await,
        0.0,
        "no verification before the origin check"
    );
    let a = raw(
        gw.public,
        upgrade_request("/", &[("Origin", "https://app.example"), ("Authorization", &t)]).as_bytes(),
    )
    .await;
    assert_eq!(a.status, 101);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn missing_token_is_401_with_a_bare_challenge() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let a = raw(gw.public, upgrade_request("/", &[]).as_bytes()).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.header("www-authenticate").as_deref(), Some("Bearer realm=\"portcullis\""));
    assert_eq!(gw.rejected("missing_token").await, 1.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

fn hs(alg: jsonwebtoken::Algorithm, secret: &[u8], claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn invalid_tokens_are_401_invalid_token() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.auth.issuer = "https://issuer.example".into();
    cfg.auth.audience = "portcullis".into();
    let gw = start(cfg).await;
    let good = json!({ "sub": "a", "iat": now(), "exp": now() + 600, "iss": "https://issuer.example", "aud": "portcullis" });
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let alg_none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&good.to_string()));
    let cases = vec![
        ("forged", hs(jsonwebtoken::Algorithm::HS256, b"wrong-secret", good.clone())),
        ("alg none", alg_none),
        ("wrong alg", hs(jsonwebtoken::Algorithm::HS512, SECRET.as_bytes(), good.clone())),
        ("wrong aud", hs(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), with("aud", json!("other")))),
        (
            "wrong iss",
            hs(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), with("iss", json!("https://evil"))),
        ),
        ("nbf ahead", hs(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), with("nbf", json!(now() + 600)))),
        (
            "too long-lived",
            hs(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), with("exp", json!(now() + 86_400 * 7))),
        ),
        ("garbage", "not.a.token".to_string()),
        ("oversized", "a".repeat(6000)),
    ];
    let n = cases.len();
    for (what, t) in cases {
        let a = raw(gw.public, upgrade_request("/", &[("Authorization", &auth(&t))]).as_bytes()).await;
        assert_eq!(a.status, 401, "{what}: {}", a.text);
        let challenge = a.header("www-authenticate").unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"portcullis\", error=\"invalid_token\", error_description="),
            "{what}: {challenge}"
        );
    }
    assert_eq!(gw.rejected("invalid_token").await, n as f64);
    // And the good one passes.
    let t = hs(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), good);
    assert_eq!(
        raw(gw.public, upgrade_request("/", &[("Authorization", &auth(&t))]).as_bytes()).await.status,
        101
    );
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn expired_token_is_401_expired_token() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let t = token_with(json!({ "iat": now() - 100, "exp": now() - 10 }));
    let a = raw(gw.public, upgrade_request("/", &[("Authorization", &auth(&t))]).as_bytes()).await;
    assert_eq!(a.status, 401);
    assert!(a.header("www-authenticate").unwrap().contains("error=\"invalid_token\""));
    assert_eq!(gw.rejected("expired_token").await, 1.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn revoked_jti_is_refused_and_stays_refused_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t = token_with(json!({ "jti": "j-123" }));
    let req = upgrade_request("/", &[("Authorization", &auth(&t))]);
    let gw = start(config(dir.path())).await;
    assert_eq!(raw(gw.public, req.as_bytes()).await.status, 101, "cached before the revocation");
    let r = gw.revoke(r#"{"jti":"j-123"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let a = raw(gw.public, req.as_bytes()).await;
    assert_eq!(a.status, 401, "refused even on a cache hit");
    assert!(a.header("www-authenticate").unwrap().contains("error=\"invalid_token\""));
    assert_eq!(gw.rejected("revoked_token").await, 1.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;

    let gw = start(config(dir.path())).await;
    assert_eq!(gw.metric("portcullis_revocations").await, 1.0);
    assert_eq!(raw(gw.public, req.as_bytes()).await.status, 401, "still revoked after a restart");
    assert_eq!(gw.rejected("revoked_token").await, 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn revoked_subject_before_time_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let old = token_with(json!({ "sub": "mallory", "iat": now() - 60 }));
    let r = gw.revoke(&format!(r#"{{"sub":"mallory","before":{}}}"#, now() - 30)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        raw(gw.public, upgrade_request("/", &[("Authorization", &auth(&old))]).as_bytes()).await.status,
        401
    );
    let fresh = token_with(json!({ "sub": "mallory" }));
    assert_eq!(
        raw(gw.public, upgrade_request("/", &[("Authorization", &auth(&fresh))]).as_bytes()).await.status,
        101
    );
    let no_iat = token_with(json!({ "sub": "mallory", "iat": null }));
    assert_eq!(
        raw(gw.public, upgrade_request("/", &[("Authorization", &auth(&no_iat))]).as_bytes()).await.status,
        401,
        "a token without iat counts as issued before any T"
    );
    assert_eq!(gw.rejected("revoked_token").await, 2.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn user_cap_is_429() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.per_user_max_connections = 1;
    let gw = start(cfg).await;
    let t = token("carol");
    let mut first = ws(gw.public, &t).await;
    let a = raw(gw.public, upgrade_request("/", &[("Authorization", &auth(&t))]).as_bytes()).await;
    assert_eq!(a.status, 429);
    assert_eq!(gw.rejected("user_cap").await, 1.0);
    echo(&mut first, "still here").await;
    drop(first);
    gw.assert_gauges_zero().await;
    // The slot is released when the connection ends.
    let mut again = ws(gw.public, &t).await;
    echo(&mut again, "again").await;
    drop(again);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn dead_upstream_is_502_before_any_101() {
    let dir = tempfile::tempdir().unwrap();
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = unused.local_addr().unwrap().port();
    drop(unused);
    let mut cfg = config(dir.path());
    cfg.upstream.url = format!("ws://127.0.0.1:{port}/");
    cfg.upstream.connect_timeout_ms = 500;
    let gw = start(cfg).await;
    let a =
        raw(gw.public, upgrade_request("/", &[("Authorization", &auth(&token("dave")))]).as_bytes()).await;
    assert_eq!(a.status, 502, "{}", a.text);
    assert_eq!(gw.rejected("upstream_unavailable").await, 1.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn legit_clients_are_admitted_while_200_slowloris_sockets_hang() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.handshake_timeout_ms = 3000;
    cfg.limits.per_ip_max_connections = 100;
    let gw = start(cfg).await;
    let mut loris = Vec::new();
    for i in 0..200u32 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("127.0.0.{}:0", 10 + i % 20).parse().unwrap()).unwrap();
        let mut s = sock.connect(gw.public).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        loris.push(s);
    }
    gw.wait_metric("portcullis_connections{state=\"handshaking\"}", 200.0).await;
    for i in 0..10 {
        let mut c = ws(gw.public, &token(&format!("legit{i}"))).await;
        echo(&mut c, "hello").await;
    }
    drop(loris);
    gw.assert_gauges_zero().await;
    assert_eq!(gw.metric("portcullis_handshakes_total{outcome=\"accepted\",reason=\"ok\"}").await, 10.0);
    gw.stop().await;
}
