//! The grammar of HTTP header values the gateway reads in more than one
//! place: comma-separated token lists (`Connection: keep-alive, Upgrade`)
//! and bearer credentials (`Authorization: Bearer T`). One reading each, so
//! the client side, the backend side and the admin plane cannot disagree.

/// Does the comma-separated list `value` hold `token`? Elements are
/// trimmed and compared case-insensitively, as header tokens are.
pub fn list_has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The token of a `Bearer T` credential: the scheme in any case (RFC 7235
/// §2.1), then one token without inner whitespace. `None` for another
/// scheme, an empty token or a token with whitespace inside.
pub fn bearer(value: &str) -> Option<&str> {
    let value = value.trim();
    let (scheme, rest) = value.split_once([' ', '\t'])?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(char::is_whitespace))
        .then_some(token)
}

/// Client request headers never copied upstream: hop-by-hop, the
/// handshake's own, the credential, and what the gateway sets itself or a
/// backend may trust as set by a proxy (`Forwarded` and its `X-` cousins,
/// which a client could otherwise forge).
pub const NOT_FORWARDED: [&str; 17] = [
    "host",
    "connection",
    "upgrade",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
    "authorization",
    "x-forwarded-for",
    "x-real-ip",
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
];

/// Does the gateway set or check a header of this name itself? Such a name
/// cannot carry a claim (`upstream.claim_headers`): the claim would
/// collide with, or be stripped as, the gateway's own.
pub fn reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    NOT_FORWARDED.contains(&lower.as_str())
        || lower.starts_with("sec-websocket-")
        || lower.starts_with("x-portcullis-")
        || ["cookie", "origin", "expect", "x-forwarded-port"].contains(&lower.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lists() {
        assert!(list_has_token("keep-alive, Upgrade", "upgrade"));
        assert!(list_has_token(" websocket ", "WebSocket"));
        assert!(!list_has_token("keep-alive", "upgrade"));
        assert!(!list_has_token("upgrade-insecure", "upgrade"));
        assert!(!list_has_token("", "upgrade"));
    }

    #[test]
    fn bearer_credentials() {
        for v in ["Bearer abc.def", "bearer abc.def", "BEARER   abc.def  ", "Bearer\tabc.def"] {
            assert_eq!(bearer(v), Some("abc.def"), "{v:?}");
        }
        for v in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer a b", "abc.def", ""] {
            assert_eq!(bearer(v), None, "{v:?}");
        }
    }
}
