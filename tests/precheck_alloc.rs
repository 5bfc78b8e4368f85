//! The token precheck refuses without a heap allocation: counted by a
//! global allocator of its own binary (one per process), per thread, so the
//! harness's other threads do not count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis::auth::jwt::{JwtAuthenticator, MAX_TOKEN_BYTES};
use portcullis::auth::sign;
use portcullis::auth::AuthRefusal;
use portcullis::clock::unix_now;
use portcullis::config::Auth;
use portcullis::metrics::Metrics;
use portcullis::revocation::{Revocation, RevocationSet, RevocationStore, StoreError};
use portcullis::Reject;
use serde_json::json;
use tokio::sync::broadcast;

struct Counting;

thread_local! {
    /// Whether this thread's allocations are counted, and how many so far.
    /// Const-initialised cells without destructors: reading them from the
    /// allocator allocates nothing.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: every call is forwarded to `System` unchanged; counting touches
// only the two thread-local cells above.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// How many allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get) - before
}

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

const SECRET: &str = "alloc-test-secret-alloc-test-secret";

fn authenticator() -> (JwtAuthenticator, Auth) {
    let cfg = Auth { algorithms: vec!["HS256".into()], hmac_secret: SECRET.into(), ..Auth::default() };
    let store = Arc::new(MemStore(RevocationSet::default(), broadcast::channel(4).0));
    let auth = JwtAuthenticator::new(&cfg, &BTreeMap::new(), store, Arc::new(Metrics::new())).unwrap();
    (auth, cfg)
}

fn hs256(claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
}

/// Signed under `header` as given (any JSON).
fn hs256_with(header: serde_json::Value, claims: &serde_json::Value) -> String {
    let b64 = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let message = format!("{}.{}", b64(&header), b64(claims));
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{message}.{sig}")
}

#[test]
fn precheck_refuses_without_allocating() {
    let (auth, cfg) = authenticator();
    let valid = sign::mint(&cfg, "alice", Duration::from_secs(600), Some("j1")).unwrap();
    let (body, sig) = valid.rsplit_once('.').unwrap();
    let forged = format!("{body}.{}{}", if sig.starts_with('A') { "B" } else { "A" }, &sig[1..]);
    let now = unix_now();
    let expired = hs256(&json!({"sub": "alice", "iat": now - 700, "exp": now - 100, "jti": "j2"}));
    let payload = body.split_once('.').unwrap().1;
    let alg_none = format!("eyJhbGciOiJub25lIn0.{payload}.");
    let oversized = "a".repeat(MAX_TOKEN_BYTES + 1);
    let big_header = hs256_with(json!({"alg": "HS256", "x": "x".repeat(2000)}), &json!({"sub": "alice"}));
    let big_header = format!("{}.{sig}", big_header.rsplit_once('.').unwrap().0);
    let invalid = Some(AuthRefusal::Reason(Reject::InvalidToken));
    let cases = [
        (forged.as_str(), &invalid),
        (&expired, &Some(AuthRefusal::Reason(Reject::ExpiredToken))),
        (&big_header, &invalid),
        (&alg_none, &invalid),
        ("garbage", &invalid),
        ("abcd.efgh.ijkl", &invalid),
        ("eyJhbGciOiJIUzI1NiJ9.e30.", &invalid),
        ("", &invalid),
        (&oversized, &invalid),
    ];
    // Warm-up: per-thread state of `arc-swap` and the metrics, first-use
    // detections, are paid once and not per refusal.
    for (token, want) in &cases {
        assert_eq!(&auth.precheck(token), *want, "{token}");
    }
    assert_eq!(auth.precheck(&valid), None);

    for (token, _) in &cases {
        let n = allocations(|| {
            for _ in 0..1000 {
                black_box(auth.precheck(black_box(token)));
            }
        });
        assert_eq!(n, 0, "{n} allocations refusing {token:.40}…");
    }
    // Nor does it allocate to find it cannot decide (the full path then will).
    assert_eq!(allocations(|| drop(black_box(auth.precheck(black_box(&valid))))), 0);
    // The count is real: the full path's refusal of the same forgery allocates.
    let full = allocations(|| drop(black_box(auth.verify_uncached(black_box(&forged)))));
    assert!(full > 0, "verify_uncached made no allocation");
    eprintln!("verify_uncached(forged HS256): {full} allocations");
}

/// Why the precheck counts the auth-cache miss but does not time itself: a
/// counter is an atomic add, a histogram sample goes into blocks of 64 that
/// the Prometheus recorder allocates as they fill (and again after every
/// scrape). If this starts failing, the precheck may record `token_verify`.
#[test]
fn counters_do_not_allocate_histograms_do() {
    let m = Metrics::new();
    m.auth_cache(false);
    m.token_verify(Duration::from_micros(1));
    assert_eq!(
        allocations(|| {
            for _ in 0..1000 {
                m.auth_cache(false);
            }
        }),
        0
    );
    let n = allocations(|| {
        for _ in 0..1000 {
            m.token_verify(Duration::from_micros(1));
        }
    });
    assert!(n > 0, "token_verify made no allocation");
    eprintln!("1000 token_verify samples: {n} allocations");
}
