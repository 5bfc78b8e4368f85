//! Fuzz the proxy-mode frame relay: arbitrary bytes at arbitrary split
//! points never panic it, it forwards exactly what an independent
//! reference accepts, byte for byte, and refuses before a refused frame's
//! first byte passes. `cargo fuzz run relay_frames` (from the repository
//! root; needs nightly or `RUSTC_BOOTSTRAP=1`). Saved inputs in
//! `fuzz/corpus/relay_frames/` are replayed by `tests/relay_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../relay_check.rs"]
mod relay_check;

fuzz_target!(|data: &[u8]| relay_check::check(data));
