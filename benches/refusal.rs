//! The whole in-process refusal path: request-head bytes in, answer bytes
//! out (`early::judge`: rate, parse, path and upgrade checks, token), with
//! the heap allocations each verdict makes, counted by this binary's own
//! global allocator. The valid path is measured beside it: the fast path's
//! `Continue`, then the parse and authentication the pipeline does next.
//!
//! Run with `cargo bench --bench refusal`. Allocation counts are printed
//! before the timings.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::early::{self, Verdict, ANSWER_MAX};
use portcullis::{Config, Gateway, Shared};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SECRET: &str = "bench-secret-0123456789abcdef";

/// Client addresses the verdicts rotate over (each has its own rate).
const ADDRESSES: u32 = 4096;

fn client(i: u32) -> SocketAddr {
    SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i % ADDRESSES), 40000))
}

fn token(secret: &str, exp_from_now: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = serde_json::json!({ "sub": "alice", "iat": now - 60, "exp": now + exp_from_now });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn head(token: Option<&str>) -> Vec<u8> {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!(
        "GET / HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n"
    )
    .into_bytes()
}

/// A bound (not running) gateway's state, shipped defaults but the secret
/// and the per-address rate: the highest there is, over which the bench
/// spreads its verdicts across [`ADDRESSES`] so that none is limited
/// (`limited`: the lowest, so that every verdict is a 429).
fn gateway(rt: &tokio::runtime::Runtime, limited: bool) -> Arc<Shared> {
    let mut cfg = Config::default();
    cfg.listen.public = "127.0.0.1:0".parse().unwrap();
    cfg.listen.admin = "127.0.0.1:0".parse().unwrap();
    cfg.auth.hmac_secret = SECRET.into();
    cfg.revocation.path = std::env::temp_dir().join(format!("portcullis-bench-{}.log", std::process::id()));
    (cfg.limits.per_ip_rate, cfg.limits.per_ip_burst) =
        if limited { (0.001, 1) } else { (100_000.0, 100_000) };
    let gw = rt.block_on(Gateway::bind(cfg)).expect("gateway binds");
    // The listeners stay bound but are never served.
    let shared = gw.shared();
    std::mem::forget(gw);
    shared
}

fn refusal(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut i = 0u32;
    let mut next = || {
        i = i.wrapping_add(1);
        client(i)
    };
    let open = gateway(&rt, false);
    let limited = gateway(&rt, true);
    let cfg = open.config.load_full();
    let forged = token("not-the-secret", 3600);
    let cases: [(&str, &Arc<Shared>, Vec<u8>); 5] = [
        ("missing token (401)", &open, head(None)),
        ("forged HS256 (401)", &open, head(Some(&forged))),
        ("expired HS256 (401)", &open, head(Some(&token(SECRET, -3600)))),
        ("rate limited (429)", &limited, head(None)),
        ("valid HS256: Continue", &open, head(Some(&token(SECRET, 3600)))),
    ];
    let mut answer = [0u8; ANSWER_MAX];
    // One warm-up verdict each (the limiter's key, thread-local state).
    for (_, shared, h) in &cases {
        for _ in 0..ADDRESSES {
            early::judge(shared, &cfg, next(), h, &mut answer);
        }
    }
    println!("allocations per verdict (mean of 1,000):");
    for (name, shared, h) in &cases {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..1000 {
            early::judge(shared, &cfg, next(), h, &mut answer);
        }
        let per = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 1000.0;
        println!("  {name:<24} {per:.2}");
    }
    // What the valid path allocates after the fast path's Continue: the
    // owned head and the authentication (a verified-claims cache hit).
    let valid = &cases[4].2;
    let verify = |shared: &Shared| {
        let head = portcullis::handshake::parse(valid).unwrap();
        rt.block_on(portcullis::auth::authenticate(shared.auth.as_ref(), &head, client(0))).unwrap()
    };
    verify(&open);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..1000 {
        verify(&open);
    }
    let per = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 1000.0;
    println!("  {:<24} {per:.2}", "valid: parse + authenticate (cache hit)");

    let mut g = c.benchmark_group("refusal");
    for (name, shared, h) in &cases {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let v = early::judge(shared, &cfg, next(), std::hint::black_box(h), &mut answer);
                assert!(matches!(v, Verdict::Refuse { .. } | Verdict::Continue));
                v
            })
        });
    }
    g.bench_function("valid: parse + authenticate (cache hit)", |b| b.iter(|| verify(&open)));
    g.finish();
}

criterion_group!(benches, refusal);
criterion_main!(benches);
