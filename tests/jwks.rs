//! Keys from an identity provider: a real HTTP(S) JWKS / OpenID provider
//! started by each test on port 0 (a CA made in the test signs its
//! certificate; the gateway trusts it through `auth.jwks_ca_file`), real
//! gateways, real handshakes, the provider's requests counted.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis::config::{Config, IssuerEntry};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

// ---------------------------------------------------------------- keys

/// A signing key and its public JWK.
#[derive(Clone)]
struct Key {
    alg: Algorithm,
    kid: String,
    enc: EncodingKey,
    jwk: Value,
}

impl Key {
    fn from_pem(alg: Algorithm, kid: &str, pem: &[u8]) -> Key {
        let enc = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(pem),
            _ => EncodingKey::from_ec_pem(pem),
        }
        .unwrap();
        let mut jwk = Jwk::from_encoding_key(&enc, alg).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        Key { alg, kid: kid.into(), enc, jwk: serde_json::to_value(jwk).unwrap() }
    }

    /// The RSA fixture key.
    fn rsa(kid: &str) -> Key {
        let pem =
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys/rsa.key")).unwrap();
        Key::from_pem(Algorithm::RS256, kid, &pem)
    }

    /// A fresh P-256 key.
    fn ec(kid: &str) -> Key {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Key::from_pem(Algorithm::ES256, kid, kp.serialize_pem().as_bytes())
    }

    /// A token signed by this key, claiming `kid` (normally its own).
    fn sign_as(&self, kid: &str, extra: Value) -> String {
        let mut claims = json!({ "sub": "alice", "iat": now(), "exp": now() + 600 });
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let mut h = Header::new(self.alg);
        h.kid = Some(kid.to_string());
        jsonwebtoken::encode(&h, &claims, &self.enc).unwrap()
    }

    fn sign(&self, extra: Value) -> String {
        self.sign_as(&self.kid.clone(), extra)
    }
}

// ------------------------------------------------------------ provider

/// How the provider answers its JWKS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Up,
    /// 500 to everything.
    Failing,
    /// 200 with a body that is no JWKS.
    Garbage,
}

struct IdpState {
    keys: Vec<Value>,
    mode: Mode,
    max_age: Option<u64>,
    /// The `issuer` the discovery document claims (default: its own base).
    doc_issuer: Option<String>,
}

/// A real JWKS / OpenID provider on a loopback port.
struct Idp {
    base: String,
    addr: SocketAddr,
    state: Arc<Mutex<IdpState>>,
    jwks_requests: Arc<AtomicUsize>,
    not_modified: Arc<AtomicUsize>,
    discovery_requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A CA and a `localhost` certificate it signed, as PEM files.
struct Pki {
    ca_file: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "portcullis test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf =
        CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let ca_file = dir.join("idp-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    Pki { ca_file, server: Arc::new(server) }
}

impl Idp {
    /// Serves `keys` over https (with `tls`) or http, on `listener`.
    async fn serve(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, keys: &[&Key]) -> Idp {
        let addr = listener.local_addr().unwrap();
        let base = match tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://127.0.0.1:{}", addr.port()),
        };
        let state = Arc::new(Mutex::new(IdpState {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
            mode: Mode::Up,
            max_age: None,
            doc_issuer: None,
        }));
        let (jwks_requests, not_modified, discovery_requests) = Default::default();
        let ctx = Ctx {
            base: base.clone(),
            state: state.clone(),
            jwks_requests: Arc::clone(&jwks_requests),
            not_modified: Arc::clone(&not_modified),
            discovery_requests: Arc::clone(&discovery_requests),
        };
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let ctx = ctx.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let ctx = ctx.clone();
                        async move { Ok::<_, Infallible>(ctx.answer(req)) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        Idp { base, addr, state, jwks_requests, not_modified, discovery_requests, task }
    }

    async fn https(pki: &Pki, keys: &[&Key]) -> Idp {
        Idp::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), Some(pki.server.clone()), keys).await
    }

    fn jwks_url(&self) -> String {
        format!("{}/jwks", self.base)
    }

    fn set_keys(&self, keys: &[&Key]) {
        self.state.lock().unwrap().keys = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    fn requests(&self) -> usize {
        self.jwks_requests.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Ctx {
    base: String,
    state: Arc<Mutex<IdpState>>,
    jwks_requests: Arc<AtomicUsize>,
    not_modified: Arc<AtomicUsize>,
    discovery_requests: Arc<AtomicUsize>,
}

impl Ctx {
    fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let st = self.state.lock().unwrap();
        let reply = |status: StatusCode, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r
        };
        match req.uri().path() {
            "/.well-known/openid-configuration" => {
                self.discovery_requests.fetch_add(1, Ordering::SeqCst);
                let issuer = st.doc_issuer.clone().unwrap_or_else(|| self.base.clone());
                reply(
                    StatusCode::OK,
                    json!({ "issuer": issuer, "jwks_uri": format!("{}/jwks", self.base) }).to_string(),
                )
            }
            "/jwks" => {
                self.jwks_requests.fetch_add(1, Ordering::SeqCst);
                match st.mode {
                    Mode::Failing => return reply(StatusCode::INTERNAL_SERVER_ERROR, "down".into()),
                    Mode::Garbage => return reply(StatusCode::OK, "<html>maintenance</html>".into()),
                    Mode::Up => {}
                }
                let body = json!({ "keys": st.keys }).to_string();
                // The ETag is the body's length and a checksum: it changes with the set.
                let sum: u64 = body.bytes().map(u64::from).fold(0, |a, b| a.wrapping_mul(31).wrapping_add(b));
                let etag = format!("\"{}-{sum:x}\"", body.len());
                let matches =
                    req.headers().get("if-none-match").is_some_and(|v| v.as_bytes() == etag.as_bytes());
                let mut r = if matches {
                    self.not_modified.fetch_add(1, Ordering::SeqCst);
                    reply(StatusCode::NOT_MODIFIED, String::new())
                } else {
                    reply(StatusCode::OK, body)
                };
                r.headers_mut().insert("etag", etag.parse().unwrap());
                if let Some(age) = st.max_age {
                    r.headers_mut()
                        .insert("cache-control", format!("public, max-age={age}").parse().unwrap());
                }
                r
            }
            _ => reply(StatusCode::NOT_FOUND, String::new()),
        }
    }
}

// ------------------------------------------------------------- helpers

/// A gateway config verifying RS256 / ES256 with keys from `url` only.
fn idp_config(dir: &Path, pki: &Pki, url: &str) -> Config {
    let mut c = config(dir);
    c.auth.hmac_secret = String::new();
    c.auth.algorithms = vec!["RS256".into(), "ES256".into()];
    c.auth.jwks_url = url.into();
    c.auth.jwks_ca_file = pki.ca_file.clone();
    c.auth.jwks_timeout_ms = 500;
    // The flood tests open hundreds of handshakes from one address at once.
    c.limits.per_ip_max_handshakes = 1000;
    c
}

/// The status of an upgrade with `token`.
async fn status(gw: &TestGateway, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    raw(gw.public, upgrade_request("/", &[("Authorization", &auth)]).as_bytes()).await.status
}

async fn readyz(gw: &TestGateway) -> (u16, Value) {
    let a = http(gw.admin, "GET", "/readyz", &[], "").await;
    (a.status, serde_json::from_str(body(&a)).unwrap_or(Value::Null))
}

const FETCH_OK: &str = "portcullis_jwks_fetches_total{result=\"ok\"}";
const FETCH_ERROR: &str = "portcullis_jwks_fetches_total{result=\"error\"}";
const FETCH_NOT_MODIFIED: &str = "portcullis_jwks_fetches_total{result=\"not_modified\"}";

/// Waits (bounded) until `series` is at least `want`.
async fn wait_at_least(gw: &TestGateway, series: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let v = gw.metric(series).await;
        if v >= want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} = {v}, want at least {want}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// --------------------------------------------------------------- tests

#[tokio::test]
async fn keys_fetched_over_https_verify_and_combine_with_static_keys() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (rsa, ec) = (Key::rsa("r1"), Key::ec("e1"));
    let idp = Idp::https(&pki, &[&rsa, &ec]).await;
    let mut cfg = idp_config(dir.path(), &pki, &idp.jwks_url());
    // A static HMAC secret beside the fetched keys.
    cfg.auth.algorithms.push("HS256".into());
    cfg.auth.hmac_secret = SECRET.into();
    let gw = start(cfg).await;
    // Fetched before binding.
    assert_eq!(idp.requests(), 1);
    let (code, r) = readyz(&gw).await;
    assert_eq!((code, r["keys"].as_str()), (200, Some("ok")), "{r}");

    let t = rsa.sign(json!({}));
    assert_eq!(status(&gw, &t).await, 101);
    assert_eq!(status(&gw, &t).await, 101, "a cache hit");
    assert_eq!(status(&gw, &ec.sign(json!({}))).await, 101);
    assert_eq!(status(&gw, &token("bob")).await, 101, "the static secret still verifies");
    // A key of the set does not verify what another key signed.
    assert_eq!(status(&gw, &ec.sign_as("r1", json!({}))).await, 401);
    assert_eq!(gw.metric("portcullis_auth_cache_total{result=\"hit\"}").await, 1.0);

    let m = gw.metrics().await;
    for name in ["portcullis_jwks_fetches_total", "portcullis_jwks_keys", "portcullis_jwks_age_seconds"] {
        assert!(m.contains(&format!("# HELP {name} ")), "no HELP for {name}");
    }
    assert_eq!(value_of(&m, FETCH_OK), 1.0);
    assert_eq!(value_of(&m, FETCH_ERROR), 0.0);
    assert_eq!(value_of(&m, FETCH_NOT_MODIFIED), 0.0);
    assert_eq!(value_of(&m, "portcullis_jwks_keys"), 2.0);
    assert!(value_of(&m, "portcullis_jwks_age_seconds") < 5.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn rotation_is_picked_up_and_a_flood_of_unknown_kids_costs_the_provider_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (k1, k2, k3) = (Key::ec("k1"), Key::ec("k2"), Key::ec("k3"));
    let idp = Idp::https(&pki, &[&k1]).await;
    let gw = start(idp_config(dir.path(), &pki, &idp.jwks_url())).await;
    assert_eq!(status(&gw, &k1.sign(json!({}))).await, 101);

    // The provider rotates: the new kid is fetched on first sight.
    idp.set_keys(&[&k1, &k2]);
    let before = idp.requests();
    assert_eq!(status(&gw, &k2.sign(json!({}))).await, 101, "rotation picked up without reload");
    assert_eq!(idp.requests(), before + 1);

    // Within the 10 s window: a flood of made-up kids (and a real new one)
    // costs the provider no request, and none of them waits.
    idp.set_keys(&[&k1, &k2, &k3]);
    let before = idp.requests();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let t = k1.sign_as(&format!("made-up-{i}"), json!({}));
        let public = gw.public;
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let auth = format!("Bearer {t}");
            let a = raw(public, upgrade_request("/", &[("Authorization", &auth)]).as_bytes()).await;
            (a.status, t0.elapsed())
        }));
    }
    for t in tasks {
        let (code, took) = t.await.unwrap();
        assert_eq!(code, 401);
        assert!(took < Duration::from_millis(500 + 1000), "a handshake waited {took:?}");
    }
    assert_eq!(status(&gw, &k3.sign(json!({}))).await, 401, "the refetch window is closed");
    assert_eq!(idp.requests(), before, "provider requests during the flood");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(gw.rejected("invalid_token").await, 201.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn concurrent_unknown_kids_share_one_refetch_and_wait_no_longer_than_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let k1 = Key::ec("k1");
    let idp = Idp::https(&pki, &[&k1]).await;
    let gw = start(idp_config(dir.path(), &pki, &idp.jwks_url())).await;
    let before = idp.requests();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let t = k1.sign_as(&format!("nope-{i}"), json!({}));
        let public = gw.public;
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let auth = format!("Bearer {t}");
            let a = raw(public, upgrade_request("/", &[("Authorization", &auth)]).as_bytes()).await;
            (a.status, t0.elapsed())
        }));
    }
    for t in tasks {
        let (code, took) = t.await.unwrap();
        assert_eq!(code, 401);
        assert!(took < Duration::from_millis(500 + 1000), "a handshake waited {took:?}");
    }
    let after = idp.requests();
    assert!(after - before <= 1, "{} provider requests for 100 unknown kids", after - before);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn provider_down_or_garbage_keeps_keys_and_removal_stops_verifying() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (k1, k2) = (Key::ec("k1"), Key::ec("k2"));
    let idp = Idp::https(&pki, &[&k1, &k2]).await;
    let mut cfg = idp_config(dir.path(), &pki, &idp.jwks_url());
    // Refreshed every second, so each state is seen within the test.
    cfg.auth.jwks_refresh_s = 1;
    let gw = start(cfg).await;
    let (t1, t2) = (k1.sign(json!({})), k2.sign(json!({})));
    assert_eq!(status(&gw, &t1).await, 101);
    assert_eq!(status(&gw, &t2).await, 101);

    for mode in [Mode::Failing, Mode::Garbage] {
        let errors = gw.metric(FETCH_ERROR).await;
        idp.set_mode(mode);
        wait_at_least(&gw, FETCH_ERROR, errors + 2.0, Duration::from_secs(8)).await;
        assert_eq!(status(&gw, &t1).await, 101, "keys kept while the provider fails");
        assert_eq!(gw.metric("portcullis_jwks_keys").await, 2.0);
        let (code, r) = readyz(&gw).await;
        assert_eq!((code, r["keys"].as_str()), (200, Some("ok")));
    }

    // Back, without k2: k2 stops verifying, its cached token included.
    let ok = gw.metric(FETCH_OK).await;
    idp.set_keys(&[&k1]);
    idp.set_mode(Mode::Up);
    wait_at_least(&gw, FETCH_OK, ok + 1.0, Duration::from_secs(8)).await;
    let hits = gw.metric("portcullis_auth_cache_total{result=\"hit\"}").await;
    assert_eq!(status(&gw, &t2).await, 401, "a removed key's cached token");
    assert_eq!(gw.metric("portcullis_auth_cache_total{result=\"hit\"}").await, hits);
    assert_eq!(status(&gw, &t1).await, 101);
    assert_eq!(gw.metric("portcullis_jwks_keys").await, 1.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn starts_without_the_provider_not_ready_then_ready_when_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let k1 = Key::rsa("k1");
    // A port with nothing behind it yet (plain http on loopback).
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let mut cfg = idp_config(dir.path(), &pki, &format!("http://127.0.0.1:{port}/jwks"));
    cfg.auth.jwks_timeout_ms = 200;
    let t0 = Instant::now();
    let gw = start(cfg).await;
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(550) && waited < Duration::from_secs(3), "bind after {waited:?}");
    let (code, r) = readyz(&gw).await;
    assert_eq!((code, r["keys"].as_str()), (503, Some("none")), "{r}");
    assert_eq!(gw.metric("portcullis_jwks_keys").await, 0.0);
    let t = k1.sign(json!({}));
    let a =
        raw(gw.public, upgrade_request("/", &[("Authorization", &format!("Bearer {t}"))]).as_bytes()).await;
    assert_eq!(a.status, 401);
    assert!(a.header("WWW-Authenticate").unwrap().contains("invalid_token"));

    let idp = Idp::serve(TcpListener::bind(("127.0.0.1", port)).await.unwrap(), None, &[&k1]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, r) = readyz(&gw).await;
        if code == 200 {
            assert_eq!(r["keys"], "ok");
            break;
        }
        assert!(Instant::now() < deadline, "not ready: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(&gw, &t).await, 101);
    assert!(idp.requests() >= 1);
    assert!(gw.metric(FETCH_ERROR).await >= 2.0);
    gw.stop().await;
}

#[tokio::test]
async fn max_age_and_etag_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let k1 = Key::ec("k1");
    let idp = Idp::https(&pki, &[&k1]).await;
    // max-age=0 is raised to the 30 s floor: no refetch within the test.
    idp.state.lock().unwrap().max_age = Some(0);
    let gw = start(idp_config(dir.path(), &pki, &idp.jwks_url())).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(idp.requests(), 1);
    gw.stop().await;

    // jwks_refresh_s below a long max-age wins; the refetch is conditional.
    idp.state.lock().unwrap().max_age = Some(3600);
    let mut cfg = idp_config(dir.path(), &pki, &idp.jwks_url());
    cfg.auth.jwks_refresh_s = 1;
    let gw = start(cfg).await;
    wait_at_least(&gw, FETCH_NOT_MODIFIED, 2.0, Duration::from_secs(6)).await;
    assert!(idp.not_modified.load(Ordering::SeqCst) >= 2);
    assert_eq!(gw.metric(FETCH_OK).await, 1.0);
    assert_eq!(status(&gw, &k1.sign(json!({}))).await, 101);
    assert!(gw.metric("portcullis_jwks_age_seconds").await <= 2.0);
    gw.stop().await;
}

#[tokio::test]
async fn oidc_discovery_enforces_the_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let k1 = Key::rsa("k1");
    let idp = Idp::https(&pki, &[&k1]).await;
    let mut cfg = idp_config(dir.path(), &pki, "");
    cfg.auth.oidc_issuer = idp.base.clone();
    let gw = start(cfg).await;
    assert_eq!(idp.discovery_requests.load(Ordering::SeqCst), 1);
    // One key fetch: the discovery request is not one.
    assert_eq!(gw.metric(FETCH_OK).await, 1.0);
    assert_eq!(status(&gw, &k1.sign(json!({ "iss": idp.base }))).await, 101);
    for bad in
        [json!({ "iss": format!("{}/", idp.base) }), json!({ "iss": "https://evil.example" }), json!({})]
    {
        assert_eq!(status(&gw, &k1.sign(bad.clone())).await, 401, "{bad}");
    }
    gw.stop().await;

    // A discovery document naming another issuer is refused: no keys.
    idp.state.lock().unwrap().doc_issuer = Some("https://someone-else.example".into());
    let jwks_before = idp.requests();
    let mut cfg = idp_config(dir.path(), &pki, "");
    cfg.auth.oidc_issuer = idp.base.clone();
    cfg.auth.jwks_timeout_ms = 100;
    let gw = start(cfg).await;
    assert_eq!(readyz(&gw).await.1["keys"], "none");
    assert_eq!(status(&gw, &k1.sign(json!({ "iss": idp.base }))).await, 401);
    assert!(gw.metric(FETCH_ERROR).await >= 1.0);
    assert_eq!(idp.requests(), jwks_before, "no JWKS fetched from a document naming another issuer");
    gw.stop().await;
}

#[tokio::test]
async fn two_issuers_each_verify_with_their_own_keys_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (a1, b1) = (Key::ec("a1"), Key::ec("b1"));
    let (idp_a, idp_b) = (Idp::https(&pki, &[&a1]).await, Idp::https(&pki, &[&b1]).await);
    let mut cfg = config(dir.path());
    cfg.auth.hmac_secret = String::new();
    cfg.auth.jwks_ca_file = pki.ca_file.clone();
    cfg.auth.jwks_timeout_ms = 500;
    let entry = |issuer: &str| IssuerEntry {
        issuer: issuer.into(),
        algorithms: vec!["ES256".into(), "RS256".into()],
        ..IssuerEntry::default()
    };
    let a_iss = "https://tenant-a.example/realms/a".to_string();
    cfg.auth.issuers = vec![
        IssuerEntry { jwks_url: idp_a.jwks_url(), ..entry(&a_iss) },
        IssuerEntry { oidc: true, audience: "gw".into(), ..entry(&idp_b.base) },
    ];
    let gw = start(cfg).await;
    assert_eq!(readyz(&gw).await.1["keys"], "ok");
    let b_iss = idp_b.base.clone();

    assert_eq!(status(&gw, &a1.sign(json!({ "iss": a_iss }))).await, 101);
    assert_eq!(status(&gw, &b1.sign(json!({ "iss": b_iss, "aud": "gw" }))).await, 101);
    let a_before = idp_a.requests();
    for (why, t) in [
        ("A's iss, B's key and kid", b1.sign(json!({ "iss": a_iss }))),
        ("A's iss and kid, B's key", b1.sign_as("a1", json!({ "iss": a_iss }))),
        ("B's audience missing", b1.sign(json!({ "iss": b_iss }))),
        ("an unknown issuer", a1.sign(json!({ "iss": "https://tenant-c.example" }))),
        ("no issuer", a1.sign(json!({}))),
    ] {
        assert_eq!(status(&gw, &t).await, 401, "{why}");
    }
    // B's kid under A's issuer asked A (once), never B's keys.
    assert!(idp_a.requests() - a_before <= 1);
    assert_eq!(gw.metric("portcullis_jwks_keys").await, 2.0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_fetches_once_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let k1 = Key::rsa("k1");
    let idp = Idp::https(&pki, &[&k1]).await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let run = |name: &str, auth: String| {
        let file = dir.path().join(name);
        let revocations = dir.path().join("rev.log");
        std::fs::write(
            &file,
            format!(
                "[revocation]\npath = {:?}\n[auth]\nalgorithms = [\"RS256\"]\njwks_ca_file = {:?}\njwks_timeout_ms = 300\n{auth}",
                revocations, pki.ca_file
            ),
        )
        .unwrap();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .arg("check-config")
                .arg(&file)
                .output()
                .await
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
            )
        }
    };
    let (code, out) = run("ok.toml", format!("jwks_url = {:?}\n", idp.jwks_url())).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(idp.requests(), 1);

    for (name, auth, key) in [
        ("dead.toml", format!("jwks_url = \"http://127.0.0.1:{dead}/jwks\"\n"), "auth.jwks_url"),
        ("oidc.toml", "oidc_issuer = \"http://127.0.0.1:1\"\n".to_string(), "auth.oidc_issuer"),
        (
            "issuer.toml",
            format!(
                "jwks_url = {:?}\n[[auth.issuers]]\nissuer = \"https://t.example\"\njwks_url = \"https://localhost:{}/missing\"\n",
                idp.jwks_url(),
                idp.addr.port()
            ),
            "auth.issuers",
        ),
    ] {
        let (code, out) = run(name, auth).await;
        assert_eq!(code, Some(2), "{name}: {out}");
        assert!(out.contains(&format!("error: {key}: ")), "{name}: {out}");
        assert!(out.contains("keys not fetched"), "{name}: {out}");
    }
    // Garbage from the provider is named too.
    idp.set_mode(Mode::Garbage);
    let (code, out) = run("garbage.toml", format!("jwks_url = {:?}\n", idp.jwks_url())).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("auth.jwks_url") && out.contains("not a JWKS"), "{out}");
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_provider_and_starts_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (k1, k2) = (Key::ec("k1"), Key::ec("k2"));
    let (idp1, idp2) = (Idp::https(&pki, &[&k1]).await, Idp::https(&pki, &[&k2]).await);
    let cfg = idp_config(dir.path(), &pki, &idp1.jwks_url());
    let (gw, shared) = start_shared(cfg.clone()).await;
    assert_eq!(status(&gw, &k1.sign(json!({}))).await, 101);

    // Same sources: the keys stay, nothing is refetched.
    shared.reload(cfg.clone()).unwrap();
    assert_eq!(status(&gw, &k1.sign(json!({}))).await, 101);
    assert_eq!(idp1.requests(), 1);
    assert_eq!(readyz(&gw).await.1["keys"], "ok");

    // Another URL: a new provider, fetching at once.
    let mut moved = cfg;
    moved.auth.jwks_url = idp2.jwks_url();
    shared.reload(moved).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while idp2.requests() == 0 || gw.metric("portcullis_jwks_keys").await != 1.0 {
        assert!(Instant::now() < deadline, "the new provider did not fetch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&gw, &k2.sign(json!({}))).await, 101);
    assert_eq!(status(&gw, &k1.sign(json!({}))).await, 401, "the old provider's keys are gone");
    gw.stop().await;
}

#[tokio::test]
async fn a_self_signed_provider_certificate_can_be_its_own_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca_file = dir.path().join("self-signed.pem");
    std::fs::write(&ca_file, ck.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let server =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
    let pki = Pki { ca_file, server: Arc::new(server) };
    let k1 = Key::rsa("k1");
    let idp = Idp::https(&pki, &[&k1]).await;
    let gw = start(idp_config(dir.path(), &pki, &idp.jwks_url())).await;
    assert_eq!(status(&gw, &k1.sign(json!({}))).await, 101);
    gw.stop().await;

    // Without it, the system roots do not trust the provider: no keys.
    let mut cfg = idp_config(dir.path(), &pki, &idp.jwks_url());
    cfg.auth.jwks_ca_file = PathBuf::new();
    cfg.auth.jwks_timeout_ms = 100;
    let gw = start(cfg).await;
    assert_eq!(readyz(&gw).await.1["keys"], "none");
    assert_eq!(status(&gw, &k1.sign(json!({}))).await, 401);
    gw.stop().await;
}
