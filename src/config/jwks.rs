//! Keys fetched from an identity provider: `auth.jwks_url`,
//! `auth.oidc_issuer`, `auth.jwks_refresh_s`, `auth.jwks_timeout_ms`,
//! `auth.jwks_ca_file` and the `[[auth.issuers]]` entries (one per tenant's
//! provider), with their defaults, bounds and validation.
//!
//! Fetching itself lives in `auth::provider`; this file only says what an
//! operator may write and refuses what would never work (an `http://` URL to
//! another machine, a symmetric algorithm for public keys, two entries for
//! one issuer) before anything is fetched.

use serde::Deserialize;

use super::{invalid, within, Auth, ConfigError, KNOWN_ALGORITHMS};

/// Keys are refetched at least this often (seconds).
pub const DEFAULT_JWKS_REFRESH_S: u64 = 300;
/// One fetch, connect to last byte (milliseconds).
pub const DEFAULT_JWKS_TIMEOUT_MS: u64 = 2000;
/// A provider's `Cache-Control: max-age` below this is raised to it, so a
/// provider answering `max-age=0` is not fetched on every tick.
pub const MIN_MAX_AGE_S: u64 = 30;
/// Bounds of `auth.jwks_refresh_s`: a day at most. Values under
/// [`MIN_MAX_AGE_S`] are the operator's explicit choice (tests, a provider
/// of one's own) and are honoured.
pub const MAX_JWKS_REFRESH_S: u64 = 86_400;
/// Bounds of `auth.jwks_timeout_ms`: a handshake with an unknown `kid` waits
/// this long at most, so it must stay well under any handshake deadline.
pub const MAX_JWKS_TIMEOUT_MS: u64 = 60_000;
/// The algorithms an `[[auth.issuers]]` entry allows unless it says.
pub const DEFAULT_ISSUER_ALGORITHMS: [&str; 1] = ["RS256"];
/// At most this many `[[auth.issuers]]` entries (each one a background
/// task and a set of keys).
pub const MAX_ISSUERS: usize = 1000;

/// One `[[auth.issuers]]` entry: the identity provider of one tenant.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct IssuerEntry {
    /// A token's `iss` must equal this exactly to select the entry.
    pub issuer: String,
    /// The JWKS endpoint; or `oidc = true` to discover it from `issuer`.
    pub jwks_url: String,
    pub oidc: bool,
    /// Checked when set.
    pub audience: String,
    pub algorithms: Vec<String>,
}

impl Default for IssuerEntry {
    fn default() -> Self {
        IssuerEntry {
            issuer: String::new(),
            jwks_url: String::new(),
            oidc: false,
            audience: String::new(),
            algorithms: DEFAULT_ISSUER_ALGORITHMS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// The discovery document of an OpenID Connect issuer: exactly one `/`
/// between the issuer and `.well-known/openid-configuration`.
pub fn discovery_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
}

/// Does the top-level `[auth]` name a key source of its own (static or
/// fetched)? Without one, and with `[[auth.issuers]]`, only the entries
/// verify tokens and `auth.algorithms` needs no key.
pub fn top_level_has_keys(a: &Auth) -> bool {
    !a.hmac_secret.is_empty()
        || !a.hmac_secret_file.as_os_str().is_empty()
        || !a.public_key_file.as_os_str().is_empty()
        || !a.jwks_file.as_os_str().is_empty()
        || top_level_fetches(a)
}

/// Does the top-level `[auth]` fetch keys (`jwks_url` or `oidc_issuer`)?
pub fn top_level_fetches(a: &Auth) -> bool {
    !a.jwks_url.is_empty() || !a.oidc_issuer.is_empty()
}

/// Is the top-level `[auth]` switched off: entries only, no key of its own?
pub fn top_level_off(a: &Auth) -> bool {
    !a.issuers.is_empty() && !top_level_has_keys(a)
}

/// Why `url` is not a URL keys may be fetched from, if it is not:
/// `https://`, or `http://` to a loopback host only (a key set read in the
/// clear from another machine could be swapped by anyone on the path).
pub fn url_problem(url: &str) -> Option<String> {
    let uri: hyper::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return Some(format!("{url:?} is not a URL: {e}")),
    };
    let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
        return Some(format!("{url:?} has no host"));
    };
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some(format!("{url:?}: user info in the URL is not supported"));
    }
    match uri.scheme_str() {
        Some("https") => None,
        Some("http") if is_loopback(host) => None,
        Some("http") => Some(format!("{url:?}: http:// only to a loopback address; use https://")),
        _ => Some(format!("{url:?} must be an https:// URL")),
    }
}

/// `localhost`, `127.0.0.0/8` or `::1` (brackets allowed).
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An issuer for discovery: an https URL (or http on loopback) without a
/// query or fragment (OpenID Connect Discovery 1.0, section 2).
fn issuer_problem(issuer: &str) -> Option<String> {
    if issuer.contains('?') || issuer.contains('#') {
        return Some(format!("{issuer:?}: an issuer has no query or fragment"));
    }
    url_problem(issuer)
}

/// Checks the keys of this file; called from `Config::validate`.
pub fn validate(a: &Auth) -> Result<(), ConfigError> {
    within("auth.jwks_refresh_s", a.jwks_refresh_s, 1, MAX_JWKS_REFRESH_S)?;
    within("auth.jwks_timeout_ms", a.jwks_timeout_ms, 1, MAX_JWKS_TIMEOUT_MS)?;
    if !a.jwks_url.is_empty() && !a.oidc_issuer.is_empty() {
        return Err(invalid(
            "auth.jwks_url",
            "set jwks_url or oidc_issuer, not both (the issuer's discovery document names its JWKS)",
        ));
    }
    if let Some(p) = (!a.jwks_url.is_empty()).then(|| url_problem(&a.jwks_url)).flatten() {
        return Err(invalid("auth.jwks_url", p));
    }
    if !a.oidc_issuer.is_empty() {
        if let Some(p) = issuer_problem(&a.oidc_issuer) {
            return Err(invalid("auth.oidc_issuer", p));
        }
        if !a.issuer.is_empty() && a.issuer != a.oidc_issuer {
            return Err(invalid(
                "auth.issuer",
                format!(
                    "{:?} differs from auth.oidc_issuer {:?}; a token's iss cannot equal both",
                    a.issuer, a.oidc_issuer
                ),
            ));
        }
    }
    if !a.jwks_ca_file.as_os_str().is_empty() && !a.jwks_ca_file.is_file() {
        return Err(invalid(
            "auth.jwks_ca_file",
            format!("{}: not a readable file", a.jwks_ca_file.display()),
        ));
    }
    if a.issuers.len() > MAX_ISSUERS {
        return Err(invalid("auth.issuers", format!("at most {MAX_ISSUERS} entries")));
    }
    let top_issuer = if a.oidc_issuer.is_empty() { &a.issuer } else { &a.oidc_issuer };
    for (i, e) in a.issuers.iter().enumerate() {
        // Dotted keys are `'static` in `ConfigError`; an entry is named by
        // its position in the message instead.
        let at = |msg: String| invalid("auth.issuers", format!("entry {} ({:?}): {msg}", i + 1, e.issuer));
        if e.issuer.is_empty() {
            return Err(at("issuer is required".into()));
        }
        if a.issuers[..i].iter().any(|o| o.issuer == e.issuer) {
            return Err(at("a second entry for the same issuer".into()));
        }
        if !top_issuer.is_empty() && *top_issuer == e.issuer {
            return Err(at("the same issuer as the top-level [auth]; keep one of them".into()));
        }
        match (e.jwks_url.is_empty(), e.oidc) {
            (true, false) => return Err(at("needs jwks_url, or oidc = true".into())),
            (false, true) => return Err(at("set jwks_url or oidc = true, not both".into())),
            (false, false) => {
                if let Some(p) = url_problem(&e.jwks_url) {
                    return Err(at(format!("jwks_url: {p}")));
                }
            }
            (true, true) => {
                if let Some(p) = issuer_problem(&e.issuer) {
                    return Err(at(format!("issuer: {p}")));
                }
            }
        }
        if e.algorithms.is_empty() {
            return Err(at("algorithms needs at least one algorithm".into()));
        }
        for alg in &e.algorithms {
            if !KNOWN_ALGORITHMS.contains(&alg.as_str()) || alg.eq_ignore_ascii_case("none") {
                return Err(at(format!(
                    "unknown algorithm {alg:?} (known: {})",
                    KNOWN_ALGORITHMS.join(", ")
                )));
            }
            if alg.starts_with("HS") {
                return Err(at(format!("{alg} needs a shared secret; a provider's keys are public keys")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    const RS: &str = "[auth]\nalgorithms = [\"RS256\"]\n";

    #[test]
    fn a_url_source_stands_in_for_a_public_key() {
        let c = Config::parse(&format!("{RS}jwks_url = \"https://idp.example/jwks\"\n")).unwrap();
        assert_eq!(c.auth.jwks_refresh_s, super::DEFAULT_JWKS_REFRESH_S);
        assert_eq!(c.auth.jwks_timeout_ms, super::DEFAULT_JWKS_TIMEOUT_MS);
        Config::parse(&format!("{RS}oidc_issuer = \"https://idp.example/realms/a\"\n")).unwrap();
        Config::parse(&format!("{RS}jwks_url = \"http://127.0.0.1:8/jwks\"\n")).unwrap();
        Config::parse(&format!("{RS}jwks_url = \"http://[::1]:8/jwks\"\n")).unwrap();
        Config::parse(&format!("{RS}jwks_url = \"http://localhost:8/jwks\"\n")).unwrap();
    }

    #[test]
    fn refusals_name_their_key() {
        for (text, key) in [
            (format!("{RS}jwks_url = \"http://idp.example/jwks\"\n"), "auth.jwks_url: "),
            (format!("{RS}jwks_url = \"ftp://idp.example/jwks\"\n"), "auth.jwks_url: "),
            (format!("{RS}jwks_url = \"not a url\"\n"), "auth.jwks_url: "),
            (format!("{RS}oidc_issuer = \"http://idp.example\"\n"), "auth.oidc_issuer: "),
            (format!("{RS}oidc_issuer = \"https://idp.example?x=1\"\n"), "auth.oidc_issuer: "),
            (
                format!("{RS}oidc_issuer = \"https://a.example\"\njwks_url = \"https://a.example/k\"\n"),
                "auth.jwks_url: ",
            ),
            (format!("{RS}oidc_issuer = \"https://a.example\"\nissuer = \"https://b\"\n"), "auth.issuer: "),
            (format!("{RS}jwks_url = \"https://a/k\"\njwks_refresh_s = 0\n"), "auth.jwks_refresh_s: "),
            (format!("{RS}jwks_url = \"https://a/k\"\njwks_timeout_ms = 0\n"), "auth.jwks_timeout_ms: "),
            (format!("{RS}jwks_url = \"https://a/k\"\njwks_ca_file = \"/nonexistent/ca.pem\"\n"), "auth.jwks_ca_file: "),
            (format!("{RS}[[auth.issuers]]\nissuer = \"https://a\"\n"), "auth.issuers: entry 1"),
            (format!("{RS}[[auth.issuers]]\njwks_url = \"https://a/k\"\n"), "auth.issuers: entry 1"),
            (
                format!("{RS}[[auth.issuers]]\nissuer = \"https://a\"\noidc = true\njwks_url = \"https://a/k\"\n"),
                "auth.issuers: entry 1",
            ),
            (
                format!("{RS}[[auth.issuers]]\nissuer = \"https://a\"\njwks_url = \"https://a/k\"\nalgorithms = [\"HS256\"]\n"),
                "auth.issuers: entry 1",
            ),
            (
                format!(
                    "{RS}[[auth.issuers]]\nissuer = \"https://a\"\noidc = true\n\
                     [[auth.issuers]]\nissuer = \"https://a\"\noidc = true\n"
                ),
                "auth.issuers: entry 2",
            ),
        ] {
            let e = err(&text);
            assert!(e.starts_with(key), "{text}\n→ {e}");
        }
        assert!(err(&format!("{RS}[[auth.issuers]]\nissuer = \"https://a\"\nurl = \"x\"\n")).contains("url"));
    }

    #[test]
    fn entries_alone_need_no_top_level_key() {
        // The default HS256 needs no secret when only entries verify tokens.
        let c = Config::parse(
            "[[auth.issuers]]\nissuer = \"https://a.example\"\noidc = true\n\
             [[auth.issuers]]\nissuer = \"https://b.example\"\njwks_url = \"https://b.example/k\"\n\
             algorithms = [\"ES256\"]\naudience = \"gw\"\n",
        )
        .unwrap();
        assert_eq!(c.auth.issuers.len(), 2);
        assert_eq!(c.auth.issuers[0].algorithms, vec!["RS256".to_string()]);
        assert!(super::top_level_off(&c.auth));
    }

    #[test]
    fn discovery_url_has_one_slash() {
        assert_eq!(super::discovery_url("https://a/x/"), "https://a/x/.well-known/openid-configuration");
        assert_eq!(super::discovery_url("https://a"), "https://a/.well-known/openid-configuration");
    }
}
