//! The file-descriptor budget: how many connections the open-file limit
//! allows, which sets the default `limits.max_connections` (as HAProxy
//! derives its `maxconn`) and the start-up check of an explicit one.
//!
//! One formula serves both, so the default can never trip the warning:
//! `(soft limit − FD_RESERVE) / descriptors per connection`, which
//! `config` caps at its `DEFAULT_MAX_CONNECTIONS`. A leaf module: it
//! imports nothing from the crate.

use rlimit::Resource;

/// Descriptors kept out of the connection budget: listeners, admin
/// connections, the revocation log and its compaction, Redis, TLS and key
/// files, the runtime's own.
pub const FD_RESERVE: u64 = 64;

/// Client socket, plus the backend socket in proxy mode.
pub const fn fds_per_connection(proxy: bool) -> u64 {
    if proxy {
        2
    } else {
        1
    }
}

/// The open-file soft limit, the one that counts; `None` where unknown.
pub fn soft_limit() -> Option<u64> {
    let (soft, _) = rlimit::getrlimit(Resource::NOFILE).ok()?;
    // RLIM_INFINITY comes back as u64::MAX: no limit to fit.
    Some(soft)
}

/// Raises the soft open-file limit to the hard one, as a server should
/// (the soft limit stays low by default only for the sake of `select(2)`
/// users). Returns the soft limit in force afterwards.
pub fn raise_to_hard() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok().or_else(soft_limit)
}

/// Connections that `limit` descriptors can carry.
pub fn connections_for(limit: u64, proxy: bool) -> usize {
    let n = limit.saturating_sub(FD_RESERVE) / fds_per_connection(proxy);
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Descriptors `max_connections` need, reserve included.
pub fn descriptors_for(max_connections: usize, proxy: bool) -> u64 {
    (max_connections as u64).saturating_mul(fds_per_connection(proxy)).saturating_add(FD_RESERVE)
}

/// Logs the budget at start, and warns when `max_connections` (set
/// explicitly: the default always fits) needs more than the limit.
pub fn check(max_connections: usize, proxy: bool) {
    let Some(limit) = soft_limit() else { return };
    let need = descriptors_for(max_connections, proxy);
    let per_conn = fds_per_connection(proxy);
    if need > limit {
        tracing::warn!(
            need,
            limit,
            "limits.max_connections needs more file descriptors than the open-file limit allows \
             ({per_conn} per connection); raise LimitNOFILE or lower the cap"
        );
    } else {
        tracing::info!(limit, max_connections, per_conn, "open-file limit fits limits.max_connections");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_always_fits_its_limit() {
        for limit in [0, 1, 64, 65, 200, 1024, 20_000, 1 << 20, u64::MAX] {
            for proxy in [false, true] {
                let n = connections_for(limit, proxy).clamp(1, 10_000);
                if limit > FD_RESERVE + fds_per_connection(proxy) {
                    assert!(descriptors_for(n, proxy) <= limit, "{limit} {proxy}: {n}");
                }
            }
        }
        assert_eq!(connections_for(1024, false), 960);
        assert_eq!(connections_for(1024, true), 480);
        assert_eq!(connections_for(20_000, true), 9968);
    }
}
