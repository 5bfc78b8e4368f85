//! The state every connection task and the admin plane share. A leaf of
//! the module graph: the pipeline, the admin plane and `/login` read it;
//! only `gateway` builds it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

use crate::admit::{Caps, RateLimiter, Slots};
use crate::auth::jwt::JwtAuthenticator;
use crate::auth::Authenticator;
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
    /// Whether the current episode of descriptor exhaustion was logged
    /// (once per episode, not per socket).
    pub fd_exhausted_logged: AtomicBool,
    pub(crate) file_store: Option<Arc<FileStore>>,
    /// The Redis backend, when in use: its link's health and its tasks.
    pub(crate) redis: Option<RedisStore>,
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
            && self.caps.total() < cfg.limits.max_connections
            && self.slots.total() < cfg.limits.max_handshakes
    }

    /// Is the revocation store reachable? Always for the embedded file; for
    /// Redis, while its link is up.
    pub fn store_up(&self) -> bool {
        self.redis.as_ref().is_none_or(RedisStore::is_up)
    }
}
