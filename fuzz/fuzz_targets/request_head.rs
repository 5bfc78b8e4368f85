//! Fuzz the request-head parser and the upgrade checks behind it:
//! `cargo fuzz run request_head` (from the repository root; needs nightly or
//! `RUSTC_BOOTSTRAP=1`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::handshake;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = handshake::parse(data) {
        let _ = head.path();
        let _ = head.query();
        let _ = handshake::validate_upgrade(&head);
        let _ = handshake::origin_allowed(&head, &["https://app.example".to_string()]);
        let _ = portcullis::auth::carrier::extract(
            &head,
            &[
                portcullis::config::Carrier::Header,
                portcullis::config::Carrier::Subprotocol,
                portcullis::config::Carrier::Cookie,
                portcullis::config::Carrier::Query,
            ],
            "portcullis_token",
        );
        let _ = portcullis::auth::carrier::other_subprotocols(&head);
    }
});
