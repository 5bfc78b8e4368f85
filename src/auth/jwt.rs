//! The JWT authenticator: stage 4 of the pipeline.
//!
//! Order of work, cheapest first, so a bad token costs as little as possible:
//! 1. carrier: the first configured carrier present gives the token;
//! 2. size: over [`MAX_TOKEN_BYTES`] is refused before any parsing;
//! 3. precheck, on the accept path when the head arrived whole
//!    ([`JwtAuthenticator::precheck`]): 5, and for HS256/384/512 the
//!    signature and the `exp` check of 6, synchronously and without
//!    allocating; it refuses only what 4–6 would surely refuse, with the
//!    same reason (no cache lookup: a refused token is never cached), and
//!    leaves everything else, valid tokens first, to them;
//! 4. cache: a hit skips 5–7 (the SHA-256 of the token is the key), unless
//!    the fetched key that verified it has since been removed;
//! 5. realm and header: the unverified `iss` picks the realm (an
//!    `[[auth.issuers]]` entry or the top level, `realm.rs`); `alg` must be
//!    allowed there and one of its keys must serve it (with `kid`), else
//!    refused without verifying any signature; a `kid` the fetched keys lack
//!    waits, bounded, for one shared refetch (`provider/`);
//! 6. signature and registered claims, by `jsonwebtoken` with one
//!    `Validation` per algorithm family (`exp` and `nbf` always, leeway
//!    from config, `iss` / `aud` only when configured — `validate_aud` is
//!    off otherwise, so a token's `aud` is ignored);
//! 7. our own claim rules: `sub` a non-empty string, `iat` numeric and not in
//!    the future, lifetime within `auth.max_token_ttl_s`, forwarded claims
//!    safe as header values;
//! 8. revocation, on every handshake, cache hit or not.
//!
//! Keys, validation rules and the cache live together in one [`ArcSwap`]ed
//! state, so a SIGHUP reload swaps them atomically: no handshake ever sees
//! new keys with an old cache (an entry verified under a removed key).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::errors::ErrorKind;
use serde_json::{Map, Value};

use super::cache::{TokenCache, Verified};
use super::provider::{Pool, Provider};
use super::realm::Pick;
use super::state::State;
use super::{carrier, AuthRefusal, Authenticator, Identity};
use crate::clock::unix_now;
use crate::config::{self, ConfigError};
use crate::handshake::{HeadView, RequestHead};
use crate::metrics::Metrics;
use crate::reject::Reject;
use crate::revocation::SharedStore;

/// Tokens longer than this are refused before any parsing: no legitimate
/// JWT is near it, and it bounds the work (base64, JSON) an attacker buys.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

pub use super::state::MAX_LEEWAY_S;

/// Keys and rules loaded by [`JwtAuthenticator::prepare`], not yet in force.
pub struct PreparedAuth(State);

/// A refusal and, when the client may be told, why (the challenge's
/// `error_description`). Signature and key failures are never explained.
#[derive(Debug)]
struct Refused {
    reason: Reject,
    told: Option<&'static str>,
    /// The token's `kid` is unknown to this provider: a refetch may bring
    /// it (the caller asks, then verifies once more).
    refetch: Option<Arc<Provider>>,
}

impl From<Reject> for Refused {
    fn from(reason: Reject) -> Self {
        Refused { reason, told: None, refetch: None }
    }
}

/// Whether the gateway holds keys to verify with (`/readyz` `"keys"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeysStatus {
    /// Every configured source has keys (static keys always do).
    Ok,
    /// Some identity providers have delivered keys, some not yet.
    Partial,
    /// Identity providers are configured and none has delivered keys yet:
    /// not ready.
    None,
}

impl KeysStatus {
    pub const fn label(self) -> &'static str {
        match self {
            KeysStatus::Ok => "ok",
            KeysStatus::Partial => "partial",
            KeysStatus::None => "none",
        }
    }
}

impl From<Refused> for AuthRefusal {
    fn from(r: Refused) -> Self {
        match r.told {
            Some(description) => AuthRefusal::Described { reason: r.reason, description },
            None => AuthRefusal::Reason(r.reason),
        }
    }
}

/// Verifies JWTs (stage 4, authenticate); see the module doc for the order of work.
pub struct JwtAuthenticator {
    /// Keys, rules and cache; replaced whole by [`JwtAuthenticator::reload`].
    state: ArcSwap<State>,
    /// Identity providers by source, shared by successive states so a
    /// reload that keeps a source keeps its keys and schedule.
    pool: Pool,
    /// Revocations, consulted on every handshake (not part of the reloadable
    /// state: revocations outlive key rotations).
    store: SharedStore,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state.load();
        f.debug_struct("JwtAuthenticator")
            .field("algorithms", &st.allowed)
            .field("keys", &st.key_count())
            .field("cache", &st.cache)
            .finish()
    }
}

/// A JSON number as whole unix seconds (`jsonwebtoken` accepts floats too).
fn seconds(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64().filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64).map(|f| f.round() as u64)
    })
}

/// A claim as a header value: strings raw, numbers and booleans as text,
/// anything else as JSON.
fn claim_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

impl JwtAuthenticator {
    /// Loads keys and rules from `cfg`. `claim_headers` is
    /// `upstream.claim_headers` (claim name → upstream header name).
    pub fn new(
        cfg: &config::Auth,
        claim_headers: &BTreeMap<String, String>,
        store: SharedStore,
        metrics: Arc<Metrics>,
    ) -> Result<JwtAuthenticator, ConfigError> {
        let pool = Pool::default();
        let state = State::build(cfg, claim_headers, &pool, &metrics)?;
        state.providers.iter().for_each(Provider::start);
        Ok(JwtAuthenticator { state: ArcSwap::from_pointee(state), pool, store, metrics })
    }

    /// Replaces keys (PEM, JWKS, secret), validation rules, carriers and
    /// claim headers atomically, with an empty cache. On error nothing
    /// changes and the old configuration keeps serving.
    pub fn reload(
        &self,
        cfg: &config::Auth,
        claim_headers: &BTreeMap<String, String>,
    ) -> Result<(), ConfigError> {
        let prepared = self.prepare_reload(cfg, claim_headers)?;
        self.install(prepared);
        Ok(())
    }

    /// The fallible half of [`reload`](Self::reload): loads keys and rules
    /// without touching the state in force, so a reload can prepare every
    /// part before it swaps any.
    pub fn prepare(
        cfg: &config::Auth,
        claim_headers: &BTreeMap<String, String>,
    ) -> Result<PreparedAuth, ConfigError> {
        let metrics = Arc::new(Metrics::new());
        Ok(PreparedAuth(State::build(cfg, claim_headers, &Pool::default(), &metrics)?))
    }

    /// As [`prepare`](Self::prepare), for this authenticator: identity
    /// providers whose source is unchanged are kept (with their keys), new
    /// ones start fetching when installed.
    pub fn prepare_reload(
        &self,
        cfg: &config::Auth,
        claim_headers: &BTreeMap<String, String>,
    ) -> Result<PreparedAuth, ConfigError> {
        Ok(PreparedAuth(State::build(cfg, claim_headers, &self.pool, &self.metrics)?))
    }

    /// The infallible half of [`reload`](Self::reload).
    pub fn install(&self, prepared: PreparedAuth) {
        prepared.0.providers.iter().for_each(Provider::start);
        self.state.store(Arc::new(prepared.0));
    }

    /// Waits until every identity provider in force has delivered keys, at
    /// most `within` (start-up: the gateway fetches before it binds).
    /// Whether they all have.
    pub async fn wait_for_keys(&self, within: Duration) -> bool {
        let st = self.state.load_full();
        let waits = st.providers.iter().map(|p| p.wait_for_keys(within));
        futures_util::future::join_all(waits).await.into_iter().all(|ok| ok)
    }

    /// Whether keys are held to verify with (see [`KeysStatus`]).
    pub fn keys_status(&self) -> KeysStatus {
        let st = self.state.load();
        let with_keys = st.providers.iter().filter(|p| !p.keys().is_empty()).count();
        match with_keys {
            n if n == st.providers.len() => KeysStatus::Ok,
            0 => KeysStatus::None,
            _ => KeysStatus::Partial,
        }
    }

    /// Sets `portcullis_jwks_keys` and `portcullis_jwks_age_seconds` from
    /// the providers in force (called before each scrape).
    pub fn publish_key_metrics(&self) {
        let st = self.state.load();
        let keys = st.providers.iter().map(|p| p.keys().len()).sum();
        let age = st.providers.iter().map(|p| p.age()).max().unwrap_or_default();
        self.metrics.set_jwks(keys, age);
    }

    /// Verifies `token` (cache, signature, claims, revocation) as the
    /// handshake does, without a carrier: for tests, benches and embedders
    /// that obtained the token themselves.
    pub async fn verify_token(&self, token: &str) -> Result<Identity, Reject> {
        self.identity(&self.state.load_full(), token).await.map_err(|r| r.reason)
    }

    /// Cache or verification, then revocation (never cached).
    async fn identity(&self, st: &State, token: &str) -> Result<Identity, Refused> {
        let v = self.verified(st, token).await?;
        if self.store.is_revoked(&v.sub, v.jti.as_deref(), v.iat) {
            return Err(Reject::RevokedToken.into());
        }
        Ok(Identity {
            sub: v.sub.clone(),
            expires_at: Some(v.expires_at),
            issued_at: v.iat,
            jti: v.jti.clone(),
            forward: v.forward.clone(),
            carrier: None,
        })
    }

    /// The verified claims of `token`, from the cache or a verification.
    async fn verified(&self, st: &State, token: &str) -> Result<Arc<Verified>, Refused> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(Reject::InvalidToken.into());
        }
        let key = TokenCache::key(token);
        if let Some(v) = st.cache.get(&key).await {
            // Verified with a fetched key the provider has since removed:
            // dropped, and verified afresh (which refuses it).
            let held =
                v.key.is_none_or(|r| st.providers.get(r.provider as usize).is_some_and(|p| p.holds(r.id)));
            if held {
                self.metrics.auth_cache(true);
                return Ok(v);
            }
            st.cache.invalidate(&key).await;
        }
        self.metrics.auth_cache(false);
        let v = match self.verify_with(st, token, false) {
            Err(Refused { refetch: Some(p), .. }) => {
                p.refetch_unknown_kid().await;
                self.verify_with(st, token, true)
            }
            other => other,
        };
        let v = Arc::new(v?);
        st.cache.insert(key, v.clone()).await;
        Ok(v)
    }

    /// Judges `token` synchronously and without a heap allocation, for the
    /// accept path: `Some(refusal)` when the full path ([`verify_token`],
    /// [`Authenticator::authenticate`]) would surely refuse it with exactly
    /// that refusal at this clock second; `None` when this check cannot
    /// tell, which is not a verdict: run the full path.
    ///
    /// Decided here, as `invalid_token`: empty or over [`MAX_TOKEN_BYTES`];
    /// not three base64url segments; a header that is not a JSON object
    /// with an `alg`; an `alg` not in `auth.algorithms`; no key for the
    /// `alg` / `kid`; for HS256/384/512, a wrong signature (then, signature
    /// good, claims that are not base64url). As
    /// `expired_token`: an HMAC-signed token past `exp` + leeway whose
    /// other checks before the expiry one pass. Left to the full path:
    /// valid tokens, asymmetric algorithms once `alg` and key are known
    /// (their signature is the full path's cost anyway), and whatever this
    /// check does not read exactly as `jsonwebtoken` does (escapes, repeated
    /// claims, headers beyond `alg`/`typ`/`kid`/`cty` on a well-signed
    /// token). Never a described refusal: those come after a successful
    /// decode.
    ///
    /// A refusal counts what the full path would have counted: an
    /// `auth_cache` miss (none for the size refusal, which comes before the
    /// cache there too). Not the `token_verify` duration: a Prometheus
    /// histogram sample is pushed into blocks of 64 that the recorder
    /// allocates as they fill and again after each scrape, and this path
    /// must not allocate.
    ///
    /// [`verify_token`]: Self::verify_token
    pub fn precheck(&self, token: &str) -> Option<AuthRefusal> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Some(Reject::InvalidToken.into());
        }
        let (reason, why) = self.state.load().precheck(token)?;
        // A refused token is never in the cache (an expired entry is
        // dropped on lookup): the full path would have missed.
        self.metrics.auth_cache(false);
        tracing::debug!(why, "token refused");
        Some(reason.into())
    }

    /// Verifies `token` without the cache or revocation: the cost of a
    /// cache miss (exposed for the benchmarks).
    pub fn verify_uncached(&self, token: &str) -> Result<Verified, Reject> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(Reject::InvalidToken);
        }
        self.verify_with(&self.state.load(), token, true).map_err(|r| r.reason)
    }

    /// Signature and claims. `after_refetch`: an unknown `kid` is final
    /// (else it is returned as a refusal that asks for a refetch).
    fn verify_with(&self, st: &State, token: &str, after_refetch: bool) -> Result<Verified, Refused> {
        let refuse = |why: &str| {
            tracing::debug!(why, "token refused");
            Refused::from(Reject::InvalidToken)
        };
        // Claim rules a token's issuer can act on: the client is told.
        let told = |why: &'static str| {
            tracing::debug!(why, "token refused");
            Refused { reason: Reject::InvalidToken, told: Some(why), refetch: None }
        };
        // Header only: a few hundred nanoseconds, and enough to refuse a
        // disallowed algorithm (`none` does not even parse) or an unknown
        // `kid` without touching a signature.
        let header = jsonwebtoken::decode_header(token).map_err(|_| refuse("undecodable header"))?;
        // The token's `iss` picks the realm: only its keys and rules apply.
        let realm = st.realms.for_token(token);
        if !realm.allowed.contains(&header.alg) {
            return Err(refuse("algorithm not allowed"));
        }
        let chosen = match realm.pick(header.alg, header.kid.as_deref(), after_refetch) {
            Pick::Key(k) => k,
            Pick::UnknownKid(p) => {
                return Err(Refused { reason: Reject::InvalidToken, told: None, refetch: Some(p.clone()) })
            }
            Pick::None => return Err(refuse("no key for alg/kid")),
        };
        let validation =
            realm.validation(header.alg.family()).ok_or_else(|| refuse("algorithm not allowed"))?;

        let started = tokio::time::Instant::now();
        let decoded = jsonwebtoken::decode::<Map<String, Value>>(token, chosen.key(), validation);
        self.metrics.token_verify(started.elapsed());
        let claims = match decoded {
            Ok(d) => d.claims,
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => {
                return Err(Reject::ExpiredToken.into())
            }
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                return Err(Reject::InvalidToken.into());
            }
        };

        // `jsonwebtoken` required `sub` as a string and `exp` as a number.
        let sub = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(refuse("empty or non-string sub")),
        };
        // `sub` travels upstream as `X-Portcullis-Sub`: a control character
        // would otherwise fail there, after the token was accepted (502).
        if !super::header_value_ok(&sub) {
            return Err(told(super::BAD_SUB));
        }
        let exp = claims.get("exp").and_then(seconds).ok_or_else(|| refuse("bad exp"))?;
        let iat = match claims.get("iat") {
            None => None,
            Some(v) => Some(seconds(v).ok_or_else(|| refuse("bad iat"))?),
        };
        let jti = match claims.get("jti") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(refuse("non-string jti")),
        };
        let now = unix_now();
        // A token "issued in the future" would dodge revocation by subject
        // ("issued before T") and stretch its lifetime; refuse it.
        if iat.is_some_and(|iat| iat > now.saturating_add(st.leeway)) {
            return Err(refuse("iat in the future"));
        }
        let lifetime = exp.saturating_sub(iat.unwrap_or(now));
        if lifetime > st.max_ttl {
            return Err(refuse("lifetime above auth.max_token_ttl_s"));
        }
        let mut forward = Vec::with_capacity(st.claim_headers.len());
        for (claim, header) in &st.claim_headers {
            if let Some(v) = claims.get(claim) {
                let text = claim_text(v);
                // A CR/LF in a claim would inject headers upstream.
                if !super::header_value_ok(&text) {
                    return Err(told(super::BAD_CLAIM));
                }
                forward.push((header.clone(), text));
            }
        }
        Ok(Verified {
            sub,
            exp,
            expires_at: exp.saturating_add(st.leeway),
            iat,
            jti,
            forward,
            key: chosen.key_ref(),
        })
    }
}

#[async_trait::async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, head: &RequestHead, _client: SocketAddr) -> Result<Identity, AuthRefusal> {
        // One snapshot for carriers and keys: a reload mid-handshake never
        // mixes the two.
        let st = self.state.load_full();
        let Some((carrier, token)) = carrier::extract(head, &st.carriers, &st.cookie_name) else {
            return Err(Reject::MissingToken.into());
        };
        let mut id = self.identity(&st, &token).await.map_err(AuthRefusal::from)?;
        id.carrier = Some(carrier);
        Ok(id)
    }

    fn refuse_early(&self, head: &HeadView<'_>) -> Option<AuthRefusal> {
        let st = self.state.load();
        match carrier::extract(head, &st.carriers, &st.cookie_name) {
            None => Some(Reject::MissingToken.into()),
            Some((_, token)) => self.precheck(&token),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::tests::{fixture, jwk};
    use crate::auth::precheck;
    use crate::config::Carrier;
    use crate::revocation::{Revocation, RevocationSet, RevocationStore, StoreError};
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{Algorithm, AlgorithmFamily};
    use jsonwebtoken::{EncodingKey, Header};
    use proptest::prelude::*;
    use serde_json::json;
    use tokio::sync::broadcast;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// An in-memory store for tests.
    struct MemStore(RevocationSet, broadcast::Sender<Revocation>);

    #[async_trait::async_trait]
    impl RevocationStore for MemStore {
        fn is_revoked(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool {
            self.0.is_revoked(sub, jti, iat)
        }
        async fn revoke(&self, r: Revocation) -> Result<(), StoreError> {
            self.0.insert(&r, unix_now());
            Ok(())
        }
        fn len(&self) -> usize {
            self.0.len()
        }
        fn subscribe(&self) -> broadcast::Receiver<Revocation> {
            self.1.subscribe()
        }
    }

    fn store() -> Arc<MemStore> {
        Arc::new(MemStore(RevocationSet::default(), broadcast::channel(4).0))
    }

    fn cfg(algs: &[&str]) -> config::Auth {
        config::Auth {
            algorithms: algs.iter().map(|s| s.to_string()).collect(),
            hmac_secret: SECRET.into(),
            leeway_s: 0,
            max_token_ttl_s: 3600,
            carriers: vec![Carrier::Header, Carrier::Subprotocol],
            ..config::Auth::default()
        }
    }

    fn authn(cfg: &config::Auth) -> (JwtAuthenticator, Arc<MemStore>, Arc<Metrics>) {
        let s = store();
        let m = Arc::new(Metrics::new());
        let claims = BTreeMap::from([("tenant".to_string(), "X-Tenant".to_string())]);
        (JwtAuthenticator::new(cfg, &claims, s.clone(), m.clone()).unwrap(), s, m)
    }

    fn now() -> u64 {
        unix_now()
    }

    fn claims(sub: &str) -> Value {
        json!({ "sub": sub, "iat": now(), "exp": now() + 600 })
    }

    fn encoding_key(alg: Algorithm) -> EncodingKey {
        let file = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                return EncodingKey::from_secret(SECRET.as_bytes()).unwrap()
            }
            Algorithm::ES256 => "ec256.key",
            Algorithm::ES384 => "ec384.key",
            Algorithm::EdDSA => "ed25519.key",
            _ => "rsa.key",
        };
        let pem = std::fs::read(fixture(file)).unwrap();
        match alg.family() {
            AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(&pem),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .unwrap()
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&h, claims, &encoding_key(alg)).unwrap()
    }

    fn hs(claims: &Value) -> String {
        sign(Algorithm::HS256, None, claims)
    }

    fn head_with(token: &str) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            target: "/".into(),
            headers: vec![("Authorization".into(), format!("Bearer {token}"))],
        }
    }

    fn client() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn counter(m: &Metrics, series: &str) -> f64 {
        let text = m.render();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} not in\n{text}"))
    }

    fn verify_count(m: &Metrics) -> f64 {
        let text = m.render();
        text.lines()
            .find_map(|l| {
                l.strip_prefix("portcullis_token_verify_duration_seconds_count")?.trim().parse().ok()
            })
            .unwrap_or(0.0)
    }

    #[tokio::test]
    async fn every_algorithm_accepts() {
        for (alg, pubkey) in [
            (Algorithm::HS256, None),
            (Algorithm::HS384, None),
            (Algorithm::HS512, None),
            (Algorithm::RS256, Some("rsa.pub")),
            (Algorithm::PS256, Some("rsa.pub")),
            (Algorithm::ES256, Some("ec256.pub")),
            (Algorithm::ES384, Some("ec384.pub")),
            (Algorithm::EdDSA, Some("ed25519.pub")),
        ] {
            let name = format!("{alg:?}");
            let mut c = cfg(&[&name]);
            if let Some(p) = pubkey {
                c.public_key_file = fixture(p);
            }
            let (a, _, _) = authn(&c);
            let mut cl = claims("alice");
            cl["jti"] = "j1".into();
            cl["tenant"] = "acme".into();
            let id = a.authenticate(&head_with(&sign(alg, None, &cl)), client()).await.unwrap();
            assert_eq!(id.sub, "alice", "{name}");
            assert_eq!(id.jti.as_deref(), Some("j1"));
            assert_eq!(id.issued_at, cl["iat"].as_u64());
            assert_eq!(id.expires_at, cl["exp"].as_u64());
            assert_eq!(id.forward, vec![("X-Tenant".to_string(), "acme".to_string())]);
            assert_eq!(id.carrier, Some(Carrier::Header));
        }
    }

    async fn refused(a: &JwtAuthenticator, token: &str) -> Reject {
        match a.verify_token(token).await {
            Err(r) => r,
            Ok(id) => panic!("accepted {id:?}"),
        }
    }

    #[tokio::test]
    async fn forged_expired_and_immature() {
        let (a, _, _) = authn(&cfg(&["HS256"]));
        let good = hs(&claims("u"));
        let (body, sig) = good.rsplit_once('.').unwrap();
        let mut forged_sig = sig.to_string();
        let last = if forged_sig.ends_with('A') { "B" } else { "A" };
        forged_sig.replace_range(0..1, last);
        assert_eq!(refused(&a, &format!("{body}.{forged_sig}")).await, Reject::InvalidToken);
        // Payload swapped under the original signature.
        let (h, _) = body.split_once('.').unwrap();
        let other = b64(&json!({"sub": "admin", "exp": now() + 600}));
        assert_eq!(refused(&a, &format!("{h}.{other}.{sig}")).await, Reject::InvalidToken);
        let expired = hs(&json!({"sub": "u", "iat": now() - 100, "exp": now() - 10}));
        assert_eq!(refused(&a, &expired).await, Reject::ExpiredToken);
        // An expired token with a bad signature is invalid, not expired.
        let forged_expired = format!("{}.{forged_sig}", expired.rsplit_once('.').unwrap().0);
        assert_eq!(refused(&a, &forged_expired).await, Reject::InvalidToken);
        let immature = hs(&json!({"sub": "u", "nbf": now() + 100, "exp": now() + 600}));
        assert_eq!(refused(&a, &immature).await, Reject::InvalidToken);
    }

    #[tokio::test]
    async fn leeway_applies_to_exp_and_nbf() {
        let mut c = cfg(&["HS256"]);
        c.leeway_s = 30;
        let (a, _, _) = authn(&c);
        let t = hs(&json!({"sub": "u", "nbf": now() + 20, "exp": now() - 20}));
        let id = a.verify_token(&t).await.unwrap();
        assert_eq!(id.expires_at, Some(now() - 20 + 30));
    }

    #[tokio::test]
    async fn alg_none_and_garbage_and_oversized() {
        let (a, _, m) = authn(&cfg(&["HS256"]));
        let body = b64(&claims("u"));
        for header in [json!({"alg": "none"}), json!({"alg": "None", "typ": "JWT"}), json!({"alg": "HS256x"})]
        {
            let t = format!("{}.{body}.", b64(&header));
            assert_eq!(refused(&a, &t).await, Reject::InvalidToken, "{header}");
        }
        for t in ["garbage", "a.b.c", "...", "eyJ.eyJ.x", "Basic x", &"a".repeat(100)] {
            assert_eq!(refused(&a, t).await, Reject::InvalidToken, "{t}");
        }
        let mut big = claims("u");
        big["pad"] = "x".repeat(MAX_TOKEN_BYTES).into();
        assert_eq!(refused(&a, &hs(&big)).await, Reject::InvalidToken);
        // Nothing above reached a signature check.
        assert_eq!(verify_count(&m), 0.0);
    }

    #[tokio::test]
    async fn wrong_algorithm_and_confusion() {
        let mut c = cfg(&["ES256"]);
        c.hmac_secret = String::new();
        c.public_key_file = fixture("ec256.pub");
        let (a, _, _) = authn(&c);
        assert!(a.verify_token(&sign(Algorithm::ES256, None, &claims("u"))).await.is_ok());
        // HS256 with the real secret: not allowed.
        assert_eq!(refused(&a, &hs(&claims("u"))).await, Reject::InvalidToken);
        // The classic confusion: HS256 "signed" with the public key PEM bytes.
        let pem = std::fs::read(fixture("ec256.pub")).unwrap();
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims("u"),
            &EncodingKey::from_secret(&pem).unwrap(),
        )
        .unwrap();
        assert_eq!(refused(&a, &t).await, Reject::InvalidToken);
        // Even with HS256 allowed, it is checked against the secret only.
        let mut c = cfg(&["HS256", "ES256"]);
        c.public_key_file = fixture("ec256.pub");
        let (a, _, _) = authn(&c);
        assert_eq!(refused(&a, &t).await, Reject::InvalidToken);
        // ES384 token against a P-256 key: not served.
        assert_eq!(refused(&a, &sign(Algorithm::ES384, None, &claims("u"))).await, Reject::InvalidToken);
        // An RS256 token when only EC keys exist.
        assert_eq!(refused(&a, &sign(Algorithm::RS256, None, &claims("u"))).await, Reject::InvalidToken);
    }

    #[tokio::test]
    async fn issuer_and_audience() {
        let mut c = cfg(&["HS256"]);
        let with = |iss: Option<&str>, aud: Option<Value>| {
            let mut cl = claims("u");
            if let Some(i) = iss {
                cl["iss"] = i.into();
            }
            if let Some(a) = aud {
                cl["aud"] = a;
            }
            hs(&cl)
        };
        // Not configured: any aud is ignored, any iss is fine.
        let (a, _, _) = authn(&c);
        assert!(a.verify_token(&with(Some("x"), Some("whoever".into()))).await.is_ok());
        assert!(a.verify_token(&with(None, Some(json!(["a", "b"])))).await.is_ok());

        c.issuer = "https://issuer".into();
        c.audience = "gw".into();
        let (a, _, _) = authn(&c);
        assert!(a.verify_token(&with(Some("https://issuer"), Some("gw".into()))).await.is_ok());
        assert!(a.verify_token(&with(Some("https://issuer"), Some(json!(["x", "gw"])))).await.is_ok());
        for t in [
            with(Some("https://evil"), Some("gw".into())),
            with(Some("https://issuer"), Some("other".into())),
            with(None, Some("gw".into())),
            with(Some("https://issuer"), None),
        ] {
            assert_eq!(refused(&a, &t).await, Reject::InvalidToken);
        }
    }

    #[tokio::test]
    async fn claim_rules() {
        let (a, _, _) = authn(&cfg(&["HS256"]));
        let n = now();
        for cl in [
            json!({"exp": n + 60}),                                         // no sub
            json!({"sub": "", "exp": n + 60}),                              // empty sub
            json!({"sub": 42, "exp": n + 60}),                              // non-string sub
            json!({"sub": "u"}),                                            // no exp
            json!({"sub": "u", "exp": "soon"}),                             // non-numeric exp
            json!({"sub": "u", "iat": n - 10, "exp": n + 3600}),            // lifetime 3610 > 3600
            json!({"sub": "u", "exp": n + 3700}),                           // no iat: exp - now > 3600
            json!({"sub": "u", "iat": n + 600, "exp": n + 700}),            // issued in the future
            json!({"sub": "u", "iat": "x", "exp": n + 60}),                 // non-numeric iat
            json!({"sub": "u", "jti": 7, "exp": n + 60}),                   // non-string jti
            json!({"sub": "u", "tenant": "a\r\nX-Evil: 1", "exp": n + 60}), // header injection
        ] {
            assert_eq!(refused(&a, &hs(&cl)).await, Reject::InvalidToken, "{cl}");
        }
        let id = a.verify_token(&hs(&json!({"sub": "u", "iat": n, "exp": n + 3600}))).await.unwrap();
        assert_eq!(id.forward, vec![]);
        let id = a.verify_token(&hs(&json!({"sub": "u", "exp": n + 60, "tenant": 7}))).await.unwrap();
        assert_eq!(id.forward, vec![("X-Tenant".to_string(), "7".to_string())]);
        let id =
            a.verify_token(&hs(&json!({"sub": "u", "exp": n + 60, "tenant": {"a": [1]}}))).await.unwrap();
        assert_eq!(id.forward, vec![("X-Tenant".to_string(), "{\"a\":[1]}".to_string())]);
    }

    #[tokio::test]
    async fn missing_token_and_carriers() {
        let mut c = cfg(&["HS256"]);
        c.carriers = vec![Carrier::Subprotocol, Carrier::Header];
        let (a, _, _) = authn(&c);
        let none = RequestHead { method: "GET".into(), target: "/".into(), headers: vec![] };
        assert_eq!(a.authenticate(&none, client()).await, Err(AuthRefusal::Reason(Reject::MissingToken)));
        let t = hs(&claims("u"));
        let sp = RequestHead {
            method: "GET".into(),
            target: "/".into(),
            headers: vec![("Sec-WebSocket-Protocol".into(), format!("bearer, {t}"))],
        };
        assert_eq!(a.authenticate(&sp, client()).await.unwrap().carrier, Some(Carrier::Subprotocol));
        // Present but malformed: invalid, not missing, and no fall-through.
        let basic = RequestHead {
            method: "GET".into(),
            target: "/".into(),
            headers: vec![("Authorization".into(), "Basic x".into())],
        };
        assert_eq!(a.authenticate(&basic, client()).await, Err(AuthRefusal::Reason(Reject::InvalidToken)));
    }

    #[tokio::test]
    async fn cache_hits_and_misses_are_counted() {
        let (a, _, m) = authn(&cfg(&["HS256"]));
        let t = hs(&claims("u"));
        for _ in 0..3 {
            a.verify_token(&t).await.unwrap();
        }
        assert_eq!(counter(&m, "portcullis_auth_cache_total{result=\"hit\"}"), 2.0);
        assert_eq!(counter(&m, "portcullis_auth_cache_total{result=\"miss\"}"), 1.0);
        assert_eq!(verify_count(&m), 1.0);
        // A failed verification is not cached.
        let bad = hs(&json!({"sub": "u", "exp": now() + 100_000}));
        for _ in 0..2 {
            assert_eq!(refused(&a, &bad).await, Reject::InvalidToken);
        }
        assert_eq!(counter(&m, "portcullis_auth_cache_total{result=\"miss\"}"), 3.0);
    }

    #[tokio::test]
    async fn revocation_checked_even_on_cache_hit() {
        let (a, s, _) = authn(&cfg(&["HS256"]));
        let mut cl = claims("alice");
        cl["jti"] = "j-1".into();
        let t = hs(&cl);
        a.verify_token(&t).await.unwrap(); // now cached
        s.revoke(Revocation::Jti { jti: "j-1".into() }).await.unwrap();
        assert_eq!(refused(&a, &t).await, Reject::RevokedToken);

        let t2 = hs(&json!({"sub": "bob", "iat": now() - 5, "exp": now() + 600}));
        let no_iat = hs(&json!({"sub": "bob", "exp": now() + 600}));
        let carol = hs(&json!({"sub": "carol", "iat": now(), "exp": now() + 600}));
        for t in [&t2, &no_iat, &carol] {
            a.verify_token(t).await.unwrap(); // now cached
        }
        s.revoke(Revocation::Subject { sub: "bob".into(), before: now() }).await.unwrap();
        assert_eq!(refused(&a, &t2).await, Reject::RevokedToken);
        // Without iat: counts as issued before any cut-off.
        assert_eq!(refused(&a, &no_iat).await, Reject::RevokedToken);
        // Issued after the cut-off: still good.
        s.revoke(Revocation::Subject { sub: "carol".into(), before: now() - 10 }).await.unwrap();
        assert!(a.verify_token(&carol).await.is_ok());
    }

    #[tokio::test]
    async fn jwks_kid_selection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("jwks.json");
        let keys = json!({ "keys": [
            jwk("ec256.key", Algorithm::ES256, Some("ec")),
            jwk("rsa.key", Algorithm::RS256, Some("rsa")),
        ]});
        std::fs::write(&p, keys.to_string()).unwrap();
        let mut c = cfg(&["ES256", "RS256"]);
        c.hmac_secret = String::new();
        c.jwks_file = p.clone();
        let (a, _, _) = authn(&c);
        assert!(a.verify_token(&sign(Algorithm::ES256, Some("ec"), &claims("u"))).await.is_ok());
        assert!(a.verify_token(&sign(Algorithm::RS256, Some("rsa"), &claims("u"))).await.is_ok());
        for t in [
            sign(Algorithm::ES256, Some("nope"), &claims("u")), // unknown kid
            sign(Algorithm::ES256, Some("rsa"), &claims("u")),  // kid of another type
            sign(Algorithm::ES256, None, &claims("u")),         // no kid, no anonymous key
        ] {
            assert_eq!(refused(&a, &t).await, Reject::InvalidToken);
        }
    }

    #[tokio::test]
    async fn reload_swaps_keys_and_clears_cache() {
        let (a, _, m) = authn(&cfg(&["HS256"]));
        let t = hs(&claims("u"));
        a.verify_token(&t).await.unwrap();
        let mut c = cfg(&["HS256"]);
        c.hmac_secret = "another-secret-another-secret-!!".into();
        a.reload(&c, &BTreeMap::new()).unwrap();
        // The cached entry is gone with the old key.
        assert_eq!(refused(&a, &t).await, Reject::InvalidToken);
        assert_eq!(counter(&m, "portcullis_auth_cache_total{result=\"hit\"}"), 0.0);
        // A bad reload keeps the current state.
        let mut bad = cfg(&["ES256"]);
        bad.public_key_file = fixture("missing.pub");
        assert!(a
            .reload(&bad, &BTreeMap::new())
            .unwrap_err()
            .to_string()
            .starts_with("auth.public_key_file"));
        let t2 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims("u"),
            &EncodingKey::from_secret(c.hmac_secret.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(a.verify_token(&t2).await.is_ok());
    }

    // The precheck, held against the full path.

    /// The HMAC secret a JWKS serves under kid `k1` (HS256 only).
    const SECRET_K1: &str = "k1-secret-k1-secret-k1-secret-k1";

    /// The full path as `authenticate` runs it once the carrier gave the token.
    async fn full_path(a: &JwtAuthenticator, token: &str) -> Result<Identity, AuthRefusal> {
        a.identity(&a.state.load_full(), token).await.map_err(AuthRefusal::from)
    }

    /// A token from raw header and claims texts (so they can hold what
    /// `json!` cannot: repeated keys, escapes, odd numbers).
    fn raw_token(header: &str, claims: &str, alg: Algorithm, key: &EncodingKey) -> String {
        let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
        format!("{message}.{sig}")
    }

    /// Plain HS256; every HMAC algorithm and ES256 with leeway, issuer and
    /// audience; a JWKS (`k1`: HS256 under its own secret, `ec`: ES256) next
    /// to the static secret.
    fn precheck_configs(dir: &std::path::Path) -> Vec<config::Auth> {
        let plain = cfg(&["HS256"]);
        let mut strict = cfg(&["HS256", "HS384", "HS512", "ES256"]);
        strict.public_key_file = fixture("ec256.pub");
        strict.leeway_s = 30;
        strict.issuer = "https://issuer".into();
        strict.audience = "gw".into();
        let path = dir.join("jwks.json");
        let oct = json!({"kty": "oct", "kid": "k1", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(SECRET_K1)});
        let keys = json!({ "keys": [oct, jwk("ec256.key", Algorithm::ES256, Some("ec"))] });
        std::fs::write(&path, keys.to_string()).unwrap();
        let mut jwks = cfg(&["HS256", "HS512", "ES256"]);
        jwks.jwks_file = path;
        vec![plain, strict, jwks]
    }

    /// Whether config `i` of [`precheck_configs`] has a key for `alg` / `kid`.
    fn served(i: usize, alg: &str, kid: Option<&str>) -> bool {
        matches!(
            (i, alg, kid),
            (0, "HS256", _)
                | (1, "HS256" | "HS384" | "HS512" | "ES256", _)
                | (2, "HS256", Some("k1"))
                | (2, "ES256", Some("ec"))
                | (2, "HS256" | "HS512", None)
        )
    }

    /// A generated token and what the precheck must answer for it.
    #[derive(Debug)]
    struct Case {
        config: usize,
        token: String,
        /// `Some`: the precheck must decide it, so; `None`: it may or may not.
        decided: Option<Reject>,
    }

    /// An index below `n`, `usual` about `weight` times as often as each other.
    fn often(usual: usize, weight: u32, n: usize) -> impl Strategy<Value = usize> {
        prop_oneof![weight => Just(usual), 1 => 0..n]
    }

    const ALGS: [&str; 7] = ["HS256", "HS384", "HS512", "ES256", "RS256", "none", "HS256x"];

    prop_compose! {
        /// Tokens built from random headers, claims and signatures.
        fn built_case()(
            config in 0..3usize,
            alg in often(0, 3, ALGS.len()),
            kid in often(0, 2, 6),
            header_extra in often(0, 3, 7),
            claims in (
                often(0, 3, 10),
                0..5usize,
                0..4usize,
                often(2, 3, 7),
                0..6usize,
                0..6usize,
                often(0, 4, 7),
            ),
            signing in often(0, 3, 5),
            mutate in prop::option::weighted(0.1, any::<prop::sample::Index>()),
        ) -> Case {
            let n = now();
            let alg_name = ALGS[alg];
            let kid_value = ["", "\"k1\"", "\"nope\"", "null", "5", "\"ec\""][kid];
            let mut header = vec![format!("\"alg\":\"{alg_name}\"")];
            match header_extra {
                0 => header.push("\"typ\":\"JWT\"".into()),
                1 => {}
                2 => header.push("\"x5t\":\"abc\"".into()),
                3 => header.push("\"b64\":false".into()),
                4 => header[0] = format!("\"alg\":\"{}\"", alg_name.replace('2', "\\u0032")),
                5 => header.push("\"alg\":\"HS256\"".into()),
                _ => header.push("\"typ\":5".into()),
            }
            if !kid_value.is_empty() {
                header.push(format!("\"kid\":{kid_value}"));
            }
            let header = format!("{{{}}}", header.join(","));

            let (exp, nbf, iat, sub, iss, aud, extra) = claims;
            let past = n - 100;
            let mut members = vec![];
            // One claim from its choices; "" leaves it out.
            let mut claim = |name: &str, choices: &[&str], i: usize| {
                if !choices[i].is_empty() {
                    members.push(format!("\"{name}\":{}", choices[i]));
                }
            };
            let (p, f, nbf_past, nbf_future) =
                (past.to_string(), (n + 300).to_string(), (n - 50).to_string(), (n + 100).to_string());
            let (iat_past, iat_future) = ((n - 200).to_string(), (n + 600).to_string());
            let p_float = format!("{past}.5");
            let exps = [p.as_str(), &f, "", "\"soon\"", "null", "-5", &p_float, "1e30", "[1]", "-100.5"];
            claim("exp", &exps, exp);
            claim("nbf", &["", &nbf_past, &nbf_future, "null", "\"x\""], nbf);
            claim("iat", &["", &iat_past, &iat_future, "\"x\""], iat);
            claim("sub", &["", "\"\"", "\"u\"", "42", "null", "[\"a\"]", "{}"], sub);
            let issuers = ["", "\"https://issuer\"", "\"https://evil\"", "[\"https://issuer\"]", "5", "null"];
            claim("iss", &issuers, iss);
            claim("aud", &["", "\"gw\"", "\"other\"", "[\"x\",\"gw\"]", "5", "[]"], aud);
            match extra {
                0 => {}
                1 => members.push("\"tenant\":\"a\\r\\nb\"".into()),
                2 => members.push(format!("\"exp\":{past}")),
                3 => members.push("\"name\":\"Zoë\"".into()),
                4 => members.push("\"nested\":{\"a\":[1,2,{\"b\":null}]}".into()),
                5 => members.push("\"big\":1e400".into()),
                _ => members.push("\"\\u0065xp\":5".into()),
            }
            let claims = format!("{{{}}}", members.join(","));

            // The key the full path would pick, when the header names one.
            let sign_alg = precheck::algorithm(alg_name.as_bytes()).unwrap_or(Algorithm::HS256);
            let right = match (config, kid) {
                (2, 1) if sign_alg.family() == AlgorithmFamily::Hmac => {
                    EncodingKey::from_secret(SECRET_K1.as_bytes()).unwrap()
                }
                _ => encoding_key(sign_alg),
            };
            let wrong = EncodingKey::from_secret(b"not-the-secret-not-the-secret-!!").unwrap();
            let signed = raw_token(&header, &claims, sign_alg, &right);
            let message = signed.rsplit_once('.').unwrap().0;
            let mut token = match signing {
                0 => signed.clone(),
                // An HMAC under another secret, whatever the header's alg.
                1 => {
                    let hmac = sign_alg.family() == AlgorithmFamily::Hmac;
                    let hs = if hmac { sign_alg } else { Algorithm::HS256 };
                    raw_token(&header, &claims, hs, &wrong)
                }
                2 => format!("{message}.{}", URL_SAFE_NO_PAD.encode(b"garbage signature bytes")),
                3 => format!("{message}."),
                _ => {
                    // The signature of other claims.
                    let other = raw_token(&header, "{\"sub\":\"admin\"}", sign_alg, &right);
                    format!("{message}.{}", other.rsplit_once('.').unwrap().1)
                }
            };

            let hmac = sign_alg.family() == AlgorithmFamily::Hmac && alg < 3;
            let allowed = match config {
                0 => alg == 0,
                1 => alg < 4,
                _ => [0, 2, 3].contains(&alg),
            };
            let kid_str = match kid {
                1 => Some("k1"),
                2 => Some("nope"),
                5 => Some("ec"),
                _ => None,
            };
            // The header's `alg` / `kid` are what they look like.
            let readable = header_extra != 4 && header_extra != 5 && kid != 4;
            let simple = header_extra < 2 && kid != 3;
            let expired_claims = matches!(exp, 0 | 6)
                && matches!(nbf, 0..=2)
                && matches!(sub, 1 | 2)
                && (config != 1 || (matches!(iss, 1..=3) && matches!(aud, 1..=3 | 5)))
                && matches!(extra, 0 | 3 | 4);
            let decided = if mutate.is_some() || !readable {
                None
            } else if !allowed || !served(config, alg_name, kid_str) || (hmac && signing != 0) {
                Some(Reject::InvalidToken)
            } else if hmac && simple && expired_claims {
                Some(Reject::ExpiredToken)
            } else {
                None
            };
            if let Some(at) = mutate {
                // One character swapped for another of the alphabet.
                let i = at.index(token.len());
                let c = if token.as_bytes()[i] == b'A' { "B" } else { "A" };
                token.replace_range(i..i + 1, c);
            }
            Case { config, token, decided }
        }
    }

    /// Strings that are no token at all.
    fn garbage() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9_.=+/ -]{1,80}",
            "\\PC{1,40}",
            "[A-Za-z0-9_-]{2,24}\\.[A-Za-z0-9_-]{0,24}\\.[A-Za-z0-9_-]{0,24}",
            "eyJ[A-Za-z0-9_-]{0,30}\\.eyJ[A-Za-z0-9_-]{0,30}\\.[A-Za-z0-9_-]{0,43}",
        ]
    }

    #[test]
    fn precheck_is_sound_and_decides_the_common_refusals() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let auths: Vec<JwtAuthenticator> = precheck_configs(dir.path()).iter().map(|c| authn(c).0).collect();
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(5000));
        let cases = prop_oneof![
            4 => built_case(),
            1 => (0..3usize, garbage()).prop_map(|(config, token)| Case {
                config,
                token,
                decided: Some(Reject::InvalidToken),
            }),
        ];
        runner
            .run(&cases, |case| {
                let a = &auths[case.config];
                let pre = a.precheck(&case.token);
                if let Some(r) = &pre {
                    let full = rt.block_on(full_path(a, &case.token));
                    prop_assert_eq!(Err(r.clone()), full.map(|id| id.sub), "{:?}", case);
                }
                if let Some(want) = case.decided {
                    prop_assert_eq!(pre, Some(AuthRefusal::Reason(want)), "{:?}", case);
                }
                Ok(())
            })
            .unwrap();
    }

    #[tokio::test]
    async fn precheck_refusals_are_the_full_paths() {
        let (a, _, _) = authn(&cfg(&["HS256"]));
        let n = now();
        let good = hs(&claims("u"));
        let (body, sig) = good.rsplit_once('.').unwrap();
        let forged = format!("{body}.{}{}", if sig.starts_with('A') { "B" } else { "A" }, &sig[1..]);
        let expired = hs(&json!({"sub": "u", "iat": n - 100, "exp": n - 10}));
        let forged_expired = format!("{}.{}", expired.rsplit_once('.').unwrap().0, &sig);
        let payload = body.split_once('.').unwrap().1;
        let none = format!("{}.{payload}.", b64(&json!({"alg": "none"})));
        let rs256 = sign(Algorithm::RS256, None, &claims("u"));
        let hs512 = sign(Algorithm::HS512, None, &claims("u"));
        let no_alg = format!("{}.{payload}.{sig}", b64(&json!({"typ": "JWT"})));
        let not_json = format!("{}.{payload}.{sig}", URL_SAFE_NO_PAD.encode("not json"));
        let oversized = "a".repeat(MAX_TOKEN_BYTES + 1);
        // Segments past the small buffer.
        let big_header = format!("{}.{payload}.{sig}", b64(&json!({"alg": "HS256", "x": "x".repeat(2000)})));
        let big_expired = hs(&json!({"sub": "u", "exp": n - 10, "pad": "x".repeat(4000)}));
        let invalid = Some(AuthRefusal::Reason(Reject::InvalidToken));
        for (token, want) in [
            (forged.as_str(), &invalid),
            (&forged_expired, &invalid),
            (&expired, &Some(AuthRefusal::Reason(Reject::ExpiredToken))),
            (&big_header, &invalid),
            (&big_expired, &Some(AuthRefusal::Reason(Reject::ExpiredToken))),
            (&none, &invalid),
            (&rs256, &invalid),
            (&hs512, &invalid),
            (&no_alg, &invalid),
            (&not_json, &invalid),
            ("", &invalid),
            (&oversized, &invalid),
            ("garbage", &invalid),
            ("a.b.c", &invalid),
            ("...", &invalid),
            ("eyJ.eyJ.x", &invalid),
            ("Basic x", &invalid),
            (&format!("{good}.x"), &invalid),
        ] {
            assert_eq!(&a.precheck(token), want, "{token}");
            assert_eq!(full_path(&a, token).await.map(|id| id.sub), Err(want.clone().unwrap()), "{token}");
        }
    }

    #[tokio::test]
    async fn precheck_leaves_what_it_cannot_mirror_to_the_full_path() {
        let mut c = cfg(&["HS256", "ES256"]);
        c.public_key_file = fixture("ec256.pub");
        let (a, _, _) = authn(&c);
        let n = now();
        let key = encoding_key(Algorithm::HS256);
        let hs_raw = |header: &str, claims: &str| raw_token(header, claims, Algorithm::HS256, &key);
        let expired = format!("{{\"sub\":\"u\",\"exp\":{}}}", n - 10);
        let es_expired = sign(Algorithm::ES256, None, &json!({"sub": "u", "exp": n - 10}));
        let es_forged = format!("{}.{}", es_expired.rsplit_once('.').unwrap().0, "A".repeat(86));
        for (token, full) in [
            // Valid: the full path accepts (and caches) them.
            (hs(&claims("u")), Ok("u".to_string())),
            (sign(Algorithm::ES256, None, &claims("u")), Ok("u".to_string())),
            // Asymmetric refusals cost a signature there anyway.
            (es_expired, Err(Reject::ExpiredToken)),
            (es_forged, Err(Reject::InvalidToken)),
            // A header `jsonwebtoken` parses but then refuses (`b64: false`):
            // invalid there, not expired.
            (hs_raw(r#"{"alg":"HS256","b64":false}"#, &expired), Err(Reject::InvalidToken)),
            // A header it may or may not parse: not vouched for.
            (hs_raw(r#"{"alg":"HS256","x5c":"nope"}"#, &expired), Err(Reject::InvalidToken)),
            // Claims a check before `exp` refuses: invalid, not expired.
            (hs_raw(r#"{"alg":"HS256"}"#, &format!("{{\"exp\":{}}}", n - 10)), Err(Reject::InvalidToken)),
            (hs_raw(r#"{"alg":"HS256"}"#, r#"{"sub":"u","exp":-100.5}"#), Err(Reject::InvalidToken)),
            (hs_raw(r#"{"alg":"HS256"}"#, r#"{"sub":"u","exp":[1]}"#), Err(Reject::InvalidToken)),
            (
                hs_raw(r#"{"alg":"HS256"}"#, &format!("{{\"sub\":\"u\",\"exp\":{},\"nbf\":null}}", n - 10)),
                Err(Reject::InvalidToken),
            ),
            (
                hs_raw(r#"{"alg":"HS256"}"#, &format!("{{\"sub\":\"u\",\"exp\":{},\"exp\":1}}", n - 10)),
                Err(Reject::InvalidToken),
            ),
            (
                hs_raw(r#"{"alg":"HS256"}"#, &format!("{{\"sub\":\"u\",\"exp\":{},\"x\":1e400}}", n - 10)),
                Err(Reject::InvalidToken),
            ),
            // Escapes would make `serde_json` allocate: left alone.
            (
                hs_raw(r#"{"alg":"HS256"}"#, &format!("{{\"sub\":\"\\u0075\",\"exp\":{}}}", n - 10)),
                Err(Reject::ExpiredToken),
            ),
            // An escaped key might spell `alg`.
            (hs_raw(r#"{"\u0061lg":"HS256"}"#, &expired), Err(Reject::ExpiredToken)),
        ] {
            assert_eq!(a.precheck(&token), None, "{token}");
            let got = full_path(&a, &token).await.map(|id| id.sub).map_err(|r| match r {
                AuthRefusal::Reason(r) => r,
                other => panic!("{other:?}"),
            });
            assert_eq!(got, full, "{token}");
        }
    }

    #[tokio::test]
    async fn precheck_expiry_bound_is_jsonwebtokens() {
        let mut c = cfg(&["HS256"]);
        c.leeway_s = 30;
        let (a, _, _) = authn(&c);
        // Retried when the clock ticks mid-check, so both sides see one second.
        loop {
            let n = now();
            let last_accepted = hs(&json!({"sub": "u", "exp": n - 30}));
            let first_refused = hs(&json!({"sub": "u", "exp": n - 31}));
            let pre = (a.precheck(&last_accepted), a.precheck(&first_refused));
            let full = (full_path(&a, &last_accepted).await, full_path(&a, &first_refused).await);
            if now() != n {
                continue;
            }
            assert_eq!(pre, (None, Some(AuthRefusal::Reason(Reject::ExpiredToken))));
            assert_eq!(full.0.unwrap().sub, "u");
            assert_eq!(full.1, Err(AuthRefusal::Reason(Reject::ExpiredToken)));
            break;
        }
    }

    #[tokio::test]
    async fn precheck_counts_what_the_full_path_counts() {
        let (pre, _, pm) = authn(&cfg(&["HS256"]));
        let (full, _, fm) = authn(&cfg(&["HS256"]));
        let good = hs(&claims("u"));
        let (body, _) = good.rsplit_once('.').unwrap();
        let tokens = [
            format!("{body}.{}", "A".repeat(43)),
            hs(&json!({"sub": "u", "exp": now() - 10})),
            "garbage".to_string(),
            sign(Algorithm::RS256, None, &claims("u")),
            String::new(),
            "a".repeat(MAX_TOKEN_BYTES + 1),
        ];
        for t in &tokens {
            assert!(pre.precheck(t).is_some(), "{t}");
            assert!(full_path(&full, t).await.is_err(), "{t}");
        }
        let miss = "portcullis_auth_cache_total{result=\"miss\"}";
        let hit = "portcullis_auth_cache_total{result=\"hit\"}";
        assert_eq!(counter(&pm, miss), counter(&fm, miss));
        assert_eq!(counter(&pm, miss), 4.0);
        assert_eq!(counter(&pm, hit), 0.0);
        // Not mirrored: the verification time (its histogram allocates).
        assert_eq!(verify_count(&pm), 0.0);
        assert_eq!(verify_count(&fm), 2.0);
        // Undecided: nothing counted, the full path counts.
        assert_eq!(pre.precheck(&good), None);
        assert_eq!(counter(&pm, miss), 4.0);
    }
}
