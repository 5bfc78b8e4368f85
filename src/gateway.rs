//! The gateway: shared state, start-up, background duties, live reload and
//! the drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::admit::{Caps, RateLimiter, Slots};
use crate::auth::jwt::JwtAuthenticator;
use crate::auth::Authenticator;
use crate::ban::Bans;
use crate::config::{Config, ConfigError, RevocationBackend};
use crate::login::Login;
use crate::metrics::Metrics;
use crate::reject::CloseReason;
use crate::revocation::file::FileStore;
use crate::revocation::redis::RedisStore;
use crate::revocation::SharedStore;
use crate::session::leases::{RedisLeases, UserCaps};
use crate::session::registry::Registry;
pub use crate::shared::Shared;
use crate::upstream::pool::Pools;
use crate::{admin, server};

/// How often background upkeep runs (rate-limiter eviction, gauges).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10);
/// How often the revocation log is compacted.
const COMPACT_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] crate::revocation::StoreError),
    /// The ban log (beside the revocation log) cannot be read or written.
    #[error("ban log {0}")]
    Bans(String),
}

impl Shared {
    /// Applies a new configuration (SIGHUP): keys, TLS certificates,
    /// limits, heartbeat, allowed origins and the backend pools and routes,
    /// all or nothing.
    pub fn reload(&self, new: Config) -> Result<(), ConfigError> {
        let result = (|| {
            // Everything that can fail is loaded first; only then applied.
            // Embedders call this directly, not only `Config::load`: validate.
            // Nothing is swapped before every part has been built: a
            // failure anywhere leaves the old configuration whole.
            new.validate()?;
            // Fixed at start: addresses and the store; keep the old ones.
            let old = self.config.load_full();
            let mut merged = new;
            merged.listen.public = old.listen.public;
            merged.listen.admin = old.listen.admin;
            merged.listen.backlog = old.listen.backlog;
            merged.revocation = old.revocation.clone();
            let tls = crate::tls::acceptor(&merged.listen)?;
            let signer = self.login.as_ref().map(|_| Login::prepare(&merged.auth)).transpose()?;
            let claims = merged.upstream.all_claim_headers();
            let auth = match &self.jwt {
                Some(jwt) => Some(jwt.prepare_reload(&merged.auth, &claims)?),
                None => None,
            };
            // Last of the fallible steps: it registers the series of new
            // backends, which a refused reload must not leave behind.
            let pools = self.upstream.prepare(&merged.upstream)?;
            if let (Some(jwt), Some(auth)) = (&self.jwt, auth) {
                jwt.install(auth);
            }
            if let (Some(login), Some(signer)) = (&self.login, signer) {
                login.apply(signer, &merged.auth.login);
            }
            self.tls.store(Arc::new(tls));
            self.upstream.install(pools);
            self.rate.set_quota(merged.limits.per_ip_rate, merged.limits.per_ip_burst);
            self.config.store(Arc::new(merged));
            Ok(())
        })();
        self.metrics.config_reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!(event = "reload", result = "ok", "configuration reloaded"),
            Err(e) => {
                tracing::error!(event = "reload", result = "error", error = %e, "configuration reload refused; the old one stays")
            }
        }
        result
    }
}

/// Everything start-up checks before it binds, in the order it does:
/// validation, the revocation log (or Redis URL), the JWT keys (PEM, JWKS,
/// secret file; `jwt` false with a custom authenticator), the login users
/// and signing key, the TLS certificate and key. `check-config` runs
/// exactly this, so it reports what `serve` would.
pub fn preflight(cfg: &Config, jwt: bool) -> Result<(), StartError> {
    cfg.validate()?;
    if cfg.revocation.backend == RevocationBackend::Redis {
        crate::revocation::redis::check_target(&cfg.revocation)?;
    }
    crate::revocation::file::check_path(&cfg.revocation.path)?;
    if jwt {
        JwtAuthenticator::prepare(&cfg.auth, &cfg.upstream.all_claim_headers())?;
        // What `serve` fetches before it binds, fetched once.
        crate::auth::provider::check::check(&cfg.auth)?;
    }
    if cfg.auth.login.enabled {
        Login::load(&cfg.auth)?;
    }
    crate::tls::acceptor(&cfg.listen)?;
    // The backends' CA, certificate and key files (for wss://).
    crate::upstream::pool::check(&cfg.upstream)?;
    Ok(())
}

/// A bound gateway, ready to [`run`](Gateway::run).
pub struct Gateway {
    shared: Arc<Shared>,
    public: TcpListener,
    admin: TcpListener,
}

fn listen(
    addr: SocketAddr,
    backlog: u32,
    defer_accept_s: u64,
    what: &'static str,
) -> Result<TcpListener, StartError> {
    let bind = |addr| -> std::io::Result<TcpListener> {
        let socket = if addr_is_v4(addr) { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        if defer_accept_s > 0 {
            crate::sockopt::set_defer_accept(&socket, Duration::from_secs(defer_accept_s))?;
        }
        socket.listen(backlog)
    };
    bind(addr).map_err(|source| StartError::Bind { what, addr, source })
}

/// Listeners a binary upgrade's new process inherits, with what else it
/// takes over from the old one.
pub struct Inherited {
    pub public: std::net::TcpListener,
    pub admin: std::net::TcpListener,
    /// The old registry's instance name (connection ids keep their prefix).
    pub instance: String,
    /// How long ago the old process's session clock started.
    pub clock_age: Duration,
    /// The old registry's next connection id.
    pub next_id: u64,
    /// The old Redis link's node name (empty without Redis).
    pub redis_node: String,
}

/// An inherited listener, kept when the configuration still names its
/// address (or port 0, "any": the one it has), with the backlog and
/// `TCP_DEFER_ACCEPT` the configuration names now; a listener for another
/// address is bound anew and the inherited one left to close.
fn adopt_listener(
    l: std::net::TcpListener,
    cfg: &Config,
    want: SocketAddr,
    backlog: u32,
    what: &'static str,
) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { what, addr: want, source };
    let have = l.local_addr().map_err(err)?;
    let same = want == have || (want.port() == 0 && want.ip() == have.ip());
    if !same {
        tracing::info!(listener = what, old = %have, new = %want, "upgrade: the configuration names a new address");
        let defer = if what == "listen.public" { cfg.listen.defer_accept_s } else { 0 };
        return listen(want, backlog, defer, what);
    }
    let sock = socket2::SockRef::from(&l);
    // listen() again on a listening socket only changes its backlog.
    sock.listen(i32::try_from(backlog).unwrap_or(i32::MAX)).map_err(err)?;
    if what == "listen.public" && cfg.listen.defer_accept_s > 0 {
        crate::sockopt::set_defer_accept(&l, Duration::from_secs(cfg.listen.defer_accept_s)).map_err(err)?;
    }
    l.set_nonblocking(true).map_err(err)?;
    TcpListener::from_std(l).map_err(err)
}

fn addr_is_v4(a: SocketAddr) -> bool {
    a.is_ipv4()
}

impl Gateway {
    /// Binds both listeners and builds the state, with the JWT authenticator.
    pub async fn bind(cfg: Config) -> Result<Gateway, StartError> {
        Gateway::bind_with(cfg, None).await
    }

    /// As [`bind`](Gateway::bind), with a custom authenticator when given.
    pub async fn bind_with(cfg: Config, auth: Option<Arc<dyn Authenticator>>) -> Result<Gateway, StartError> {
        Gateway::bind_inner(cfg, auth, None).await
    }

    /// A binary upgrade's new process: the old one's listeners (re-bound
    /// only where the configuration now names another address), its
    /// instance name and its session clock.
    pub async fn bind_inherited(cfg: Config, inherited: Inherited) -> Result<Gateway, StartError> {
        Gateway::bind_inner(cfg, None, Some(inherited)).await
    }

    async fn bind_inner(
        cfg: Config,
        auth: Option<Arc<dyn Authenticator>>,
        inherited: Option<Inherited>,
    ) -> Result<Gateway, StartError> {
        // An upgrade's new process keeps the old one's Redis node name, so
        // moved connections' lease names stay theirs.
        if let Some(node) = inherited.as_ref().map(|i| i.redis_node.clone()).filter(|n| !n.is_empty()) {
            let _ = crate::redis_link::INHERITED_NODE.set(node);
        }
        // The same checks, in the same order, as `preflight` (which
        // `check-config` runs); here each part is kept as it is loaded.
        cfg.validate()?;
        if cfg.listen.trusted_proxies.iter().any(|n| n.prefix_len() == 0) {
            tracing::warn!(
                trusted_proxies = ?cfg.listen.trusted_proxies,
                "listen.trusted_proxies covers every address (a /0 entry): any client can name any \
                 address in PROXY or X-Forwarded-For, and no client is limited per IP"
            );
        }
        let metrics = Arc::new(Metrics::new());
        let (store, file_store, redis): (SharedStore, Option<Arc<FileStore>>, Option<RedisStore>) =
            match cfg.revocation.backend {
                RevocationBackend::File => {
                    let fs = Arc::new(FileStore::open(&cfg.revocation.path, cfg.auth.max_token_ttl_s)?);
                    (fs.clone(), Some(fs), None)
                }
                RevocationBackend::Redis => {
                    let rs = RedisStore::open(&cfg, metrics.clone()).await?;
                    (Arc::new(rs.clone()), Some(Arc::new(rs.file().clone())), Some(rs))
                }
            };
        metrics.set_revocations(store.len());
        // The embedded store is always available; Redis reports its own state.
        if redis.is_none() {
            metrics.set_store_up(true);
        }
        let user_caps = redis.as_ref().map(|r| {
            let (leases, keeper) = RedisLeases::start(r.link(), cfg.revocation.lease_ttl_ms);
            r.own_task(keeper);
            leases
        });
        if let Some(l) = &user_caps {
            // The first heartbeat before the first claim (bounded: a down
            // link serves at once, per `limits.on_cap_store_error`).
            l.ready(Duration::from_secs(2)).await;
        }
        let user_caps = user_caps.map(|l| Arc::new(l) as Arc<dyn UserCaps>);
        let (auth, jwt): (Arc<dyn Authenticator>, Option<Arc<JwtAuthenticator>>) = match auth {
            Some(a) => (a, None),
            None => {
                let j = Arc::new(JwtAuthenticator::new(
                    &cfg.auth,
                    &cfg.upstream.all_claim_headers(),
                    store.clone(),
                    metrics.clone(),
                )?);
                (j.clone(), Some(j))
            }
        };
        if let Some(j) = &jwt {
            // Keys from identity providers before binding; without them
            // within jwks_timeout_ms × 3, start anyway, not ready.
            let within = std::time::Duration::from_millis(cfg.auth.jwks_timeout_ms.saturating_mul(3));
            if !j.wait_for_keys(within).await {
                tracing::warn!(
                    event = "jwks",
                    keys = j.keys_status().label(),
                    "starting without keys from every identity provider; not ready until they arrive"
                );
            }
        }
        let login = if cfg.auth.login.enabled { Some(Login::load(&cfg.auth)?) } else { None };
        let tls = crate::tls::acceptor(&cfg.listen)?;
        let upstream = Arc::new(Pools::new(&cfg.upstream, metrics.clone())?);

        crate::fdlimit::check(cfg.limits.max_connections, upstream.proxies());

        let id_floor = inherited.as_ref().map(|i| i.next_id);
        let (public, admin, inherit) = match inherited {
            None => (
                listen(cfg.listen.public, cfg.listen.backlog, cfg.listen.defer_accept_s, "listen.public")?,
                listen(cfg.listen.admin, 128, 0, "listen.admin")?,
                None,
            ),
            Some(i) => (
                adopt_listener(i.public, &cfg, cfg.listen.public, cfg.listen.backlog, "listen.public")?,
                adopt_listener(i.admin, &cfg, cfg.listen.admin, 128, "listen.admin")?,
                Some((i.instance, i.clock_age)),
            ),
        };
        let bans = Arc::new(Bans::new(metrics.clone()));
        let ban_log = crate::ban::persist::path_for(&cfg.revocation.path);
        crate::ban::persist::open(&ban_log, &bans, &cfg.ban)
            .map_err(|e| StartError::Bans(format!("{}: {e}", ban_log.display())))?;
        let shared = Arc::new(Shared {
            bans,
            caps: Caps::new(),
            slots: Slots::new(Some(metrics.clone())),
            rate: RateLimiter::new(cfg.limits.per_ip_rate, cfg.limits.per_ip_burst),
            registry: Registry::inheriting(metrics.clone(), user_caps, inherit),
            config: ArcSwap::from_pointee(cfg),
            metrics,
            auth,
            jwt,
            store,
            upstream,
            login,
            tls: ArcSwap::from_pointee(tls),
            log_limiter: Default::default(),
            draining: AtomicBool::new(false),
            demo_page: AtomicBool::new(false),
            fd_exhausted_logged: AtomicBool::new(false),
            file_store,
            redis,
            upgrade: Default::default(),
        });
        if let Some(next) = id_floor {
            // Far above any id the old process hands out while it still
            // finishes handshakes (they follow here with their ids).
            shared.registry.ids_from(next.saturating_add(1 << 32));
        }
        Ok(Gateway { shared, public, admin })
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().unwrap_or(self.shared.config.load().listen.public)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.shared.config.load().listen.admin)
    }

    /// Serves the demo page at `GET /` without an upgrade (`serve --demo`
    /// only: the page hands a token to whoever asks).
    pub fn serve_demo_page(&self) {
        self.shared.demo_page.store(true, Ordering::Relaxed);
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The listeners' descriptors (public, admin), for a binary upgrade to
    /// hand over; open while [`run`](Gateway::run) serves.
    pub fn listener_fds(&self) -> (std::os::fd::RawFd, std::os::fd::RawFd) {
        use std::os::fd::AsRawFd;
        (self.public.as_raw_fd(), self.admin.as_raw_fd())
    }

    /// Serves until `shutdown` resolves, then drains (see `drain`) and
    /// returns once every connection is gone or the drain timeout passed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Gateway { shared, public, admin } = self;
        let (stop_accept_tx, mut stop_accept_rx) = watch::channel(false);
        let (stop_admin_tx, stop_admin_rx) = watch::channel(false);

        let accept = tokio::spawn(server::accept_loop(shared.clone(), public, async move {
            let _ = stop_accept_rx.wait_for(|s| *s).await;
        }));
        let admin_task = tokio::spawn(admin::serve(shared.clone(), admin, stop_admin_rx));
        let upkeep = tokio::spawn(housekeeping(shared.clone()));
        let sweeper = tokio::spawn(sweep_handshakes(shared.clone()));
        let kicker = tokio::spawn(kick_remote_revocations(shared.clone()));
        let evicter = tokio::spawn(kick_evicted(shared.clone()));
        let ban_sweeper = tokio::spawn(sweep_bans(shared.clone()));
        let ban_fleet = shared.redis.as_ref().map(|r| {
            let s = shared.clone();
            crate::ban::fleet::start(shared.bans.clone(), r.link(), move || s.config.load().ban.clone())
        });
        let health = tokio::spawn(crate::upstream::health::run(shared.upstream.clone()));

        // A committed binary upgrade ends this process too: the new one
        // accepts now; only what could not move is drained (at once, no
        // readiness delay: the new process is ready).
        let upgraded = tokio::select! {
            _ = shutdown => false,
            _ = shared.upgrade.committed() => true,
        };
        if upgraded {
            let _ = stop_accept_tx.send(true);
            let _ = stop_admin_tx.send(true);
            // Handshakes under way here follow in late rounds first.
            shared.upgrade.settled().await;
        }
        drain(&shared, upgraded, || {
            let _ = stop_accept_tx.send(true);
        })
        .await;
        let _ = accept.await;
        let _ = stop_admin_tx.send(true);
        let _ = admin_task.await;
        upkeep.abort();
        sweeper.abort();
        kicker.abort();
        evicter.abort();
        ban_sweeper.abort();
        if let Some(f) = ban_fleet {
            f.abort();
        }
        health.abort();
        // Released leases reach Redis before the link stops (else they
        // would linger until they expire).
        let _ = tokio::time::timeout(Duration::from_secs(2), shared.registry.flush_caps()).await;
        if let Some(r) = &shared.redis {
            r.close();
        }
    }
}

/// The drain: readiness 503 while still accepting for `drain_delay_s`,
/// then stop accepting and close live connections with 1001 spread over
/// the first half of `drain_timeout_s` (no reconnect storm), leaving the
/// second half for their close handshakes.
async fn drain(shared: &Arc<Shared>, upgraded: bool, stop_accepting: impl FnOnce()) {
    let cfg = shared.config.load_full();
    shared.draining.store(true, Ordering::Release);
    let delay_s = if upgraded { 0 } else { cfg.listen.drain_delay_s };
    tracing::info!(event = "drain", delay_s, timeout_s = cfg.listen.drain_timeout_s, upgraded, "draining");
    tokio::time::sleep(Duration::from_secs(delay_s)).await;
    stop_accepting();
    shared.registry.start_closing();
    let timeout = Duration::from_secs(cfg.listen.drain_timeout_s);
    let start = tokio::time::Instant::now();
    let end = start + timeout;
    let conns = shared.registry.all();
    // Each kick at its own instant of the first half (absolute, not a step
    // slept per connection: a thousand sleeps' overshoot would add up and
    // push the last kicks past the timeout).
    let n = conns.len().max(1) as f64;
    for (i, c) in conns.iter().enumerate() {
        let at = start + (timeout / 2).mul_f64(i as f64 / n);
        if at > tokio::time::Instant::now() {
            tokio::time::sleep_until(at).await;
        }
        c.kick(CloseReason::Drain);
    }
    while shared.caps.total() > 0 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = shared.caps.total();
    if left > 0 {
        tracing::warn!(left, "drain timeout passed with connections still open");
    } else {
        tracing::info!(event = "drain", "drained");
    }
}

/// The head deadline of every handshaking socket, and the pressure gauges.
async fn sweep_handshakes(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(crate::admit::slots::SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = tick.tick().await;
        let limits = crate::admit::SlotLimits::from(&shared.config.load().limits);
        shared.slots.sweep(now, limits);
    }
}

/// Ends expired bans, forgets decayed strikes, keeps `portcullis_bans`.
async fn sweep_bans(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.bans.sweep(&shared.config.load().ban);
    }
}

async fn housekeeping(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    let mut since_compact = Duration::ZERO;
    loop {
        tick.tick().await;
        shared.rate.housekeep();
        shared.log_limiter.flush();
        shared.metrics.upkeep();
        if let Some(l) = &shared.login {
            l.housekeep();
        }
        since_compact += HOUSEKEEPING_EVERY;
        if since_compact >= COMPACT_EVERY {
            since_compact = Duration::ZERO;
            if let Some(fs) = shared.file_store.clone() {
                let _ = tokio::task::spawn_blocking(move || fs.compact()).await;
            }
        }
        shared.metrics.set_revocations(shared.store.len());
    }
}

/// Connections of this instance that an admission elsewhere evicted
/// (`evict_oldest` with fleet-wide caps) are closed with `evicted`.
async fn kick_evicted(shared: Arc<Shared>) {
    let Some(mut rx) = shared.registry.evictions() else { return };
    loop {
        match rx.recv().await {
            Ok(id) => {
                shared.registry.kick_id(id, CloseReason::Evicted);
            }
            // Missed notices: those leases are gone from Redis already; the
            // connections stay over the cap until they end (rare: 1024
            // evictions unread).
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "eviction notices lost");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Revocations arriving from the store (this instance's or another's)
/// kick the live connections they cover.
async fn kick_remote_revocations(shared: Arc<Shared>) {
    let mut rx = shared.store.subscribe();
    loop {
        match rx.recv().await {
            Ok(r) => {
                shared.registry.kick_revoked(&r);
                shared.metrics.set_revocations(shared.store.len());
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Missed some: re-check every live connection.
                for c in shared.registry.all() {
                    if shared.store.is_revoked(&c.sub, c.jti.as_deref(), c.iat) {
                        shared.registry.kick_revoked_conn(&c);
                    }
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
