//! Production operations: the real client IP behind PROXY protocol
//! and trusted `X-Forwarded-For`, `wss://` with a certificate made here, key
//! rotation by JWKS on SIGHUP, JSON logs, and the annotated example config.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis::config::Config;
use portcullis::events::REFUSAL_LINES_PER_S;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

// ----------------------------------------------------------------- helpers

/// A TCP connection from a chosen loopback source address.
async fn connect_from(src: &str, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(addr).await.unwrap()
}

/// Sends `bytes` from `src` and reads the answer; the socket stays open
/// (for a 101). The write may meet a socket the gateway already closed.
async fn send_from(src: &str, addr: SocketAddr, bytes: &[u8]) -> (TcpStream, Answer) {
    let mut s = connect_from(src, addr).await;
    let _ = s.write_all(bytes).await;
    let a = read_answer(&mut s).await;
    (s, a)
}

fn proxy_v1(src: &str) -> Vec<u8> {
    format!("PROXY TCP4 {src} 127.0.0.1 40000 8080\r\n").into_bytes()
}

fn proxy_v2(src: &str) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (SocketAddr::new(src.parse().unwrap(), 40000), "127.0.0.1:8080".parse::<SocketAddr>().unwrap()),
    )
    .build()
    .unwrap()
}

/// A PROXY v2 `LOCAL` header, as load balancers send for health checks.
fn proxy_v2_local() -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An upgrade request carrying `token` and extra header lines.
fn upgrade(token: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let auth = bearer(token);
    let mut h = vec![("Authorization", auth.as_str())];
    h.extend_from_slice(extra);
    upgrade_request("/", &h).into_bytes()
}

/// `GET /admin/connections`, as `sub -> ip`.
async fn ips_by_sub(admin: SocketAddr) -> BTreeMap<String, String> {
    let a = http(admin, "GET", "/admin/connections", &[], "").await;
    let list: Vec<Value> = serde_json::from_str(body(&a)).unwrap();
    list.iter().map(|c| (c["sub"].as_str().unwrap().into(), c["ip"].as_str().unwrap().into())).collect()
}

fn reason_series(reason: &str) -> String {
    format!("portcullis_handshakes_total{{outcome=\"rejected\",reason=\"{reason}\"}}")
}

/// Sends a text message and expects it back, on any WebSocket stream.
async fn echo_on<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo in time");
    assert_eq!(got.unwrap().unwrap(), Message::text(text));
}

/// A WebSocket client on a TCP connection from `src`.
async fn ws_from(src: &str, addr: SocketAddr, token: &str) -> WebSocketStream<TcpStream> {
    let tcp = connect_from(src, addr).await;
    let mut req = format!("ws://{addr}/").into_client_request().unwrap();
    req.headers_mut().insert("Authorization", bearer(token).parse().unwrap());
    tokio_tungstenite::client_async(req, tcp).await.expect("ws connects").0
}

// ------------------------------------------------------- PROXY protocol

fn proxy_config(dir: &Path) -> Config {
    let mut cfg = config(dir);
    cfg.listen.proxy_protocol = true;
    cfg.listen.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    cfg
}

#[tokio::test]
async fn proxy_v1_and_v2_give_the_client_ip_to_admin_and_the_per_ip_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(dir.path());
    cfg.limits.per_ip_max_connections = 1;
    let gw = start(cfg).await;
    let via = |hdr: Vec<u8>, sub: &str| [hdr, upgrade(&token(sub), &[])].concat();

    let (_v1, a) = send_from("127.0.0.1", gw.public, &via(proxy_v1("198.51.100.7"), "v1")).await;
    assert_eq!(a.status, 101, "{}", a.text);
    let (_v2, a) = send_from("127.0.0.1", gw.public, &via(proxy_v2("203.0.113.9"), "v2")).await;
    assert_eq!(a.status, 101, "{}", a.text);
    let ips = ips_by_sub(gw.admin).await;
    assert_eq!(ips["v1"], "198.51.100.7");
    assert_eq!(ips["v2"], "203.0.113.9");

    // The same claimed source again (by the other version): over its cap.
    let (_c, a) = send_from("127.0.0.1", gw.public, &via(proxy_v2("198.51.100.7"), "again")).await;
    assert_eq!(a.status, 0, "closed without an answer: {}", a.text);
    gw.wait_metric(&reason_series("ip_cap"), 1.0).await;

    // Another source passes, though the proxy itself (127.0.0.1) now holds
    // several connections against a cap of 1 per IP.
    let (_d, a) = send_from("127.0.0.1", gw.public, &via(proxy_v1("192.0.2.44"), "other")).await;
    assert_eq!(a.status, 101, "{}", a.text);
    // Health-check style headers (v1 UNKNOWN, v2 LOCAL) name no client: the
    // proxy's own address, never limited per IP.
    let (_e, a) = send_from("127.0.0.1", gw.public, &via(b"PROXY UNKNOWN\r\n".to_vec(), "hc1")).await;
    assert_eq!(a.status, 101, "{}", a.text);
    let (_f, a) = send_from("127.0.0.1", gw.public, &via(proxy_v2_local(), "hc2")).await;
    assert_eq!(a.status, 101, "{}", a.text);
    let ips = ips_by_sub(gw.admin).await;
    assert_eq!(ips["other"], "192.0.2.44");
    assert_eq!((ips["hc1"].as_str(), ips["hc2"].as_str()), ("127.0.0.1", "127.0.0.1"));
    assert_eq!(gw.rejected("ip_cap").await, 1.0);
    drop((_v1, _v2, _c, _d, _e, _f));
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn the_proxy_source_keys_the_per_ip_rate() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(dir.path());
    cfg.limits.per_ip_rate = 0.01;
    cfg.limits.per_ip_burst = 2;
    let gw = start(cfg).await;
    // No token: the answer is 401 when the rate lets the request through.
    let ask = |hdr: Vec<u8>| async move {
        send_from("127.0.0.1", gw.public, &[hdr, upgrade_request("/", &[]).into_bytes()].concat()).await.1
    };
    for _ in 0..2 {
        assert_eq!(ask(proxy_v1("198.51.100.20")).await.status, 401);
    }
    let limited = ask(proxy_v2("198.51.100.20")).await;
    assert_eq!(limited.status, 429, "{}", limited.text);
    assert!(limited.header("Retry-After").is_some());
    assert_eq!(ask(proxy_v2("198.51.100.21")).await.status, 401, "another client is not limited");
    for _ in 0..4 {
        assert_eq!(ask(proxy_v2_local()).await.status, 401, "the proxy itself is never rate-limited");
    }
    assert_eq!(gw.rejected("ip_rate").await, 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn a_proxy_header_from_an_untrusted_peer_or_a_bad_one_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(proxy_config(dir.path())).await;
    let req = upgrade(&token("mallory"), &[]);
    for (src, bytes) in [
        // A well-formed header, but the peer is not a trusted proxy.
        ("127.0.0.5", [proxy_v1("198.51.100.1"), req.clone()].concat()),
        ("127.0.0.5", [proxy_v2("198.51.100.1"), req.clone()].concat()),
        // A trusted peer without a header, or with a broken one.
        ("127.0.0.1", req.clone()),
        ("127.0.0.1", [b"PROXY TCP4 nonsense\r\n".to_vec(), req.clone()].concat()),
    ] {
        let (_s, a) = send_from(src, gw.public, &bytes).await;
        assert_eq!(a.status, 0, "closed without an answer: {}", a.text);
    }
    gw.wait_metric(&reason_series("proxy_header"), 4.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn only_the_first_proxy_header_is_read() {
    // As README "Behind a load balancer" says: a balancer prepends its
    // header and keeps the client's; the second one is the client's
    // request, and not a valid one.
    let dir = tempfile::tempdir().unwrap();
    let gw = start(proxy_config(dir.path())).await;
    let bytes = [proxy_v2("198.51.100.30"), proxy_v1("203.0.113.66"), upgrade(&token("u"), &[])].concat();
    let (_s, a) = send_from("127.0.0.1", gw.public, &bytes).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(gw.rejected("bad_request").await, 1.0);
    gw.stop().await;
}

// ------------------------------------------------------- X-Forwarded-For

fn xff_config(dir: &Path) -> Config {
    let mut cfg = config(dir);
    cfg.listen.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    cfg
}

#[tokio::test]
async fn trusted_forwarded_for_names_the_rightmost_untrusted_hop() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = xff_config(dir.path());
    cfg.limits.per_ip_max_connections = 1;
    let gw = start(cfg).await;

    // Several header lines are one list, in order; the trusted hop at the
    // right end is skipped, and everything left of the client is ignored.
    let xff = [("X-Forwarded-For", "203.0.113.1"), ("X-Forwarded-For", "198.51.100.3, 127.0.0.1")];
    let (_a, a) = send_from("127.0.0.1", gw.public, &upgrade(&token("behind-lb"), &xff)).await;
    assert_eq!(a.status, 101, "{}", a.text);
    // From an untrusted peer the header is ignored.
    let spoof = [("X-Forwarded-For", "198.51.100.99")];
    let (_b, a) = send_from("127.0.0.5", gw.public, &upgrade(&token("direct"), &spoof)).await;
    assert_eq!(a.status, 101, "{}", a.text);
    // From the trusted peer without the header: the proxy itself, unlimited.
    let (_c, a) = send_from("127.0.0.1", gw.public, &upgrade(&token("lb-1"), &[])).await;
    assert_eq!(a.status, 101, "{}", a.text);
    let (_d, a) = send_from("127.0.0.1", gw.public, &upgrade(&token("lb-2"), &[])).await;
    assert_eq!(a.status, 101, "{}", a.text);

    let ips = ips_by_sub(gw.admin).await;
    assert_eq!(ips["behind-lb"], "198.51.100.3");
    assert_eq!(ips["direct"], "127.0.0.5");
    assert_eq!(ips["lb-1"], "127.0.0.1");

    // The per-IP cap counts the forwarded client.
    let again = [("X-Forwarded-For", "198.51.100.3")];
    let (_e, a) = send_from("127.0.0.1", gw.public, &upgrade(&token("behind-lb-2"), &again)).await;
    assert_eq!(a.status, 0, "{}", a.text);
    assert_eq!(gw.rejected("ip_cap").await, 1.0);
    drop((_a, _b, _c, _d, _e));
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_spoofed_forwarded_for_cannot_dodge_the_per_ip_rate() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = xff_config(dir.path());
    cfg.limits.per_ip_rate = 0.01;
    cfg.limits.per_ip_burst = 3;
    let gw = start(cfg).await;
    let ask = |src: &'static str, xff: String| async move {
        let req = upgrade_request("/", &[("X-Forwarded-For", &xff)]);
        send_from(src, gw.public, req.as_bytes()).await.1
    };
    // An untrusted client claiming a new address each time.
    for i in 0..3 {
        assert_eq!(ask("127.0.0.6", format!("198.51.100.{i}")).await.status, 401);
    }
    let limited = ask("127.0.0.6", "198.51.100.200".into()).await;
    assert_eq!(limited.status, 429, "{}", limited.text);
    assert!(limited.header("Retry-After").is_some());
    // Through the trusted proxy, the forwarded client is what is limited.
    for _ in 0..3 {
        assert_eq!(ask("127.0.0.1", "203.0.113.5".into()).await.status, 401);
    }
    assert_eq!(ask("127.0.0.1", "203.0.113.5".into()).await.status, 429);
    assert_eq!(ask("127.0.0.1", "203.0.113.6".into()).await.status, 401);
    assert_eq!(gw.rejected("ip_rate").await, 2.0);
    gw.stop().await;
}

// ------------------------------------------------------------------ TLS

struct Cert {
    ck: rcgen::CertifiedKey<rcgen::KeyPair>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// A self-signed certificate for `localhost`, written as PEM files in `dir`.
fn self_signed(dir: &Path, name: &str) -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_file = dir.join(format!("{name}.crt"));
    let key_file = dir.join(format!("{name}.key"));
    std::fs::write(&cert_file, ck.cert.pem()).unwrap();
    std::fs::write(&key_file, ck.signing_key.serialize_pem()).unwrap();
    Cert { ck, cert_file, key_file }
}

fn tls_config(dir: &Path, cert: &Cert) -> Config {
    let mut cfg = config(dir);
    cfg.listen.tls_cert_file = cert.cert_file.clone();
    cfg.listen.tls_key_file = cert.key_file.clone();
    cfg
}

/// A TLS client that trusts `cert` and nothing else.
fn trusting(cert: &Cert) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Wss<S> = WebSocketStream<tokio_rustls::client::TlsStream<S>>;

/// `wss://localhost/` over `io`.
async fn wss<S>(io: S, tls: &tokio_rustls::TlsConnector, token: &str) -> Result<Wss<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tls.connect(name, io).await.map_err(|e| format!("tls: {e}"))?;
    let mut req = "wss://localhost/".into_client_request().unwrap();
    req.headers_mut().insert("Authorization", bearer(token).parse().unwrap());
    tokio_tungstenite::client_async(req, tls).await.map(|(ws, _)| ws).map_err(|e| format!("ws: {e}"))
}

#[tokio::test]
async fn wss_with_a_certificate_made_here_and_reloaded_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let old = self_signed(dir.path(), "old");
    let cfg = tls_config(dir.path(), &old);
    let (gw, shared) = start_shared(cfg.clone()).await;

    let mut live = wss(TcpStream::connect(gw.public).await.unwrap(), &trusting(&old), &token("tls"))
        .await
        .expect("wss connects");
    echo_on(&mut live, "over tls").await;
    // Plain ws:// on a TLS port goes nowhere.
    assert!(ws_connect(gw.public, "/", &[("Authorization", &bearer(&token("plain")))]).await.is_err());

    // A new certificate, applied by reload: clients trusting only it connect,
    // clients trusting only the old one no longer do; the live one stays.
    let new = self_signed(dir.path(), "new");
    shared.reload(tls_config(dir.path(), &new)).expect("reload");
    let mut fresh = wss(TcpStream::connect(gw.public).await.unwrap(), &trusting(&new), &token("tls-new"))
        .await
        .expect("the new certificate is served");
    echo_on(&mut fresh, "new cert").await;
    let stale = wss(TcpStream::connect(gw.public).await.unwrap(), &trusting(&old), &token("tls-old")).await;
    assert!(stale.is_err(), "the old certificate is still served");
    echo_on(&mut live, "live connection untouched").await;

    // A reload naming a missing certificate is refused; the current one stays.
    let mut broken = tls_config(dir.path(), &new);
    broken.listen.tls_cert_file = dir.path().join("missing.crt");
    let err = shared.reload(broken).unwrap_err().to_string();
    assert!(err.starts_with("listen.tls_cert_file"), "{err}");
    let mut again = wss(TcpStream::connect(gw.public).await.unwrap(), &trusting(&new), &token("tls-again"))
        .await
        .expect("still the new certificate");
    echo_on(&mut again, "after a refused reload").await;
    assert_eq!(gw.metric("portcullis_config_reloads_total{result=\"ok\"}").await, 1.0);
    assert_eq!(gw.metric("portcullis_config_reloads_total{result=\"error\"}").await, 1.0);
    drop((live, fresh, again));
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_never_starts_tls_is_cut_at_the_handshake_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path(), "c");
    let gw = start(tls_config(dir.path(), &cert)).await; // handshake_timeout_ms = 500
    let started = Instant::now();
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    assert!(closed_without_answer(&mut s, Duration::from_secs(3)).await);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(2000), "{took:?}");
    gw.wait_metric(&reason_series("handshake_timeout"), 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn wss_behind_proxy_protocol_with_the_header_and_client_hello_in_one_segment() {
    // Balancers send the PROXY header together with the client's first
    // bytes; the gateway must not swallow the start of the ClientHello.
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path(), "lb");
    let mut cfg = tls_config(dir.path(), &cert);
    cfg.listen.proxy_protocol = true;
    cfg.listen.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let gw = start(cfg).await;
    for (header, client) in
        [(proxy_v1("198.51.100.77"), "198.51.100.77"), (proxy_v2("203.0.113.78"), "203.0.113.78")]
    {
        let (io, mut lb) = tokio::io::duplex(64 * 1024);
        let mut tcp = TcpStream::connect(gw.public).await.unwrap();
        tokio::spawn(async move {
            let mut hello = vec![0u8; 16 * 1024];
            let n = lb.read(&mut hello).await.unwrap();
            // One write: the header and the ClientHello in one segment.
            tcp.write_all(&[&header[..], &hello[..n]].concat()).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut lb, &mut tcp).await;
        });
        let mut c = wss(io, &trusting(&cert), &token(client)).await.expect("wss through the balancer");
        echo_on(&mut c, "through the balancer").await;
        assert_eq!(ips_by_sub(gw.admin).await[client], client);
    }
    gw.stop().await;
}

// ------------------------------------------------- the binary: a child process

/// `portcullis serve` in a child process, with what it wrote to stderr.
struct Proc {
    proc: ChildProc,
    public: SocketAddr,
    admin: SocketAddr,
    lines: Vec<String>,
}

/// A config file for the binary: JSON logs at `level`, plus `extra` tables.
fn binary_config(dir: &Path, level: &str, extra: &str) -> PathBuf {
    let path = dir.join("portcullis.toml");
    let text = format!(
        "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         [revocation]\npath = \"{}\"\n[log]\nformat = \"json\"\nlevel = \"{level}\"\n{extra}",
        dir.join("revocations.log").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

impl Proc {
    fn spawn(config: &Path) -> Proc {
        let proc = ChildProc::spawn(
            Command::new(BIN)
                .args(["serve", "--config", config.to_str().unwrap()])
                .env_remove("PORTCULLIS_LOG"),
        );
        let mut p = Proc {
            proc,
            public: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            lines: Vec::new(),
        };
        let banner = p.wait_line(|v| v["event"] == "listening", Duration::from_secs(20));
        p.public = banner["public"].as_str().unwrap().parse().unwrap();
        p.admin = banner["admin"].as_str().unwrap().parse().unwrap();
        p
    }

    /// Takes in what the child wrote so far.
    fn pump(&mut self) {
        while let Ok(l) = self.proc.lines.try_recv() {
            self.lines.push(l);
        }
    }

    /// Waits (bounded) for a JSON line matching `want`.
    fn wait_line(&mut self, want: impl Fn(&Value) -> bool, within: Duration) -> Value {
        let deadline = std::time::Instant::now() + within;
        let mut seen = 0;
        loop {
            self.pump();
            for l in &self.lines[seen..] {
                if let Ok(v) = serde_json::from_str::<Value>(l) {
                    if want(&v) {
                        return v;
                    }
                }
            }
            seen = self.lines.len();
            assert!(std::time::Instant::now() < deadline, "no such line in:\n{}", self.lines.join("\n"));
            if let Ok(l) = self.proc.lines.recv_timeout(Duration::from_millis(50)) {
                self.lines.push(l);
            }
        }
    }

    /// Every line so far, each parsed as one JSON object.
    fn json_lines(&mut self) -> Vec<Value> {
        self.pump();
        self.lines
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                assert!(v.is_object(), "not an object: {l}");
                v
            })
            .collect()
    }

    fn signal(&self, sig: &str) {
        self.proc.signal(sig);
    }

    async fn metric(&self, series: &str) -> f64 {
        value_of(body(&http(self.admin, "GET", "/metrics", &[], "").await), series)
    }

    async fn wait_metric(&self, series: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(series).await;
            if v == want {
                return;
            }
            assert!(Instant::now() < deadline, "{series} = {v}, want {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------- key rotation

const K1_SECRET: &str = "k1-rotation-secret-0123456789abcdef";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys").join(name)
}

/// k1: an HS256 `oct` key; k2: the ES256 fixture key.
fn signing_key(kid: &str) -> (Algorithm, EncodingKey) {
    match kid {
        "k1" => (Algorithm::HS256, EncodingKey::from_secret(K1_SECRET.as_bytes()).unwrap()),
        _ => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&std::fs::read(fixture("ec256.key")).unwrap()).unwrap(),
        ),
    }
}

fn jwk(kid: &str) -> Value {
    let (alg, key) = signing_key(kid);
    let mut j = serde_json::to_value(Jwk::from_encoding_key(&key, alg).unwrap()).unwrap();
    j["kid"] = kid.into();
    j
}

fn kid_token(kid: &str, sub: &str) -> String {
    let (alg, key) = signing_key(kid);
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &json!({ "sub": sub, "iat": now(), "exp": now() + 600 }), &key).unwrap()
}

#[tokio::test]
async fn jwks_rotation_on_sighup_admits_the_new_kid_and_keeps_live_connections() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({ "keys": [jwk("k1")] }).to_string()).unwrap();
    let auth = format!(
        "[auth]\nalgorithms = [\"HS256\", \"ES256\"]\nhmac_secret = \"{SECRET}\"\njwks_file = \"{}\"\nleeway_s = 0\n",
        jwks.display()
    );
    let mut p = Proc::spawn(&binary_config(dir.path(), "info", &auth));

    let mut live = ws(p.public, &kid_token("k1", "early")).await;
    echo_on(&mut live, "k1").await;
    let refused = raw(p.public, &upgrade(&kid_token("k2", "too-early"), &[])).await;
    assert_eq!(refused.status, 401, "{}", refused.text);
    assert!(refused.header("WWW-Authenticate").unwrap().contains("invalid_token"));

    // The new key is published and the gateway told.
    std::fs::write(&jwks, json!({ "keys": [jwk("k1"), jwk("k2")] }).to_string()).unwrap();
    p.signal("-HUP");
    p.wait_metric("portcullis_config_reloads_total{result=\"ok\"}", 1.0).await;
    let mut rotated = ws(p.public, &kid_token("k2", "rotated")).await;
    echo_on(&mut rotated, "k2").await;
    echo_on(&mut live, "the k1 connection is untouched").await;

    // A broken JWKS: refused, logged with the key at fault, the old set stays.
    std::fs::write(&jwks, "{not json").unwrap();
    p.signal("-HUP");
    p.wait_metric("portcullis_config_reloads_total{result=\"error\"}", 1.0).await;
    let line = p.wait_line(|v| v["event"] == "reload" && v["result"] == "error", Duration::from_secs(5));
    assert!(line["error"].as_str().unwrap().starts_with("auth.jwks_file"), "{line}");
    for kid in ["k1", "k2"] {
        let mut c = ws(p.public, &kid_token(kid, &format!("after-{kid}"))).await;
        echo_on(&mut c, "the old set is in force").await;
    }
    echo_on(&mut live, "still").await;
    echo_on(&mut rotated, "still").await;
    assert_eq!(p.metric("portcullis_config_reloads_total{result=\"ok\"}").await, 1.0);
}

// ------------------------------------------------------------------ logs

#[tokio::test]
async fn json_logs_carry_reason_client_and_sub_and_never_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\ncarriers = [\"header\", \"query\"]\n\
         [limits]\nper_user_max_connections = 1\n"
    );
    // Debug level: not even the chattiest level may print a token.
    let mut p = Proc::spawn(&binary_config(dir.path(), "debug", &extra));
    let good = token("logan");
    let mut first = ws_from("127.0.0.7", p.public, &good).await;
    echo_on(&mut first, "hello").await;
    // The same user again: refused after authentication, so `sub` is known.
    let (_s, a) = send_from("127.0.0.7", p.public, &upgrade(&good, &[])).await;
    assert_eq!(a.status, 429, "{}", a.text);
    // Query tokens: a forged one refused, a good one admitted.
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": "forger", "iat": now(), "exp": now() + 600 }),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-!!").unwrap(),
    )
    .unwrap();
    let a = raw(p.public, upgrade_request(&format!("/?access_token={forged}"), &[]).as_bytes()).await;
    assert_eq!(a.status, 401);
    let query = token("quinn");
    let (q, a) = send_from(
        "127.0.0.8",
        p.public,
        upgrade_request(&format!("/?v=1&access_token={query}"), &[]).as_bytes(),
    )
    .await;
    assert_eq!(a.status, 101, "{}", a.text);
    drop(q);
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}

    let within = Duration::from_secs(5);
    let capped = p.wait_line(|v| v["event"] == "rejected" && v["reason"] == "user_cap", within);
    assert_eq!(
        (&capped["client"], &capped["sub"], &capped["status"]),
        (&json!("127.0.0.7"), &json!("logan"), &json!(429))
    );
    let invalid = p.wait_line(|v| v["event"] == "rejected" && v["reason"] == "invalid_token", within);
    assert_eq!(invalid["client"], "127.0.0.1");
    let gone = p.wait_line(|v| v["event"] == "disconnected" && v["sub"] == "logan", within);
    assert_eq!((&gone["reason"], &gone["client"]), (&json!("client_close"), &json!("127.0.0.7")));
    let gone = p.wait_line(|v| v["event"] == "disconnected" && v["sub"] == "quinn", within);
    assert_eq!(gone["client"], "127.0.0.8");

    let lines = p.json_lines();
    for secret in [&good, &forged, &query] {
        // The signature alone would be enough to leak it.
        let sig = secret.rsplit('.').next().unwrap();
        assert!(!p.lines.iter().any(|l| l.contains(sig)), "a token reached the log");
    }
    assert!(lines.iter().all(|v| v.get("level").is_some() || v["event"] == "listening"));
}

#[tokio::test]
async fn a_flood_of_refusals_logs_a_few_lines_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\n[limits]\nper_ip_rate = 100000.0\nper_ip_burst = 100000\n\
         [ban]\nenabled = false\n"
    );
    let mut p = Proc::spawn(&binary_config(dir.path(), "info", &extra));
    let flood: u64 = 300;
    let public = p.public;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..flood / 10 {
                    assert_eq!(raw(public, upgrade_request("/", &[]).as_bytes()).await.status, 401);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // A refusal in a later second reports what the flood's seconds held back.
    let flood_second = now();
    while now() == flood_second {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(raw(public, upgrade_request("/", &[]).as_bytes()).await.status, 401);
    p.wait_line(|v| v["event"] == "suppressed", Duration::from_secs(5));
    p.wait_metric(&reason_series("missing_token"), (flood + 1) as f64).await;
    // Until the last lines have arrived.
    let accounted = |lines: &[Value]| {
        let refused = lines.iter().filter(|v| v["event"] == "rejected").count() as u64;
        let suppressed: u64 = lines.iter().filter_map(|v| v["suppressed"].as_u64()).sum();
        refused + suppressed
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while accounted(&p.json_lines()) < flood + 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let lines = p.json_lines();
    let refused: Vec<&Value> = lines.iter().filter(|v| v["event"] == "rejected").collect();
    let suppressed: u64 = lines.iter().filter_map(|v| v["suppressed"].as_u64()).sum();
    assert!(suppressed > 0);
    assert_eq!(refused.len() as u64 + suppressed, flood + 1, "every refusal is logged or counted");
    let mut per_second: BTreeMap<&str, u64> = BTreeMap::new();
    for v in &refused {
        *per_second.entry(&v["timestamp"].as_str().unwrap()[..19]).or_default() += 1;
    }
    // A line admitted at the very end of a second may be stamped with the next.
    assert!(per_second.values().all(|n| *n <= REFUSAL_LINES_PER_S + 1), "{per_second:?}");
}

// ------------------------------------------------------ the example config

/// The keys a table accepts, read from the error an unknown key gets
/// (`unknown field …, expected one of `a`, `b`…`).
fn known_keys(table: &str) -> Vec<String> {
    let probe = if table.is_empty() { "zz_probe = 1\n".into() } else { format!("[{table}]\nzz_probe = 1\n") };
    let err = Config::parse(&probe).unwrap_err().to_string();
    let (_, expected) = err.split_once("expected").unwrap_or_else(|| panic!("{err}"));
    expected.split('`').skip(1).step_by(2).map(String::from).collect()
}

#[test]
fn the_annotated_example_config_checks_out_and_names_every_key() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/portcullis.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    let set = text.replacen("hmac_secret = \"\"", &format!("hmac_secret = \"{SECRET}\""), 1);
    assert_ne!(set, text, "the example has an empty hmac_secret to fill in");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("portcullis.toml");
    std::fs::write(&copy, &set).unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&copy).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    // "Every key, set to its default."
    let mut want = Config::default();
    want.auth.hmac_secret = SECRET.into();
    assert_eq!(format!("{:?}", Config::load(&copy).unwrap()), format!("{want:?}"));

    // Every key the code knows is in the file (a commented-out alternative
    // such as `# hmac_secret_file = …` counts).
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = t.to_string();
            keys.entry(table.clone()).or_default();
        } else if let Some((k, _)) = line.trim_start_matches('#').split_once('=') {
            let k = k.trim();
            if !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                keys.entry(table.clone()).or_default().insert(k.to_string());
            }
        }
    }
    let mut tables = vec![String::new()];
    tables.extend(keys.keys().filter(|t| !t.is_empty()).cloned());
    for table in &tables {
        for key in known_keys(table) {
            let sub = if table.is_empty() { key.clone() } else { format!("{table}.{key}") };
            let present = keys.contains_key(&sub) || keys.get(table).is_some_and(|k| k.contains(&key));
            assert!(present, "examples/portcullis.toml lacks {sub}");
        }
    }
}

// ------------------------------------------------------ the admin token

#[tokio::test]
async fn the_admin_token_guards_admin_paths_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.admin.token = "adm1n-s3cret".into();
    let gw = start(cfg).await;
    let get = |auth: Option<&'static str>| {
        let admin = gw.admin;
        async move {
            let headers: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
            http(admin, "GET", "/admin/connections", &headers, "").await
        }
    };
    let refused = get(None).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("www-authenticate").as_deref(), Some("Bearer realm=\"portcullis-admin\""));
    for wrong in ["Bearer adm1n-s3cre", "Basic adm1n-s3cret", "Bearer adm1n-s3cret extra", "adm1n-s3cret"] {
        assert_eq!(get(Some(wrong)).await.status, 401, "{wrong}");
    }
    // The scheme is case-insensitive (RFC 7235), as for the token carrier.
    for right in ["Bearer adm1n-s3cret", "bearer adm1n-s3cret", "BEARER  adm1n-s3cret"] {
        assert_eq!(get(Some(right)).await.status, 200, "{right}");
    }
    // Metrics and probes stay open: the admin port is firewalled instead.
    assert_eq!(http(gw.admin, "GET", "/metrics", &[], "").await.status, 200);
    assert_eq!(http(gw.admin, "GET", "/readyz", &[], "").await.status, 200);
    gw.stop().await;
}
