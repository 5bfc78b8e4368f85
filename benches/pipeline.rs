//! Hot-path micro-benchmarks of the stages before authentication:
//! request-head parse and validation, the per-IP rate check, and the caps.
//!
//! Run with `cargo bench --bench pipeline`.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::admit::{Caps, IpKey, RateLimiter, SlotLimits, Slots};
use portcullis::handshake;

const FIREFOX: &[u8] = b"GET /chat HTTP/1.1\r\nHost: gw.example:8080\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0\r\nAccept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br, zstd\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.example\r\nSec-WebSocket-Protocol: bearer, eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl\r\nSec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: keep-alive, Upgrade\r\nSec-Fetch-Dest: empty\r\nSec-Fetch-Mode: websocket\r\nSec-Fetch-Site: same-site\r\nPragma: no-cache\r\nCache-Control: no-cache\r\nUpgrade: websocket\r\n\r\n";

fn head(c: &mut Criterion) {
    c.bench_function("head/parse+validate (firefox, 700 B)", |b| {
        b.iter(|| {
            let h = handshake::parse(std::hint::black_box(FIREFOX)).unwrap();
            handshake::validate_upgrade(&h).map(str::len).unwrap()
        })
    });
}

fn rate(c: &mut Criterion) {
    let rl = RateLimiter::new(1e9, 1_000_000);
    let key = IpKey::new("127.0.0.2".parse().unwrap());
    c.bench_function("rate/check (one key)", |b| b.iter(|| rl.check(std::hint::black_box(key))));
    let keys: Vec<IpKey> =
        (0..10_000u32).map(|i| IpKey::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into())).collect();
    let mut i = 0;
    c.bench_function("rate/check (10k keys)", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            rl.check(keys[i])
        })
    });
}

fn caps(c: &mut Criterion) {
    let caps = Arc::new(Caps::default());
    let slots = Slots::new(None);
    let limits = SlotLimits::from(&portcullis::config::Limits::default());
    let key = IpKey::new("127.0.0.2".parse().unwrap());
    c.bench_function("caps/admit+ip+slot+release", |b| {
        b.iter(|| {
            let conn = caps.admit(10_000).unwrap();
            let ip = caps.admit_ip(key, 256).unwrap();
            let slot = slots.admit(Some(key), tokio::time::Instant::now(), limits).unwrap();
            drop((conn, ip, slot));
        })
    });
}

criterion_group!(benches, head, rate, caps);
criterion_main!(benches);
