//! What a JWT verification depends on, built from `[auth]` and swapped whole
//! on reload: realms (keys, algorithms, issuer and audience rules), carriers,
//! claim rules and the verified-token cache; and the allocation-free
//! precheck that reads it (`JwtAuthenticator::precheck`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

use super::cache::TokenCache;
use super::keys::{allowed_algorithms, KeySet};
use super::precheck::{self, Decoded};
use super::provider::{Pool, Provider, Source, Spec};
use super::realm::{validations, Realm, Realms};
use crate::clock::unix_now;
use crate::config::{self, jwks, Carrier, ConfigError};
use crate::metrics::Metrics;
use crate::reject::Reject;

/// A leeway above this is a misconfiguration (and would overflow
/// `now - leeway` arithmetic inside `jsonwebtoken`).
pub const MAX_LEEWAY_S: u64 = 86_400;

/// Room for an HMAC tag (at most 64 bytes); a signature segment that does not
/// fit decodes to something longer than any tag, so it cannot match.
const TAG_BYTES: usize = 96;

/// Everything a verification depends on, swapped whole on reload.
pub(crate) struct State {
    pub realms: Realms,
    /// Every realm's algorithms: what the precheck may refuse on sight.
    pub allowed: Vec<Algorithm>,
    /// Every realm's provider, indexed by [`super::provider::KeyRef`].
    pub providers: Vec<Arc<Provider>>,
    pub carriers: Vec<Carrier>,
    pub cookie_name: String,
    /// (claim, header) pairs to forward upstream.
    pub claim_headers: Vec<(String, String)>,
    pub leeway: u64,
    pub max_ttl: u64,
    /// Verified claims; part of the state so a reload starts empty.
    pub cache: TokenCache,
}

fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, ConfigError> {
    let mut out = Vec::new();
    for n in names {
        let alg: Algorithm = n.parse().map_err(|_| ConfigError::Invalid {
            key: "auth.issuers",
            msg: format!("unknown algorithm {n:?}"),
        })?;
        if !out.contains(&alg) {
            out.push(alg);
        }
    }
    Ok(out)
}

impl State {
    /// Builds the state; providers come from `pool` (shared with the state
    /// in force, so unchanged sources keep their keys).
    pub fn build(
        cfg: &config::Auth,
        claim_headers: &BTreeMap<String, String>,
        pool: &Pool,
        metrics: &Arc<Metrics>,
    ) -> Result<State, ConfigError> {
        if cfg.leeway_s > MAX_LEEWAY_S {
            return Err(ConfigError::Invalid {
                key: "auth.leeway_s",
                msg: format!("at most {MAX_LEEWAY_S}"),
            });
        }
        let timeout = Duration::from_millis(cfg.jwks_timeout_ms);
        let refresh = Duration::from_secs(cfg.jwks_refresh_s);
        let spec = |source, algorithms: &[Algorithm]| Spec {
            source,
            algorithms: algorithms.to_vec(),
            ca_file: cfg.jwks_ca_file.clone(),
            timeout,
            refresh,
        };
        let mut providers = Vec::new();
        let mut add = |p: Arc<Provider>| {
            providers.push(p.clone());
            ((providers.len() - 1) as u32, p)
        };

        let off = jwks::top_level_off(cfg);
        let top_allowed = allowed_algorithms(cfg)?;
        let top_issuer = if cfg.oidc_issuer.is_empty() { &cfg.issuer } else { &cfg.oidc_issuer };
        let top_source = if !cfg.jwks_url.is_empty() {
            Some(Source::Jwks(cfg.jwks_url.clone()))
        } else if !cfg.oidc_issuer.is_empty() {
            Some(Source::Oidc(cfg.oidc_issuer.clone()))
        } else {
            None
        };
        let top_provider = match top_source {
            Some(s) if !off => Some(add(pool.get(spec(s, &top_allowed), metrics)?)),
            _ => None,
        };
        let top = Realm {
            validations: validations(&top_allowed, cfg.leeway_s, top_issuer, &cfg.audience),
            keys: if off { KeySet::default() } else { KeySet::load(cfg)? },
            allowed: if off { Vec::new() } else { top_allowed },
            provider: top_provider,
            off,
        };
        let mut entries = Vec::with_capacity(cfg.issuers.len());
        let mut by_issuer = HashMap::new();
        for e in &cfg.issuers {
            let allowed = parse_algorithms(&e.algorithms)?;
            let source =
                if e.oidc { Source::Oidc(e.issuer.clone()) } else { Source::Jwks(e.jwks_url.clone()) };
            let provider = add(pool.get(spec(source, &allowed), metrics)?);
            by_issuer.insert(e.issuer.clone(), entries.len());
            entries.push(Realm {
                validations: validations(&allowed, cfg.leeway_s, &e.issuer, &e.audience),
                keys: KeySet::default(),
                allowed,
                provider: Some(provider),
                off: false,
            });
        }
        let mut allowed = top.allowed.clone();
        for a in entries.iter().flat_map(|r| &r.allowed) {
            if !allowed.contains(a) {
                allowed.push(*a);
            }
        }
        Ok(State {
            realms: Realms { top, entries, by_issuer },
            allowed,
            providers,
            carriers: cfg.carriers.clone(),
            cookie_name: cfg.cookie_name.clone(),
            claim_headers: claim_headers.iter().map(|(c, h)| (c.clone(), h.clone())).collect(),
            leeway: cfg.leeway_s,
            max_ttl: cfg.max_token_ttl_s,
            cache: TokenCache::new(cfg.cache_capacity),
        })
    }

    /// The top level's rules for `family` (the precheck's; entries never
    /// verify HMAC).
    fn validation(&self, family: AlgorithmFamily) -> Option<&Validation> {
        self.realms.top.validation(family)
    }

    /// How many keys are held, static and fetched (for `Debug`).
    pub fn key_count(&self) -> usize {
        self.realms.top.keys.len() + self.providers.iter().map(|p| p.keys().len()).sum::<usize>()
    }

    /// The precheck past the size check: a refusal the full path would
    /// surely give, and why (for the debug log), or `None` when it cannot
    /// tell. Its steps follow the full path's.
    pub fn precheck(&self, token: &str) -> Option<(Reject, &'static str)> {
        let invalid = |why| Some((Reject::InvalidToken, why));
        let Some(parts) = precheck::split(token) else {
            return invalid("not three segments");
        };
        let (alg, key, simple) = match precheck::with_decoded(parts.header, |h| self.precheck_header(h)) {
            Ok(found) => found?,
            Err(why) => return invalid(why),
        };
        let validation = self.validation(alg.family()).filter(|v| v.algorithms.contains(&alg))?;
        if alg.family() != AlgorithmFamily::Hmac {
            // Asymmetric signatures cost what the full path pays anyway.
            return None;
        }
        let secret = key.try_get_as_bytes().ok()?;
        let mut tag = [0u8; TAG_BYTES];
        let signed = match precheck::decode(parts.signature, &mut tag) {
            Decoded::Bytes(t) => precheck::hmac_matches(alg, secret, parts.message, t)?,
            Decoded::Invalid | Decoded::TooLong => false,
        };
        if !signed {
            return invalid("bad signature");
        }
        // A good signature on a header `jsonwebtoken` might still refuse:
        // its verdict is not ours to guess.
        if !simple {
            return None;
        }
        let expired = precheck::with_decoded(parts.payload, |claims| match claims {
            Decoded::Bytes(c) => Ok(precheck::surely_expired(c, validation, unix_now())),
            Decoded::Invalid => Err("undecodable claims"),
            Decoded::TooLong => Ok(false),
        });
        match expired {
            Ok(expired) => expired.then_some((Reject::ExpiredToken, "expired")),
            Err(why) => invalid(why),
        }
    }

    /// The header step of [`State::precheck`]: `Err(why)` for a surely
    /// invalid token; else the algorithm, its key and whether
    /// `jsonwebtoken` surely parses the header, or `None` (cannot tell).
    fn precheck_header(
        &self,
        header: Decoded<'_>,
    ) -> Result<Option<(Algorithm, &DecodingKey, bool)>, &'static str> {
        let header = match header {
            Decoded::Bytes(b) => precheck::scan_header(b),
            Decoded::Invalid => return Err("undecodable header"),
            Decoded::TooLong => return Ok(None),
        };
        // From here on `alg` and `kid` are what `decode_header` would read,
        // if it reads the header at all; when it does not, the refusal is
        // `invalid_token` all the same.
        let (alg, kid, simple) = match header {
            precheck::Header::Fields { alg, kid, simple } => (alg, kid, simple),
            precheck::Header::Invalid => return Err("undecodable header"),
            precheck::Header::Unknown => return Ok(None),
        };
        let Some(alg) = precheck::algorithm(alg).filter(|a| self.allowed.contains(a)) else {
            return Err("algorithm not allowed");
        };
        // Which realm, hence which keys, depends on the claims' `iss`; and
        // fetched keys may arrive with a refetch. Both are the full path's.
        let top = &self.realms.top;
        if !self.realms.entries.is_empty()
            || (top.provider.is_some() && alg.family() != AlgorithmFamily::Hmac)
        {
            return Ok(None);
        }
        let key = top.keys.select(alg, kid).ok_or("no key for alg/kid")?;
        Ok(Some((alg, key, simple)))
    }
}

#[cfg(test)]
mod tests {
    use crate::auth::jwt::JwtAuthenticator;
    use crate::auth::keys::tests::fixture;
    use crate::auth::AuthRefusal;
    use crate::config::{Auth, IssuerEntry};
    use crate::metrics::Metrics;
    use crate::reject::Reject;
    use crate::revocation::file::FileStore;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// An authenticator whose providers never fetch (no runtime): what the
    /// precheck decides must not depend on keys it has not got.
    fn authn(cfg: &Auth, dir: &std::path::Path) -> JwtAuthenticator {
        let store = Arc::new(FileStore::open(&dir.join("rev.log"), 3600).unwrap());
        JwtAuthenticator::new(cfg, &BTreeMap::new(), store, Arc::new(Metrics::new())).unwrap()
    }

    fn token(alg: Algorithm, kid: Option<&str>, exp_in: i64, key: &EncodingKey) -> String {
        let now = crate::clock::unix_now() as i64;
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        let claims = serde_json::json!({ "sub": "u", "iat": now - 100, "exp": now + exp_in });
        jsonwebtoken::encode(&h, &claims, key).unwrap()
    }

    #[test]
    fn with_fetched_keys_the_precheck_refuses_only_what_needs_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let hs = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        let wrong = EncodingKey::from_secret(b"another-secret-another-secret-!!").unwrap();
        let ec = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec256.key")).unwrap()).unwrap();
        let rsa = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa.key")).unwrap()).unwrap();
        let invalid = Some(AuthRefusal::Reason(Reject::InvalidToken));

        // Top level: a secret and a provider.
        let cfg = Auth {
            algorithms: vec!["HS256".into(), "ES256".into()],
            hmac_secret: SECRET.into(),
            jwks_url: "https://idp.example/jwks".into(),
            leeway_s: 0,
            ..Auth::default()
        };
        let a = authn(&cfg, dir.path());
        assert_eq!(a.precheck("garbage"), invalid);
        assert_eq!(a.precheck(&token(Algorithm::RS256, None, 60, &rsa)), invalid, "RS256 not allowed");
        // HMAC is never a provider's: still decided here.
        assert_eq!(a.precheck(&token(Algorithm::HS256, Some("k"), 60, &wrong)), invalid);
        assert_eq!(
            a.precheck(&token(Algorithm::HS256, None, -10, &hs)),
            Some(AuthRefusal::Reason(Reject::ExpiredToken))
        );
        // An ES256 kid may arrive with a refetch: not decided.
        assert_eq!(a.precheck(&token(Algorithm::ES256, Some("new"), 60, &ec)), None);
        assert_eq!(a.precheck(&token(Algorithm::ES256, None, -10, &ec)), None);

        // Entries: the realm depends on the claims, so only the header decides.
        let cfg = Auth {
            issuers: vec![IssuerEntry {
                issuer: "https://a.example".into(),
                jwks_url: "https://a.example/jwks".into(),
                algorithms: vec!["ES256".into()],
                ..IssuerEntry::default()
            }],
            ..cfg
        };
        let a = authn(&cfg, dir.path());
        assert_eq!(a.precheck("garbage"), invalid);
        assert_eq!(a.precheck(&token(Algorithm::RS256, None, 60, &rsa)), invalid);
        assert_eq!(a.precheck(&token(Algorithm::HS256, None, 60, &wrong)), None);
        assert_eq!(a.precheck(&token(Algorithm::ES256, Some("k"), 60, &ec)), None);
    }

    #[tokio::test]
    async fn without_keys_the_full_path_refuses_and_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let ec = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec256.key")).unwrap()).unwrap();
        let cfg = Auth {
            algorithms: vec!["ES256".into()],
            // Port 9 on loopback: nothing listens; fetches fail at once.
            jwks_url: "http://127.0.0.1:9/jwks".into(),
            jwks_timeout_ms: 200,
            ..Auth::default()
        };
        let a = authn(&cfg, dir.path());
        let t0 = std::time::Instant::now();
        assert_eq!(
            a.verify_token(&token(Algorithm::ES256, Some("k"), 60, &ec)).await,
            Err(Reject::InvalidToken)
        );
        assert!(t0.elapsed() < std::time::Duration::from_millis(1000), "{:?}", t0.elapsed());
        assert_eq!(a.keys_status(), crate::auth::jwt::KeysStatus::None);
    }
}
