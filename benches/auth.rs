//! Stage 4 costs: token verification on a cache miss (signature + claims)
//! and on a cache hit (SHA-256 + moka lookup + revocation check), for HS256
//! and ES256; and the cheap refusals that never reach a signature. Then a
//! forged HS256 token refused by the precheck (synchronous, no allocation)
//! and by the full path.
//!
//! Then ES256 with the key fetched from an identity provider (a JWKS served
//! on loopback by the bench itself): miss, hit, and a made-up `kid` once
//! the refetch window is closed (what each token of a flood costs).
//!
//! Run with `cargo bench --bench auth`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::auth::jwt::JwtAuthenticator;
use portcullis::auth::sign;
use portcullis::config::Auth;
use portcullis::metrics::Metrics;
use portcullis::revocation::{Revocation, RevocationSet, RevocationStore, StoreError};
use tokio::sync::broadcast;

/// An in-memory store: the benchmark measures verification, not disk I/O.
struct MemStore(RevocationSet, broadcast::Sender<Revocation>);

#[async_trait::async_trait]
impl RevocationStore for MemStore {
    fn is_revoked(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool {
        self.0.is_revoked(sub, jti, iat)
    }
    async fn revoke(&self, r: Revocation) -> Result<(), StoreError> {
        self.0.insert(&r, 0);
        Ok(())
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.1.subscribe()
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys").join(name)
}

fn config(alg: &str) -> Auth {
    let mut cfg = Auth { algorithms: vec![alg.to_string()], ..Auth::default() };
    match alg {
        "HS256" => cfg.hmac_secret = "bench-secret-bench-secret-bench-secret".into(),
        "ES256" => {
            cfg.public_key_file = fixture("ec256.pub");
            cfg.private_key_file = fixture("ec256.key");
        }
        other => unreachable!("no bench config for {other}"),
    }
    cfg
}

fn verify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // Revocations present, so the hit path does real lookups.
    let set = RevocationSet::default();
    for i in 0..1000 {
        set.insert(&Revocation::Jti { jti: format!("revoked-{i}") }, 0);
    }
    let store = Arc::new(MemStore(set, broadcast::channel(16).0));

    for alg in ["HS256", "ES256"] {
        let cfg = config(alg);
        let auth = JwtAuthenticator::new(&cfg, &BTreeMap::new(), store.clone(), Arc::new(Metrics::new()))
            .expect("authenticator");
        let token = sign::mint(&cfg, "bench-user", Duration::from_secs(3600), None).expect("token");
        let (body, sig) = token.rsplit_once('.').expect("three parts");
        let forged = format!("{body}.{}{}", if sig.starts_with('A') { "B" } else { "A" }, &sig[1..]);
        let none = format!("eyJhbGciOiJub25lIn0.{}.", body.split_once('.').expect("payload").1);

        let mut g = c.benchmark_group(format!("token_verify/{alg}"));
        g.bench_function("miss", |b| b.iter(|| auth.verify_uncached(black_box(&token)).expect("valid")));
        rt.block_on(auth.verify_token(&token)).expect("valid");
        g.bench_function("hit", |b| {
            b.iter(|| rt.block_on(auth.verify_token(black_box(&token))).expect("valid"))
        });
        g.bench_function("forged", |b| b.iter(|| auth.verify_uncached(black_box(&forged)).unwrap_err()));
        g.bench_function("alg_none", |b| b.iter(|| auth.verify_uncached(black_box(&none)).unwrap_err()));
        g.finish();
    }
}

/// The accept path's synchronous, allocation-free refusal next to the full
/// path's for the same forged HS256 token.
fn precheck(c: &mut Criterion) {
    let store = Arc::new(MemStore(RevocationSet::default(), broadcast::channel(16).0));
    let cfg = config("HS256");
    let auth = JwtAuthenticator::new(&cfg, &BTreeMap::new(), store, Arc::new(Metrics::new()))
        .expect("authenticator");
    let token = sign::mint(&cfg, "bench-user", Duration::from_secs(3600), None).expect("token");
    let (body, sig) = token.rsplit_once('.').expect("three parts");
    let forged = format!("{body}.{}{}", if sig.starts_with('A') { "B" } else { "A" }, &sig[1..]);
    let mut g = c.benchmark_group("forged_hs256");
    g.bench_function("precheck", |b| b.iter(|| auth.precheck(black_box(&forged)).expect("refused")));
    g.bench_function("verify_uncached", |b| b.iter(|| auth.verify_uncached(black_box(&forged)).unwrap_err()));
    g.finish();
}

/// Serves `body` as the answer to every request on a loopback port (one
/// request per connection); returns the URL and a request counter.
async fn jwks_server(body: String) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        }
    });
    (url, count)
}

fn fetched(c: &mut Criterion) {
    use jsonwebtoken::{jwk::Jwk, Algorithm, EncodingKey, Header};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let store = Arc::new(MemStore(RevocationSet::default(), broadcast::channel(16).0));
    let pem = std::fs::read(fixture("ec256.key")).expect("fixture");
    let key = EncodingKey::from_ec_pem(&pem).expect("EC key");
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("jwk");
    jwk.common.key_id = Some("bench".into());
    let body = serde_json::json!({ "keys": [jwk] }).to_string();
    let (url, requests) = rt.block_on(jwks_server(body));
    let cfg = Auth { algorithms: vec!["ES256".into()], jwks_url: url, ..Auth::default() };
    let auth = rt.block_on(async {
        let a = JwtAuthenticator::new(&cfg, &BTreeMap::new(), store, Arc::new(Metrics::new()))
            .expect("authenticator");
        assert!(a.wait_for_keys(Duration::from_secs(5)).await, "keys fetched");
        a
    });
    let now = portcullis::clock::unix_now();
    let claims = serde_json::json!({ "sub": "bench-user", "iat": now, "exp": now + 3600 });
    let sign = |kid: &str| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, &key).expect("token")
    };
    let token = sign("bench");
    let made_up = sign("made-up");
    // The first unknown kid spends the window's one refetch.
    rt.block_on(auth.verify_token(&made_up)).unwrap_err();
    let before = requests.load(std::sync::atomic::Ordering::Relaxed);

    let mut g = c.benchmark_group("token_verify/ES256_fetched");
    g.bench_function("miss", |b| b.iter(|| auth.verify_uncached(black_box(&token)).expect("valid")));
    rt.block_on(auth.verify_token(&token)).expect("valid");
    g.bench_function("hit", |b| b.iter(|| rt.block_on(auth.verify_token(black_box(&token))).expect("valid")));
    g.bench_function("unknown_kid_window_closed", |b| {
        b.iter(|| rt.block_on(auth.verify_token(black_box(&made_up))).unwrap_err())
    });
    g.finish();
    let after = requests.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("provider requests during the unknown-kid benchmark: {}", after - before);
}

criterion_group!(benches, verify, precheck, fetched);
criterion_main!(benches);
