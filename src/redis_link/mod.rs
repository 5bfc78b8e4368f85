//! The Redis link: one command connection per instance, shared by the
//! revocation store ([`crate::revocation::redis`], which owns the link's
//! life: connect, resync, health checks, reconnect) and the per-user leases
//! ([`crate::session::leases`]), so neither imports the other.
//!
//! # Deployments
//!
//! [`target`] turns `[revocation]` into what to dial: the URL's server
//! (standalone), the master the sentinels name ([`sentinel`]), or a
//! cluster ([`cluster`]); [`tls`] loads `redis_ca_file`. Whatever the mode,
//! the revocation store keeps a *primary* connection (and its
//! subscription) to the one server that holds the `{portcullis}` hash
//! slot, and checks every second that it is still that slot's master
//! (`ROLE`, and a keyed read, which a moved slot answers with `MOVED`); the
//! leases speak through [`Conn`]: that same connection, or on a cluster a
//! slot-aware cluster connection.
//!
//! # Slow calls and a down link
//!
//! A call that fails or times out is counted (`portcullis_store_errors_total
//! {op}`) and makes the owner check the link at once (a ping), but one slow
//! call does not take the link down for everyone: a handshake whose lease
//! claim was slow falls back alone. The link goes down (callers fall back
//! at once, `portcullis_store_up` 0) when a health ping fails, or after
//! [`FAILURES_DOWN`] calls in a row have failed; any success, or a good
//! ping, clears the count.
//!
//! # Connection names
//!
//! A connection is named in Redis as `<admitted unix ms, 15 digits>/<node>/<id>`
//! ([`conn_member`]): names sort by age and say which instance owns them,
//! so an eviction published on [`EVICT_CHANNEL`] reaches the owner.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisFuture, Value};
use arc_swap::ArcSwapOption;
use tokio::sync::{broadcast, Notify};

use crate::metrics::Metrics;

pub mod cluster;
pub mod sentinel;
pub mod target;
pub mod tls;

/// A command connection: one server's, or a cluster's (which routes each
/// command, script included, by the slot of its first key).
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The sorted set of revocations: the store's (`revocation::redis`), and
/// on a Cluster the key whose slot's primary the link follows.
pub const REVOCATIONS_KEY: &str = "portcullis:revocations";
/// Where `evict_oldest` names a lease whose connection must close.
pub const EVICT_CHANNEL: &str = "portcullis:evict";
/// Bound on calls no handshake waits for (revoke's publish, lease renewal
/// and release).
pub const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive failed calls that take the link down without a failed ping.
pub const FAILURES_DOWN: u32 = 3;
/// Eviction notices kept for a slow consumer before the oldest are lost.
const EVICTION_CAPACITY: usize = 1024;

/// The connection state shared by the revocation store and the leases.
pub struct RedisLink {
    /// The command connection while the link is up; `None` while down, so
    /// callers (a handshake's lease claim) fall back at once instead of
    /// waiting for a timeout each.
    conn: ArcSwapOption<Conn>,
    pub metrics: Arc<Metrics>,
    /// Poked by a caller whose command failed: the owner pings now.
    pub suspect: Notify,
    /// Poked after each (re)connection and resync: leases re-assert then.
    pub reconnected: Notify,
    /// Failed calls in a row (see the module notes).
    failures: AtomicU32,
    /// This instance's id in connection names (random, 64 bits: ids of
    /// different instances must not collide, or one would close another's
    /// connection on an eviction).
    pub node: String,
    /// Local connection ids an eviction named (from any instance).
    pub evicted: broadcast::Sender<u64>,
    /// `revocation.redis_timeout_ms`: the bound on a handshake's call.
    pub timeout: Duration,
    /// Lease buckets (hash tags) users are spread over: 1 on one server,
    /// [`cluster::LEASE_BUCKETS`] on a cluster (see `session::leases`).
    pub buckets: u32,
}

/// The node name a binary upgrade's new process takes over from the old
/// one (set once, before the link is built): its connections keep their
/// lease members, so eviction notices naming them still find them.
pub static INHERITED_NODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

impl RedisLink {
    /// A link that is down until its owner connects it.
    pub fn new(metrics: Arc<Metrics>, timeout: Duration, buckets: u32) -> RedisLink {
        RedisLink {
            conn: ArcSwapOption::empty(),
            metrics,
            suspect: Notify::new(),
            reconnected: Notify::new(),
            failures: AtomicU32::new(0),
            node: INHERITED_NODE.get().cloned().unwrap_or_else(|| format!("{:016x}", rand::random::<u64>())),
            evicted: broadcast::channel(EVICTION_CAPACITY).0,
            timeout,
            buckets: buckets.max(1),
        }
    }

    /// The command connection, or `None` while the link is down.
    pub fn conn(&self) -> Option<Conn> {
        self.conn.load_full().map(|c| (*c).clone())
    }

    pub fn is_up(&self) -> bool {
        self.conn.load().is_some()
    }

    /// The owner connected, or a ping answered: callers may use Redis.
    pub fn set_up(&self, c: Conn) {
        self.failures.store(0, Ordering::Relaxed);
        self.conn.store(Some(Arc::new(c)));
        self.metrics.set_store_up(true);
    }

    pub fn set_down(&self) {
        self.conn.store(None);
        self.metrics.set_store_up(false);
    }

    /// A call failed or timed out: count it and have the owner ping now;
    /// down only after [`FAILURES_DOWN`] in a row (module notes).
    pub fn failed(&self, op: &str) {
        self.metrics.store_error(op);
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= FAILURES_DOWN {
            self.set_down();
        }
        self.suspect.notify_one();
    }

    /// A call succeeded: the failures so far were not in a row.
    pub fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// An eviction notice (a connection name) for this instance's
    /// connection: passed on to whoever closes it.
    pub fn on_evicted(&self, member: &str) {
        if let Some(id) = owned_conn(member, &self.node) {
            let _ = self.evicted.send(id);
        }
    }
}

/// `<admitted ms>/<node>/<id>`: sorts by age, names its owner.
pub fn conn_member(admitted_ms: u64, node: &str, id: u64) -> String {
    format!("{admitted_ms:015}/{node}/{id}")
}

/// The local connection id a name gives, if `node` owns it.
pub fn owned_conn(member: &str, node: &str) -> Option<u64> {
    let mut parts = member.splitn(3, '/');
    let (_, owner, id) = (parts.next()?, parts.next()?, parts.next()?);
    if owner == node {
        id.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_sort_by_age_and_name_their_owner() {
        let node = "00000000000000ab";
        let a = conn_member(999, node, 7);
        let b = conn_member(1_000, "ffffffffffffffff", 3);
        assert!(a < b, "{a} < {b}");
        assert_eq!(owned_conn(&a, node), Some(7));
        assert_eq!(owned_conn(&b, node), None);
        assert_eq!(owned_conn("garbage", node), None);
        assert_eq!(owned_conn(&format!("1/{node}/x"), node), None);
    }

    #[test]
    fn one_failure_does_not_take_the_link_down_three_in_a_row_do() {
        let link = RedisLink::new(Arc::new(Metrics::new()), Duration::from_millis(100), 1);
        // Not connected: up is simulated by the failure count alone here.
        link.failed("lease_claim");
        link.succeeded();
        link.failed("lease_claim");
        link.failed("lease_claim");
        assert_eq!(link.failures.load(Ordering::Relaxed), 2);
        link.failed("lease_claim");
        assert!(!link.is_up());
        assert_eq!(link.failures.load(Ordering::Relaxed), 3);
    }
}
