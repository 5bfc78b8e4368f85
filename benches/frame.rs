//! The echo's unmasking, side by side with the byte-at-a-time definition
//! it replaced (kept here as the reference), at 1 KiB and 64 KiB.
//!
//! Run with `cargo bench --bench frame`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use portcullis::relay::frame::apply_mask;

/// RFC 6455 §5.3, as written: each byte with mask byte `(offset + i) % 4`.
fn bytewise(data: &mut [u8], mask: [u8; 4], offset: u64) {
    let start = (offset % 4) as usize;
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(start + i) % 4];
    }
}

fn unmask(c: &mut Criterion) {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut g = c.benchmark_group("unmask");
    for size in [1024usize, 65536] {
        let mut data = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("bytewise (reference)", size), &size, |b, _| {
            b.iter(|| bytewise(std::hint::black_box(&mut data), mask, 1))
        });
        g.bench_with_input(BenchmarkId::new("apply_mask", size), &size, |b, _| {
            b.iter(|| apply_mask(std::hint::black_box(&mut data), mask, 1))
        });
    }
    g.finish();
}

criterion_group!(benches, unmask);
criterion_main!(benches);
