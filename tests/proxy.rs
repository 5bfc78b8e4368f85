//! Proxy mode against a real WebSocket backend started by the test.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// What the backend saw of each handshake: request-target and headers.
type Seen = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

#[derive(Clone, Copy)]
enum Behaviour {
    Echo,
    /// Close with this code after the first message.
    CloseWith(u16),
    /// Drop the TCP connection after the first message, without a close.
    Vanish,
    /// Record the client's close code and reply.
    RecordClose,
}

struct Backend {
    addr: SocketAddr,
    seen: Seen,
    closes: Arc<Mutex<Vec<Option<u16>>>>,
}

#[allow(clippy::result_large_err)] // tungstenite's callback signature
async fn backend(behaviour: Behaviour) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let closes: Arc<Mutex<Vec<Option<u16>>>> = Arc::default();
    let (seen2, closes2) = (seen.clone(), closes.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let seen = seen2.clone();
            let closes = closes2.clone();
            tokio::spawn(async move {
                let cb = |req: &Request, mut resp: Response| {
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                        .collect();
                    seen.lock().unwrap().push((req.uri().to_string(), headers));
                    if let Some(p) = req.headers().get("sec-websocket-protocol") {
                        let first = p.to_str().unwrap().split(',').next().unwrap().trim().to_string();
                        resp.headers_mut().insert("sec-websocket-protocol", first.parse().unwrap());
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else { return };
                match behaviour {
                    Behaviour::Echo => {
                        while let Some(Ok(m)) = ws.next().await {
                            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                                break;
                            }
                        }
                    }
                    Behaviour::CloseWith(code) => {
                        let _ = ws.next().await;
                        let _ = ws
                            .close(Some(CloseFrame { code: CloseCode::from(code), reason: "bye".into() }))
                            .await;
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                    Behaviour::Vanish => {
                        let _ = ws.next().await;
                        drop(ws);
                    }
                    Behaviour::RecordClose => {
                        while let Some(m) = ws.next().await {
                            match m {
                                Ok(Message::Close(f)) => {
                                    closes.lock().unwrap().push(f.map(|f| u16::from(f.code)));
                                }
                                Ok(_) => {}
                                Err(_) => break,
                            }
                        }
                    }
                }
            });
        }
    });
    Backend { addr, seen, closes }
}

fn proxy_config(dir: &std::path::Path, backend: SocketAddr) -> portcullis::Config {
    let mut cfg = config(dir);
    cfg.upstream.url = format!("ws://{backend}/base");
    cfg.upstream.claim_headers.insert("role".into(), "X-User-Role".into());
    cfg.auth.carriers = vec![
        portcullis::config::Carrier::Header,
        portcullis::config::Carrier::Subprotocol,
        portcullis::config::Carrier::Query,
    ];
    cfg
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
}

#[tokio::test]
async fn identity_and_request_reach_the_backend_without_spoofs() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(Behaviour::Echo).await;
    let gw = start(proxy_config(dir.path(), be.addr)).await;
    let t = token_with(json!({ "sub": "ivy", "role": "admin" }));
    let mut c = ws_connect(
        gw.public,
        "/?room=1",
        &[
            ("Authorization", &format!("Bearer {t}")),
            ("X-Portcullis-Sub", "root"),
            ("X-User-Role", "superuser"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Cookie", "theme=dark"),
        ],
    )
    .await
    .unwrap();
    echo(&mut c, "through the backend").await;
    let seen = be.seen.lock().unwrap().clone();
    let (target, headers) = &seen[0];
    assert_eq!(target, "/base/?room=1");
    assert_eq!(header(headers, "x-portcullis-sub"), vec!["ivy"]);
    assert_eq!(header(headers, "x-user-role"), vec!["admin"]);
    assert_eq!(header(headers, "x-forwarded-for"), vec!["127.0.0.1"], "an untrusted client's XFF is dropped");
    assert_eq!(header(headers, "cookie"), vec!["theme=dark"]);
    assert!(header(headers, "authorization").is_empty(), "the credential stays at the gateway");
    drop(c);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn query_token_is_stripped_and_subprotocols_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(Behaviour::Echo).await;
    let mut cfg = proxy_config(dir.path(), be.addr);
    cfg.auth.carriers = vec![portcullis::config::Carrier::Query];
    let gw = start(cfg).await;
    let t = token("jay");
    let mut c =
        ws_connect(gw.public, &format!("/?a=1&access_token={t}&b=2"), &[("Sec-WebSocket-Protocol", "chat")])
            .await
            .unwrap();
    echo(&mut c, "q").await;
    let seen = be.seen.lock().unwrap().clone();
    assert_eq!(seen[0].0, "/base/?a=1&b=2");
    assert_eq!(header(&seen[0].1, "sec-websocket-protocol"), vec!["chat"]);
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn ten_thousand_messages_each_way_arrive_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(Behaviour::Echo).await;
    let gw = start(proxy_config(dir.path(), be.addr)).await;
    let c = ws(gw.public, &token("kim")).await;
    let (mut tx, mut rx) = c.split();
    const N: usize = 10_000;
    let writer = tokio::spawn(async move {
        for i in 0..N {
            let m = if i % 3 == 0 {
                Message::binary(vec![(i % 251) as u8; i % 700])
            } else {
                Message::text(format!("msg-{i}"))
            };
            tx.send(m).await.unwrap();
        }
        tx
    });
    for i in 0..N {
        let m = tokio::time::timeout(Duration::from_secs(10), rx.next()).await.unwrap().unwrap().unwrap();
        let want = if i % 3 == 0 {
            Message::binary(vec![(i % 251) as u8; i % 700])
        } else {
            Message::text(format!("msg-{i}"))
        };
        assert_eq!(m, want, "message {i}");
    }
    let tx = writer.await.unwrap();
    drop((tx, rx));
    assert_eq!(gw.metric("portcullis_messages_total{direction=\"client_to_upstream\"}").await, N as f64);
    gw.wait_metric("portcullis_messages_total{direction=\"upstream_to_client\"}", N as f64).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn close_codes_are_carried_across() {
    let dir = tempfile::tempdir().unwrap();
    // Backend closes with 4002: the client sees 4002.
    let be = backend(Behaviour::CloseWith(4002)).await;
    let gw = start(proxy_config(dir.path(), be.addr)).await;
    let mut c = ws(gw.public, &token("lee")).await;
    c.send(Message::text("go")).await.unwrap();
    assert_eq!(close_code(&mut c, Duration::from_secs(3)).await.0, Some(4002));
    gw.wait_metric("portcullis_disconnects_total{reason=\"upstream_close\"}", 1.0).await;
    gw.stop().await;

    // Client closes with 4001: the backend sees 4001.
    let be = backend(Behaviour::RecordClose).await;
    let gw = start(proxy_config(dir.path(), be.addr)).await;
    let mut c = ws(gw.public, &token("lee")).await;
    c.close(Some(CloseFrame { code: CloseCode::from(4001), reason: "done".into() })).await.unwrap();
    let _ = close_code(&mut c, Duration::from_secs(3)).await;
    gw.wait_metric("portcullis_disconnects_total{reason=\"client_close\"}", 1.0).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while be.closes.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(be.closes.lock().unwrap().clone(), vec![Some(4001)]);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_vanished_backend_closes_the_client_with_1014() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(Behaviour::Vanish).await;
    let gw = start(proxy_config(dir.path(), be.addr)).await;
    // tungstenite refuses to receive 1014 (it treats it as reserved), so
    // this client is raw.
    let mut s = raw_ws(gw.public, &token("max")).await;
    use tokio::io::AsyncWriteExt;
    s.write_all(&masked_text(b"hello?")).await.unwrap();
    assert_eq!(raw_close_code(&mut s, Duration::from_secs(3)).await, Some(1014));
    gw.wait_metric("portcullis_disconnects_total{reason=\"upstream_lost\"}", 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn the_cookie_carrier_works_end_to_end_and_its_cookie_stays_at_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(Behaviour::Echo).await;
    let mut cfg = proxy_config(dir.path(), be.addr);
    cfg.auth.carriers = vec![portcullis::config::Carrier::Cookie];
    cfg.auth.allowed_origins = vec!["https://app.example".into()];
    let gw = start(cfg).await;
    let t = token("cora");
    let cookie = format!("theme=dark; portcullis_token={t}; lang=fr");
    let mut c =
        ws_connect(gw.public, "/", &[("Cookie", &cookie), ("Origin", "https://app.example")]).await.unwrap();
    echo(&mut c, "by cookie").await;
    // Only the carrier's cookie: alone in its header, the header goes.
    let only = format!("portcullis_token={t}");
    let mut d =
        ws_connect(gw.public, "/", &[("Cookie", &only), ("Origin", "https://app.example")]).await.unwrap();
    echo(&mut d, "by cookie alone").await;
    let seen = be.seen.lock().unwrap().clone();
    assert_eq!(header(&seen[0].1, "x-portcullis-sub"), vec!["cora"]);
    assert_eq!(header(&seen[0].1, "cookie"), vec!["theme=dark; lang=fr"]);
    assert!(header(&seen[1].1, "cookie").is_empty(), "{:?}", seen[1].1);
    for (_, headers) in &seen {
        assert!(headers.iter().all(|(_, v)| !v.contains(&t)), "the token reached the backend: {headers:?}");
    }
    // A foreign origin is refused even with a good cookie (CSWSH).
    let a = raw(
        gw.public,
        upgrade_request("/", &[("Cookie", &cookie), ("Origin", "https://evil.example")]).as_bytes(),
    )
    .await;
    assert_eq!(a.status, 403);
    drop((c, d));
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn headers_a_client_could_smuggle_never_reach_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(Behaviour::Echo).await;
    let gw = start(proxy_config(dir.path(), be.addr)).await;
    let t = token_with(json!({ "sub": "sam", "role": "user" }));
    let req = upgrade_request(
        "/",
        &[
            ("Authorization", &format!("Bearer {t}")),
            ("Connection", "X-Internal-Auth, keep-alive"),
            ("X-Internal-Auth", "let-me-in"),
            ("Forwarded", "for=6.6.6.6;proto=https"),
            ("X-Forwarded-Host", "admin.internal"),
            ("X-Forwarded-Proto", "https"),
            ("X-Real-IP", "6.6.6.6"),
            ("x-user-role", "admin"),
            ("X-Kept", "yes"),
        ],
    );
    let mut s = tokio::net::TcpStream::connect(gw.public).await.unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut s).await.status, 101);
    let seen = be.seen.lock().unwrap().clone();
    let headers = &seen[0].1;
    for gone in ["x-internal-auth", "forwarded", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"] {
        assert!(header(headers, gone).is_empty(), "{gone} reached the backend: {headers:?}");
    }
    assert_eq!(header(headers, "x-user-role"), vec!["user"], "only the gateway sets a claim header");
    assert_eq!(header(headers, "x-kept"), vec!["yes"]);
    drop(s);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn an_authenticators_identity_headers_cannot_be_spoofed_by_the_client() {
    use portcullis::auth::{AuthRefusal, Authenticator, Identity};
    use portcullis::handshake::RequestHead;
    struct WithTenant;
    #[async_trait::async_trait]
    impl Authenticator for WithTenant {
        async fn authenticate(&self, _: &RequestHead, _: SocketAddr) -> Result<Identity, AuthRefusal> {
            Ok(Identity {
                sub: "tia".into(),
                forward: vec![("X-Tenant".into(), "blue".into())],
                ..Identity::default()
            })
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let be = backend(Behaviour::Echo).await;
    let gw = portcullis::Gateway::bind_with(proxy_config(dir.path(), be.addr), Some(Arc::new(WithTenant)))
        .await
        .unwrap();
    let public = gw.public_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gw.run(async move {
        let _ = rx.await;
    }));
    let mut c = ws_connect(public, "/", &[("x-tenant", "red")]).await.unwrap();
    echo(&mut c, "tenant").await;
    let seen = be.seen.lock().unwrap().clone();
    assert_eq!(header(&seen[0].1, "x-tenant"), vec!["blue"]);
    drop(c);
    let _ = tx.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn oversize_and_flood_close_both_sides_as_in_echo_mode() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(Behaviour::RecordClose).await;
    let mut cfg = proxy_config(dir.path(), be.addr);
    cfg.limits.max_message_bytes = 1024;
    cfg.limits.max_outbound_bytes = 8192;
    let gw = start(cfg).await;
    // Summed over fragments: two 600-byte fragments are one 1200-byte message.
    let mut s = raw_ws(gw.public, &token("big")).await;
    use tokio::io::AsyncWriteExt;
    let frag = |fin: bool, op: u8| {
        let mut f = vec![if fin { 0x80 } else { 0 } | op, 0xFE, 0x02, 0x58, 0, 0, 0, 0];
        f.extend(vec![b'a'; 600]);
        f
    };
    s.write_all(&frag(false, 0x1)).await.unwrap();
    s.write_all(&frag(true, 0x0)).await.unwrap();
    assert_eq!(raw_close_code(&mut s, Duration::from_secs(3)).await, Some(1009));
    gw.wait_metric("portcullis_disconnects_total{reason=\"message_too_big\"}", 1.0).await;
    gw.stop().await;

    let mut cfg = proxy_config(dir.path(), be.addr);
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while be.closes.lock().unwrap().len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(be.closes.lock().unwrap().clone(), vec![Some(1009), Some(1008)], "the backend is told too");
    gw.assert_gauges_zero().await;
    gw.stop().await;
}
