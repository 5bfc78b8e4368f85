//! Memory per ban entry, counted by a global allocator of this test's
//! own: the ban table is what an attacker rotating addresses grows, so its
//! cost per entry is held to at most 64 bytes, hash table included.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use portcullis::admit::IpKey;
use portcullis::ban::{BanKey, Bans};
use portcullis::config;
use portcullis::metrics::Metrics;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn a_ban_entry_costs_at_most_64_bytes() {
    let cfg = config::Ban::default();
    let bans = Bans::new(Arc::new(Metrics::new()));
    // Warm: the tables' first allocations and the log line's machinery.
    bans.ban_manual(&cfg, BanKey::Key(IpKey::V4(1)), 60).unwrap();
    let n: u32 = 90_000;
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..n {
        bans.ban_manual(&cfg, BanKey::Key(IpKey::V4(0x0a00_0000 + i)), 60).unwrap();
    }
    let per = (LIVE.load(Ordering::Relaxed) - before) as f64 / f64::from(n);
    println!("{per:.1} bytes per ban entry at {n} entries (hash table included)");
    assert!(per <= 64.0, "{per:.1} bytes per entry");
    assert_eq!(bans.entries(), n as usize + 1);
}
