//! Every configuration key, its default and its validation, in one place.
//!
//! The README's reference table mirrors this file. Unknown keys are errors
//! (`deny_unknown_fields`), and every validation error names its key, so an
//! operator's typo never silently becomes a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

mod ban;
pub mod jwks;
pub mod redis;
pub mod upstream;

pub use ban::*;
pub use jwks::IssuerEntry;
pub use redis::RedisMode;
pub use upstream::{Balance, Route, Upstream, UpstreamUrl, DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS};

pub const DEFAULT_PUBLIC: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";
pub const DEFAULT_BACKLOG: u32 = 4096;
pub const DEFAULT_DRAIN_DELAY_S: u64 = 0;
pub const DEFAULT_DRAIN_TIMEOUT_S: u64 = 30;
/// How long a binary upgrade's new process has to start, take over and
/// report ready before the old one takes everything back.
pub const DEFAULT_UPGRADE_TIMEOUT_S: u64 = 30;
pub const MAX_UPGRADE_TIMEOUT_S: u64 = 600;

/// The most the default `limits.max_connections` may be; below it, the
/// default is what the open-file limit allows (`fdlimit`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_MAX_HANDSHAKES: usize = 2048;
pub const DEFAULT_PER_IP_MAX_CONNECTIONS: usize = 256;
pub const DEFAULT_PER_IP_RATE: f64 = 20.0;
pub const DEFAULT_PER_IP_BURST: u32 = 40;
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5000;
/// Floor of the pressure-scaled deadline for an incomplete head: a real
/// client's head arrives in one round trip, well under half a second.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MIN_MS: u64 = 500;
/// Sockets still handshaking per client address. A legitimate address,
/// even a NAT'd office or a carrier's gateway with thousands of users
/// behind it, completes each head within a round trip, so it seldom has
/// more than a few incomplete at once: 16 is ample for it, while 40
/// attacking addresses then hold at most 640 of the 2,048 slots.
pub const DEFAULT_PER_IP_MAX_HANDSHAKES: usize = 16;
/// `TCP_DEFER_ACCEPT`: a socket that sends nothing stays in the kernel
/// this long before the process sees it.
pub const DEFAULT_DEFER_ACCEPT_S: u64 = 5;
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8192;
pub const DEFAULT_PER_USER_MAX_CONNECTIONS: usize = 8;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
pub const DEFAULT_MAX_OUTBOUND_BYTES: usize = 4 << 20;
pub const DEFAULT_WRITE_TIMEOUT_MS: u64 = 10_000;

pub const DEFAULT_PING_INTERVAL_MS: u64 = 20_000;
pub const DEFAULT_PONG_TIMEOUT_MS: u64 = 10_000;

pub const DEFAULT_LEEWAY_S: u64 = 30;
pub const DEFAULT_MAX_TOKEN_TTL_S: u64 = 86_400;
pub const DEFAULT_COOKIE_NAME: &str = "portcullis_token";
pub const DEFAULT_CACHE_CAPACITY: u64 = 100_000;
pub const DEFAULT_LOGIN_TOKEN_TTL_S: u64 = 3600;
pub const DEFAULT_LOGIN_PER_IP_RATE: f64 = 1.0;
pub const DEFAULT_LOGIN_PER_IP_BURST: u32 = 5;

pub const DEFAULT_REVOCATION_PATH: &str = "portcullis-revocations.log";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A configuration error, one line, naming the dotted TOML key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not TOML, or a value has the wrong type. `key` is empty
    /// for a syntax error; `at` is "line N" (and the file, once known).
    #[error("{}", parse_line(key, msg, at))]
    Parse { key: String, msg: String, at: String },
    #[error("{key}: {msg}")]
    Invalid { key: &'static str, msg: String },
    /// The cause is part of the message, not a `source`: error reporters
    /// that print the chain would otherwise say it twice.
    #[error("cannot read {path}: {msg}")]
    Io { path: String, msg: String },
}

fn parse_line(key: &str, msg: &str, at: &str) -> String {
    if key.is_empty() {
        format!("{at}: {msg}")
    } else {
        format!("{key}: {msg} ({at})")
    }
}

fn invalid(key: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, msg: msg.into() }
}

/// Upper bounds of numeric keys. Generous for any real deployment; their
/// job is to keep arithmetic on them (instants, durations, rates) from
/// overflowing or panicking, at start and on reload alike.
pub mod bounds {
    /// Counts of connections, handshakes, users.
    pub const MAX_COUNT: u64 = 10_000_000;
    /// Millisecond timeouts and intervals: one day.
    pub const MAX_MS: u64 = 86_400_000;
    /// Second durations of the drain: one day.
    pub const MAX_DRAIN_S: u64 = 86_400;
    /// Token and connection lifetimes: ten years.
    pub const MAX_LIFETIME_S: u64 = 10 * 365 * 86_400;
    /// Rates per second: the smallest is one a day (a smaller positive one
    /// would overflow the limiter's period), the largest a million.
    pub const MIN_RATE: f64 = 1.0 / 86_400.0;
    pub const MAX_RATE: f64 = 1_000_000.0;
    /// Bursts (a day-long period times this still fits the limiter).
    pub const MAX_BURST: u64 = 100_000;
    /// Bytes of a request head.
    pub const MAX_HEADER_BYTES: u64 = 1 << 20;
    /// Bytes of a message, and of the outbound queue.
    pub const MAX_MESSAGE_BYTES: u64 = 1 << 30;
    pub const MAX_OUTBOUND_BYTES: u64 = 1 << 32;
    /// Verified tokens cached.
    pub const MAX_CACHE: u64 = 100_000_000;
    /// Seconds of clock leeway.
    pub const MAX_LEEWAY_S: u64 = 86_400;
}

/// `v` within `min..=max`, or an error naming `key`.
fn within(key: &'static str, v: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(invalid(key, format!("must be between {min} and {max}, got {v}")));
    }
    Ok(())
}

/// A rate: 0 when `zero_ok` (off), else within the rate bounds.
fn rate_within(key: &'static str, v: f64, zero_ok: bool) -> Result<(), ConfigError> {
    use bounds::{MAX_RATE, MIN_RATE};
    if zero_ok && v == 0.0 {
        return Ok(());
    }
    if !(v.is_finite() && (MIN_RATE..=MAX_RATE).contains(&v)) {
        let off = if zero_ok { "0 (off) or " } else { "" };
        return Err(invalid(
            key,
            format!("must be {off}between {MIN_RATE:.6} (one a day) and {MAX_RATE}, got {v}"),
        ));
    }
    Ok(())
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: Listen,
    pub limits: Limits,
    pub heartbeat: Heartbeat,
    pub auth: Auth,
    pub revocation: Revocation,
    pub upstream: Upstream,
    pub admin: Admin,
    pub log: Log,
    pub ban: Ban,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// Paths that accept a WebSocket upgrade.
    pub paths: Vec<String>,
    pub backlog: u32,
    pub proxy_protocol: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub drain_delay_s: u64,
    pub drain_timeout_s: u64,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    /// `TCP_DEFER_ACCEPT` seconds (Linux); 0 = off.
    pub defer_accept_s: u64,
    /// A binary upgrade's deadline (SIGUSR2, `POST /admin/upgrade`).
    pub upgrade_timeout_s: u64,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            public: DEFAULT_PUBLIC.parse().expect("constant address"),
            admin: DEFAULT_ADMIN.parse().expect("constant address"),
            paths: vec!["/".into()],
            backlog: DEFAULT_BACKLOG,
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            drain_delay_s: DEFAULT_DRAIN_DELAY_S,
            drain_timeout_s: DEFAULT_DRAIN_TIMEOUT_S,
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            defer_accept_s: DEFAULT_DEFER_ACCEPT_S,
            upgrade_timeout_s: DEFAULT_UPGRADE_TIMEOUT_S,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUserCap {
    #[default]
    Reject,
    EvictOldest,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnCapStoreError {
    #[default]
    Local,
    Reject,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_connections: usize,
    pub max_handshakes: usize,
    /// Sockets still handshaking per client address (the fair share bound).
    pub per_ip_max_handshakes: usize,
    pub per_ip_max_connections: usize,
    pub per_ip_rate: f64,
    pub per_ip_burst: u32,
    pub handshake_timeout_ms: u64,
    /// Under handshake-slot pressure the deadline for an incomplete head
    /// shrinks from `handshake_timeout_ms` toward this.
    pub handshake_timeout_min_ms: u64,
    pub max_header_bytes: usize,
    pub per_user_max_connections: usize,
    pub on_user_cap: OnUserCap,
    pub max_message_bytes: usize,
    /// 0 = unlimited.
    pub per_conn_msgs_per_s: f64,
    pub max_outbound_bytes: usize,
    pub write_timeout_ms: u64,
    /// 0 = unlimited.
    pub max_lifetime_s: u64,
    pub on_cap_store_error: OnCapStoreError,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Fits the open-file limit (echo mode); `Config::parse` redoes it
            // for proxy mode when the file does not set the key.
            max_connections: default_max_connections(false),
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            per_ip_max_handshakes: DEFAULT_PER_IP_MAX_HANDSHAKES,
            per_ip_max_connections: DEFAULT_PER_IP_MAX_CONNECTIONS,
            per_ip_rate: DEFAULT_PER_IP_RATE,
            per_ip_burst: DEFAULT_PER_IP_BURST,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            handshake_timeout_min_ms: DEFAULT_HANDSHAKE_TIMEOUT_MIN_MS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            per_user_max_connections: DEFAULT_PER_USER_MAX_CONNECTIONS,
            on_user_cap: OnUserCap::Reject,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            per_conn_msgs_per_s: 0.0,
            max_outbound_bytes: DEFAULT_MAX_OUTBOUND_BYTES,
            write_timeout_ms: DEFAULT_WRITE_TIMEOUT_MS,
            max_lifetime_s: 0,
            on_cap_store_error: OnCapStoreError::Local,
        }
    }
}

impl Limits {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub fn handshake_timeout_min(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_min_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Heartbeat {
    pub ping_interval_ms: u64,
    pub pong_timeout_ms: u64,
    /// 0 = off.
    pub idle_timeout_ms: u64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            ping_interval_ms: DEFAULT_PING_INTERVAL_MS,
            pong_timeout_ms: DEFAULT_PONG_TIMEOUT_MS,
            idle_timeout_ms: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Carrier {
    Header,
    Subprotocol,
    Cookie,
    Query,
}

#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// Algorithm names as JWT spells them (`HS256`, `ES256`, `EdDSA`, …).
    pub algorithms: Vec<String>,
    pub hmac_secret: String,
    pub hmac_secret_file: PathBuf,
    pub public_key_file: PathBuf,
    pub private_key_file: PathBuf,
    pub jwks_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    pub leeway_s: u64,
    pub max_token_ttl_s: u64,
    pub carriers: Vec<Carrier>,
    pub cookie_name: String,
    pub allowed_origins: Vec<String>,
    pub cache_capacity: u64,
    pub login: Login,
    /// Keys fetched from identity providers (`config/jwks.rs`).
    pub jwks_url: String,
    pub oidc_issuer: String,
    pub jwks_refresh_s: u64,
    pub jwks_timeout_ms: u64,
    pub jwks_ca_file: PathBuf,
    pub issuers: Vec<IssuerEntry>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            algorithms: vec!["HS256".into()],
            hmac_secret: String::new(),
            hmac_secret_file: PathBuf::new(),
            public_key_file: PathBuf::new(),
            private_key_file: PathBuf::new(),
            jwks_file: PathBuf::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway_s: DEFAULT_LEEWAY_S,
            max_token_ttl_s: DEFAULT_MAX_TOKEN_TTL_S,
            carriers: vec![Carrier::Header, Carrier::Subprotocol],
            cookie_name: DEFAULT_COOKIE_NAME.into(),
            allowed_origins: Vec::new(),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            login: Login::default(),
            jwks_url: String::new(),
            oidc_issuer: String::new(),
            jwks_refresh_s: jwks::DEFAULT_JWKS_REFRESH_S,
            jwks_timeout_ms: jwks::DEFAULT_JWKS_TIMEOUT_MS,
            jwks_ca_file: PathBuf::new(),
            issuers: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Login {
    pub enabled: bool,
    pub users_file: PathBuf,
    pub token_ttl_s: u64,
    pub per_ip_rate: f64,
    pub per_ip_burst: u32,
}

impl Default for Login {
    fn default() -> Self {
        Login {
            enabled: false,
            users_file: PathBuf::new(),
            token_ttl_s: DEFAULT_LOGIN_TOKEN_TTL_S,
            per_ip_rate: DEFAULT_LOGIN_PER_IP_RATE,
            per_ip_burst: DEFAULT_LOGIN_PER_IP_BURST,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationBackend {
    #[default]
    File,
    Redis,
}

#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Revocation {
    pub backend: RevocationBackend,
    /// The embedded store's log; with Redis, the local write-through copy.
    pub path: PathBuf,
    pub redis_url: String,
    /// Redis: how long a per-user connection lease lives unless renewed.
    pub lease_ttl_ms: u64,
    /// Redis: the bound on every Redis call a handshake waits for (the
    /// per-user lease claim); past it `limits.on_cap_store_error` applies.
    pub redis_timeout_ms: u64,
    /// Redis deployment: standalone, sentinel or cluster (see `redis`).
    pub redis_mode: redis::RedisMode,
    /// `host:port` of each sentinel (sentinel mode).
    pub redis_sentinels: Vec<String>,
    /// The master the sentinels monitor (sentinel mode).
    pub redis_master_name: String,
    /// `host:port` seeds of the cluster (cluster mode).
    pub redis_cluster_nodes: Vec<String>,
    /// PEM roots a `rediss://` server's certificate is verified against
    /// (empty: the system's roots).
    pub redis_ca_file: PathBuf,
}

pub const DEFAULT_LEASE_TTL_MS: u64 = 30_000;
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 200;

impl Default for Revocation {
    fn default() -> Self {
        Revocation {
            backend: RevocationBackend::File,
            path: DEFAULT_REVOCATION_PATH.into(),
            redis_url: DEFAULT_REDIS_URL.into(),
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
            redis_timeout_ms: DEFAULT_REDIS_TIMEOUT_MS,
            redis_mode: redis::DEFAULT_REDIS_MODE,
            redis_sentinels: Vec::new(),
            redis_master_name: String::new(),
            redis_cluster_nodes: Vec::new(),
            redis_ca_file: PathBuf::new(),
        }
    }
}

#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// When set, `/admin/*` requires `Authorization: Bearer <token>`.
    pub token: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub level: String,
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Log { level: "info".into(), format: LogFormat::Text }
    }
}

/// What `Debug` prints for a secret: whether one is set, never its value
/// (a `{:?}` of the configuration ends up in logs and panics).
fn secret(s: &str) -> &'static str {
    if s.is_empty() {
        "\"\""
    } else {
        "\"<redacted>\""
    }
}

/// A URL's password replaced, for `Debug`.
fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}<redacted>@{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Prints a `&'static str` as is (no quotes added) in a `Debug` struct.
struct Raw<'a>(&'a str);

impl std::fmt::Debug for Raw<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("algorithms", &self.algorithms)
            .field("hmac_secret", &Raw(secret(&self.hmac_secret)))
            .field("hmac_secret_file", &self.hmac_secret_file)
            .field("public_key_file", &self.public_key_file)
            .field("private_key_file", &self.private_key_file)
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_s", &self.leeway_s)
            .field("max_token_ttl_s", &self.max_token_ttl_s)
            .field("carriers", &self.carriers)
            .field("cookie_name", &self.cookie_name)
            .field("allowed_origins", &self.allowed_origins)
            .field("cache_capacity", &self.cache_capacity)
            .field("login", &self.login)
            .field("jwks_url", &self.jwks_url)
            .field("oidc_issuer", &self.oidc_issuer)
            .field("jwks_refresh_s", &self.jwks_refresh_s)
            .field("jwks_timeout_ms", &self.jwks_timeout_ms)
            .field("jwks_ca_file", &self.jwks_ca_file)
            .field("issuers", &self.issuers)
            .finish()
    }
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("token", &Raw(secret(&self.token))).finish()
    }
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("redis_url", &redacted_url(&self.redis_url))
            .field("lease_ttl_ms", &self.lease_ttl_ms)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("redis_mode", &self.redis_mode)
            .field("redis_sentinels", &self.redis_sentinels)
            .field("redis_master_name", &self.redis_master_name)
            .field("redis_cluster_nodes", &self.redis_cluster_nodes)
            .field("redis_ca_file", &self.redis_ca_file)
            .finish()
    }
}

/// Algorithms the verifier knows; anything else (notably `none`) is refused.
pub const KNOWN_ALGORITHMS: [&str; 12] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
    "EdDSA",
];

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Io { path: path.display().to_string(), msg: e.to_string() })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { key, msg, at } => {
                ConfigError::Parse { key, msg, at: format!("{}, {at}", path.display()) }
            }
            other => other,
        })
    }

    /// Parses and validates TOML text. Errors fit on one line and name the
    /// dotted key, for a wrong type as for a bad value.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config =
            toml::Deserializer::parse(text).map_err(|e| parse_error(text, "", &e)).and_then(|de| {
                serde_path_to_error::deserialize(de)
                    .map_err(|e| parse_error(text, &e.path().to_string(), e.inner()))
            })?;
        // `url = "echo"` written out beside a pool is a contradiction too
        // (validate sees only the value, the default's).
        if sets_key(text, "upstream", "url") && !cfg.upstream.backends.is_empty() {
            return Err(invalid("upstream.backends", "set upstream.url or upstream.backends, not both"));
        }
        if cfg.upstream.proxies() && !sets_key(text, "limits", "max_connections") {
            cfg.limits.max_connections = default_max_connections(true);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let a = &self.auth;
        if self.listen.paths.is_empty() {
            return Err(invalid("listen.paths", "needs at least one path"));
        }
        if let Some(p) = self.listen.paths.iter().find(|p| !p.starts_with('/')) {
            return Err(invalid("listen.paths", format!("{p:?} must start with '/'")));
        }
        if self.listen.backlog == 0 {
            return Err(invalid("listen.backlog", "must be at least 1"));
        }
        if self.listen.proxy_protocol && self.listen.trusted_proxies.is_empty() {
            return Err(invalid(
                "listen.trusted_proxies",
                "proxy_protocol needs at least one trusted proxy CIDR",
            ));
        }
        let cert = !self.listen.tls_cert_file.as_os_str().is_empty();
        let key = !self.listen.tls_key_file.as_os_str().is_empty();
        if cert != key {
            return Err(invalid(
                if cert { "listen.tls_key_file" } else { "listen.tls_cert_file" },
                "TLS needs both tls_cert_file and tls_key_file",
            ));
        }
        use bounds::*;
        within("listen.backlog", u64::from(self.listen.backlog), 1, 65_535)?;
        within("listen.drain_delay_s", self.listen.drain_delay_s, 0, MAX_DRAIN_S)?;
        within("listen.drain_timeout_s", self.listen.drain_timeout_s, 0, MAX_DRAIN_S)?;
        within("listen.upgrade_timeout_s", self.listen.upgrade_timeout_s, 1, MAX_UPGRADE_TIMEOUT_S)?;
        for (key, v) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_handshakes", l.max_handshakes),
            ("limits.per_ip_max_handshakes", l.per_ip_max_handshakes),
            ("limits.per_ip_max_connections", l.per_ip_max_connections),
            ("limits.per_user_max_connections", l.per_user_max_connections),
        ] {
            within(key, v as u64, 1, MAX_COUNT)?;
        }
        rate_within("limits.per_ip_rate", l.per_ip_rate, false)?;
        within("limits.per_ip_burst", u64::from(l.per_ip_burst), 1, MAX_BURST)?;
        within("limits.handshake_timeout_ms", l.handshake_timeout_ms, 1, MAX_MS)?;
        within("limits.handshake_timeout_min_ms", l.handshake_timeout_min_ms, 1, l.handshake_timeout_ms)?;
        within("listen.defer_accept_s", self.listen.defer_accept_s, 0, 3600)?;
        within("limits.max_header_bytes", l.max_header_bytes as u64, 256, MAX_HEADER_BYTES)?;
        within("limits.max_message_bytes", l.max_message_bytes as u64, 1, MAX_MESSAGE_BYTES)?;
        rate_within("limits.per_conn_msgs_per_s", l.per_conn_msgs_per_s, true)?;
        within("limits.max_outbound_bytes", l.max_outbound_bytes as u64, 1, MAX_OUTBOUND_BYTES)?;
        if l.max_outbound_bytes <= l.max_message_bytes {
            return Err(invalid(
                "limits.max_outbound_bytes",
                format!(
                    "must be above limits.max_message_bytes ({} <= {})",
                    l.max_outbound_bytes, l.max_message_bytes
                ),
            ));
        }
        within("limits.write_timeout_ms", l.write_timeout_ms, 1, MAX_MS)?;
        within("limits.max_lifetime_s", l.max_lifetime_s, 0, MAX_LIFETIME_S)?;
        within("heartbeat.ping_interval_ms", self.heartbeat.ping_interval_ms, 1, MAX_MS)?;
        within("heartbeat.pong_timeout_ms", self.heartbeat.pong_timeout_ms, 1, MAX_MS)?;
        within("heartbeat.idle_timeout_ms", self.heartbeat.idle_timeout_ms, 0, MAX_MS)?;
        within("auth.leeway_s", a.leeway_s, 0, MAX_LEEWAY_S)?;
        within("auth.max_token_ttl_s", a.max_token_ttl_s, 1, MAX_LIFETIME_S)?;
        within("auth.cache_capacity", a.cache_capacity, 0, MAX_CACHE)?;
        within("revocation.lease_ttl_ms", self.revocation.lease_ttl_ms, 100, MAX_MS)?;
        if a.algorithms.is_empty() {
            return Err(invalid("auth.algorithms", "needs at least one algorithm"));
        }
        for alg in &a.algorithms {
            if alg.eq_ignore_ascii_case("none") {
                return Err(invalid("auth.algorithms", "\"none\" is never allowed"));
            }
            if !KNOWN_ALGORITHMS.contains(&alg.as_str()) {
                return Err(invalid(
                    "auth.algorithms",
                    format!("unknown algorithm {alg:?} (known: {})", KNOWN_ALGORITHMS.join(", ")),
                ));
            }
        }
        let has_secret = !a.hmac_secret.is_empty() || !a.hmac_secret_file.as_os_str().is_empty();
        if !a.hmac_secret.is_empty() && !a.hmac_secret_file.as_os_str().is_empty() {
            return Err(invalid("auth.hmac_secret", "set hmac_secret or hmac_secret_file, not both"));
        }
        // With `[[auth.issuers]]` alone, the top level verifies nothing.
        let top_level = !jwks::top_level_off(a);
        if top_level && a.algorithms.iter().any(|alg| alg.starts_with("HS")) && !has_secret {
            return Err(invalid(
                "auth.hmac_secret",
                "an HS algorithm is allowed but no secret is set (hmac_secret or hmac_secret_file)",
            ));
        }
        let asym = a.algorithms.iter().any(|alg| !alg.starts_with("HS"));
        if top_level
            && asym
            && a.public_key_file.as_os_str().is_empty()
            && a.jwks_file.as_os_str().is_empty()
            && !jwks::top_level_fetches(a)
        {
            return Err(invalid(
                "auth.public_key_file",
                "an asymmetric algorithm is allowed but none of public_key_file, jwks_file, \
                 jwks_url or oidc_issuer is set",
            ));
        }
        jwks::validate(a)?;
        if a.carriers.is_empty() {
            return Err(invalid("auth.carriers", "needs at least one carrier"));
        }
        if a.carriers.contains(&Carrier::Cookie) && a.allowed_origins.is_empty() {
            return Err(invalid(
                "auth.allowed_origins",
                "the cookie carrier needs an Origin allow-list (cross-site WebSocket hijacking)",
            ));
        }
        if a.cookie_name.is_empty() {
            return Err(invalid("auth.cookie_name", "must not be empty"));
        }
        if a.login.enabled {
            if a.login.users_file.as_os_str().is_empty() {
                return Err(invalid("auth.login.users_file", "required when login is enabled"));
            }
            if a.login.token_ttl_s == 0 || a.login.token_ttl_s > a.max_token_ttl_s {
                return Err(invalid("auth.login.token_ttl_s", "must be between 1 and auth.max_token_ttl_s"));
            }
            rate_within("auth.login.per_ip_rate", a.login.per_ip_rate, false)?;
            within("auth.login.per_ip_burst", u64::from(a.login.per_ip_burst), 1, MAX_BURST)?;
        }
        upstream::validate(&self.upstream)?;
        redis::validate(&self.revocation)?;
        if self.revocation.path.as_os_str().is_empty() {
            return Err(invalid("revocation.path", "must not be empty"));
        }
        if self.revocation.redis_timeout_ms == 0 || self.revocation.redis_timeout_ms > 10_000 {
            return Err(invalid("revocation.redis_timeout_ms", "must be between 1 and 10000"));
        }
        self.ban.validate()?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid("log.level", format!("{:?} is not a log level", self.log.level)));
        }
        Ok(())
    }
}

/// The default `limits.max_connections`: what the open-file soft limit
/// allows (`fdlimit`), at most [`DEFAULT_MAX_CONNECTIONS`].
pub fn default_max_connections(proxy: bool) -> usize {
    let fit = crate::fdlimit::soft_limit()
        .map_or(DEFAULT_MAX_CONNECTIONS, |limit| crate::fdlimit::connections_for(limit, proxy));
    fit.clamp(1, DEFAULT_MAX_CONNECTIONS)
}

/// Does the TOML `text` set `table.key`? (Only called on text that parsed.)
fn sets_key(text: &str, table: &str, key: &str) -> bool {
    text.parse::<toml::Table>().ok().and_then(|t| t.get(table)?.as_table()?.get(key).map(|_| ())).is_some()
}

/// A deserialization error as an operator reads it: the dotted key, what
/// was expected in words (not Rust type names), what was found, the line.
fn parse_error(text: &str, path: &str, e: &toml::de::Error) -> ConfigError {
    let at = match e.span() {
        Some(span) => format!("line {}", text[..span.start.min(text.len())].matches('\n').count() + 1),
        None => "config".into(),
    };
    let raw = e.message().trim().replace('\n', " ");
    // serde_path_to_error renders the root as ".".
    let mut key = if path == "." { String::new() } else { path.to_string() };
    let msg = if let Some(rest) = raw.strip_prefix("unknown field ") {
        let (name, known) = rest.split_once(", expected ").unwrap_or((rest, ""));
        let name = name.trim_matches('`');
        // The path may stop at the table; the unknown name is in the message.
        if !key.ends_with(name) {
            key = if key.is_empty() { name.to_string() } else { format!("{key}.{name}") };
        }
        if known.is_empty() {
            "unknown key".to_string()
        } else {
            format!("unknown key, expected {known}")
        }
    } else if let Some(rest) = raw.strip_prefix("unknown variant ") {
        let (got, known) = rest.split_once(", expected ").unwrap_or((rest, ""));
        format!("expected {}, got {}", known.replace('`', "\""), got.replace('`', "\""))
    } else if let Some((got, expected)) = raw
        .strip_prefix("invalid type: ")
        .or_else(|| raw.strip_prefix("invalid value: "))
        .and_then(|r| r.rsplit_once(", expected "))
    {
        format!("expected {}, got {}", in_words(expected), found(got))
    } else {
        // A value its type refused in its own words ("invalid IP address syntax").
        raw
    };
    ConfigError::Parse { key, msg, at }
}

/// serde's "expected" in an operator's words.
fn in_words(expected: &str) -> String {
    let words = match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a non-negative integer",
        "isize" | "i64" | "i32" | "i16" | "i8" => "an integer",
        "f64" | "f32" => "a number",
        "a boolean" => "true or false",
        "socket address" => "an address such as \"127.0.0.1:8080\"",
        "IP network" | "IP network string" => "a CIDR such as \"10.0.0.0/24\"",
        "a sequence" => "a list [...]",
        "a string" => "a string in quotes",
        e if e.starts_with("struct ") || e.starts_with("a map") => "a table",
        e => return e.replace('`', "\""),
    };
    words.to_string()
}

/// serde's "unexpected" part (`string "abc"`, `integer `5``) as the value.
fn found(got: &str) -> String {
    for prefix in ["string ", "integer ", "floating point ", "boolean ", "unsigned integer "] {
        if let Some(v) = got.strip_prefix(prefix) {
            return v.trim_matches('`').to_string();
        }
    }
    match got {
        "sequence" => "a list".into(),
        "map" => "a table".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_need_a_secret_for_hs256() {
        assert!(err("").starts_with("auth.hmac_secret"));
        let cfg = Config::parse("[auth]\nhmac_secret = \"s\"\n").unwrap();
        assert_eq!(cfg.limits.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(cfg.listen.paths, vec!["/".to_string()]);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("[limits]\nmax_conections = 3\n");
        assert!(e.contains("max_conections"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn type_errors_name_the_dotted_key_in_words() {
        for (text, want) in [
            (
                "[limits]\nmax_connections = \"abc\"\n",
                "limits.max_connections: expected a non-negative integer, got \"abc\" (line 2)",
            ),
            (
                "[listen]\npublic = 18080\n",
                "listen.public: expected an address such as \"127.0.0.1:8080\", got 18080 (line 2)",
            ),
            (
                "[limits]\non_user_cap = \"kill\"\n",
                "limits.on_user_cap: expected \"reject\" or \"evict_oldest\", got \"kill\" (line 2)",
            ),
            (
                "[heartbeat]\nping_interval_ms = -1\n",
                "heartbeat.ping_interval_ms: expected a non-negative integer, got -1 (line 2)",
            ),
            (
                "[auth.login]\nenabled = \"yes\"\n",
                "auth.login.enabled: expected true or false, got \"yes\" (line 2)",
            ),
            (
                "[listen]\ntrusted_proxies = \"10.0.0.0/8\"\n",
                "listen.trusted_proxies: expected a list [...], got \"10.0.0.0/8\" (line 2)",
            ),
            ("limits = 5\n", "limits: expected a table, got 5 (line 1)"),
        ] {
            let e = err(text);
            assert_eq!(e, want);
            assert!(!e.contains("usize") && !e.contains("u64"), "{e}");
        }
        let e = err("[limits]\nmax_conections = 3\n");
        assert!(
            e.starts_with("limits.max_conections: unknown key, expected one of `max_connections`"),
            "{e}"
        );
        assert!(err("[limits\n").starts_with("line 1: "), "a syntax error names its line");
    }

    #[test]
    fn the_default_cap_follows_the_mode_unless_set() {
        let s = "[auth]\nhmac_secret = \"s\"\n";
        let echo = Config::parse(s).unwrap().limits.max_connections;
        assert_eq!(echo, default_max_connections(false));
        let proxy = Config::parse(&format!("{s}[upstream]\nurl = \"ws://127.0.0.1:9/\"\n")).unwrap();
        assert_eq!(proxy.limits.max_connections, default_max_connections(true));
        let set = format!("{s}[upstream]\nurl = \"ws://127.0.0.1:9/\"\n[limits]\nmax_connections = 7\n");
        assert_eq!(Config::parse(&set).unwrap().limits.max_connections, 7);
    }

    #[test]
    fn refusals_name_their_key() {
        let s = "[auth]\nhmac_secret = \"s\"\n";
        assert!(err(&format!("{s}algorithms = [\"none\"]\n")).starts_with("auth.algorithms"));
        assert!(err("[auth]\nalgorithms = [\"HS256\"]\n").starts_with("auth.hmac_secret"));
        assert!(err(&format!("{s}carriers = [\"cookie\"]\n")).starts_with("auth.allowed_origins"));
        assert!(err(&format!("{s}[limits]\nmax_outbound_bytes = 10\nmax_message_bytes = 10\n"))
            .starts_with("limits.max_outbound_bytes"));
        assert!(err(&format!("{s}[upstream]\nurl = \"http://x\"\n")).starts_with("upstream.url"));
        assert!(err("[auth]\nalgorithms = [\"ES256\"]\n").starts_with("auth.public_key_file"));
    }

    #[test]
    fn debug_never_prints_a_secret() {
        let cfg = Config::parse(
            "[auth]\nhmac_secret = \"hmac-s3cret\"\n[admin]\ntoken = \"adm1n-s3cret\"\n\
             [revocation]\nbackend = \"redis\"\nredis_url = \"redis://u:redis-s3cret@h:6379/0\"\n",
        )
        .unwrap();
        let text = format!("{cfg:?} {cfg:#?}");
        for s in ["hmac-s3cret", "adm1n-s3cret", "redis-s3cret"] {
            assert!(!text.contains(s), "{s} printed: {text}");
        }
        assert!(text.contains("hmac_secret: \"<redacted>\""), "{text}");
        assert!(
            text.contains("redis://u:<redacted>@h:6379/0") || text.contains("redis://<redacted>@h:6379/0"),
            "{text}"
        );
        assert!(format!("{:?}", Config::default()).contains("token: \"\""));
    }
}
