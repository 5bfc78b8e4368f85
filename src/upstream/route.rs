//! Which pool a request goes to, and the request-target it is sent with.
//!
//! The first `[[upstream.routes]]` entry whose `path_prefix` matches the
//! request path (whole segments) wins; otherwise the default pool (or
//! echo). A route's paths accept an upgrade beside `listen.paths`.

use crate::config::{Config, Upstream, UpstreamUrl};

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick<'a> {
    /// `upstream.url` / `upstream.backends` (or echo).
    Default,
    /// Route `index`, whose trimmed prefix matched.
    Route { index: usize, prefix: &'a str },
}

impl Pick<'_> {
    /// The route index, `None` for the default pool.
    pub fn route(&self) -> Option<usize> {
        match self {
            Pick::Default => None,
            Pick::Route { index, .. } => Some(*index),
        }
    }
}

/// The pool for request path `path`.
pub fn pick<'a>(u: &'a Upstream, path: &str) -> Pick<'a> {
    match u.route_for(path) {
        Some((index, r)) => Pick::Route { index, prefix: r.prefix() },
        None => Pick::Default,
    }
}

/// May `path` be upgraded (stage 3): listed in `listen.paths`, or under a
/// route.
pub fn accepts(cfg: &Config, path: &str) -> bool {
    cfg.listen.paths.iter().any(|p| p == path) || cfg.upstream.route_for(path).is_some()
}

/// The request-target sent to `url` for the client's `target` (its path
/// and query, `access_token` already removed).
pub fn target(url: &UpstreamUrl, pick: Pick<'_>, client_target: &str) -> String {
    match pick {
        Pick::Default => url.target_for(client_target),
        Pick::Route { prefix, .. } => url.target_in_route(prefix, client_target),
    }
}
