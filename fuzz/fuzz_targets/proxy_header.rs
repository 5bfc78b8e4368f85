//! Fuzz the PROXY protocol header parser (v1 and v2): `cargo fuzz run proxy_header` (from the repository root; needs
//! nightly or `RUSTC_BOOTSTRAP=1`). Seeds and past findings live in
//! `fuzz/corpus/proxy_header/`, which `tests/fuzz_corpus.rs` replays on every test run.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::proxy_header(data));
