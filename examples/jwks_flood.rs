//! The unknown-`kid` flood, measured: a gateway verifying ES256 tokens with
//! keys from an identity provider (a JWKS served on loopback by this
//! program, its requests counted), and clients sending upgrades whose tokens
//! name made-up `kid`s as fast as they are answered. Prints handshakes
//! answered per second, the slowest answer, and how many requests the
//! provider saw; then the same for tokens with the real `kid` and a forged
//! signature (each costs a signature verification) for comparison.
//!
//! Run with `cargo run --release --example jwks_flood [SECONDS] [CLIENTS]`
//! (defaults 25 s, 32 clients). Loopback only.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis::{Config, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const EC_KEY: &str = include_str!("../tests/fixtures/keys/ec256.key");

/// Serves `body` to every request, one per connection; counts requests.
async fn provider(body: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::Relaxed);
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    (url, count)
}

/// One upgrade with `token`; the status line's code.
async fn handshake(addr: std::net::SocketAddr, token: &str) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr).await else { return 0 };
    let req = format!(
        "GET / HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap_or(0);
    std::str::from_utf8(&buf[..n]).ok().and_then(|t| t.get(9..12)).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// `clients` loops sending `tokens` (round robin) for `secs`.
async fn flood(
    addr: std::net::SocketAddr,
    tokens: Arc<Vec<String>>,
    clients: usize,
    secs: u64,
) -> (usize, Duration, usize) {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let tokens = tokens.clone();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut worst, mut other) = (0usize, Duration::ZERO, 0usize);
            let mut i = c;
            while Instant::now() < end {
                let t0 = Instant::now();
                let code = handshake(addr, &tokens[i % tokens.len()]).await;
                worst = worst.max(t0.elapsed());
                if code == 401 {
                    n += 1
                } else {
                    other += 1
                }
                i += clients;
            }
            (n, worst, other)
        }));
    }
    let (mut n, mut worst, mut other) = (0, Duration::ZERO, 0);
    for t in tasks {
        let (a, w, o) = t.await.expect("client");
        n += a;
        worst = worst.max(w);
        other += o;
    }
    (n, worst, other)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(25);
    let clients: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);

    let key = EncodingKey::from_ec_pem(EC_KEY.as_bytes()).expect("EC key");
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("jwk");
    jwk.common.key_id = Some("real".into());
    let (url, requests) = provider(serde_json::json!({ "keys": [jwk] }).to_string()).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::default();
    cfg.listen.public = "127.0.0.1:0".parse().expect("addr");
    cfg.listen.admin = "127.0.0.1:0".parse().expect("addr");
    cfg.listen.defer_accept_s = 0;
    cfg.auth.algorithms = vec!["ES256".into()];
    cfg.auth.jwks_url = url;
    cfg.limits.per_ip_rate = 1_000_000.0;
    cfg.limits.per_ip_burst = 100_000;
    cfg.limits.per_ip_max_handshakes = 10_000;
    cfg.revocation.path = dir.path().join("revocations.log");
    cfg.validate().expect("config");
    let gw = Gateway::bind(cfg).await.expect("gateway");
    let addr = gw.public_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(gw.run(async move {
        let _ = stop_rx.await;
    }));

    let now = portcullis::clock::unix_now();
    let claims = serde_json::json!({ "sub": "flood", "iat": now, "exp": now + 3600 });
    let sign = |kid: &str| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, &key).expect("token")
    };
    let made_up: Vec<String> = (0..2000).map(|i| sign(&format!("made-up-{i}"))).collect();
    let real = sign("real");
    let (body, sig) = real.rsplit_once('.').expect("token");
    let forged: Vec<String> =
        vec![format!("{body}.{}{}", if sig.starts_with('A') { "B" } else { "A" }, &sig[1..])];

    for (name, tokens) in [("unknown kid", made_up), ("forged signature, real kid", forged)] {
        let before = requests.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let (n, worst, other) = flood(addr, Arc::new(tokens), clients, secs).await;
        let took = t0.elapsed().as_secs_f64();
        let asked = requests.load(Ordering::Relaxed) - before;
        println!(
            "{name}: {n} handshakes refused in {took:.1} s = {:.0}/s ({clients} clients), slowest answer {:.1} ms, \
             other answers {other}, provider requests {asked}",
            n as f64 / took,
            worst.as_secs_f64() * 1000.0
        );
    }
    let _ = stop_tx.send(());
    let _ = run.await;
}
