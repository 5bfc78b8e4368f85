//! Replays every saved fuzz input (`fuzz/corpus/<target>/*`) through the
//! same entry points the `cargo fuzz` targets call, so a crash found once
//! stays fixed without a nightly toolchain.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panics", path.display());
        n += 1;
    }
    assert!(n > 0, "no corpus for {target}");
}

#[test]
fn request_head_corpus() {
    replay("request_head", portcullis::fuzzing::request_head);
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header", portcullis::fuzzing::proxy_header);
}

#[test]
fn carriers_corpus() {
    replay("carriers", portcullis::fuzzing::carriers);
}

#[test]
fn jwt_corpus() {
    replay("jwt", portcullis::fuzzing::jwt);
}

#[test]
fn config_corpus() {
    replay("config", portcullis::fuzzing::config);
}
