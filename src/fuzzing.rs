//! Fuzz entry points, one per `cargo fuzz` target in `fuzz/fuzz_targets/`.
//! `tests/fuzz_corpus.rs` replays every saved corpus file through these
//! same functions, so an input that once crashed stays fixed. Each must
//! return normally on any input: a panic is the finding.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use crate::auth::jwt::JwtAuthenticator;
use crate::auth::{carrier, check_identity, Identity};
use crate::config::{Carrier, Config};
use crate::handshake::{self, RequestHead};
use crate::revocation::{Revocation, RevocationSet, RevocationStore, StoreError};

const ALL_CARRIERS: [Carrier; 4] = [Carrier::Header, Carrier::Subprotocol, Carrier::Cookie, Carrier::Query];

/// The request-head parser and every check that reads a parsed head.
pub fn request_head(data: &[u8]) {
    if let Ok(head) = handshake::parse(data) {
        let _ = head.path();
        let _ = head.query();
        let _ = handshake::validate_upgrade(&head);
        let _ = handshake::origin_allowed(&head, &["https://app.example".to_string()]);
        carriers_of(&head);
    }
}

/// The PROXY protocol header parser (v1 and v2).
pub fn proxy_header(data: &[u8]) {
    if let crate::client_addr::ProxyParse::Header { len, .. } = crate::client_addr::parse_proxy_header(data) {
        assert!(len <= data.len(), "a header longer than its input");
    }
}

/// The token carriers and what is derived from them, on a head built from
/// lines: the first is the request-target, the others `name: value`.
pub fn carriers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let target = lines.next().unwrap_or("/").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let head = RequestHead { method: "GET".into(), target, headers };
    carriers_of(&head);
}

fn carriers_of(head: &RequestHead) {
    let _ = carrier::extract(head, &ALL_CARRIERS, "portcullis_token");
    let _ = carrier::other_subprotocols(head);
    let redacted = carrier::redact_query(&head.target);
    let stripped = carrier::strip_access_token(&head.target);
    // No parameter named `access_token` (decoded) is left; a longer name
    // merely ending in it (`xaccess_token=`) is another parameter.
    let left = stripped.split_once('?').map_or("", |(_, q)| q);
    assert!(
        left.split('&').all(|p| carrier::percent_decode(p.split_once('=').map_or(p, |(n, _)| n)).as_deref()
            != Some(carrier::QUERY_PARAM)),
        "{stripped}"
    );
    let _ = redacted;
    if let Some(q) = head.query() {
        let _ = carrier::percent_decode(q);
    }
    for v in head.headers_named("cookie") {
        if let Some(rest) = carrier::without_cookie(v, "portcullis_token") {
            assert!(!rest.is_empty());
        }
    }
    let mut cfg = Config::default();
    cfg.auth.carriers = ALL_CARRIERS.to_vec();
    let identity = Identity { sub: "fuzz".into(), ..Identity::default() };
    let peer = SocketAddr::from(([127, 0, 0, 1], 1));
    let _ = crate::upstream::request_headers(head, &identity, &cfg.upstream.claim_headers, &cfg, peer, peer);
}

/// A store that revokes nothing, for the verifier below.
struct NoRevocations(RevocationSet);

#[async_trait::async_trait]
impl RevocationStore for NoRevocations {
    fn is_revoked(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool {
        self.0.is_revoked(sub, jti, iat)
    }
    async fn revoke(&self, _: Revocation) -> Result<(), StoreError> {
        Ok(())
    }
    fn len(&self) -> usize {
        0
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Revocation> {
        tokio::sync::broadcast::channel(1).1
    }
}

/// The secret the JWT target's tokens may be signed with.
pub const FUZZ_SECRET: &str = "fuzz-secret-0123456789abcdef0123";

static VERIFIER: LazyLock<Option<JwtAuthenticator>> = LazyLock::new(|| {
    let mut cfg = Config::default();
    cfg.auth.hmac_secret = FUZZ_SECRET.into();
    cfg.upstream.claim_headers.insert("tenant".into(), "X-Tenant".into());
    let store = Arc::new(NoRevocations(RevocationSet::default()));
    let metrics = Arc::new(crate::metrics::Metrics::new());
    JwtAuthenticator::new(&cfg.auth, &cfg.upstream.claim_headers, store, metrics).ok()
});

/// JWT header parsing, then the whole verification (claims included) of
/// whatever the input holds as a token.
pub fn jwt(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let _ = jsonwebtoken::decode_header(token);
    if let Some(v) = VERIFIER.as_ref() {
        if let Ok(verified) = v.verify_uncached(token) {
            let id = Identity {
                sub: verified.sub.clone(),
                forward: verified.forward.clone(),
                ..Identity::default()
            };
            // A verified token's identity can always travel as headers.
            assert!(check_identity(&id).is_ok(), "{id:?}");
        }
    }
}

/// The configuration parser and validation, and `Debug` (which redacts).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = Config::parse(text) {
        let _ = format!("{cfg:?}");
        assert!(cfg.validate().is_ok());
    }
}
