//! The backends: one [`Pool`] per route (and the default one), each a list
//! of shared [`BackendState`]s; the choice of a backend for a new
//! connection (`upstream.balance`), the retries on the others before the
//! 101 (`upstream.retries`), passive ejection after failed connects, the
//! live-connection count of each backend (a [`Lease`] per connection) and
//! the admin plane's drain.
//!
//! A URL configured in several pools is one backend: one health, one
//! count, one `backend` label.
//!
//! SIGHUP builds a new set of pools (re-reading the `wss://` files) that
//! keeps the state of every backend it still lists; a session keeps the
//! backend it has until it ends.

use std::collections::HashSet;
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::time::Instant;

use super::tls::Tls;
use super::{Backend, Offer};
use crate::config::{Balance, ConfigError, Upstream, UpstreamUrl};
use crate::metrics::{BackendSeries, Metrics};

/// Without active checks (`health_interval_ms = 0`), how long a backend
/// taken out by failed connects stays out before one connection tries it
/// again (a success puts it back).
pub const PASSIVE_RETRY: Duration = Duration::from_secs(5);

/// One backend, shared by every pool that lists its URL.
pub struct BackendState {
    pub url: UpstreamUrl,
    /// Listed in `upstream.backends` or a route: health-checked and
    /// ejected. The lone `upstream.url` backend is neither: with no other
    /// backend to send a client to, taking it out would only turn a blip
    /// into seconds of refusals, and it is connected to exactly as before
    /// pools existed (`backends = [url]` makes a checked pool of one).
    pub pooled: bool,
    healthy: AtomicBool,
    draining: AtomicBool,
    /// Bumped by every drain and undrain: a drain's closing task stops
    /// once it changed.
    drain_gen: AtomicU64,
    /// Live connections (leases), read by `least_connections`.
    conns: AtomicUsize,
    /// Their connection ids, for the drain to close (registry kicks).
    ids: Mutex<HashSet<u64>>,
    /// Consecutive failed checks or connects; consecutive good checks.
    fails: AtomicU32,
    goods: AtomicU32,
    /// Passive mode: milliseconds since the pools' epoch after which an
    /// ejected backend may be tried again.
    retry_at: AtomicU64,
    series: BackendSeries,
}

impl BackendState {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Acquire)
    }

    fn set_healthy(&self, up: bool, why: &str) {
        if self.healthy.swap(up, Ordering::AcqRel) != up {
            self.series.up.set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!(event = "backend", backend = %self.url.text, healthy = true, "backend put back");
            } else {
                tracing::warn!(event = "backend", backend = %self.url.text, healthy = false, reason = %why, "backend taken out");
            }
        }
    }
}

/// Consecutive results needed to change a backend's health.
#[derive(Clone, Copy, Debug)]
pub struct Hysteresis {
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    /// Active checks run: only they put an ejected backend back.
    pub active: bool,
}

/// One route's backends (or the default pool's) and how it chooses.
pub struct Pool {
    /// `default`, or the route's `path_prefix` as configured.
    pub name: String,
    members: Vec<Arc<BackendState>>,
    balance: Balance,
    retries: u32,
    /// Rotation for `round_robin`, and for ties of `least_connections`.
    turn: AtomicUsize,
}

/// What `/admin/backends` lists, one entry per (route, backend).
#[derive(Debug, Serialize)]
pub struct BackendView {
    pub route: String,
    pub url: String,
    pub healthy: bool,
    pub draining: bool,
    pub connections: usize,
}

/// Closes one connection by id (the registry's kick with `backend_drain`):
/// given by the caller, so the pools need not know the sessions.
pub type Kick = Arc<dyn Fn(u64) + Send + Sync>;

/// Why no backend connection came of a handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// No backend of the pool is healthy and not draining: refused at once.
    NoneHealthy,
    /// Every backend tried failed (each failure logged).
    AllFailed,
}

/// The gateway's pools: the [`PoolSet`] in force, swapped whole by SIGHUP.
/// A new set takes over the [`BackendState`] of every URL it keeps (health,
/// drain, live connections); a session keeps the backend it has whatever
/// the reload does.
pub struct Pools {
    current: ArcSwap<PoolSet>,
    metrics: Arc<Metrics>,
    /// The clock of passive retries, shared by every set.
    epoch: Instant,
}

impl Pools {
    /// Builds the pools of `u` (validated): see [`PoolSet`].
    pub fn new(u: &Upstream, metrics: Arc<Metrics>) -> Result<Pools, ConfigError> {
        let epoch = Instant::now();
        let set = PoolSet::build(u, &metrics, None, epoch)?;
        Ok(Pools { current: ArcSwap::from_pointee(set), metrics, epoch })
    }

    /// The set in force; a handshake holds it from its choice to its 101.
    pub fn load(&self) -> Arc<PoolSet> {
        self.current.load_full()
    }

    /// The set `u` describes, keeping the state of every backend already
    /// known; not installed (a reload installs it only once everything
    /// else loaded too). Reads the TLS files.
    pub fn prepare(&self, u: &Upstream) -> Result<PoolSet, ConfigError> {
        PoolSet::build(u, &self.metrics, Some(&self.current.load()), self.epoch)
    }

    /// Installs `next`. A backend it no longer lists gets no new connection
    /// (its live ones stay until they end) and exports `up` 0 from then on.
    pub fn install(&self, next: PoolSet) {
        let old = self.current.swap(Arc::new(next));
        let now = self.current.load();
        for b in old.backends.iter().filter(|b| !now.backends.iter().any(|n| Arc::ptr_eq(n, b))) {
            b.series.up.set(0.0);
            tracing::info!(event = "backend", backend = %b.url.text, "backend removed by reload; its live connections stay");
        }
    }

    /// Does any path proxy (is there a backend at all)?
    pub fn proxies(&self) -> bool {
        self.current.load().proxies()
    }

    /// A lease on the backend configured as `url`, for connection `id`
    /// (one a binary upgrade moved here); `None` when no pool lists it now.
    pub fn lease_for(&self, url: &str, id: u64) -> Option<Lease> {
        let set = self.current.load();
        set.backends().iter().find(|b| b.url.text == url).map(|b| Lease::new(b.clone(), id))
    }

    /// `/admin/backends`, of the set in force.
    pub fn list(&self) -> Vec<BackendView> {
        self.current.load().list()
    }

    /// See [`PoolSet::drain`].
    pub fn drain(&self, url: &str, over: Duration, kick: Kick) -> Option<usize> {
        self.current.load().drain(url, over, kick)
    }

    /// See [`PoolSet::undrain`].
    pub fn undrain(&self, url: &str) -> Option<()> {
        self.current.load().undrain(url)
    }
}

/// Checks what building the pools of `u` reads (`check-config`): the URLs
/// and, with a `wss://` backend, the TLS files.
pub fn check(u: &Upstream) -> Result<(), ConfigError> {
    PoolSet::build(u, &Metrics::new(), None, Instant::now()).map(|_| ())
}

/// Every pool of one configuration: the default one and the routes'.
pub struct PoolSet {
    /// `None`: echo mode outside the routes.
    default: Option<Pool>,
    /// In `upstream.routes` order (the route index is the config's).
    routes: Vec<Pool>,
    /// Every distinct backend, in configuration order.
    backends: Vec<Arc<BackendState>>,
    tls: Option<Tls>,
    /// The upstream section this set was built from: routes are picked and
    /// claim headers read from it, so a handshake sees one set whole.
    config: Upstream,
    hysteresis: Hysteresis,
    epoch: Instant,
}

impl PoolSet {
    /// Builds the pools of `u` (validated), loading the TLS configuration
    /// when a backend is `wss://`. A URL `previous` knows keeps its state;
    /// a new one gets its series registered (up 1, connections 0, errors 0).
    fn build(
        u: &Upstream,
        metrics: &Metrics,
        previous: Option<&PoolSet>,
        epoch: Instant,
    ) -> Result<PoolSet, ConfigError> {
        // Everything that can fail comes first: a set that is not built
        // (a reload refused) registers no series for URLs never in force.
        let mut texts: Vec<&String> = u.default_backends_ref().collect();
        texts.extend(u.routes.iter().flat_map(|r| r.backends.iter()));
        let mut urls: Vec<UpstreamUrl> = Vec::with_capacity(texts.len());
        for text in texts {
            let url = UpstreamUrl::parse(text).ok_or_else(|| ConfigError::Invalid {
                key: "upstream.backends",
                msg: format!("cannot parse {text:?}"),
            })?;
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        let tls = Tls::load(u, &urls.iter().collect::<Vec<_>>())?;
        let pooled = |text: &str| {
            u.backends.iter().chain(u.routes.iter().flat_map(|r| r.backends.iter())).any(|b| b == text)
        };
        let backends: Vec<Arc<BackendState>> = urls
            .into_iter()
            .map(|url| {
                let pooled = pooled(&url.text);
                let known = previous
                    .and_then(|p| p.backends.iter().find(|b| b.url.text == url.text && b.pooled == pooled));
                if let Some(b) = known {
                    b.series.up.set(if b.healthy() { 1.0 } else { 0.0 });
                    return b.clone();
                }
                let series = metrics.backend(&url.text);
                series.up.set(1.0);
                Arc::new(BackendState {
                    url,
                    pooled,
                    healthy: AtomicBool::new(true),
                    draining: AtomicBool::new(false),
                    drain_gen: AtomicU64::new(0),
                    conns: AtomicUsize::new(0),
                    ids: Mutex::new(HashSet::new()),
                    fails: AtomicU32::new(0),
                    goods: AtomicU32::new(0),
                    retry_at: AtomicU64::new(0),
                    series,
                })
            })
            .collect();
        // Every text was parsed into `backends` above.
        let members = |texts: &[String]| -> Vec<Arc<BackendState>> {
            texts.iter().filter_map(|t| backends.iter().find(|b| &b.url.text == t).cloned()).collect()
        };
        let default_urls = u.default_backends();
        let default = if default_urls.is_empty() {
            None
        } else {
            Some(Pool::new("default".into(), members(&default_urls), u.balance, u.retries))
        };
        let mut routes = Vec::with_capacity(u.routes.len());
        for r in &u.routes {
            routes.push(Pool::new(
                r.path_prefix.clone(),
                members(&r.backends),
                r.balance.unwrap_or(u.balance),
                r.retries.unwrap_or(u.retries),
            ));
        }
        Ok(PoolSet {
            default,
            routes,
            tls,
            config: u.clone(),
            hysteresis: Hysteresis {
                unhealthy_after: u.unhealthy_after,
                healthy_after: u.healthy_after,
                active: u.health_interval_ms > 0,
            },
            backends,
            epoch,
        })
    }

    /// The upstream section this set was built from.
    pub fn config(&self) -> &Upstream {
        &self.config
    }

    /// Active checks' interval (zero: none) and one check's limit.
    pub fn health_timing(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.config.health_interval_ms),
            Duration::from_millis(self.config.connect_timeout_ms),
        )
    }

    /// Does any path proxy (is there a backend at all)?
    pub fn proxies(&self) -> bool {
        !self.backends.is_empty()
    }

    /// The pool of route `i`, or the default pool (`None`: echo).
    pub fn pool(&self, route: Option<usize>) -> Option<&Pool> {
        match route {
            Some(i) => self.routes.get(i),
            None => self.default.as_ref(),
        }
    }

    /// Every distinct backend (the health checks walk these).
    pub fn backends(&self) -> &[Arc<BackendState>] {
        &self.backends
    }

    pub(super) fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// `/admin/backends`: the default pool first, then the routes.
    pub fn list(&self) -> Vec<BackendView> {
        self.default
            .iter()
            .chain(self.routes.iter())
            .flat_map(|p| {
                p.members.iter().map(|b| BackendView {
                    route: p.name.clone(),
                    url: b.url.text.clone(),
                    healthy: b.healthy(),
                    draining: b.draining(),
                    connections: b.connections(),
                })
            })
            .collect()
    }

    fn find(&self, url: &str) -> Option<&Arc<BackendState>> {
        self.backends.iter().find(|b| b.url.text == url)
    }

    /// Drains `url`: no new connections go to it, and its live ones are
    /// closed with `backend_drain` (1012), one at each instant of a spread
    /// over `over` (no reconnect storm). Connections that reach it while
    /// the spread runs (handshakes already past the choice) are closed at
    /// its end. `None`: the URL is not configured. Returns how many were
    /// live.
    pub fn drain(&self, url: &str, over: Duration, kick: Kick) -> Option<usize> {
        let b = self.find(url)?.clone();
        b.draining.store(true, Ordering::Release);
        let generation = b.drain_gen.fetch_add(1, Ordering::AcqRel) + 1;
        let ids: Vec<u64> = lock(&b.ids).iter().copied().collect();
        let live = ids.len();
        tracing::info!(event = "backend_drain", backend = %b.url.text, connections = live, over_s = over.as_secs_f64(), "draining backend");
        tokio::spawn(async move {
            let start = Instant::now();
            let still = |b: &BackendState| b.draining() && b.drain_gen.load(Ordering::Acquire) == generation;
            let n = ids.len().max(1) as f64;
            for (i, id) in ids.iter().enumerate() {
                // Absolute instants, not a sleep per connection: overshoots
                // would add up past `over`.
                let at = start + over.mul_f64(i as f64 / n);
                tokio::time::sleep_until(at).await;
                if !still(&b) {
                    return;
                }
                kick(*id);
            }
            tokio::time::sleep_until(start + over).await;
            if still(&b) {
                let late: Vec<u64> = lock(&b.ids).iter().copied().collect();
                for id in late {
                    kick(id);
                }
            }
        });
        Some(live)
    }

    /// Undrains `url`: new connections may go to it again, and a drain in
    /// progress stops closing. `None`: the URL is not configured.
    pub fn undrain(&self, url: &str) -> Option<()> {
        let b = self.find(url)?;
        b.drain_gen.fetch_add(1, Ordering::AcqRel);
        b.draining.store(false, Ordering::Release);
        tracing::info!(event = "backend_undrain", backend = %b.url.text, "backend undrained");
        Some(())
    }

    /// The result of an active check (see `health`).
    pub fn checked(&self, b: &BackendState, ok: bool, why: &str) {
        let h = self.hysteresis;
        if ok {
            b.fails.store(0, Ordering::Release);
            let goods = b.goods.fetch_add(1, Ordering::AcqRel).saturating_add(1);
            if !b.healthy() && goods >= h.healthy_after {
                b.set_healthy(true, "checks passed");
            }
        } else {
            self.failed(b, why);
        }
    }

    /// A failed check or connect: `unhealthy_after` in a row take it out.
    fn failed(&self, b: &BackendState, why: &str) {
        if !b.pooled {
            return;
        }
        b.goods.store(0, Ordering::Release);
        let fails = b.fails.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        if fails >= self.hysteresis.unhealthy_after {
            let retry = PASSIVE_RETRY.as_millis() as u64;
            b.retry_at.store(self.now_ms().saturating_add(retry), Ordering::Release);
            b.set_healthy(false, why);
        }
    }

    /// A connect that succeeded: the failure streak ends. Without active
    /// checks, this is how an ejected backend (tried again after
    /// [`PASSIVE_RETRY`]) comes back.
    fn connected(&self, b: &BackendState) {
        b.fails.store(0, Ordering::Release);
        if !self.hysteresis.active && !b.healthy() {
            b.set_healthy(true, "a connection succeeded");
        }
    }

    /// The backends a new connection of `sub` tries, in order: at most
    /// `retries + 1`, healthy and not draining (without active checks,
    /// ejected ones whose retry time came, last).
    pub fn order(&self, pool: &Pool, sub: &str) -> Vec<Arc<BackendState>> {
        let now = self.now_ms();
        let passive = !self.hysteresis.active;
        let mut healthy: Vec<(usize, &Arc<BackendState>)> = Vec::with_capacity(pool.members.len());
        let mut probation: Vec<(usize, &Arc<BackendState>)> = Vec::new();
        for (i, b) in pool.members.iter().enumerate() {
            if b.draining() {
                continue;
            }
            if b.healthy() {
                healthy.push((i, b));
            } else if passive && now >= b.retry_at.load(Ordering::Acquire) {
                probation.push((i, b));
            }
        }
        let n = pool.members.len().max(1);
        match pool.balance {
            Balance::LeastConnections => {
                let turn = pool.turn.fetch_add(1, Ordering::Relaxed) % n;
                let key = |(i, b): &(usize, &Arc<BackendState>)| (b.connections(), (i + n - turn) % n);
                healthy.sort_by_key(key);
                probation.sort_by_key(key);
            }
            Balance::RoundRobin => {
                let turn = pool.turn.fetch_add(1, Ordering::Relaxed) % n;
                let key = |(i, _): &(usize, &Arc<BackendState>)| (i + n - turn) % n;
                healthy.sort_by_key(key);
                probation.sort_by_key(key);
            }
            Balance::SubHash => {
                let key =
                    |(_, b): &(usize, &Arc<BackendState>)| std::cmp::Reverse(rendezvous(sub, &b.url.text));
                healthy.sort_by_key(key);
                probation.sort_by_key(key);
            }
        }
        healthy.into_iter().chain(probation).take(pool.retries as usize + 1).map(|(_, b)| b.clone()).collect()
    }

    /// Connects a new connection (`id`, of `sub`) to a backend of `pool`:
    /// the first of [`order`](Pools::order) that answers its 101, each
    /// attempt within `timeout`. A failure is logged (naming the backend
    /// and why), counted, and weighs on the backend's health; the client
    /// sees none of it unless every attempt fails.
    pub async fn connect(
        &self,
        pool: &Pool,
        sub: &str,
        id: u64,
        offer_for: impl Fn(&UpstreamUrl) -> Result<Offer, String>,
        timeout: Duration,
    ) -> Result<Backend, Unavailable> {
        let order = self.order(pool, sub);
        if order.is_empty() {
            return Err(Unavailable::NoneHealthy);
        }
        for b in order {
            // Counted from before the connect: a burst of handshakes sees
            // the ones still connecting (`least_connections`).
            let lease = Lease::new(b.clone(), id);
            let attempt = async {
                let offer = offer_for(&b.url)?;
                let tls = match (b.url.tls, self.tls()) {
                    (true, Some(t)) => Some(t.connector(&b.url)?),
                    _ => None,
                };
                super::connect(&b.url, tls, offer, timeout).await
            };
            match attempt.await {
                Ok(mut backend) => {
                    self.connected(&b);
                    backend.lease = Some(lease);
                    return Ok(backend);
                }
                Err(e) => {
                    drop(lease);
                    b.series.connect_errors.increment(1);
                    tracing::warn!(event = "backend_connect", backend = %b.url.text, error = %e, "backend connect failed");
                    self.failed(&b, &e);
                }
            }
        }
        Err(Unavailable::AllFailed)
    }
}

impl Pool {
    fn new(name: String, members: Vec<Arc<BackendState>>, balance: Balance, retries: u32) -> Pool {
        Pool { name, members, balance, retries, turn: AtomicUsize::new(0) }
    }
}

/// A connection counted against its backend until dropped (with the
/// session, or with a handshake that fails after the backend answered).
pub struct Lease {
    backend: Arc<BackendState>,
    id: u64,
}

impl Lease {
    fn new(backend: Arc<BackendState>, id: u64) -> Lease {
        backend.conns.fetch_add(1, Ordering::AcqRel);
        lock(&backend.ids).insert(id);
        backend.series.connections.increment(1.0);
        Lease { backend, id }
    }
}

impl Lease {
    /// Its backend's URL as configured.
    pub fn url(&self) -> &str {
        &self.backend.url.text
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        lock(&self.backend.ids).remove(&self.id);
        self.backend.conns.fetch_sub(1, Ordering::AcqRel);
        self.backend.series.connections.decrement(1.0);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("backend", &self.backend.url.text).field("id", &self.id).finish()
    }
}

/// The id set's lock; a panic while it was held cannot leave the set
/// inconsistent (single inserts and removes), so a poisoned one is used.
fn lock(m: &Mutex<HashSet<u64>>) -> std::sync::MutexGuard<'_, HashSet<u64>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Rendezvous (highest random weight) score of `sub` on backend `url`:
/// every instance of a fleet computes the same, and removing a backend
/// moves only the subjects whose highest score it had.
pub fn rendezvous(sub: &str, url: &str) -> u64 {
    // FNV-1a then a SplitMix64 finaliser: stable across builds and
    // processes (std's hasher is not promised to be), well spread.
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.write(url.as_bytes());
    h.write(&[0xff]);
    h.write(sub.as_bytes());
    let mut z = h.finish().wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(sub: &str, urls: &[&str]) -> String {
        urls.iter().max_by_key(|u| rendezvous(sub, u)).unwrap().to_string()
    }

    #[test]
    fn rendezvous_moves_only_the_users_of_a_backend_that_left() {
        let all = ["ws://a:1/", "ws://b:1/", "ws://c:1/"];
        let without_b = ["ws://a:1/", "ws://c:1/"];
        let mut per = std::collections::HashMap::new();
        for i in 0..3000 {
            let sub = format!("user-{i}");
            let before = owner(&sub, &all);
            let after = owner(&sub, &without_b);
            if before != "ws://b:1/" {
                assert_eq!(before, after, "{sub} moved although its backend stayed");
            }
            *per.entry(before).or_insert(0) += 1;
        }
        // Spread: each of three backends owns roughly a third.
        for (u, n) in per {
            assert!((800..1200).contains(&n), "{u} owns {n} of 3000");
        }
    }

    #[test]
    fn the_score_is_stable() {
        // The fleet's instances must agree: a fixed value, whatever the build.
        assert_eq!(rendezvous("alice", "ws://a:1/"), rendezvous("alice", "ws://a:1/"));
        assert_ne!(rendezvous("alice", "ws://a:1/"), rendezvous("alice", "ws://b:1/"));
    }
}
