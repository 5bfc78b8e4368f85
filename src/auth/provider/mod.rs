//! Keys from an identity provider: a JWKS fetched by URL (`auth.jwks_url`,
//! an `[[auth.issuers]]` entry's `jwks_url`) or found through OpenID
//! Connect discovery (`auth.oidc_issuer`, `oidc = true`).
//!
//! One [`Provider`] per source, each with one background task that does all
//! of its fetching, so there is never more than one request in flight to a
//! provider:
//! - **routine refresh**: at the JWKS's `Cache-Control: max-age`, bounded by
//!   `auth.jwks_refresh_s` and raised to [`MIN_MAX_AGE_S`], revalidated with
//!   `If-None-Match`; the discovery document is re-read on the same
//!   schedule. A handshake never waits for one: it reads the keys in force
//!   (an `ArcSwap`), whatever the task is doing.
//! - **unknown `kid`**: a handshake asks for a refetch
//!   ([`Provider::refetch_unknown_kid`]); at most one is started per
//!   [`UNKNOWN_KID_REFETCH_EVERY`], concurrent askers share it (or the
//!   routine fetch already running), and each waits at most
//!   `auth.jwks_timeout_ms`. Past the window nobody waits: a flood of
//!   made-up `kid`s costs the provider one request per 10 s.
//! - **failures** (unreachable, a status other than 200/304, not a JWKS,
//!   no usable key): the keys in force stay, the failure is counted and
//!   logged once per change of state, and the task retries with jittered
//!   exponential backoff ([`BACKOFF_FIRST`] to [`BACKOFF_MAX`]).
//! - **removal**: a successful fetch replaces the set whole, so a key the
//!   provider dropped stops verifying at once; tokens verified with it
//!   carry its [`KeyRef`] in the verified-token cache and are dropped from
//!   it at their next lookup ([`Provider::holds`]).
//!
//! Providers are shared between configurations through a [`Pool`], so a
//! SIGHUP that leaves a source unchanged keeps its keys and its schedule.

pub mod check;
pub mod http;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use self::http::{Answer, Client};
use super::keys::{jwk_serving_key, ServingKey};
use crate::config::jwks::{discovery_url, url_problem, MIN_MAX_AGE_S};
use crate::config::ConfigError;
use crate::metrics::{JwksFetch, Metrics};

/// At most one refetch for unknown `kid`s per provider in this window.
pub const UNKNOWN_KID_REFETCH_EVERY: Duration = Duration::from_secs(10);
/// First retry after a failed fetch; doubled per failure up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where a provider's keys come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// A JWKS URL.
    Jwks(String),
    /// An OpenID Connect issuer: its discovery document names the JWKS.
    Oidc(String),
}

impl Source {
    /// What log lines and errors call it.
    pub fn name(&self) -> &str {
        match self {
            Source::Jwks(u) | Source::Oidc(u) => u,
        }
    }
}

/// Everything a provider's behaviour depends on: two configurations with
/// the same spec share one provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub source: Source,
    /// The algorithms its keys may serve (the realm's allow-list).
    pub algorithms: Vec<Algorithm>,
    pub ca_file: PathBuf,
    pub timeout: Duration,
    pub refresh: Duration,
}

/// A key of the fetched set, with the identity it keeps while the provider
/// keeps publishing the same key under the same `kid`.
#[derive(Debug)]
pub struct FetchedKey {
    serving: ServingKey,
    /// Unique in the process; the same across fetches for an unchanged key.
    id: u64,
    kid: Option<String>,
    /// The JWK as published, to recognise an unchanged key.
    raw: serde_json::Value,
}

impl FetchedKey {
    pub fn serves(&self, alg: Algorithm) -> Option<&DecodingKey> {
        self.serving.serves(alg)
    }
    pub fn decoding(&self) -> &DecodingKey {
        self.serving.key()
    }
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// Which fetched key verified a token (kept in the verified-token cache):
/// the index of its provider in the authenticator's state, and the key's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRef {
    pub provider: u32,
    pub id: u64,
}

/// One successful fetch's keys, replaced whole by the next.
#[derive(Debug, Default)]
pub struct FetchedKeys {
    by_kid: HashMap<String, Arc<FetchedKey>>,
    anonymous: Vec<Arc<FetchedKey>>,
}

impl FetchedKeys {
    pub fn by_kid(&self, kid: &str) -> Option<&Arc<FetchedKey>> {
        self.by_kid.get(kid)
    }
    /// A key without `kid` serving `alg`, for a token without `kid`.
    pub fn anonymous(&self, alg: Algorithm) -> Option<&Arc<FetchedKey>> {
        self.anonymous.iter().find(|k| k.serves(alg).is_some())
    }
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn all(&self) -> impl Iterator<Item = &Arc<FetchedKey>> {
        self.by_kid.values().chain(&self.anonymous)
    }
    fn holds(&self, id: u64) -> bool {
        self.all().any(|k| k.id == id)
    }
}

static NEXT_KEY_ID: AtomicU64 = AtomicU64::new(1);

/// Parses a JWKS document into usable keys, reusing `previous`'s ids for
/// unchanged keys. Keys it cannot or may not use are skipped (providers
/// routinely publish encryption keys and other curves); a document with no
/// usable key at all is refused, so it never replaces a good set.
/// Symmetric (`oct`) keys are always skipped: a key published at a URL is
/// no secret, and accepting it would let anyone sign tokens.
pub fn parse_jwks(
    body: &[u8],
    allowed: &[Algorithm],
    previous: &FetchedKeys,
) -> Result<(FetchedKeys, usize), String> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut out = FetchedKeys::default();
    let mut skipped = 0;
    for value in raw.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value.clone()) else {
            skipped += 1;
            continue;
        };
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            skipped += 1;
            continue;
        }
        let Ok(serving) = jwk_serving_key(&jwk, allowed) else {
            skipped += 1;
            continue;
        };
        let kid = jwk.common.key_id.clone();
        if kid.as_ref().is_some_and(|k| out.by_kid.contains_key(k)) {
            skipped += 1;
            continue;
        }
        let same = previous.all().find(|k| k.kid == kid && k.raw == value);
        let id = same.map_or_else(|| NEXT_KEY_ID.fetch_add(1, Ordering::Relaxed), |k| k.id);
        let key = Arc::new(FetchedKey { serving, id, kid: kid.clone(), raw: value });
        match kid {
            Some(k) => {
                out.by_kid.insert(k, key);
            }
            None => out.anonymous.push(key),
        }
    }
    if out.is_empty() {
        let names: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        return Err(format!("no usable key for the algorithms {}", names.join(", ")));
    }
    Ok((out, skipped))
}

/// The part of an OpenID Connect discovery document we read.
#[derive(serde::Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// Checks a discovery document against the issuer it was fetched for and
/// returns its `jwks_uri`.
pub fn parse_discovery(body: &[u8], issuer: &str) -> Result<String, String> {
    let d: Discovery =
        serde_json::from_slice(body).map_err(|e| format!("not an OpenID discovery document: {e}"))?;
    // OpenID Connect Discovery 1.0, 4.3: the issuer must be identical.
    if d.issuer != issuer {
        return Err(format!("the document's issuer {:?} is not {issuer:?}", d.issuer));
    }
    if let Some(p) = url_problem(&d.jwks_uri) {
        return Err(format!("jwks_uri: {p}"));
    }
    Ok(d.jwks_uri)
}

/// The hand-off between handshakes asking for a refetch and the task.
#[derive(Default)]
struct Gate {
    /// A fetch is running (or has been asked for): askers wait for it.
    in_flight: bool,
    /// The next fetch was asked for by an unknown `kid`: JWKS only.
    on_demand: bool,
    /// When the last unknown-`kid` refetch was started.
    last_on_demand: Option<Instant>,
}

/// Wakes the task: a refetch is asked for, or the provider is gone.
#[derive(Default)]
struct Signals {
    wake: Notify,
    stop: Notify,
}

/// One source of fetched keys and its background task.
pub struct Provider {
    spec: Spec,
    client: Client,
    metrics: Arc<Metrics>,
    /// The keys in force: what every handshake reads, without waiting.
    keys: ArcSwap<FetchedKeys>,
    gate: Mutex<Gate>,
    /// Bumped after every fetch, whatever its result: askers wait on it.
    done: watch::Sender<u64>,
    signals: Arc<Signals>,
    /// When the provider was created, and when a fetch last succeeded
    /// (200 or 304): `portcullis_jwks_age_seconds`.
    created: Instant,
    last_ok: Mutex<Option<Instant>>,
    started: AtomicBool,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("source", &self.spec.source)
            .field("keys", &self.keys.load().len())
            .finish_non_exhaustive()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        // The task holds only a weak reference; this ends it.
        self.signals.stop.notify_one();
    }
}

/// What the task keeps between fetches (nobody else reads it).
#[derive(Default)]
struct FetchState {
    etag: Option<String>,
    /// Discovered `jwks_uri` (OIDC), kept when a later discovery fails.
    jwks_uri: Option<String>,
    /// Consecutive failed cycles (backoff).
    failures: u32,
    /// The error of the failing state, or `None` while healthy: a line is
    /// logged when this changes, not per attempt.
    failing: Option<String>,
    /// Whether keys were ever installed (the first success is logged).
    ever: bool,
    /// The discovery error while the known `jwks_uri` still serves (logged
    /// once per change, like `failing`).
    discovery_failing: Option<String>,
}

impl Provider {
    /// A provider for `spec`, not fetching yet ([`Provider::start`]).
    /// Fails when the trust roots cannot be read.
    pub fn new(spec: Spec, metrics: Arc<Metrics>) -> Result<Arc<Provider>, ConfigError> {
        let https = match &spec.source {
            Source::Jwks(u) | Source::Oidc(u) => u.starts_with("https://"),
        };
        let client = Client::new(&spec.ca_file, spec.timeout, https)?;
        Ok(Arc::new(Provider {
            spec,
            client,
            metrics,
            keys: ArcSwap::from_pointee(FetchedKeys::default()),
            gate: Mutex::new(Gate::default()),
            done: watch::channel(0).0,
            signals: Arc::new(Signals::default()),
            created: Instant::now(),
            last_ok: Mutex::new(None),
            started: AtomicBool::new(false),
        }))
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Starts the background task (once; no-op outside a Tokio runtime,
    /// where nothing would run it: `check-config`, benches).
    pub fn start(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        rt.spawn(run(Arc::downgrade(self), self.signals.clone()));
    }

    /// The keys in force.
    pub fn keys(&self) -> arc_swap::Guard<Arc<FetchedKeys>> {
        self.keys.load()
    }

    /// Is the key `id` still published (a cached verification still good)?
    pub fn holds(&self, id: u64) -> bool {
        self.keys.load().holds(id)
    }

    /// Seconds since the last successful fetch (since creation before any).
    pub fn age(&self) -> Duration {
        let since = self.last_ok.lock().map(|g| g.unwrap_or(self.created)).unwrap_or(self.created);
        since.elapsed()
    }

    /// A token named a `kid` the keys in force lack: waits (at most
    /// `jwks_timeout_ms`) for a fetch that may bring it, started here unless
    /// one is running or one was started within [`UNKNOWN_KID_REFETCH_EVERY`]
    /// (then nothing is awaited). Returns whether a fetch ended meanwhile.
    pub async fn refetch_unknown_kid(&self) -> bool {
        if !self.started.load(Ordering::Acquire) {
            return false;
        }
        let mut rx = self.done.subscribe();
        let seen = *rx.borrow_and_update();
        let wait = {
            let Ok(mut g) = self.gate.lock() else { return false };
            if g.in_flight {
                true
            } else if g.last_on_demand.is_none_or(|t| t.elapsed() >= UNKNOWN_KID_REFETCH_EVERY) {
                g.last_on_demand = Some(Instant::now());
                g.in_flight = true;
                g.on_demand = true;
                self.signals.wake.notify_one();
                true
            } else {
                false
            }
        };
        if !wait {
            return false;
        }
        tokio::time::timeout(self.spec.timeout, rx.wait_for(|g| *g != seen)).await.is_ok_and(|r| r.is_ok())
    }

    /// Waits until keys are in force, at most `within`; whether they are.
    pub async fn wait_for_keys(&self, within: Duration) -> bool {
        let mut rx = self.done.subscribe();
        let deadline = Instant::now() + within;
        loop {
            if !self.keys.load().is_empty() {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return !self.keys.load().is_empty(),
            }
        }
    }

    /// One fetch now, outside the task (`check-config`): the error, if any.
    pub async fn fetch_once(&self) -> Result<usize, String> {
        let mut st = FetchState::default();
        self.fetch(&mut st, false).await.map(|_| self.keys.load().len())
    }

    /// One cycle: discovery when due, then the JWKS; returns the delay
    /// until the next routine cycle.
    async fn cycle(&self, st: &mut FetchState) -> Duration {
        let on_demand = match self.gate.lock() {
            Ok(mut g) => {
                g.in_flight = true;
                std::mem::take(&mut g.on_demand)
            }
            Err(_) => false,
        };
        let result = self.fetch(st, on_demand).await;
        if let Ok(mut g) = self.gate.lock() {
            g.in_flight = false;
        }
        self.done.send_modify(|g| *g = g.wrapping_add(1));
        match result {
            Ok(max_age) => {
                st.failures = 0;
                if let Some(why) = st.failing.take() {
                    tracing::info!(event = "jwks", source = self.spec.source.name(), was = %why, "identity provider keys fetched again");
                }
                next_refresh(max_age, self.spec.refresh)
            }
            Err(why) => {
                st.failures = st.failures.saturating_add(1);
                if st.failing.as_deref() != Some(why.as_str()) {
                    tracing::warn!(
                        event = "jwks",
                        source = self.spec.source.name(),
                        error = %why,
                        keys = self.keys.load().len(),
                        "identity provider keys not fetched; the keys in force stay"
                    );
                    st.failing = Some(why);
                } else {
                    tracing::debug!(source = self.spec.source.name(), error = %why, "jwks fetch failed again");
                }
                backoff(st.failures).min(self.spec.refresh.max(BACKOFF_FIRST))
            }
        }
    }

    /// Discovery (when due) and the JWKS; on success the `max-age` given.
    async fn fetch(&self, st: &mut FetchState, on_demand: bool) -> Result<Option<u64>, String> {
        let url = match &self.spec.source {
            Source::Jwks(u) => u.clone(),
            Source::Oidc(issuer) => {
                if !on_demand || st.jwks_uri.is_none() {
                    match self.discover(issuer).await {
                        Ok(uri) => {
                            if st.discovery_failing.take().is_some() {
                                tracing::info!(
                                    event = "jwks",
                                    source = issuer.as_str(),
                                    "discovery document read again"
                                );
                            }
                            // A validator is only good for the URL it came from.
                            if st.jwks_uri.as_ref() != Some(&uri) {
                                st.etag = None;
                            }
                            st.jwks_uri = Some(uri);
                        }
                        // A known jwks_uri still serves: logged here, once.
                        Err(e) if st.jwks_uri.is_some() => {
                            if st.discovery_failing.as_deref() != Some(e.as_str()) {
                                tracing::warn!(
                                    event = "jwks",
                                    source = issuer.as_str(),
                                    error = %e,
                                    "discovery document not read; the known jwks_uri is used"
                                );
                                st.discovery_failing = Some(e);
                            }
                        }
                        Err(e) => {
                            // No JWKS to fetch: this attempt failed.
                            self.metrics.jwks_fetch(JwksFetch::Error);
                            return Err(e);
                        }
                    }
                }
                st.jwks_uri.clone().unwrap_or_default()
            }
        };
        let etag = st.etag.as_deref().filter(|_| !self.keys.load().is_empty());
        match self.client.get(&url, etag).await {
            Ok(Answer::NotModified { max_age }) => {
                self.metrics.jwks_fetch(JwksFetch::NotModified);
                self.succeeded();
                Ok(max_age)
            }
            Ok(Answer::Fresh { body, etag, max_age }) => {
                let parsed = parse_jwks(&body, &self.spec.algorithms, &self.keys.load());
                let (keys, skipped) = match parsed {
                    Ok(k) => k,
                    Err(e) => {
                        self.metrics.jwks_fetch(JwksFetch::Error);
                        return Err(format!("{url}: {e}"));
                    }
                };
                self.metrics.jwks_fetch(JwksFetch::Ok);
                self.install(keys, skipped, st);
                st.etag = etag;
                self.succeeded();
                Ok(max_age)
            }
            Err(e) => {
                self.metrics.jwks_fetch(JwksFetch::Error);
                Err(format!("{url}: {e}"))
            }
        }
    }

    async fn discover(&self, issuer: &str) -> Result<String, String> {
        let url = discovery_url(issuer);
        let answer = self.client.get(&url, None).await;
        let parsed = match answer {
            Ok(Answer::Fresh { body, .. }) => parse_discovery(&body, issuer),
            Ok(Answer::NotModified { .. }) => Err("304 to an unconditional request".into()),
            Err(e) => Err(e.to_string()),
        };
        parsed.map_err(|e| format!("{url}: {e}"))
    }

    fn succeeded(&self) {
        if let Ok(mut t) = self.last_ok.lock() {
            *t = Some(Instant::now());
        }
    }

    fn install(&self, keys: FetchedKeys, skipped: usize, st: &mut FetchState) {
        let old = self.keys.load_full();
        let kids = |k: &FetchedKeys| -> Vec<String> {
            let mut v: Vec<String> = k.all().map(|k| k.kid.clone().unwrap_or_default()).collect();
            v.sort();
            v
        };
        let changed = old.len() != keys.len() || keys.all().any(|k| !old.holds(k.id));
        if changed || !st.ever {
            let (before, after) = (kids(&old), kids(&keys));
            let added: Vec<&String> = after.iter().filter(|k| !before.contains(k)).collect();
            let removed: Vec<&String> = before.iter().filter(|k| !after.contains(k)).collect();
            tracing::info!(
                event = "jwks",
                source = self.spec.source.name(),
                keys = keys.len(),
                skipped,
                added = ?added,
                removed = ?removed,
                "identity provider keys installed"
            );
        }
        st.ever = true;
        self.keys.store(Arc::new(keys));
    }
}

/// When to refetch after a success: the provider's `max-age`, raised to
/// [`MIN_MAX_AGE_S`], never later than `jwks_refresh_s` (which wins even
/// below the floor: the operator's explicit choice).
pub fn next_refresh(max_age: Option<u64>, refresh: Duration) -> Duration {
    let floor = Duration::from_secs(MIN_MAX_AGE_S);
    match max_age {
        Some(s) => Duration::from_secs(s).max(floor).min(refresh),
        None => refresh,
    }
}

/// Exponential backoff with ±20 % jitter (so a fleet restarted together
/// does not retry in step).
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let base = exp.min(BACKOFF_MAX);
    base.mul_f64(rand::random_range(0.8..1.2))
}

/// The provider's task: fetch at once, then on schedule or when asked,
/// until the provider is dropped.
async fn run(provider: Weak<Provider>, signals: Arc<Signals>) {
    let mut st = FetchState::default();
    loop {
        let next = match provider.upgrade() {
            Some(p) => p.cycle(&mut st).await,
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = signals.wake.notified() => {}
            _ = signals.stop.notified() => return,
        }
    }
}

/// Providers by spec, shared by the configurations an authenticator goes
/// through (weakly: a provider no configuration uses stops).
#[derive(Default)]
pub struct Pool {
    live: Mutex<Vec<Weak<Provider>>>,
}

impl Pool {
    /// The live provider for `spec`, or a new one (not started).
    pub fn get(&self, spec: Spec, metrics: &Arc<Metrics>) -> Result<Arc<Provider>, ConfigError> {
        let mut live = self.live.lock().map_err(|_| ConfigError::Invalid {
            key: "auth.jwks_url",
            msg: "internal: provider pool poisoned".into(),
        })?;
        live.retain(|w| w.strong_count() > 0);
        if let Some(p) = live.iter().filter_map(Weak::upgrade).find(|p| p.spec == spec) {
            return Ok(p);
        }
        let p = Provider::new(spec, metrics.clone())?;
        live.push(Arc::downgrade(&p));
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_bounded_by_floor_and_refresh() {
        let five_min = Duration::from_secs(300);
        assert_eq!(next_refresh(None, five_min), five_min);
        assert_eq!(next_refresh(Some(0), five_min), Duration::from_secs(30));
        assert_eq!(next_refresh(Some(60), five_min), Duration::from_secs(60));
        assert_eq!(next_refresh(Some(86_400), five_min), five_min);
        assert_eq!(next_refresh(Some(0), Duration::from_secs(2)), Duration::from_secs(2));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for (n, lo, hi) in [(1, 0.4, 0.6), (2, 0.8, 1.2), (3, 1.6, 2.4), (40, 24.0, 36.0)] {
            let d = backoff(n).as_secs_f64();
            assert!(d >= lo && d <= hi, "{n}: {d}");
        }
    }

    #[test]
    fn jwks_without_usable_keys_is_refused_and_oct_skipped() {
        let none = FetchedKeys::default();
        let oct = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(parse_jwks(oct, &[Algorithm::HS256], &none).is_err());
        assert!(parse_jwks(b"{}", &[Algorithm::RS256], &none).is_err());
        assert!(parse_jwks(b"<html>", &[Algorithm::RS256], &none).is_err());
    }

    #[test]
    fn discovery_issuer_must_match_exactly() {
        let doc = br#"{"issuer":"https://a.example/","jwks_uri":"https://a.example/k"}"#;
        assert!(parse_discovery(doc, "https://a.example").is_err());
        assert_eq!(parse_discovery(doc, "https://a.example/").unwrap(), "https://a.example/k");
        let plain = br#"{"issuer":"https://a.example","jwks_uri":"http://a.example/k"}"#;
        assert!(parse_discovery(plain, "https://a.example").unwrap_err().contains("http://"));
    }
}
