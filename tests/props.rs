//! Property tests for the parsers and the limiter maths: no input panics,
//! and splitting input across reads never changes a verdict.

use std::time::Duration;

use portcullis::admit::slots::Attempt;
use portcullis::admit::{IpKey, RateLimiter};
use portcullis::handshake::{self, read_head, ReadError};
use proptest::prelude::*;

const GOOD: &str = "GET /chat?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Reads `bytes` delivered in chunks of the given sizes.
fn read_chunked(
    bytes: &[u8],
    sizes: &[usize],
    max: usize,
) -> Result<(handshake::RequestHead, Vec<u8>), ReadError> {
    rt().block_on(async {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut chunks = Vec::new();
        let mut rest = bytes;
        for s in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = (*s).clamp(1, rest.len());
            chunks.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in chunks {
                if b.write_all(&c).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            // Keep the writer open so EOF does not race the verdict.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        // Every case here completes or fails on its bytes; the bound only
        // turns a hang into a failure.
        let attempt = Attempt::new(tokio::time::Instant::now());
        tokio::time::timeout(Duration::from_secs(2), read_head(&mut a, &attempt, max, Vec::new()))
            .await
            .unwrap_or(Err(ReadError::Timeout { started: true }))
            .map(|h| (h.head, h.rest))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = handshake::parse(&bytes);
    }

    #[test]
    fn validation_never_panics_on_mutated_heads(
        pos in 0usize..GOOD.len(),
        byte in any::<u8>(),
    ) {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes[pos] = byte;
        if let Ok(h) = handshake::parse(&bytes) {
            let _ = handshake::validate_upgrade(&h);
            let _ = handshake::origin_allowed(&h, &["https://a".to_string()]);
        }
    }

    #[test]
    fn splitting_a_head_across_reads_changes_nothing(
        sizes in proptest::collection::vec(1usize..40, 1..20),
        extra in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes.extend_from_slice(&extra);
        let whole = read_chunked(&bytes, &[bytes.len()], 8192).unwrap();
        let split = read_chunked(&bytes, &sizes, 8192).unwrap();
        prop_assert_eq!(&whole.0, &split.0);
        // Bytes past the head are kept, never lost (some may still be unread).
        prop_assert!(extra.starts_with(&split.1));
    }

    #[test]
    fn heads_over_the_limit_are_refused_however_they_arrive(
        sizes in proptest::collection::vec(1usize..300, 1..10),
        pad in 600usize..2000,
    ) {
        let head = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "p".repeat(pad));
        prop_assert_eq!(read_chunked(head.as_bytes(), &sizes, 512).unwrap_err(), ReadError::TooLarge);
    }

    #[test]
    fn ipv6_keys_ignore_the_interface_half(hi in any::<u64>(), lo1 in any::<u64>(), lo2 in any::<u64>()) {
        let a = std::net::Ipv6Addr::from(((hi as u128) << 64) | lo1 as u128);
        let b = std::net::Ipv6Addr::from(((hi as u128) << 64) | lo2 as u128);
        // IPv4-mapped addresses are keyed as IPv4, by design.
        prop_assume!(a.to_ipv4_mapped().is_none() && b.to_ipv4_mapped().is_none());
        prop_assert_eq!(IpKey::new(a.into()), IpKey::new(b.into()));
    }

    #[test]
    fn gcra_admits_the_burst_then_refuses(burst in 1u32..50, rate in 0.01f64..5.0) {
        let rl = RateLimiter::new(rate, burst);
        let k = IpKey::new("127.0.0.9".parse().unwrap());
        let admitted = (0..burst + 10).filter(|_| rl.check(k).is_ok()).count() as u32;
        // Instantly, exactly the burst (plus at most one refill at fast rates).
        prop_assert!(admitted >= burst && admitted <= burst + 1, "burst {} admitted {}", burst, admitted);
        let retry = rl.check(k).unwrap_err();
        prop_assert!(retry >= 1 && retry as f64 <= (1.0 / rate).ceil() + 1.0, "retry {} at rate {}", retry, rate);
    }
}
