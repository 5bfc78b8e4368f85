//! `[revocation]`'s Redis deployment keys: which kind of Redis the fleet
//! shares (`redis_mode`), where its sentinels or cluster seeds are, and
//! the roots a `rediss://` link is verified against.
//!
//! The URL (`redis_url`) carries the scheme (`redis://`, `rediss://` for
//! TLS, `unix://`), the ACL user and password (`redis://user:pass@host`)
//! and, in standalone mode, the address. In sentinel and cluster modes its
//! host is not dialled: the sentinels name the master, the seeds name the
//! cluster's nodes, and the URL's scheme, credentials and database apply to
//! every node Portcullis then connects to.

use serde::Deserialize;

use super::{invalid, ConfigError, RevocationBackend};

/// How the shared Redis is deployed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server (or a managed endpoint that fails over behind one name).
    #[default]
    Standalone,
    /// A master found through `redis_sentinels`, followed across failovers.
    Sentinel,
    /// Redis Cluster, reached through the seeds in `redis_cluster_nodes`.
    Cluster,
}

pub const DEFAULT_REDIS_MODE: RedisMode = RedisMode::Standalone;
/// The most sentinels or seeds listed (a sanity bound, not a limit of Redis).
pub const MAX_REDIS_NODES: usize = 64;

/// Checks the Redis keys of `[revocation]` (called from `Config::validate`).
pub fn validate(rc: &super::Revocation) -> Result<(), ConfigError> {
    for (key, list) in [
        ("revocation.redis_sentinels", &rc.redis_sentinels),
        ("revocation.redis_cluster_nodes", &rc.redis_cluster_nodes),
    ] {
        if list.len() > MAX_REDIS_NODES {
            return Err(invalid(key, format!("at most {MAX_REDIS_NODES} entries")));
        }
        for n in list.iter() {
            if host_port(n).is_none() {
                return Err(invalid(key, format!("{n:?} is not host:port")));
            }
        }
    }
    if rc.backend != RevocationBackend::Redis {
        return Ok(());
    }
    let url = rc.redis_url.as_str();
    let tls = url.starts_with("rediss://");
    let unix = url.starts_with("unix://") || url.starts_with("redis+unix://");
    if !(url.starts_with("redis://") || tls || unix) {
        return Err(invalid("revocation.redis_url", "must be a redis://, rediss:// or unix:// URL"));
    }
    if !rc.redis_ca_file.as_os_str().is_empty() && !tls {
        return Err(invalid("revocation.redis_ca_file", "is only used with a rediss:// redis_url"));
    }
    match rc.redis_mode {
        RedisMode::Standalone => {
            if !rc.redis_sentinels.is_empty() || !rc.redis_cluster_nodes.is_empty() {
                return Err(invalid(
                    "revocation.redis_mode",
                    "is \"standalone\": set it to \"sentinel\" or \"cluster\" to use redis_sentinels or \
                     redis_cluster_nodes",
                ));
            }
        }
        RedisMode::Sentinel => {
            if rc.redis_sentinels.is_empty() {
                return Err(invalid(
                    "revocation.redis_sentinels",
                    "sentinel mode needs at least one sentinel",
                ));
            }
            if rc.redis_master_name.is_empty() {
                return Err(invalid("revocation.redis_master_name", "sentinel mode needs the master's name"));
            }
            if unix {
                return Err(invalid(
                    "revocation.redis_url",
                    "sentinel mode needs a redis:// or rediss:// URL",
                ));
            }
        }
        RedisMode::Cluster => {
            if rc.redis_cluster_nodes.is_empty() {
                return Err(invalid(
                    "revocation.redis_cluster_nodes",
                    "cluster mode needs at least one seed",
                ));
            }
            if unix {
                return Err(invalid(
                    "revocation.redis_url",
                    "cluster mode needs a redis:// or rediss:// URL",
                ));
            }
        }
    }
    Ok(())
}

/// `host:port` (IPv6 as `[::1]:port`), split; `None` if it is not one.
pub fn host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return None;
    }
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Revocation;

    fn redis(url: &str) -> Revocation {
        Revocation { backend: RevocationBackend::Redis, redis_url: url.into(), ..Revocation::default() }
    }

    fn key_of(r: Result<(), ConfigError>) -> &'static str {
        match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn each_mode_names_the_key_it_misses() {
        assert!(validate(&redis("rediss://u:p@h:6380")).is_ok());
        assert_eq!(key_of(validate(&redis("http://h"))), "revocation.redis_url");
        let mut r = redis("redis://h");
        r.redis_ca_file = "ca.pem".into();
        assert_eq!(key_of(validate(&r)), "revocation.redis_ca_file");
        let mut r = redis("redis://h");
        r.redis_mode = RedisMode::Sentinel;
        assert_eq!(key_of(validate(&r)), "revocation.redis_sentinels");
        r.redis_sentinels = vec!["127.0.0.1:26379".into()];
        assert_eq!(key_of(validate(&r)), "revocation.redis_master_name");
        r.redis_master_name = "mymaster".into();
        assert!(validate(&r).is_ok());
        r.redis_sentinels = vec!["nope".into()];
        assert_eq!(key_of(validate(&r)), "revocation.redis_sentinels");
        let mut r = redis("redis://h");
        r.redis_mode = RedisMode::Cluster;
        assert_eq!(key_of(validate(&r)), "revocation.redis_cluster_nodes");
        r.redis_cluster_nodes = vec!["[::1]:7000".into(), "h:7001".into()];
        assert!(validate(&r).is_ok());
        let mut r = redis("redis://h");
        r.redis_cluster_nodes = vec!["h:7000".into()];
        assert_eq!(key_of(validate(&r)), "revocation.redis_mode");
    }

    #[test]
    fn host_port_splits_and_refuses() {
        assert_eq!(host_port("h:1"), Some(("h".into(), 1)));
        assert_eq!(host_port("[::1]:7000"), Some(("::1".into(), 7000)));
        for bad in ["h", "h:0", ":1", "h:x", "u@h:1"] {
            assert_eq!(host_port(bad), None, "{bad}");
        }
    }
}
