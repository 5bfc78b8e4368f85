//! `[upstream]` and `[[upstream.routes]]`: the backends, how one is chosen,
//! how their health is judged, how `wss://` ones are verified, and which
//! request paths go to which pool.
//!
//! Every key has its `DEFAULT_*` here; [`validate`] is called from
//! `Config::validate` and names the dotted key at fault.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{bounds, invalid, within, ConfigError};

pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 3000;
/// Other backends tried after a failed connect, all before the 101.
pub const DEFAULT_RETRIES: u32 = 2;
/// Active health checks: one WebSocket upgrade and close per backend this often.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 2000;
/// Consecutive failed checks or connects before a backend is taken out.
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 2;
/// Consecutive good checks before it is put back.
pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
/// Most backends in one pool, and most routes: far above any real
/// deployment, low enough that a pool's ordering per handshake stays cheap.
pub const MAX_BACKENDS: usize = 256;
pub const MAX_ROUTES: usize = 256;
/// Most retries: every other backend of the largest pool.
pub const MAX_RETRIES: u64 = MAX_BACKENDS as u64;
/// Most consecutive checks of the hysteresis.
pub const MAX_CHECKS: u64 = 100;

/// How a pool picks the backend for a new connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The healthy backend with the fewest live connections (ties in turn).
    #[default]
    LeastConnections,
    /// Each healthy backend in turn.
    RoundRobin,
    /// A user's connections go to one backend (rendezvous hashing of
    /// `sub`): a backend leaving or returning moves only its own users.
    SubHash,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Upstream {
    /// `echo`, or one `ws://` / `wss://` backend.
    pub url: String,
    /// A pool instead of `url` (not both).
    pub backends: Vec<String>,
    pub balance: Balance,
    pub retries: u32,
    /// 0: no active checks, passive ejection only.
    pub health_interval_ms: u64,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    /// PEM roots for `wss://` backends; empty: the system's roots.
    pub ca_file: PathBuf,
    /// Client certificate and key presented to `wss://` backends (mutual TLS).
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    /// Name verified in a backend's certificate and sent as SNI, when it
    /// differs from the URL's host.
    pub server_name: String,
    pub connect_timeout_ms: u64,
    /// Claim name → request header sent upstream.
    pub claim_headers: BTreeMap<String, String>,
    pub routes: Vec<Route>,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            url: "echo".into(),
            backends: Vec::new(),
            balance: Balance::default(),
            retries: DEFAULT_RETRIES,
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            unhealthy_after: DEFAULT_UNHEALTHY_AFTER,
            healthy_after: DEFAULT_HEALTHY_AFTER,
            ca_file: PathBuf::new(),
            client_cert_file: PathBuf::new(),
            client_key_file: PathBuf::new(),
            server_name: String::new(),
            connect_timeout_ms: DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS,
            claim_headers: BTreeMap::new(),
            routes: Vec::new(),
        }
    }
}

impl Upstream {
    /// Does any backend exist (proxy mode for at least one path)?
    pub fn proxies(&self) -> bool {
        self.url != "echo" || !self.backends.is_empty() || !self.routes.is_empty()
    }

    /// The default pool's URLs as configured: `backends`, or `url` alone;
    /// empty in echo mode.
    pub fn default_backends(&self) -> Vec<String> {
        if !self.backends.is_empty() {
            self.backends.clone()
        } else if self.url != "echo" {
            vec![self.url.clone()]
        } else {
            Vec::new()
        }
    }

    /// As [`default_backends`](Upstream::default_backends), borrowed.
    pub fn default_backends_ref(&self) -> impl Iterator<Item = &String> {
        let one = (self.backends.is_empty() && self.url != "echo").then_some(&self.url);
        self.backends.iter().chain(one)
    }

    /// The route a request path goes to, if any: the first whose prefix
    /// matches (see [`Route::matches`]).
    pub fn route_for(&self, path: &str) -> Option<(usize, &Route)> {
        self.routes.iter().enumerate().find(|(_, r)| r.matches(path))
    }

    /// Every header name some pool forwards a claim as (no allocation:
    /// read on every handshake).
    pub fn every_claim_header(&self) -> impl Iterator<Item = &str> + Clone {
        let routes = self.routes.iter().filter_map(|r| r.claim_headers.as_ref()).flat_map(|c| c.values());
        self.claim_headers.values().chain(routes).map(String::as_str)
    }

    /// The claim headers of the default pool (`None`) or of route `i`.
    pub fn claim_headers_of(&self, route: Option<usize>) -> &BTreeMap<String, String> {
        route
            .and_then(|i| self.routes.get(i))
            .and_then(|r| r.claim_headers.as_ref())
            .unwrap_or(&self.claim_headers)
    }

    /// Every claim → header forwarded by some pool: the authenticator
    /// reads these claims, each pool forwards its own.
    pub fn all_claim_headers(&self) -> BTreeMap<String, String> {
        let mut all = self.claim_headers.clone();
        for r in &self.routes {
            if let Some(c) = &r.claim_headers {
                all.extend(c.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        all
    }
}

/// `[[upstream.routes]]`: requests under a path prefix go to a pool of their own.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Route {
    /// Matched by whole path segments: `/chat` matches `/chat`,
    /// `/chat/room` and `/chat?x`, not `/chatroom`.
    pub path_prefix: String,
    pub backends: Vec<String>,
    /// Unset: `upstream.balance`.
    pub balance: Option<Balance>,
    /// Unset: `upstream.retries`.
    pub retries: Option<u32>,
    /// Unset: `upstream.claim_headers`.
    pub claim_headers: Option<BTreeMap<String, String>>,
}

impl Route {
    /// The prefix without a trailing `/` (`/` itself becomes empty, which
    /// matches every path).
    pub fn prefix(&self) -> &str {
        self.path_prefix.trim_end_matches('/')
    }

    /// Does the request path fall under this route (whole segments)?
    pub fn matches(&self, path: &str) -> bool {
        let p = self.prefix();
        match path.strip_prefix(p) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// A parsed `ws://host:port/path` or `wss://host:port/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// The URL as configured: the `backend` label and the admin API's key.
    pub text: String,
    /// `host:port` as dialled and sent in `Host`.
    pub authority: String,
    /// The host alone (no brackets around IPv6): verified in a `wss://`
    /// backend's certificate unless `upstream.server_name` says otherwise.
    pub host: String,
    /// The path prefix, without a trailing `/`.
    pub prefix: String,
    /// `wss://`: TLS toward the backend.
    pub tls: bool,
}

impl UpstreamUrl {
    /// Parses `ws[s]://host[:port][/path]` (port 80 or 443 when absent)
    /// with the `http` crate's URI parser. Refused: another scheme, user
    /// info, a query or fragment (the client's own query follows the
    /// prefix), an empty host, a port out of range.
    pub fn parse(url: &str) -> Option<UpstreamUrl> {
        // `Uri` keeps a fragment silently; it has no place in a request-target.
        if url.contains('#') {
            return None;
        }
        let uri: tokio_tungstenite::tungstenite::http::Uri = url.parse().ok()?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return None,
        };
        if uri.query().is_some() {
            return None;
        }
        let authority = uri.authority()?;
        if authority.as_str().contains('@') || authority.host().is_empty() {
            return None;
        }
        // `Authority::port` is `None` for a non-numeric port too, so the
        // text after the host is checked: nothing, or `:` and a u16.
        let port = match authority.as_str().strip_prefix(authority.host())? {
            "" if tls => 443,
            "" => 80,
            rest => rest.strip_prefix(':')?.parse::<u16>().ok()?,
        };
        let host = authority.host();
        Some(UpstreamUrl {
            text: url.to_string(),
            authority: format!("{host}:{port}"),
            host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            prefix: uri.path().trim_end_matches('/').to_string(),
            tls,
        })
    }

    /// The request-target upstream for a client target (already stripped of
    /// `access_token`), outside any route: the URL's path as a prefix.
    pub fn target_for(&self, client_target: &str) -> String {
        format!("{}{}", self.prefix, client_target)
    }

    /// The request-target within a route: the part of the client's target
    /// that matched `route_prefix` (already trimmed, see [`Route::prefix`])
    /// is replaced by the URL's path, `/` when it has none.
    pub fn target_in_route(&self, route_prefix: &str, client_target: &str) -> String {
        let rest = client_target.get(route_prefix.len()..).unwrap_or("");
        if rest.starts_with('/') {
            format!("{}{rest}", self.prefix)
        } else {
            let base = if self.prefix.is_empty() { "/" } else { self.prefix.as_str() };
            format!("{base}{rest}")
        }
    }
}

/// Checks `[upstream]` and its routes; called from `Config::validate`.
pub fn validate(u: &Upstream) -> Result<(), ConfigError> {
    within("upstream.connect_timeout_ms", u.connect_timeout_ms, 1, bounds::MAX_MS)?;
    within("upstream.retries", u64::from(u.retries), 0, MAX_RETRIES)?;
    within("upstream.health_interval_ms", u.health_interval_ms, 0, bounds::MAX_MS)?;
    within("upstream.unhealthy_after", u64::from(u.unhealthy_after), 1, MAX_CHECKS)?;
    within("upstream.healthy_after", u64::from(u.healthy_after), 1, MAX_CHECKS)?;
    if u.url != "echo" {
        if !u.backends.is_empty() {
            return Err(invalid("upstream.backends", "set upstream.url or upstream.backends, not both"));
        }
        if UpstreamUrl::parse(&u.url).is_none() {
            return Err(invalid(
                "upstream.url",
                format!("{:?} must be \"echo\" or a ws:// or wss://host:port/path URL", u.url),
            ));
        }
    }
    urls("upstream.backends", &u.backends)?;
    if u.client_cert_file.as_os_str().is_empty() != u.client_key_file.as_os_str().is_empty() {
        return Err(invalid(
            if u.client_cert_file.as_os_str().is_empty() {
                "upstream.client_cert_file"
            } else {
                "upstream.client_key_file"
            },
            "mutual TLS needs both client_cert_file and client_key_file",
        ));
    }
    if !u.server_name.is_empty() && rustls::pki_types::ServerName::try_from(u.server_name.as_str()).is_err() {
        return Err(invalid(
            "upstream.server_name",
            format!("{:?} is not a DNS name or IP address", u.server_name),
        ));
    }
    claim_headers("upstream.claim_headers", &u.claim_headers)?;
    if u.routes.len() > MAX_ROUTES {
        return Err(invalid("upstream.routes", format!("at most {MAX_ROUTES} routes")));
    }
    let mut forwarded: BTreeMap<&str, &str> =
        u.claim_headers.iter().map(|(c, h)| (c.as_str(), h.as_str())).collect();
    for (i, r) in u.routes.iter().enumerate() {
        let at = |msg: String| format!("route {} ({:?}): {msg}", i + 1, r.path_prefix);
        if !r.path_prefix.starts_with('/') || r.path_prefix.contains(['?', '#', ' ']) {
            return Err(invalid(
                "upstream.routes.path_prefix",
                at("must be a path starting with '/'".into()),
            ));
        }
        if u.routes[..i].iter().any(|o| o.prefix() == r.prefix()) {
            return Err(invalid("upstream.routes.path_prefix", at("appears in two routes".into())));
        }
        if r.backends.is_empty() {
            return Err(invalid("upstream.routes.backends", at("needs at least one backend".into())));
        }
        urls("upstream.routes.backends", &r.backends).map_err(|e| match e {
            ConfigError::Invalid { key, msg } => ConfigError::Invalid { key, msg: at(msg) },
            other => other,
        })?;
        if let Some(n) = r.retries {
            within("upstream.routes.retries", u64::from(n), 0, MAX_RETRIES)?;
        }
        if let Some(c) = &r.claim_headers {
            claim_headers("upstream.routes.claim_headers", c)?;
            // The authenticator reads each claim once, for every pool.
            for (claim, header) in c {
                match forwarded.insert(claim, header) {
                    Some(other) if !other.eq_ignore_ascii_case(header) => {
                        return Err(invalid(
                            "upstream.routes.claim_headers",
                            at(format!(
                                "claim {claim:?} is forwarded as {other:?} elsewhere, not {header:?}"
                            )),
                        ))
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// A list of backend URLs: each parses, none twice, not too many.
fn urls(key: &'static str, list: &[String]) -> Result<(), ConfigError> {
    if list.len() > MAX_BACKENDS {
        return Err(invalid(key, format!("at most {MAX_BACKENDS} backends")));
    }
    for (i, u) in list.iter().enumerate() {
        if UpstreamUrl::parse(u).is_none() {
            return Err(invalid(key, format!("{u:?} is not a ws:// or wss://host:port/path URL")));
        }
        if list[..i].contains(u) {
            return Err(invalid(key, format!("{u:?} is listed twice")));
        }
    }
    Ok(())
}

fn claim_headers(key: &'static str, map: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (claim, header) in map {
        let ok =
            !header.is_empty() && header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok || claim.is_empty() {
            return Err(invalid(key, format!("{claim:?} -> {header:?} is not a valid header name")));
        }
        if crate::header::reserved_header(header) {
            return Err(invalid(
                key,
                format!("{claim:?} -> {header:?}: the gateway sets or checks {header:?} itself"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_prefixes_match_whole_segments() {
        let r = Route { path_prefix: "/chat".into(), ..Route::default() };
        for p in ["/chat", "/chat/", "/chat/room"] {
            assert!(r.matches(p), "{p}");
        }
        for p in ["/chatroom", "/", "/cha"] {
            assert!(!r.matches(p), "{p}");
        }
        let root = Route { path_prefix: "/".into(), ..Route::default() };
        assert!(root.matches("/anything") && root.matches("/"));
        let slash = Route { path_prefix: "/chat/".into(), ..Route::default() };
        assert!(slash.matches("/chat/x") && slash.matches("/chat"));
    }

    #[test]
    fn within_a_route_the_prefix_is_replaced_by_the_backend_path() {
        let u = UpstreamUrl::parse("ws://gql:4000/graphql").unwrap();
        assert_eq!(u.target_in_route("/graphql", "/graphql"), "/graphql");
        assert_eq!(u.target_in_route("/graphql", "/graphql?x=1"), "/graphql?x=1");
        assert_eq!(u.target_in_route("/graphql", "/graphql/sub"), "/graphql/sub");
        let u = UpstreamUrl::parse("ws://b:1").unwrap();
        assert_eq!(u.target_in_route("/chat", "/chat"), "/");
        assert_eq!(u.target_in_route("/chat", "/chat?room=2"), "/?room=2");
        assert_eq!(u.target_in_route("/chat", "/chat/room"), "/room");
        let u = UpstreamUrl::parse("ws://b:1/v2/").unwrap();
        assert_eq!(u.target_in_route("/api", "/api/x?y"), "/v2/x?y");
        assert_eq!(u.target_in_route("", "/x"), "/v2/x");
    }

    #[test]
    fn wss_urls_default_to_443_and_keep_the_bare_host() {
        let u = UpstreamUrl::parse("wss://backend.internal/ws").unwrap();
        assert!(u.tls);
        assert_eq!((u.authority.as_str(), u.host.as_str()), ("backend.internal:443", "backend.internal"));
        let u = UpstreamUrl::parse("wss://[::1]:8443/").unwrap();
        assert_eq!((u.authority.as_str(), u.host.as_str()), ("[::1]:8443", "::1"));
        assert!(!UpstreamUrl::parse("ws://b/").unwrap().tls);
        assert!(UpstreamUrl::parse("https://b/").is_none());
    }
}
