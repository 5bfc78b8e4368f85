//! Fuzz the configuration parser and its validation: `cargo fuzz run config` (from the repository root; needs
//! nightly or `RUSTC_BOOTSTRAP=1`). Seeds and past findings live in
//! `fuzz/corpus/config/`, which `tests/fuzz_corpus.rs` replays on every test run.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::config(data));
