//! Every metric name, its HELP text, its buckets and its label values.
//!
//! Each gateway owns a [`Metrics`]: a Prometheus recorder that is *not*
//! installed globally, so two gateways in one process (tests, embedding)
//! never mix their counts. Every series is registered up front, which both
//! exports every label value at 0 from start (dashboards see it before it
//! first happens) and leaves the hot path an atomic add on a held handle.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::reject::{CloseReason, Reject};

pub const CONNECTIONS: &str = "portcullis_connections";
pub const HANDSHAKES_TOTAL: &str = "portcullis_handshakes_total";
pub const HANDSHAKE_DURATION: &str = "portcullis_handshake_duration_seconds";
pub const DISCONNECTS_TOTAL: &str = "portcullis_disconnects_total";
pub const CONNECTION_DURATION: &str = "portcullis_connection_duration_seconds";
pub const AUTH_CACHE_TOTAL: &str = "portcullis_auth_cache_total";
pub const TOKEN_VERIFY_DURATION: &str = "portcullis_token_verify_duration_seconds";
pub const REVOCATIONS: &str = "portcullis_revocations";
pub const USERS_CONNECTED: &str = "portcullis_users_connected";
pub const MESSAGES_TOTAL: &str = "portcullis_messages_total";
pub const BYTES_TOTAL: &str = "portcullis_bytes_total";
pub const LOGINS_TOTAL: &str = "portcullis_logins_total";
pub const CONFIG_RELOADS_TOTAL: &str = "portcullis_config_reloads_total";
pub const UPGRADES_TOTAL: &str = "portcullis_upgrades_total";
pub const STORE_UP: &str = "portcullis_store_up";
pub const STORE_ERRORS_TOTAL: &str = "portcullis_store_errors_total";
pub const HANDSHAKE_PRESSURE: &str = "portcullis_handshake_pressure";
pub const HANDSHAKE_DEADLINE: &str = "portcullis_handshake_deadline_seconds";
pub const FD_EXHAUSTED_TOTAL: &str = "portcullis_fd_exhausted_total";
pub const BANS: &str = "portcullis_bans";
pub const BANS_TOTAL: &str = "portcullis_bans_total";
pub const BAN_DRY_RUN_TOTAL: &str = "portcullis_ban_dry_run_total";
pub const JWKS_FETCHES_TOTAL: &str = "portcullis_jwks_fetches_total";
pub const JWKS_KEYS: &str = "portcullis_jwks_keys";
pub const JWKS_AGE: &str = "portcullis_jwks_age_seconds";
pub const BACKEND_UP: &str = "portcullis_backend_up";
pub const BACKEND_CONNECTIONS: &str = "portcullis_backend_connections";
pub const BACKEND_CONNECT_ERRORS_TOTAL: &str = "portcullis_backend_connect_errors_total";

/// Every `portcullis_*` name above: the reference documentation is checked
/// against this list (`tests/reference.rs`).
pub const NAMES: &[&str] = &[
    CONNECTIONS,
    HANDSHAKES_TOTAL,
    HANDSHAKE_DURATION,
    DISCONNECTS_TOTAL,
    CONNECTION_DURATION,
    AUTH_CACHE_TOTAL,
    TOKEN_VERIFY_DURATION,
    REVOCATIONS,
    USERS_CONNECTED,
    MESSAGES_TOTAL,
    BYTES_TOTAL,
    LOGINS_TOTAL,
    CONFIG_RELOADS_TOTAL,
    STORE_UP,
    STORE_ERRORS_TOTAL,
    HANDSHAKE_PRESSURE,
    HANDSHAKE_DEADLINE,
    FD_EXHAUSTED_TOTAL,
    BANS,
    BANS_TOTAL,
    BAN_DRY_RUN_TOTAL,
    JWKS_FETCHES_TOTAL,
    JWKS_KEYS,
    JWKS_AGE,
    BACKEND_UP,
    BACKEND_CONNECTIONS,
    BACKEND_CONNECT_ERRORS_TOTAL,
];

/// Handshake latency: from accept to the verdict; sub-millisecond refusals
/// up to a full slowloris deadline.
const HANDSHAKE_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Signature verification: µs (HS256) to ms (RSA under load).
const VERIFY_BUCKETS: [f64; 12] =
    [0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05];
/// Connection lifetimes: a second to a day.
const CONNECTION_BUCKETS: [f64; 12] =
    [1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0, 86400.0];

/// Which way a relayed message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

impl Direction {
    pub const fn label(self) -> &'static str {
        match self {
            Direction::ClientToUpstream => "client_to_upstream",
            Direction::UpstreamToClient => "upstream_to_client",
        }
    }
}

/// What `portcullis_bans_total` counts a ban under: why it started here,
/// or that another instance of the fleet started it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanStarted {
    Strikes,
    Manual,
    Fleet,
}

impl BanStarted {
    pub const ALL: [BanStarted; 3] = [BanStarted::Strikes, BanStarted::Manual, BanStarted::Fleet];

    pub const fn label(self) -> &'static str {
        match self {
            BanStarted::Strikes => "strikes",
            BanStarted::Manual => "manual",
            BanStarted::Fleet => "fleet",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    Ok,
    BadCredentials,
    RateLimited,
}

/// The result of one request to an identity provider (JWKS or discovery).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwksFetch {
    Ok,
    NotModified,
    Error,
}

impl JwksFetch {
    pub const ALL: [JwksFetch; 3] = [JwksFetch::Ok, JwksFetch::NotModified, JwksFetch::Error];
    pub const fn label(self) -> &'static str {
        match self {
            JwksFetch::Ok => "ok",
            JwksFetch::NotModified => "not_modified",
            JwksFetch::Error => "error",
        }
    }
}

/// Operations of a shared store whose failures are counted.
pub const STORE_OPS: [&str; 7] =
    ["revoke", "resync", "subscribe", "lease_claim", "lease_renew", "lease_release", "ban_sync"];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    handshaking: Gauge,
    open: Gauge,
    accepted: Counter,
    rejected: Vec<Counter>,
    /// Accepted, rejected: rendered by [`FixedHistogram`], not the
    /// recorder (see there why).
    handshake_duration: [FixedHistogram; 2],
    disconnects: Vec<Counter>,
    connection_duration: Histogram,
    cache_hit: Counter,
    cache_miss: Counter,
    token_verify: Histogram,
    revocations: Gauge,
    users: Gauge,
    messages: [Counter; 2],
    bytes: [Counter; 2],
    logins: [Counter; 3],
    reload_ok: Counter,
    reload_error: Counter,
    upgrade_ok: Counter,
    upgrade_error: Counter,
    store_up: Gauge,
    store_errors: Vec<Counter>,
    pressure: Gauge,
    deadline: Gauge,
    fd_exhausted: Counter,
    bans: Gauge,
    /// By [`BanStarted`], in its order.
    bans_total: [Counter; 3],
    ban_dry_run: Counter,
    jwks_fetches: Vec<Counter>,
    jwks_keys: Gauge,
    jwks_age: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(TOKEN_VERIFY_DURATION.into()), &VERIFY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(CONNECTION_DURATION.into()), &CONNECTION_BUCKETS)
            })
            // Only fails on an empty bucket list; ours are constants.
            .expect("constant, non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        let r = &recorder;

        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            // The recorder keeps one description per name whatever its kind.
            r.describe_counter(name.into(), unit, help.into());
        };
        describe(CONNECTIONS, None, "Sockets held, by state: handshaking (before the 101) or open.");
        describe(HANDSHAKES_TOTAL, None, "Handshakes by outcome and reason (ok when accepted).");
        describe(DISCONNECTS_TOTAL, None, "Upgraded connections ended, by reason.");
        describe(CONNECTION_DURATION, None, "Seconds an upgraded connection lived.");
        describe(AUTH_CACHE_TOTAL, None, "Verified-claims cache lookups by result.");
        describe(TOKEN_VERIFY_DURATION, None, "Seconds spent verifying a token signature (cache misses).");
        describe(REVOCATIONS, None, "Revocations currently held (jti and subject).");
        describe(USERS_CONNECTED, None, "Distinct subjects with at least one open connection.");
        describe(MESSAGES_TOTAL, None, "WebSocket data messages relayed, by direction.");
        describe(BYTES_TOTAL, None, "Payload bytes of relayed data messages, by direction.");
        describe(LOGINS_TOTAL, None, "POST /login attempts by outcome.");
        describe(CONFIG_RELOADS_TOTAL, None, "SIGHUP configuration reloads by result.");
        describe(
            UPGRADES_TOTAL,
            None,
            "Binary upgrades (SIGUSR2, POST /admin/upgrade) by result; the new process counts the one that started it.",
        );
        describe(STORE_UP, None, "1 while the shared store (Redis) is connected, 0 when not.");
        describe(STORE_ERRORS_TOTAL, None, "Shared store operations that failed, by operation.");
        describe(HANDSHAKE_PRESSURE, None, "Handshake slots in use over limits.max_handshakes (0 to 1).");
        describe(
            HANDSHAKE_DEADLINE,
            None,
            "Seconds an incomplete request head is given now (shrinks under pressure).",
        );
        describe(
            FD_EXHAUSTED_TOTAL,
            None,
            "Sockets accepted and closed through the reserve descriptor at EMFILE.",
        );

        describe(BANS, None, "Addresses (or ranges) banned now.");
        describe(BANS_TOTAL, None, "Bans started, by reason: strikes, manual, or learned from the fleet.");
        describe(
            BAN_DRY_RUN_TOTAL,
            None,
            "Bans that strikes would have started, with ban.dry_run set (nothing refused).",
        );
        describe(
            JWKS_FETCHES_TOTAL,
            None,
            "Key fetches from identity providers (one per JWKS request, or a discovery that left none to make), by result.",
        );
        describe(JWKS_KEYS, None, "Usable verification keys fetched from identity providers.");
        describe(
            JWKS_AGE,
            None,
            "Seconds since the last successful key fetch, the oldest over identity providers.",
        );
        describe(BACKEND_UP, None, "1 while a configured backend is healthy, 0 while it is taken out.");
        describe(
            BACKEND_CONNECTIONS,
            None,
            "Live connections (and connects in progress) per configured backend.",
        );
        describe(
            BACKEND_CONNECT_ERRORS_TOTAL,
            None,
            "Failed connects to a backend for a client's handshake (refused, timeout, TLS, not a 101).",
        );

        let process = metrics_process::Collector::default();
        metrics::with_local_recorder(r, || process.describe());

        let meta = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        let key = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>())
        };
        let counter = |name, labels: &[(&'static str, &'static str)]| {
            let c = r.register_counter(&key(name, labels), &meta);
            c.increment(0);
            c
        };
        let gauge = |name, labels: &[(&'static str, &'static str)]| {
            let g = r.register_gauge(&key(name, labels), &meta);
            g.set(0.0);
            g
        };
        let histogram =
            |name, labels: &[(&'static str, &'static str)]| r.register_histogram(&key(name, labels), &meta);

        let dir = |d: Direction| [("direction", d.label())];
        let m = Metrics {
            handshaking: gauge(CONNECTIONS, &[("state", "handshaking")]),
            open: gauge(CONNECTIONS, &[("state", "open")]),
            accepted: counter(HANDSHAKES_TOTAL, &[("outcome", "accepted"), ("reason", "ok")]),
            rejected: Reject::ALL
                .iter()
                .map(|r| counter(HANDSHAKES_TOTAL, &[("outcome", "rejected"), ("reason", r.label())]))
                .collect(),
            handshake_duration: [FixedHistogram::new("accepted"), FixedHistogram::new("rejected")],
            disconnects: CloseReason::ALL
                .iter()
                .map(|c| counter(DISCONNECTS_TOTAL, &[("reason", c.label())]))
                .collect(),
            connection_duration: histogram(CONNECTION_DURATION, &[]),
            cache_hit: counter(AUTH_CACHE_TOTAL, &[("result", "hit")]),
            cache_miss: counter(AUTH_CACHE_TOTAL, &[("result", "miss")]),
            token_verify: histogram(TOKEN_VERIFY_DURATION, &[]),
            revocations: gauge(REVOCATIONS, &[]),
            users: gauge(USERS_CONNECTED, &[]),
            messages: [
                counter(MESSAGES_TOTAL, &dir(Direction::ClientToUpstream)),
                counter(MESSAGES_TOTAL, &dir(Direction::UpstreamToClient)),
            ],
            bytes: [
                counter(BYTES_TOTAL, &dir(Direction::ClientToUpstream)),
                counter(BYTES_TOTAL, &dir(Direction::UpstreamToClient)),
            ],
            logins: [
                counter(LOGINS_TOTAL, &[("outcome", "ok")]),
                counter(LOGINS_TOTAL, &[("outcome", "bad_credentials")]),
                counter(LOGINS_TOTAL, &[("outcome", "rate_limited")]),
            ],
            reload_ok: counter(CONFIG_RELOADS_TOTAL, &[("result", "ok")]),
            reload_error: counter(CONFIG_RELOADS_TOTAL, &[("result", "error")]),
            upgrade_ok: counter(UPGRADES_TOTAL, &[("result", "ok")]),
            upgrade_error: counter(UPGRADES_TOTAL, &[("result", "error")]),
            store_up: gauge(STORE_UP, &[]),
            store_errors: STORE_OPS.iter().map(|op| counter(STORE_ERRORS_TOTAL, &[("op", op)])).collect(),
            pressure: gauge(HANDSHAKE_PRESSURE, &[]),
            deadline: gauge(HANDSHAKE_DEADLINE, &[]),
            fd_exhausted: counter(FD_EXHAUSTED_TOTAL, &[]),
            bans: gauge(BANS, &[]),
            bans_total: BanStarted::ALL.map(|c| counter(BANS_TOTAL, &[("reason", c.label())])),
            ban_dry_run: counter(BAN_DRY_RUN_TOTAL, &[]),
            jwks_fetches: JwksFetch::ALL
                .iter()
                .map(|r| counter(JWKS_FETCHES_TOTAL, &[("result", r.label())]))
                .collect(),
            jwks_keys: gauge(JWKS_KEYS, &[]),
            jwks_age: gauge(JWKS_AGE, &[]),
            process,
            handle,
            recorder,
        };
        m
    }

    /// The Prometheus text exposition, process metrics refreshed first.
    pub fn render(&self) -> String {
        metrics::with_local_recorder(&self.recorder, || self.process.collect());
        let mut text = self.handle.render();
        let _ = writeln!(text, "# HELP {HANDSHAKE_DURATION} {HANDSHAKE_DURATION_HELP}");
        let _ = writeln!(text, "# TYPE {HANDSHAKE_DURATION} histogram");
        for h in &self.handshake_duration {
            h.render(&mut text);
        }
        text
    }

    /// Moves the recorder's queued histogram samples into their buckets.
    /// A scrape does it too; without one (no Prometheus attached) the
    /// queues would grow with every sample, so housekeeping calls this.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Handshake-slot occupancy and the deadline it implies, set together.
    pub fn set_handshake_pressure(&self, pressure: f64, deadline: Duration) {
        self.pressure.set(pressure);
        self.deadline.set(deadline.as_secs_f64());
    }

    pub fn jwks_fetch(&self, result: JwksFetch) {
        self.jwks_fetches[result as usize].increment(1);
    }

    /// Fetched keys in force and the age of the oldest set (0 without any
    /// identity provider).
    pub fn set_jwks(&self, keys: usize, age: Duration) {
        self.jwks_keys.set(keys as f64);
        self.jwks_age.set(age.as_secs_f64().floor());
    }

    pub fn fd_exhausted(&self) {
        self.fd_exhausted.increment(1);
    }

    pub fn set_bans(&self, n: usize) {
        self.bans.set(n as f64);
    }

    pub fn ban_started(&self, c: BanStarted) {
        self.bans_total[c as usize].increment(1);
    }

    pub fn ban_dry_run(&self) {
        self.ban_dry_run.increment(1);
    }

    pub fn handshaking(&self) -> &Gauge {
        &self.handshaking
    }
    pub fn open(&self) -> &Gauge {
        &self.open
    }

    pub fn handshake_accepted(&self, took: Duration) {
        self.accepted.increment(1);
        self.handshake_duration[0].record(took);
    }

    /// Allocation-free: the refusal fast path records here.
    pub fn handshake_rejected(&self, reason: Reject, took: Duration) {
        self.rejected[reason as usize].increment(1);
        self.handshake_duration[1].record(took);
    }

    pub fn disconnect(&self, reason: CloseReason, lived: Duration) {
        self.disconnects[reason as usize].increment(1);
        self.connection_duration.record(lived.as_secs_f64());
    }

    pub fn auth_cache(&self, hit: bool) {
        if hit { &self.cache_hit } else { &self.cache_miss }.increment(1);
    }

    pub fn token_verify(&self, d: Duration) {
        self.token_verify.record(d.as_secs_f64());
    }

    pub fn set_revocations(&self, n: usize) {
        self.revocations.set(n as f64);
    }

    pub fn set_users_connected(&self, n: usize) {
        self.users.set(n as f64);
    }

    pub fn relayed(&self, d: Direction, bytes: usize) {
        let i = d as usize;
        self.messages[i].increment(1);
        self.bytes[i].increment(bytes as u64);
    }

    pub fn login(&self, outcome: LoginOutcome) {
        self.logins[outcome as usize].increment(1);
    }

    pub fn upgrade(&self, ok: bool) {
        if ok { &self.upgrade_ok } else { &self.upgrade_error }.increment(1);
    }

    pub fn config_reload(&self, ok: bool) {
        if ok { &self.reload_ok } else { &self.reload_error }.increment(1);
    }

    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(if up { 1.0 } else { 0.0 });
    }

    /// The series of one configured backend (`backend` = its URL as
    /// configured: a closed set, registered at start), at 0.
    pub fn backend(&self, url: &str) -> BackendSeries {
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        let key = |name: &'static str| Key::from_parts(name, vec![Label::new("backend", url.to_string())]);
        let s = BackendSeries {
            up: self.recorder.register_gauge(&key(BACKEND_UP), &meta),
            connections: self.recorder.register_gauge(&key(BACKEND_CONNECTIONS), &meta),
            connect_errors: self.recorder.register_counter(&key(BACKEND_CONNECT_ERRORS_TOTAL), &meta),
        };
        s.up.set(0.0);
        s.connections.set(0.0);
        s.connect_errors.increment(0);
        s
    }

    /// `op` must be one of [`STORE_OPS`]; an unknown op is counted as the
    /// first so a typo cannot invent a label value.
    pub fn store_error(&self, op: &str) {
        let i = STORE_OPS.iter().position(|o| *o == op).unwrap_or(0);
        self.store_errors[i].increment(1);
    }
}

/// One backend's series (see [`Metrics::backend`]).
pub struct BackendSeries {
    pub up: Gauge,
    pub connections: Gauge,
    pub connect_errors: Counter,
}

const HANDSHAKE_DURATION_HELP: &str = "Seconds from accept to the handshake's verdict.";

/// A histogram of [`HANDSHAKE_BUCKETS`] kept in atomics and rendered here.
///
/// The recorder's histograms queue every sample in blocks they allocate
/// and free at the next scrape; a handshake verdict is recorded on the
/// refusal fast path, which must not allocate, so this one counts in place.
/// Both outcomes are exported from start, at 0.
struct FixedHistogram {
    outcome: &'static str,
    /// One per bucket, not cumulative; the last is above every bound.
    counts: [AtomicU64; HANDSHAKE_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl FixedHistogram {
    fn new(outcome: &'static str) -> FixedHistogram {
        FixedHistogram {
            outcome,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = HANDSHAKE_BUCKETS.iter().position(|&b| s <= b).unwrap_or(HANDSHAKE_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// The exporter's own format: cumulative buckets, `+Inf`, sum, count.
    fn render(&self, out: &mut String) {
        let (name, outcome) = (HANDSHAKE_DURATION, self.outcome);
        let mut total = 0;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            match HANDSHAKE_BUCKETS.get(i) {
                Some(le) => writeln!(out, "{name}_bucket{{outcome=\"{outcome}\",le=\"{le}\"}} {total}"),
                None => writeln!(out, "{name}_bucket{{outcome=\"{outcome}\",le=\"+Inf\"}} {total}"),
            }
            .unwrap_or(());
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{outcome=\"{outcome}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{outcome=\"{outcome}\"}} {total}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_value_is_exported_at_zero() {
        let m = Metrics::new();
        let text = m.render();
        for r in Reject::ALL {
            let line = format!("{HANDSHAKES_TOTAL}{{outcome=\"rejected\",reason=\"{}\"}} 0", r.label());
            assert!(text.contains(&line), "missing {line}");
        }
        for c in CloseReason::ALL {
            let line = format!("{DISCONNECTS_TOTAL}{{reason=\"{}\"}} 0", c.label());
            assert!(text.contains(&line), "missing {line}");
        }
        for name in [CONNECTIONS, AUTH_CACHE_TOTAL, LOGINS_TOTAL, STORE_UP, STORE_ERRORS_TOTAL] {
            assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}");
        }
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn histograms_have_buckets() {
        let m = Metrics::new();
        m.handshake_accepted(Duration::from_millis(3));
        let text = m.render();
        assert!(
            text.contains(
                "portcullis_handshake_duration_seconds_bucket{outcome=\"accepted\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("quantile="), "summaries rendered: {text}");
    }
}
