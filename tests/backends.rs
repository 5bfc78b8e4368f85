//! Backend pools against several real backends started by the tests: the
//! balance policies, retries before the 101, health checks, `wss://`
//! (a CA made here, SNI, mutual TLS), routes, the admin drain, metrics,
//! and the subprotocol the backend chose in the client's 101.
//!
//! Every backend tags its echoes (`tag|message`), so a test knows which
//! one served; killing one drops its listener and every connection it
//! holds, restarting binds the same port again.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use portcullis::config::Balance;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// Request-targets a backend was asked for (health checks included), with
/// the request's headers (names in lower case).
type Seen = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

struct Tagged {
    addr: SocketAddr,
    tag: &'static str,
    seen: Seen,
    task: Option<JoinHandle<()>>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Tagged {
    fn url(&self) -> String {
        format!("{}://{}/", if self.tls.is_some() { "wss" } else { "ws" }, self.addr)
    }

    /// Stops accepting and drops every connection it holds.
    fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Listens again on the same address.
    async fn restart(&mut self) {
        self.kill();
        // The aborted task releases its listener when it is dropped.
        let deadline = Instant::now() + Duration::from_secs(3);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "rebind {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.task = Some(spawn_backend(listener, self.tag, self.seen.clone(), self.tls.clone()));
    }

    fn targets(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().map(|(t, _)| t.clone()).collect()
    }

    /// Values of header `name` in the `i`-th request it was asked for.
    fn header(&self, i: usize, name: &str) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        seen[i].1.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    }
}

async fn tagged(tag: &'static str) -> Tagged {
    tagged_tls(tag, None).await
}

async fn tagged_tls(tag: &'static str, tls: Option<Arc<rustls::ServerConfig>>) -> Tagged {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let task = Some(spawn_backend(listener, tag, seen.clone(), tls.clone()));
    Tagged { addr, tag, seen, task, tls }
}

fn spawn_backend(
    listener: TcpListener,
    tag: &'static str,
    seen: Seen,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Connections live in the set: aborting this task drops them all.
        let mut conns = JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            while conns.try_join_next().is_some() {}
            let seen = seen.clone();
            match tls.clone() {
                None => {
                    conns.spawn(serve(tcp, tag, seen));
                }
                Some(cfg) => {
                    conns.spawn(async move {
                        if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                            serve(s, tag, seen).await;
                        }
                    });
                }
            }
        }
    })
}

/// Echoes `tag|text`; picks the first subprotocol offered.
#[allow(clippy::result_large_err)] // tungstenite's callback signature
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(io: S, tag: &'static str, seen: Seen) {
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
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(io, cb).await else { return };
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            if ws.send(Message::text(format!("{tag}|{t}"))).await.is_err() {
                break;
            }
        }
    }
}

fn pool_config(dir: &std::path::Path, backends: &[&Tagged], balance: Balance) -> portcullis::Config {
    let mut cfg = config(dir);
    cfg.upstream.backends = backends.iter().map(|b| b.url()).collect();
    cfg.upstream.balance = balance;
    cfg.upstream.connect_timeout_ms = 500;
    cfg.upstream.health_interval_ms = 100;
    cfg.limits.per_user_max_connections = 100;
    cfg
}

/// Which backend answers this connection.
async fn served_by(ws: &mut Ws) -> String {
    ws.send(Message::text("who")).await.unwrap();
    let m =
        tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("an answer").unwrap().unwrap();
    m.into_text().unwrap().split('|').next().unwrap().to_string()
}

async fn connect_as(gw: &TestGateway, sub: &str, path: &str) -> Ws {
    ws_connect(gw.public, path, &[("Authorization", &format!("Bearer {}", token(sub)))])
        .await
        .expect("connects")
}

async fn backends_json(gw: &TestGateway) -> Vec<Value> {
    let a = http(gw.admin, "GET", "/admin/backends", &[], "").await;
    assert_eq!(a.status, 200, "{}", a.text);
    serde_json::from_str::<Vec<Value>>(body(&a)).unwrap()
}

async fn admin_post(gw: &TestGateway, path: &str, json: &str) -> Answer {
    http(gw.admin, "POST", path, &[("Content-Type", "application/json")], json).await
}

/// Waits (bounded) until `/admin/backends` says `url` is `healthy`; returns how long it took.
async fn wait_health(gw: &TestGateway, url: &str, healthy: bool, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let list = backends_json(gw).await;
        let e = list.iter().find(|e| e["url"] == url).expect("listed");
        if e["healthy"] == healthy {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{url} not healthy={healthy} within {within:?}: {list:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn count(tags: &[String], tag: &str) -> usize {
    tags.iter().filter(|t| *t == tag).count()
}

#[tokio::test]
async fn round_robin_takes_turns_and_least_connections_evens_out() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (tagged("a").await, tagged("b").await, tagged("c").await);
    let gw = start(pool_config(dir.path(), &[&a, &b, &c], Balance::RoundRobin)).await;
    let mut tags = Vec::new();
    for i in 0..9 {
        let mut ws = connect_as(&gw, &format!("u{i}"), "/").await;
        tags.push(served_by(&mut ws).await);
    }
    for t in ["a", "b", "c"] {
        assert_eq!(count(&tags, t), 3, "{tags:?}");
    }
    // Consecutive connections go to different backends.
    assert!(tags.windows(2).all(|w| w[0] != w[1]), "{tags:?}");
    gw.stop().await;

    // least_connections: connections held open; a backend holding more
    // is passed over until the others catch up.
    let gw = start(pool_config(dir.path(), &[&a, &b, &c], Balance::LeastConnections)).await;
    let mut held = Vec::new();
    let mut tags = Vec::new();
    for i in 0..6 {
        let mut ws = connect_as(&gw, &format!("l{i}"), "/").await;
        tags.push(served_by(&mut ws).await);
        held.push(ws);
    }
    for t in ["a", "b", "c"] {
        assert_eq!(count(&tags, t), 2, "{tags:?}");
    }
    // Close both of b's: the next two go to b.
    let mut rest = Vec::new();
    for (ws, t) in held.into_iter().zip(&tags) {
        if t == "b" {
            drop(ws);
        } else {
            rest.push(ws);
        }
    }
    let list = backends_json(&gw).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while backends_json(&gw).await.iter().any(|e| e["url"] == b.url() && e["connections"] != 0) {
        assert!(Instant::now() < deadline, "{list:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..2 {
        let mut ws = connect_as(&gw, &format!("m{i}"), "/").await;
        assert_eq!(served_by(&mut ws).await, "b");
        rest.push(ws);
    }
    drop(rest);
    gw.stop().await;
}

#[tokio::test]
async fn sub_hash_keeps_a_user_on_one_backend_and_moves_only_the_users_of_one_that_left() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut b, c) = (tagged("a").await, tagged("b").await, tagged("c").await);
    let mut cfg = pool_config(dir.path(), &[&a, &b, &c], Balance::SubHash);
    cfg.upstream.unhealthy_after = 1;
    cfg.upstream.healthy_after = 1;
    let gw = start(cfg).await;
    let users: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    let mut first = Vec::new();
    for u in &users {
        let mut ws = connect_as(&gw, u, "/").await;
        first.push(served_by(&mut ws).await);
    }
    for t in ["a", "b", "c"] {
        assert!(count(&first, t) > 0, "every backend owns some users: {first:?}");
    }
    // Sticky: the same users land on the same backends again.
    for (u, want) in users.iter().zip(&first) {
        let mut ws = connect_as(&gw, u, "/").await;
        assert_eq!(&served_by(&mut ws).await, want, "{u}");
    }
    // b leaves: only its users move.
    b.kill();
    wait_health(&gw, &b.url(), false, Duration::from_secs(3)).await;
    let mut moved = 0;
    for (u, was) in users.iter().zip(&first) {
        let mut ws = connect_as(&gw, u, "/").await;
        let now = served_by(&mut ws).await;
        if was == "b" {
            assert_ne!(now, "b");
            moved += 1;
        } else {
            assert_eq!(&now, was, "{u} moved although its backend stayed");
        }
    }
    assert_eq!(moved, count(&first, "b"));
    // b returns: its users come back, the others stay.
    b.restart().await;
    wait_health(&gw, &b.url(), true, Duration::from_secs(3)).await;
    for (u, was) in users.iter().zip(&first) {
        let mut ws = connect_as(&gw, u, "/").await;
        assert_eq!(&served_by(&mut ws).await, was, "{u}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_dead_backend_costs_no_handshake_and_is_taken_out_then_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut b, c) = (tagged("a").await, tagged("b").await, tagged("c").await);
    let mut cfg = pool_config(dir.path(), &[&a, &b, &c], Balance::RoundRobin);
    cfg.upstream.health_interval_ms = 200;
    cfg.upstream.unhealthy_after = 2;
    cfg.upstream.healthy_after = 2;
    let gw = start(cfg).await;
    let up = |u: &str| format!("portcullis_backend_up{{backend=\"{u}\"}}");
    let errors = |u: &str| format!("portcullis_backend_connect_errors_total{{backend=\"{u}\"}}");
    assert_eq!(gw.metric(&up(&b.url())).await, 1.0);
    b.kill();
    let killed = Instant::now();
    // Every handshake from now on succeeds: b's turns are retried on the others.
    for i in 0..30 {
        let mut ws = connect_as(&gw, &format!("k{i}"), "/").await;
        assert_ne!(served_by(&mut ws).await, "b");
    }
    assert!(gw.metric(&errors(&b.url())).await >= 1.0, "the failed connects are counted");
    assert_eq!(gw.metric(&errors(&a.url())).await, 0.0);
    // Taken out: by the handshakes' own failed connects (passive), else
    // within two checks.
    wait_health(&gw, &b.url(), false, Duration::from_millis(2 * 200 + 1000)).await;
    assert!(killed.elapsed() < Duration::from_secs(10), "{:?}", killed.elapsed());
    assert_eq!(gw.metric(&up(&b.url())).await, 0.0);
    assert_eq!(gw.rejected("upstream_unavailable").await, 0.0);
    // Back: two good checks put it back, not before.
    b.restart().await;
    let took = wait_health(&gw, &b.url(), true, Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(150), "put back after one check: {took:?}");
    assert_eq!(gw.metric(&up(&b.url())).await, 1.0);
    let mut tags = Vec::new();
    for i in 0..6 {
        let mut ws = connect_as(&gw, &format!("r{i}"), "/").await;
        tags.push(served_by(&mut ws).await);
    }
    assert_eq!(count(&tags, "b"), 2, "b receives traffic again: {tags:?}");
    gw.stop().await;
}

#[tokio::test]
async fn with_no_healthy_backend_the_answer_is_502_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = tagged("a").await;
    // Accepts TCP and answers HTTP, but is no WebSocket server: down.
    let http_only = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http_only.local_addr().unwrap();
    let http_task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = http_only.accept().await else { return };
            tokio::spawn(async move {
                let mut b = [0u8; 2048];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            });
        }
    });
    let mut cfg = pool_config(dir.path(), &[&a], Balance::LeastConnections);
    let http_url = format!("ws://{http_addr}/");
    cfg.upstream.backends.push(http_url.clone());
    cfg.upstream.unhealthy_after = 1;
    let gw = start(cfg).await;
    wait_health(&gw, &http_url, false, Duration::from_secs(2)).await;
    let mut ws = connect_as(&gw, "one", "/").await;
    assert_eq!(served_by(&mut ws).await, "a");
    a.kill();
    wait_health(&gw, &a.url(), false, Duration::from_secs(2)).await;
    let started = Instant::now();
    let ans = raw(
        gw.public,
        upgrade_request("/", &[("Authorization", &format!("Bearer {}", token("two")))]).as_bytes(),
    )
    .await;
    assert_eq!(ans.status, 502);
    assert!(started.elapsed() < Duration::from_millis(200), "not at once: {:?}", started.elapsed());
    assert_eq!(gw.rejected("upstream_unavailable").await, 1.0);
    http_task.abort();
    gw.stop().await;
}

/// A CA, and certificates it signs, written as PEM files.
struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_file: std::path::PathBuf,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

fn ca(dir: &std::path::Path, name: &str) -> Pki {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let ca_file = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_file, cert.pem()).unwrap();
    Pki { issuer: rcgen::Issuer::new(params, key), ca_file, ca_der: cert.der().clone() }
}

/// A leaf for `names`, signed by `pki`: (cert file, key file, chain, key).
fn leaf(
    dir: &std::path::Path,
    pki: &Pki,
    file: &str,
    names: &[&str],
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &pki.issuer).unwrap();
    let (cf, kf) = (dir.join(format!("{file}.crt")), dir.join(format!("{file}.key")));
    std::fs::write(&cf, cert.pem()).unwrap();
    std::fs::write(&kf, key.serialize_pem()).unwrap();
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    (cf, kf, vec![cert.der().clone()], der)
}

fn server_tls(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    client_ca: Option<&Pki>,
) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = match client_ca {
        None => b.with_no_client_auth(),
        Some(pki) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(pki.ca_der.clone()).unwrap();
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            b.with_client_cert_verifier(v)
        }
    };
    Arc::new(b.with_single_cert(chain, key).unwrap())
}

#[tokio::test]
async fn wss_backends_are_verified_against_the_ca_by_server_name_with_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ca(dir.path(), "backend");
    let other = ca(dir.path(), "other");
    let (_, _, chain, key) = leaf(dir.path(), &pki, "server", &["backend.test"]);
    let (client_cert, client_key, _, _) = leaf(dir.path(), &pki, "client", &["gateway.test"]);
    let be = tagged_tls("tls", Some(server_tls(chain, key, Some(&pki)))).await;
    // The URL names 127.0.0.1; the certificate names backend.test.
    let with = |ca_file: &std::path::Path, mtls: bool, name: &str| {
        let mut cfg = pool_config(dir.path(), &[&be], Balance::LeastConnections);
        cfg.upstream.health_interval_ms = 0;
        cfg.upstream.ca_file = ca_file.to_path_buf();
        cfg.upstream.server_name = name.into();
        if mtls {
            cfg.upstream.client_cert_file = client_cert.clone();
            cfg.upstream.client_key_file = client_key.clone();
        }
        cfg
    };
    let gw = start(with(&pki.ca_file, true, "backend.test")).await;
    let mut ws = connect_as(&gw, "tia", "/").await;
    assert_eq!(served_by(&mut ws).await, "tls");
    ws.send(Message::text("x".repeat(100_000))).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(m.into_text().unwrap().len(), 100_004, "a large message through TLS, whole");
    drop(ws);
    gw.stop().await;

    let errors = format!("portcullis_backend_connect_errors_total{{backend=\"{}\"}}", be.url());
    let refused = |cfg: portcullis::Config| {
        let errors = errors.clone();
        async move {
            let gw = start(cfg).await;
            let a = raw(
                gw.public,
                upgrade_request("/", &[("Authorization", &format!("Bearer {}", token("tia")))]).as_bytes(),
            )
            .await;
            let n = gw.metric(&errors).await;
            gw.stop().await;
            (a.status, n)
        }
    };
    // Another CA, another name, no client certificate: each a 502.
    assert_eq!(refused(with(&other.ca_file, true, "backend.test")).await.0, 502);
    assert_eq!(refused(with(&pki.ca_file, true, "wrong.test")).await.0, 502);
    let (status, errors) = refused(with(&pki.ca_file, false, "backend.test")).await;
    assert_eq!(status, 502);
    assert!(errors >= 1.0);
}

#[tokio::test]
async fn routes_take_their_own_pools_and_replace_the_matched_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (tagged("a").await, tagged("b").await, tagged("c").await);
    let mut cfg = config(dir.path());
    cfg.upstream.url = format!("ws://{}/base", a.addr);
    cfg.upstream.health_interval_ms = 0;
    cfg.upstream.routes = vec![
        portcullis::config::Route {
            path_prefix: "/graphql".into(),
            backends: vec![format!("ws://{}/graphql", b.addr)],
            ..Default::default()
        },
        portcullis::config::Route {
            path_prefix: "/chat".into(),
            backends: vec![format!("ws://{}", c.addr)],
            balance: Some(Balance::RoundRobin),
            ..Default::default()
        },
    ];
    let gw = start(cfg).await;
    for (path, tag) in
        [("/graphql?x=1", "b"), ("/graphql/sub", "b"), ("/chat", "c"), ("/chat/room?r=2", "c"), ("/", "a")]
    {
        let mut ws = connect_as(&gw, "rue", path).await;
        assert_eq!(served_by(&mut ws).await, tag, "{path}");
    }
    assert_eq!(b.targets(), vec!["/graphql?x=1", "/graphql/sub"]);
    assert_eq!(c.targets(), vec!["/", "/room?r=2"]);
    assert_eq!(a.targets(), vec!["/base/"]);
    // Neither in listen.paths nor under a route (segments, not characters).
    for path in ["/other", "/chatroom"] {
        let ans = raw(
            gw.public,
            upgrade_request(path, &[("Authorization", &format!("Bearer {}", token("rue")))]).as_bytes(),
        )
        .await;
        assert_eq!(ans.status, 404, "{path}");
    }
    let list = backends_json(&gw).await;
    let routes: Vec<(&str, &str)> =
        list.iter().map(|e| (e["route"].as_str().unwrap(), e["url"].as_str().unwrap())).collect();
    let (ua, ub, uc) =
        (format!("ws://{}/base", a.addr), format!("ws://{}/graphql", b.addr), format!("ws://{}", c.addr));
    assert_eq!(routes, vec![("default", ua.as_str()), ("/graphql", ub.as_str()), ("/chat", uc.as_str())]);
    gw.stop().await;
}

#[tokio::test]
async fn a_drain_closes_a_backends_connections_with_1012_spread_out_then_undrain_puts_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (tagged("a").await, tagged("b").await);
    let gw = start(pool_config(dir.path(), &[&a, &b], Balance::RoundRobin)).await;
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for i in 0..8 {
        let mut ws = connect_as(&gw, &format!("d{i}"), "/").await;
        if served_by(&mut ws).await == "a" {
            on_a.push(ws);
        } else {
            on_b.push(ws);
        }
    }
    assert_eq!((on_a.len(), on_b.len()), (4, 4));
    let list = backends_json(&gw).await;
    for e in &list {
        assert_eq!(
            (e["route"].as_str(), e["healthy"].as_bool(), e["draining"].as_bool()),
            (Some("default"), Some(true), Some(false))
        );
        assert_eq!(e["connections"], 4, "{list:?}");
    }
    assert_eq!(gw.metric(&format!("portcullis_backend_connections{{backend=\"{}\"}}", a.url())).await, 4.0);

    // Unknown URLs: 404, nothing drained.
    assert_eq!(
        admin_post(&gw, "/admin/backends/drain", r#"{"url": "ws://nowhere:1/", "over_s": 1}"#).await.status,
        404
    );
    assert_eq!(admin_post(&gw, "/admin/backends/undrain", r#"{"url": "ws://nowhere:1/"}"#).await.status, 404);
    assert_eq!(admin_post(&gw, "/admin/backends/drain", r#"{"over_s": 1}"#).await.status, 400);

    let started = Instant::now();
    let body = format!(r#"{{"url": "{}", "over_s": 2}}"#, a.url());
    let ans = admin_post(&gw, "/admin/backends/drain", &body).await;
    assert_eq!(ans.status, 200, "{}", ans.text);
    let closes: Vec<_> = on_a
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), ws.next())
                        .await
                        .expect("closed in time")
                    {
                        Some(Ok(Message::Close(f))) => {
                            let f = f.unwrap();
                            return (u16::from(f.code), f.reason.to_string(), Instant::now());
                        }
                        Some(Ok(_)) => continue,
                        other => panic!("no close frame: {other:?}"),
                    }
                }
            })
        })
        .collect();
    // No new connection goes to a while it drains.
    for i in 0..4 {
        let mut ws = connect_as(&gw, &format!("n{i}"), "/").await;
        assert_eq!(served_by(&mut ws).await, "b");
    }
    let list = backends_json(&gw).await;
    assert!(list.iter().any(|e| e["url"] == a.url() && e["draining"] == true), "{list:?}");
    let mut at = Vec::new();
    for c in closes {
        let (code, reason, when) = c.await.unwrap();
        assert_eq!((code, reason.as_str()), (1012, "backend_drain"));
        at.push(when - started);
    }
    at.sort();
    // Spread over 2 s: one at 0, 0.5, 1, 1.5 s (not all at once).
    assert!(at[0] < Duration::from_millis(500), "{at:?}");
    assert!(at[3] >= Duration::from_millis(1300), "not spread: {at:?}");
    assert!(at[3] < Duration::from_millis(2500), "{at:?}");
    gw.wait_metric("portcullis_disconnects_total{reason=\"backend_drain\"}", 4.0).await;
    gw.wait_metric(&format!("portcullis_backend_connections{{backend=\"{}\"}}", a.url()), 0.0).await;
    // b's connections were not touched.
    for ws in &mut on_b {
        assert_eq!(served_by(ws).await, "b");
    }
    let body = format!(r#"{{"url": "{}"}}"#, a.url());
    assert_eq!(admin_post(&gw, "/admin/backends/undrain", &body).await.status, 200);
    let mut tags = Vec::new();
    for i in 0..4 {
        let mut ws = connect_as(&gw, &format!("u{i}"), "/").await;
        tags.push(served_by(&mut ws).await);
    }
    assert_eq!(count(&tags, "a"), 2, "a takes its turns again: {tags:?}");
    gw.stop().await;
}

#[tokio::test]
async fn backend_series_exist_from_start_for_configured_backends_only() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (tagged("a").await, tagged("b").await);
    let mut cfg = pool_config(dir.path(), &[&a, &b], Balance::LeastConnections);
    cfg.upstream.health_interval_ms = 0;
    let gw = start(cfg).await;
    let m = gw.metrics().await;
    for u in [a.url(), b.url()] {
        assert_eq!(value_of(&m, &format!("portcullis_backend_up{{backend=\"{u}\"}}")), 1.0);
        assert_eq!(value_of(&m, &format!("portcullis_backend_connections{{backend=\"{u}\"}}")), 0.0);
        assert_eq!(value_of(&m, &format!("portcullis_backend_connect_errors_total{{backend=\"{u}\"}}")), 0.0);
    }
    let labelled = m.lines().filter(|l| l.starts_with("portcullis_backend_")).count();
    assert_eq!(labelled, 6, "{m}");
    for name in
        ["portcullis_backend_up", "portcullis_backend_connections", "portcullis_backend_connect_errors_total"]
    {
        assert!(m.contains(&format!("# HELP {name} ")), "{name} has HELP");
    }
    gw.stop().await;
}

#[tokio::test]
async fn the_101_names_the_subprotocol_the_backend_chose_and_bearer_only_when_it_chose_none() {
    let dir = tempfile::tempdir().unwrap();
    let a = tagged("a").await;
    let mut cfg = pool_config(dir.path(), &[&a], Balance::LeastConnections);
    cfg.auth.carriers = vec![portcullis::config::Carrier::Subprotocol];
    let gw = start(cfg).await;
    let t = token("pat");
    let offer = format!("graphql-transport-ws, bearer, {t}");
    let ans = raw_upgrade(&gw, &offer).await;
    assert_eq!(ans.status, 101, "{}", ans.text);
    assert_eq!(ans.header("sec-websocket-protocol").as_deref(), Some("graphql-transport-ws"));
    // Only the pair: the backend is offered nothing and chooses nothing.
    let ans = raw_upgrade(&gw, &format!("bearer, {t}")).await;
    assert_eq!(ans.status, 101, "{}", ans.text);
    assert_eq!(ans.header("sec-websocket-protocol").as_deref(), Some("bearer"));
    gw.stop().await;
}

async fn raw_upgrade(gw: &TestGateway, protocols: &str) -> Answer {
    let mut s = tokio::net::TcpStream::connect(gw.public).await.unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(upgrade_request("/", &[("Sec-WebSocket-Protocol", protocols)]).as_bytes()).await.unwrap();
    read_answer(&mut s).await
}

#[test]
fn pool_keys_are_checked_and_named() {
    let base = "[auth]\nhmac_secret = \"s\"\n";
    let err = |extra: &str| portcullis::Config::parse(&format!("{base}{extra}")).unwrap_err().to_string();
    for (extra, key) in [
        ("[upstream]\nurl = \"ws://a:1/\"\nbackends = [\"ws://b:1/\"]\n", "upstream.backends"),
        ("[upstream]\nurl = \"echo\"\nbackends = [\"ws://b:1/\"]\n", "upstream.backends"),
        ("[upstream]\nbackends = [\"http://b:1/\"]\n", "upstream.backends"),
        ("[upstream]\nbackends = [\"ws://b:1/\", \"ws://b:1/\"]\n", "upstream.backends"),
        ("[upstream]\nbalance = \"random\"\n", "upstream.balance"),
        ("[upstream]\nunhealthy_after = 0\n", "upstream.unhealthy_after"),
        ("[upstream]\nclient_cert_file = \"c.pem\"\n", "upstream.client_key_file"),
        ("[upstream]\nserver_name = \"not a name\"\n", "upstream.server_name"),
        (
            "[[upstream.routes]]\npath_prefix = \"graphql\"\nbackends = [\"ws://g:1/\"]\n",
            "upstream.routes.path_prefix",
        ),
        ("[[upstream.routes]]\npath_prefix = \"/g\"\n", "upstream.routes.backends"),
        ("[[upstream.routes]]\npath_prefix = \"/g\"\nbackends = [\"ws://g:1/\"]\nweight = 3\n", "weight"),
    ] {
        let e = err(extra);
        assert!(e.contains(key), "{extra:?}: {e}");
    }
    let ok = portcullis::Config::parse(&format!(
        "{base}[upstream]\nbackends = [\"ws://a:1/\", \"wss://b:2/ws\"]\nbalance = \"sub_hash\"\n\
         [[upstream.routes]]\npath_prefix = \"/graphql\"\nbackends = [\"ws://g:1/graphql\"]\nretries = 0\n"
    ))
    .unwrap();
    assert_eq!(ok.upstream.balance, Balance::SubHash);
    assert_eq!(ok.upstream.retries, 2);
    assert_eq!(ok.upstream.routes[0].retries, Some(0));
}

#[tokio::test]
async fn a_reload_changes_the_pools_and_routes_and_live_sessions_keep_their_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (tagged("a").await, tagged("b").await, tagged("c").await);
    let cfg = pool_config(dir.path(), &[&a, &b], Balance::RoundRobin);
    let (gw, shared) = start_shared(cfg.clone()).await;
    let mut on_a = connect_as(&gw, "s0", "/").await;
    assert_eq!(served_by(&mut on_a).await, "a");
    let body = format!(r#"{{"url": "{}", "over_s": 60}}"#, b.url());
    assert_eq!(admin_post(&gw, "/admin/backends/drain", &body).await.status, 200);
    // a leaves the pool, c joins; b (kept) stays drained; a route appears.
    let mut next = cfg.clone();
    next.upstream.backends = vec![b.url(), c.url()];
    next.upstream.routes = vec![portcullis::config::Route {
        path_prefix: "/v2".into(),
        backends: vec![a.url()],
        ..Default::default()
    }];
    shared.reload(next).unwrap();
    for i in 0..3 {
        let mut ws = connect_as(&gw, &format!("s{}", i + 1), "/").await;
        assert_eq!(served_by(&mut ws).await, "c", "b is still drained, a is gone from the default pool");
    }
    let mut v2 = connect_as(&gw, "s9", "/v2/x").await;
    assert_eq!(served_by(&mut v2).await, "a");
    assert_eq!(a.targets().last().map(String::as_str), Some("/x"));
    // The session on a, opened before the reload, goes on.
    assert_eq!(served_by(&mut on_a).await, "a");
    let list = backends_json(&gw).await;
    let view: Vec<(String, String, bool)> = list
        .iter()
        .map(|e| {
            (e["route"].as_str().unwrap().into(), e["url"].as_str().unwrap().into(), e["draining"] == true)
        })
        .collect();
    assert_eq!(
        view,
        vec![
            ("default".into(), b.url(), true),
            ("default".into(), c.url(), false),
            ("/v2".into(), a.url(), false)
        ]
    );
    // A refused reload (a bad URL) leaves the pools as they are.
    let mut bad = cfg.clone();
    bad.upstream.backends = vec!["ws://no port:x/".into()];
    assert!(shared.reload(bad).is_err());
    // Refused later (its CA file is missing): no series for the URL either.
    let mut bad = cfg.clone();
    bad.upstream.backends = vec!["wss://127.0.0.1:1/".into()];
    bad.upstream.ca_file = dir.path().join("missing.pem");
    let e = shared.reload(bad).unwrap_err().to_string();
    assert!(e.starts_with("upstream.ca_file"), "{e}");
    assert!(!gw.metrics().await.contains("wss://127.0.0.1:1/"), "a refused reload left a series");
    let mut ws = connect_as(&gw, "s5", "/").await;
    assert_eq!(served_by(&mut ws).await, "c");
    gw.stop().await;
}

/// A page that opens a WebSocket through the subprotocol carrier beside its
/// own protocol, as browser applications do, and reports what it saw to
/// `/done`. Its iframe (`/hold`) is answered only then, so the page's load
/// event, and Chromium's `--dump-dom`, wait for the WebSocket.
const PAGE: &str = r#"<!doctype html><html><body><pre id="out">pending</pre><script>
const out = document.getElementById("out");
const done = (r) => { out.textContent = r; fetch("/done?" + encodeURIComponent(r)); };
const ws = new WebSocket("ws://GATEWAY/", ["graphql-transport-ws", "bearer", "TOKEN"]);
ws.onopen = () => ws.send("hello");
ws.onmessage = (e) => { done("protocol=" + ws.protocol + " echo=" + e.data); ws.close(); };
ws.onerror = () => done("error");
</script><iframe src="/hold"></iframe></body></html>"#;

#[tokio::test]
async fn in_headless_chromium_the_page_sees_its_own_protocol() {
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("this test needs chromium (apt-get install chromium)");
    let dir = tempfile::tempdir().unwrap();
    let a = tagged("app").await;
    let mut cfg = pool_config(dir.path(), &[&a], Balance::LeastConnections);
    cfg.auth.carriers = vec![portcullis::config::Carrier::Subprotocol];
    let gw = start(cfg).await;
    let page = PAGE.replace("GATEWAY", &gw.public.to_string()).replace("TOKEN", &token("browser"));
    // The page's own origin: a small HTTP server (page, report, hold).
    let site = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let site_addr = site.local_addr().unwrap();
    let (report_tx, mut report_rx) = tokio::sync::watch::channel(None::<String>);
    let report_tx = Arc::new(report_tx);
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = site.accept().await else { return };
            let page = page.clone();
            let tx = report_tx.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                let n = s.read(&mut b).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&b[..n]).to_string();
                let target = head.split(' ').nth(1).unwrap_or("/").to_string();
                let body = if let Some(q) = target.strip_prefix("/done?") {
                    let r = percent_encoding::percent_decode_str(q).decode_utf8_lossy().to_string();
                    tx.send_replace(Some(r));
                    String::new()
                } else if target == "/hold" {
                    let mut rx = tx.subscribe();
                    let _ = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| r.is_some())).await;
                    "held".to_string()
                } else {
                    page
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    let profile = dir.path().join("chromium-profile");
    let url = format!("http://{site_addr}/");
    let browser = tokio::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", &url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(60), report_rx.wait_for(|r| r.is_some()))
        .await
        .expect("the page reported within 60 s")
        .unwrap()
        .clone();
    assert_eq!(seen.as_deref(), Some("protocol=graphql-transport-ws echo=app|hello"));
    drop(browser);
    server.abort();
    gw.stop().await;
}

#[test]
fn check_config_reads_the_backend_tls_files_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    let write = |upstream: &str| {
        std::fs::write(
            &file,
            format!(
                "[auth]\nhmac_secret = \"{SECRET}\"\n[revocation]\npath = \"{}\"\n[upstream]\n{upstream}",
                dir.path().join("r.log").display()
            ),
        )
        .unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap()
    };
    let missing = dir.path().join("missing-ca.pem");
    let out = write(&format!("backends = [\"wss://127.0.0.1:1/\"]\nca_file = \"{}\"\n", missing.display()));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstream.ca_file") && err.contains("missing-ca.pem"), "{err}");
    // ws:// only: the TLS files are not needed, so not read.
    let out = write(&format!("backends = [\"ws://127.0.0.1:1/\"]\nca_file = \"{}\"\n", missing.display()));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let pki = ca(dir.path(), "ok");
    let out =
        write(&format!("backends = [\"wss://127.0.0.1:1/\"]\nca_file = \"{}\"\n", pki.ca_file.display()));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn a_route_forwards_its_own_claim_headers_and_every_pools_are_stripped_from_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (tagged("a").await, tagged("b").await);
    let mut cfg = config(dir.path());
    cfg.upstream.url = a.url();
    cfg.upstream.claim_headers.insert("role".into(), "X-Role".into());
    cfg.upstream.health_interval_ms = 0;
    cfg.upstream.routes = vec![portcullis::config::Route {
        path_prefix: "/t".into(),
        backends: vec![b.url()],
        claim_headers: Some([("tenant".to_string(), "X-Tenant".to_string())].into()),
        ..Default::default()
    }];
    let gw = start(cfg).await;
    let t = token_with(serde_json::json!({ "sub": "cy", "role": "admin", "tenant": "acme" }));
    let spoof =
        [("Authorization", format!("Bearer {t}")), ("X-Tenant", "evil".into()), ("X-Role", "root".into())];
    let spoof: Vec<(&str, &str)> = spoof.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut ws = ws_connect(gw.public, "/", &spoof).await.unwrap();
    assert_eq!(served_by(&mut ws).await, "a");
    let mut ws = ws_connect(gw.public, "/t", &spoof).await.unwrap();
    assert_eq!(served_by(&mut ws).await, "b");
    assert_eq!(a.header(0, "x-role"), vec!["admin"]);
    assert!(a.header(0, "x-tenant").is_empty(), "another route's claim header is stripped, not forwarded");
    assert_eq!(b.header(0, "x-tenant"), vec!["acme"]);
    assert!(b.header(0, "x-role").is_empty());
    assert_eq!(b.header(0, "x-portcullis-sub"), vec!["cy"]);
    gw.stop().await;
}

#[tokio::test]
async fn health_checks_name_themselves_and_carry_no_identity() {
    let dir = tempfile::tempdir().unwrap();
    let a = tagged("a").await;
    let gw = start(pool_config(dir.path(), &[&a], Balance::LeastConnections)).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.targets().is_empty() {
        assert!(Instant::now() < deadline, "no health check reached the backend");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.targets()[0], "/");
    assert_eq!(a.header(0, "x-portcullis-health-check"), vec!["1"]);
    assert_eq!(a.header(0, "user-agent"), vec!["portcullis-health-check"]);
    assert!(a.header(0, "x-portcullis-sub").is_empty());
    gw.stop().await;
}
