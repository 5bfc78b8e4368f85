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

use std::borrow::Cow;

use crate::config::Carrier;
use crate::handshake::Request;

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
/// (`missing_token`). Borrowed from the head unless percent-decoding
/// changed it: the refusal fast path extracts without allocating.
pub fn extract<'a, R: Request>(
    head: &'a R,
    carriers: &[Carrier],
    cookie_name: &str,
) -> Option<(Carrier, Cow<'a, str>)> {
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
fn from_header<R: Request>(head: &R) -> Option<Cow<'_, str>> {
    let mut values = head.headers_named("authorization");
    let value = values.next()?;
    if values.next().is_some() {
        return Some(Cow::Borrowed(""));
    }
    let value = value.trim();
    let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    let token = rest.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(char::is_whitespace) {
        return Some(Cow::Borrowed(""));
    }
    Some(Cow::Borrowed(token))
}

/// Every offered subprotocol, across repeated `Sec-WebSocket-Protocol` lines,
/// trimmed, empty elements skipped.
fn offered_subprotocols<R: Request>(head: &R) -> impl Iterator<Item = &str> {
    head.headers_named("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// `Sec-WebSocket-Protocol: bearer, T`: present when `bearer` is offered;
/// the token is the element right after it (missing → malformed).
/// Subprotocol names are case-sensitive (RFC 6455 §4.1), and the 101 echoes
/// `bearer` exactly, so only `bearer` itself announces a token.
fn from_subprotocol<R: Request>(head: &R) -> Option<Cow<'_, str>> {
    let mut it = offered_subprotocols(head);
    it.find(|p| *p == BEARER_SUBPROTOCOL)?;
    Some(Cow::Borrowed(it.next().unwrap_or_default()))
}

/// The offered subprotocols minus every `bearer` and the token after it:
/// what is forwarded upstream, so the credential never leaves the gateway in
/// a header the backend might log.
pub fn other_subprotocols<R: Request>(head: &R) -> Vec<String> {
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

/// The `name=value` pairs of one `Cookie` header line, trimmed (RFC 6265
/// §4.2.1: pairs separated by `;`). A piece without `=` is skipped.
fn cookie_pairs(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split(';').filter_map(|pair| {
        let (n, v) = pair.split_once('=')?;
        Some((n.trim(), v.trim()))
    })
}

/// `Cookie: name=value` across every `Cookie` line; the first cookie of that
/// name wins. Double quotes around the value (RFC 6265 allows them) are
/// removed; an empty value is malformed.
fn from_cookie<'a, R: Request>(head: &'a R, name: &str) -> Option<Cow<'a, str>> {
    head.headers_named("cookie").flat_map(cookie_pairs).find_map(|(n, v)| {
        if n != name {
            return None;
        }
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        Some(Cow::Borrowed(v))
    })
}

/// One `Cookie` header line without any cookie called `name` (the cookie
/// carrier's, which must not reach the backend); the other pieces are kept
/// as sent. `None` when nothing is left, so the header is dropped.
pub fn without_cookie(line: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = line
        .split(';')
        .map(str::trim)
        .filter(|piece| !piece.is_empty() && piece.split_once('=').is_none_or(|(n, _)| n.trim() != name))
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// `?access_token=T` (percent-decoded). The first occurrence wins; bad
/// percent-encoding is malformed.
fn from_query<R: Request>(head: &R) -> Option<Cow<'_, str>> {
    query_param(head.query()?, QUERY_PARAM)
}

/// The first value of parameter `name` in a query string, percent-decoded
/// (a bad escape gives an empty value, which matches nothing). Names are
/// compared decoded: `access%5Ftoken` is the same parameter to any backend
/// that decodes, so it must be the same to the gateway. The one query
/// parser of the crate (the token carrier, the admin `?sub=`).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (n, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(n).as_deref() != Some(name) {
            return None;
        }
        Some(percent_decode(value).unwrap_or_default())
    })
}

fn is_access_token(raw_name: &str) -> bool {
    percent_decode(raw_name).is_some_and(|n| n == QUERY_PARAM)
}

/// Decodes `%XX` escapes (RFC 3986); `None` on a bad escape (a `%` not
/// followed by two hex digits) or a non-UTF-8 result. A `+` stays a `+`:
/// the form rule (`+` for a space) belongs to HTML form bodies, and would
/// turn an admin's `?sub=a+b` into another subject.
pub fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    // `percent_decode_str` passes a malformed escape through untouched;
    // a credential with one is refused instead.
    let b = s.as_bytes();
    let bad_escape = b.iter().enumerate().any(|(i, &c)| {
        c == b'%'
            && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if bad_escape {
        return None;
    }
    percent_encoding::percent_decode_str(s).decode_utf8().ok()
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
    use crate::handshake::RequestHead;
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
        extract(h, carriers, "portcullis_token").map(|(c, t)| (c, t.into_owned()))
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
        let h = head("/ws?access_token=bad%4", &[]);
        assert_eq!(ext(&h, &[Query]), Some((Query, String::new())));
    }

    #[test]
    fn percent_decoding_keeps_plus_and_refuses_bad_escapes() {
        assert_eq!(percent_decode("a+b").as_deref(), Some("a+b"));
        assert_eq!(percent_decode("a%20b%2B").as_deref(), Some("a b+"));
        assert_eq!(percent_decode("%e2%82%ac").as_deref(), Some("\u{20ac}"));
        for bad in ["%", "%4", "%zz", "a%g1", "%ff"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_carrier_cookie_alone_is_removed() {
        let name = "portcullis_token";
        assert_eq!(without_cookie("a=1; portcullis_token=t; b=2", name).as_deref(), Some("a=1; b=2"));
        assert_eq!(without_cookie("portcullis_token=t", name), None);
        assert_eq!(without_cookie("portcullis_token=t;portcullis_token=u", name), None);
        assert_eq!(
            without_cookie("xportcullis_token=1;flag", name).as_deref(),
            Some("xportcullis_token=1; flag")
        );
        assert_eq!(without_cookie(" portcullis_token = t ; c=3", name).as_deref(), Some("c=3"));
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
