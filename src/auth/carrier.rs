//! Where a token travels: the `header`, `subprotocol`, `cookie` and `query`
//! carriers, and the helpers that keep a token out of logs and away from the
//! upstream.
//!
//! The first carrier *present* in `auth.carriers` order decides; there is no
//! fall-through. A carrier that is present but malformed (`Authorization:
//! Basic …`, `bearer` as the last subprotocol, an empty cookie, a badly
//! percent-encoded `access_token`) yields an empty token, which the verifier
//! refuses as `invalid_token`: a client that sent *something* gets told its
//! credential is wrong, not that it sent none, and an attacker cannot steer
//! the gateway to a weaker carrier by breaking the stronger one.

use crate::config::Carrier;
use crate::handshake::RequestHead;

/// The query parameter of the `query` carrier.
pub const QUERY_PARAM: &str = "access_token";
/// The subprotocol that announces a token in the next element.
pub const BEARER_SUBPROTOCOL: &str = "bearer";
/// What a redacted `access_token` value becomes in logs.
pub const REDACTED: &str = "REDACTED";

/// The token from the first carrier present, in `carriers` order.
///
/// `Some((carrier, ""))` means the carrier is present but malformed (see the
/// module doc); `None` means no configured carrier is present at all
/// (`missing_token`).
pub fn extract(head: &RequestHead, carriers: &[Carrier], cookie_name: &str) -> Option<(Carrier, String)> {
    carriers.iter().find_map(|&c| {
        let token = match c {
            Carrier::Header => from_header(head),
            Carrier::Subprotocol => from_subprotocol(head),
            Carrier::Cookie => from_cookie(head, cookie_name),
            Carrier::Query => from_query(head),
        }?;
        Some((c, token))
    })
}

/// `Authorization: Bearer T`. Any `Authorization` header counts as present;
/// another scheme, an empty token, a token with inner whitespace or a repeated
/// header (ambiguous: which one would a backend believe?) is malformed.
fn from_header(head: &RequestHead) -> Option<String> {
    let mut values = head.headers_named("authorization");
    let value = values.next()?;
    if values.next().is_some() {
        return Some(String::new());
    }
    let value = value.trim();
    let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    let token = rest.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(char::is_whitespace) {
        return Some(String::new());
    }
    Some(token.to_owned())
}

/// Every offered subprotocol, across repeated `Sec-WebSocket-Protocol` lines,
/// trimmed, empty elements skipped.
fn offered_subprotocols(head: &RequestHead) -> impl Iterator<Item = &str> {
    head.headers_named("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// `Sec-WebSocket-Protocol: bearer, T`: present when `bearer` is offered;
/// the token is the element right after it (missing → malformed).
/// Subprotocol names are case-sensitive (RFC 6455 §4.1), and the 101 echoes
/// `bearer` exactly, so only `bearer` itself announces a token.
fn from_subprotocol(head: &RequestHead) -> Option<String> {
    let mut it = offered_subprotocols(head);
    it.find(|p| *p == BEARER_SUBPROTOCOL)?;
    Some(it.next().unwrap_or_default().to_owned())
}

/// The offered subprotocols minus every `bearer` and the token after it:
/// what is forwarded upstream, so the credential never leaves the gateway in
/// a header the backend might log.
pub fn other_subprotocols(head: &RequestHead) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = offered_subprotocols(head);
    while let Some(p) = it.next() {
        if p == BEARER_SUBPROTOCOL {
            it.next();
        } else {
            out.push(p.to_owned());
        }
    }
    out
}

/// `Cookie: name=value` across every `Cookie` line; the first cookie of that
/// name wins. Double quotes around the value (RFC 6265 allows them) are
/// removed; an empty value is malformed.
fn from_cookie(head: &RequestHead, name: &str) -> Option<String> {
    head.headers_named("cookie").flat_map(|v| v.split(';')).find_map(|pair| {
        let (n, v) = pair.split_once('=')?;
        if n.trim() != name {
            return None;
        }
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        Some(v.to_owned())
    })
}

/// `?access_token=T` (percent-decoded, `+` as a space as in forms). The
/// first occurrence wins; bad percent-encoding is malformed.
fn from_query(head: &RequestHead) -> Option<String> {
    let query = head.query()?;
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !is_access_token(name) {
            return None;
        }
        Some(percent_decode(value).unwrap_or_default())
    })
}

fn is_access_token(raw_name: &str) -> bool {
    // Compare the decoded name: `access%5Ftoken` is the same parameter to
    // any backend that decodes, so it must be the same to the gateway.
    percent_decode(raw_name).is_some_and(|n| n == QUERY_PARAM)
}

/// Decodes `%XX` escapes and `+`; `None` on a bad escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = hex_val(*bytes.get(i + 1)?)?;
                let lo = hex_val(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Rewrites the query of `target` ("/path?query"), keeping or replacing each
/// parameter; the rest is kept byte for byte.
fn rewrite_query(target: &str, redact: bool) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let kept: Vec<String> = query
        .split('&')
        .filter_map(|pair| {
            let name = pair.split_once('=').map_or(pair, |(n, _)| n);
            match (is_access_token(name), redact) {
                (false, _) => Some(pair.to_owned()),
                (true, true) => Some(format!("{name}={REDACTED}")),
                (true, false) => None,
            }
        })
        .collect();
    if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// `target` with every `access_token` value replaced by `REDACTED`: the only
/// form of a request target that may be logged.
pub fn redact_query(target: &str) -> String {
    rewrite_query(target, true)
}

/// `target` without any `access_token` parameter (a `?` left with nothing
/// after it is dropped too): the path and query sent upstream.
pub fn strip_access_token(target: &str) -> String {
    rewrite_query(target, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Carrier::*;

    fn head(target: &str, headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            target: target.into(),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        }
    }

    const ALL: [Carrier; 4] = [Header, Subprotocol, Cookie, Query];

    fn ext(h: &RequestHead, carriers: &[Carrier]) -> Option<(Carrier, String)> {
        extract(h, carriers, "portcullis_token")
    }

    #[test]
    fn header_bearer_any_case() {
        for v in ["Bearer abc.def.ghi", "bearer abc.def.ghi", "BEARER   abc.def.ghi  "] {
            let h = head("/", &[("authorization", v)]);
            assert_eq!(ext(&h, &ALL), Some((Header, "abc.def.ghi".into())), "{v}");
        }
    }

    #[test]
    fn header_other_scheme_is_present_but_invalid() {
        for v in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer a b", "abc.def.ghi"] {
            // A valid token in a later carrier must not rescue it: no fall-through.
            let h = head("/?access_token=good", &[("Authorization", v)]);
            assert_eq!(ext(&h, &ALL), Some((Header, String::new())), "{v}");
        }
    }

    #[test]
    fn repeated_authorization_is_invalid() {
        let h = head("/", &[("Authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert_eq!(ext(&h, &[Header]), Some((Header, String::new())));
    }

    #[test]
    fn subprotocol_bearer_then_token() {
        let h = head("/", &[("Sec-WebSocket-Protocol", "chat, bearer, tok.en.x, v2")]);
        assert_eq!(ext(&h, &ALL), Some((Subprotocol, "tok.en.x".into())));
        assert_eq!(other_subprotocols(&h), vec!["chat".to_string(), "v2".to_string()]);
    }

    #[test]
    fn subprotocol_across_header_lines() {
        let h =
            head("/", &[("Sec-WebSocket-Protocol", "chat, bearer"), ("sec-websocket-protocol", " tok , v2")]);
        assert_eq!(ext(&h, &[Subprotocol]), Some((Subprotocol, "tok".into())));
        assert_eq!(other_subprotocols(&h), vec!["chat".to_string(), "v2".to_string()]);
    }

    #[test]
    fn subprotocol_bearer_last_is_invalid_and_absent_without_bearer() {
        let h = head("/", &[("Sec-WebSocket-Protocol", "chat, bearer")]);
        assert_eq!(ext(&h, &[Subprotocol, Query]), Some((Subprotocol, String::new())));
        let h = head("/?access_token=q", &[("Sec-WebSocket-Protocol", "chat, Bearer, x")]);
        // `Bearer` is not `bearer`: the subprotocol carrier is absent, so the
        // next carrier decides.
        assert_eq!(ext(&h, &[Subprotocol, Query]), Some((Query, "q".into())));
        assert_eq!(other_subprotocols(&h), vec!["chat", "Bearer", "x"]);
    }

    #[test]
    fn cookie_by_name() {
        let h = head(
            "/",
            &[("Cookie", "a=1; portcullis_token=ck.tok.en"), ("Cookie", "portcullis_token=second")],
        );
        assert_eq!(ext(&h, &[Cookie]), Some((Cookie, "ck.tok.en".into())));
        let h = head("/", &[("Cookie", "portcullis_token=\"quoted\"")]);
        assert_eq!(ext(&h, &[Cookie]), Some((Cookie, "quoted".into())));
        let h = head("/", &[("Cookie", "portcullis_token=")]);
        assert_eq!(ext(&h, &[Cookie, Header]), Some((Cookie, String::new())));
        let h = head("/", &[("Cookie", "other=1; xportcullis_token=2")]);
        assert_eq!(ext(&h, &[Cookie]), None);
    }

    #[test]
    fn query_percent_decoded() {
        let h = head("/ws?x=1&access_token=a%2Eb.c&access_token=second", &[]);
        assert_eq!(ext(&h, &[Query]), Some((Query, "a.b.c".into())));
        let h = head("/ws?access%5Ftoken=tok", &[]);
        assert_eq!(ext(&h, &[Query]), Some((Query, "tok".into())));
        let h = head("/ws?access_token=bad%zz", &[]);
        assert_eq!(ext(&h, &[Query]), Some((Query, String::new())));
        let h = head("/ws?access_token", &[]);
        assert_eq!(ext(&h, &[Query]), Some((Query, String::new())));
        let h = head("/ws?x=access_token", &[]);
        assert_eq!(ext(&h, &[Query]), None);
    }

    #[test]
    fn first_present_in_config_order_decides() {
        let h = head(
            "/?access_token=q",
            &[
                ("Authorization", "Bearer h"),
                ("Sec-WebSocket-Protocol", "bearer, s"),
                ("Cookie", "portcullis_token=c"),
            ],
        );
        assert_eq!(ext(&h, &[Header, Subprotocol, Cookie, Query]).unwrap().1, "h");
        assert_eq!(ext(&h, &[Subprotocol, Header]).unwrap().1, "s");
        assert_eq!(ext(&h, &[Cookie, Header]).unwrap().1, "c");
        assert_eq!(ext(&h, &[Query, Header]).unwrap().1, "q");
        // Carriers not configured are never read.
        let h = head("/?access_token=q", &[("Cookie", "portcullis_token=c")]);
        assert_eq!(ext(&h, &[Header, Subprotocol]), None);
    }

    #[test]
    fn missing_everywhere_is_none() {
        let h = head("/", &[("Host", "x")]);
        assert_eq!(ext(&h, &ALL), None);
    }

    #[test]
    fn redact_and_strip() {
        assert_eq!(redact_query("/ws?a=1&access_token=sec&b=2"), "/ws?a=1&access_token=REDACTED&b=2");
        assert_eq!(redact_query("/ws?access%5Ftoken=sec"), "/ws?access%5Ftoken=REDACTED");
        assert_eq!(redact_query("/ws"), "/ws");
        assert_eq!(strip_access_token("/ws?a=1&access_token=sec&b=2"), "/ws?a=1&b=2");
        assert_eq!(strip_access_token("/ws?access_token=sec"), "/ws");
        assert_eq!(strip_access_token("/ws?access_token=1&access_token=2&x"), "/ws?x");
        assert_eq!(strip_access_token("/ws?a=%20"), "/ws?a=%20");
        assert_eq!(strip_access_token("/ws"), "/ws");
    }
}
