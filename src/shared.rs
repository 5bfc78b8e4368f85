//! The state every connection task and the admin plane share. A leaf of
//! the module graph: the pipeline, the admin plane and `/login` read it;
//! only `gateway` builds it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

use crate::admit::{Caps, RateLimiter, Slots};
use crate::auth::jwt::{JwtAuthenticator, KeysStatus};
use crate::auth::Authenticator;
use crate::ban::Bans;
use crate::config::Config;
use crate::login::Login;
use crate::metrics::Metrics;
use crate::revocation::file::FileStore;
use crate::revocation::redis::RedisStore;
use crate::revocation::SharedStore;
use crate::session::registry::Registry;
use crate::upstream::pool::Pools;

/// State every connection task and the admin plane share.
pub struct Shared {
    /// The configuration in force; SIGHUP swaps it whole. Listen addresses
    /// and the store backend are fixed at start.
    pub config: ArcSwap<Config>,
    pub metrics: Arc<Metrics>,
    pub caps: Arc<Caps>,
    /// Handshake slots, shared fairly between client addresses (stage 1).
    pub slots: Arc<Slots>,
    /// Per-IP handshake rate (stage 2).
    pub rate: RateLimiter,
    /// Banned addresses, refused first of all; every verdict strikes here.
    pub bans: Arc<Bans>,
    pub auth: Arc<dyn Authenticator>,
    /// The built-in JWT authenticator, when it is the one in use (for reload).
    pub jwt: Option<Arc<JwtAuthenticator>>,
    pub store: SharedStore,
    pub registry: Arc<Registry>,
    /// The backends of every route (none in echo mode); SIGHUP swaps the
    /// set, keeping each backend's state.
    pub upstream: Arc<Pools>,
    pub login: Option<Login>,
    pub tls: ArcSwap<Option<TlsAcceptor>>,
    pub log_limiter: crate::events::LogLimiter,
    /// Set at SIGTERM: `/readyz` answers 503 from then on.
    pub draining: AtomicBool,
    /// `serve --demo`: `GET /` without an upgrade answers the demo page
    /// (`demo`). Off unless [`crate::Gateway::serve_demo_page`] is called.
    pub demo_page: AtomicBool,
    /// Whether the current episode of descriptor exhaustion was logged
    /// (once per episode, not per socket).
    pub fd_exhausted_logged: AtomicBool,
    pub(crate) file_store: Option<Arc<FileStore>>,
    /// The Redis backend, when in use: its link's health and its tasks.
    pub(crate) redis: Option<RedisStore>,
    /// Binary upgrades: asked for by SIGUSR2 or `POST /admin/upgrade`, one
    /// at a time, carried out by `crate::upgrade`.
    pub upgrade: UpgradeSwitch,
}

/// Why an upgrade was not started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradeRefused {
    /// One is already running.
    Running,
    /// This process cannot upgrade itself (an embedding without the binary's upgrader).
    Unavailable,
    /// The gateway is shutting down (SIGTERM): nothing to hand over to.
    Draining,
}

/// Where upgrade requests meet the one upgrader (a leaf: the admin plane
/// and the signal handler ask, `crate::upgrade` answers).
#[derive(Default)]
pub struct UpgradeSwitch {
    available: AtomicBool,
    running: AtomicBool,
    requested: tokio::sync::Notify,
    committed: tokio::sync::Notify,
    done: AtomicBool,
    settled: tokio::sync::Notify,
    settled_flag: AtomicBool,
}

impl UpgradeSwitch {
    /// Asks for an upgrade; refused while one runs.
    pub fn request(&self) -> Result<(), UpgradeRefused> {
        if !self.available.load(Ordering::Acquire) {
            return Err(UpgradeRefused::Unavailable);
        }
        if self.running.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(UpgradeRefused::Running);
        }
        self.requested.notify_one();
        Ok(())
    }

    /// The upgrader is listening (the binary's `serve`).
    pub fn set_available(&self) {
        self.available.store(true, Ordering::Release);
    }

    /// The next request (the upgrader's loop).
    pub async fn requested(&self) {
        self.requested.notified().await;
    }

    /// An upgrade is under way without a request here: the new process,
    /// while its predecessor still hands over late rounds.
    pub fn mark_running(&self) {
        self.running.store(true, Ordering::Release);
    }

    /// The upgrade that ran is over (failed: another may be asked for).
    pub fn finished(&self) {
        self.running.store(false, Ordering::Release);
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// The new process has taken over: this one stops accepting and drains
    /// what stayed.
    pub fn commit(&self) {
        self.done.store(true, Ordering::Release);
        self.committed.notify_waiters();
        self.committed.notify_one();
    }

    /// The hand-over is over (late rounds included): the drain may start.
    pub fn settle(&self) {
        self.settled_flag.store(true, Ordering::Release);
        self.settled.notify_waiters();
    }

    /// Resolves once [`settle`](UpgradeSwitch::settle) was called.
    pub async fn settled(&self) {
        loop {
            let wait = self.settled.notified();
            if self.settled_flag.load(Ordering::Acquire) {
                return;
            }
            wait.await;
        }
    }

    /// Resolves once an upgrade committed.
    pub async fn committed(&self) {
        loop {
            let wait = self.committed.notified();
            if self.done.load(Ordering::Acquire) {
                return;
            }
            wait.await;
        }
    }
}

impl Shared {
    /// Is the gateway ready for more traffic (`/readyz`)?
    pub fn ready(&self) -> bool {
        let cfg = self.config.load();
        // With the shared store down, `on_cap_store_error = "reject"`
        // refuses every user: not ready, so a load balancer prefers an
        // instance that still reaches Redis. With `local` it serves on.
        let store_ok =
            self.store_up() || cfg.limits.on_cap_store_error == crate::config::OnCapStoreError::Local;
        !self.draining.load(Ordering::Acquire)
            && store_ok
            && self.keys_status() != KeysStatus::None
            && self.caps.total() < cfg.limits.max_connections
            && self.slots.total() < cfg.limits.max_handshakes
    }

    /// Keys to verify with: `None` while identity providers are configured
    /// and none has delivered keys (a custom authenticator: `Ok`).
    pub fn keys_status(&self) -> KeysStatus {
        self.jwt.as_ref().map_or(KeysStatus::Ok, |j| j.keys_status())
    }

    /// Is the revocation store reachable? Always for the embedded file; for
    /// Redis, while its link is up.
    pub fn store_up(&self) -> bool {
        self.redis.as_ref().is_none_or(RedisStore::is_up)
    }
}
