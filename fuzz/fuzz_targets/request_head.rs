//! Fuzz the request-head parser and the upgrade checks behind it: `cargo fuzz run request_head` (from the repository root; needs
//! nightly or `RUSTC_BOOTSTRAP=1`). Seeds and past findings live in
//! `fuzz/corpus/request_head/`, which `tests/fuzz_corpus.rs` replays on every test run.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::request_head(data));
