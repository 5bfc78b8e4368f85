//! The verification key set: an HMAC secret, a PEM public key and JWKS keys,
//! each bound to the algorithms it may verify.
//!
//! Every key carries the list of algorithms it serves (its type's algorithms
//! ∩ `auth.algorithms`), and [`KeySet::select`] only hands out a key for an
//! algorithm on that list. That closes algorithm confusion by construction:
//! an `HS256` token is never checked with a public key used as an HMAC
//! secret, an `ES256` token never with an RSA key, an `ES384` token never
//! with a P-256 key.
//!
//! Choosing a key for a token's header (`alg`, `kid`):
//! - with `auth.jwks_file` set and a `kid` in the token, the JWKS key of that
//!   `kid` and nothing else (an unknown `kid` is refused, never retried
//!   against other keys);
//! - otherwise the static key of the algorithm's family (`hmac_secret` for
//!   HS*, `public_key_file` for the rest), then a JWKS key without `kid`
//!   that serves the algorithm.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use crate::config::{Auth, ConfigError};

/// Below this many bytes an HMAC secret is brute-forceable offline from any
/// captured token; warned about, not refused (the operator may have reasons).
const MIN_HMAC_SECRET_BYTES: usize = 32;

/// A decoding key and the algorithms it may verify.
#[derive(Clone, Debug)]
pub(crate) struct ServingKey {
    key: DecodingKey,
    /// Never empty, never mixing families: both checked at load.
    algorithms: Vec<Algorithm>,
}

impl ServingKey {
    pub(crate) fn key(&self) -> &DecodingKey {
        &self.key
    }

    pub(crate) fn serves(&self, alg: Algorithm) -> Option<&DecodingKey> {
        // The family comparison is redundant with `algorithms` (built per
        // family) but costs nothing and keeps the invariant local.
        (self.algorithms.contains(&alg) && self.key.family() == alg.family()).then_some(&self.key)
    }
}

/// Every verification key the gateway holds, immutable once loaded (a reload
/// builds a new one and swaps it in whole).
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    hmac: Option<ServingKey>,
    public: Option<ServingKey>,
    /// JWKS keys by `kid`.
    jwks: HashMap<String, ServingKey>,
    /// JWKS keys without a `kid`, for tokens without one.
    jwks_anonymous: Vec<ServingKey>,
    /// Whether a JWKS file is configured: a token's `kid` then must name one
    /// of its keys.
    jwks_configured: bool,
}

/// Parses `auth.algorithms` (already validated by the config; re-checked so
/// this module stands alone).
pub fn allowed_algorithms(cfg: &Auth) -> Result<Vec<Algorithm>, ConfigError> {
    let mut out = Vec::with_capacity(cfg.algorithms.len());
    for name in &cfg.algorithms {
        let alg: Algorithm = name.parse().map_err(|_| ConfigError::Invalid {
            key: "auth.algorithms",
            msg: format!("unknown algorithm {name:?}"),
        })?;
        if !out.contains(&alg) {
            out.push(alg);
        }
    }
    if out.is_empty() {
        return Err(ConfigError::Invalid {
            key: "auth.algorithms",
            msg: "needs at least one algorithm".into(),
        });
    }
    Ok(out)
}

/// The HMAC secret from `auth.hmac_secret` or `auth.hmac_secret_file` (the
/// file's content with one trailing newline dropped, so `echo secret > f`
/// works); `None` when neither is set.
pub fn hmac_secret(cfg: &Auth) -> Result<Option<Vec<u8>>, ConfigError> {
    if !cfg.hmac_secret.is_empty() {
        return Ok(Some(cfg.hmac_secret.as_bytes().to_vec()));
    }
    if cfg.hmac_secret_file.as_os_str().is_empty() {
        return Ok(None);
    }
    let key = "auth.hmac_secret_file";
    let mut bytes = read(key, &cfg.hmac_secret_file)?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(ConfigError::Invalid {
            key,
            msg: format!("{} is empty", cfg.hmac_secret_file.display()),
        });
    }
    Ok(Some(bytes))
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::Invalid { key, msg: format!("{}: {e}", path.display()) })
}

fn names(algs: &[Algorithm]) -> String {
    algs.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
}

/// The algorithms a key of `family` could verify, restricted to `allowed`.
fn family_algorithms(family: AlgorithmFamily, allowed: &[Algorithm]) -> Vec<Algorithm> {
    family.algorithms().iter().copied().filter(|a| allowed.contains(a)).collect()
}

/// The ECDSA algorithm of an uncompressed public point, by its length.
fn ec_algorithm(point: &[u8]) -> Option<Algorithm> {
    match (point.first(), point.len()) {
        (Some(4), 65) => Some(Algorithm::ES256),
        (Some(4), 97) => Some(Algorithm::ES384),
        _ => None,
    }
}

/// Loads a PEM public key and works out what it can verify.
fn load_public_key(path: &Path, allowed: &[Algorithm]) -> Result<ServingKey, ConfigError> {
    let key = "auth.public_key_file";
    let invalid = |msg: String| ConfigError::Invalid { key, msg: format!("{}: {msg}", path.display()) };
    let pem = read(key, path)?;
    let text = String::from_utf8_lossy(&pem);
    // Only public keys: jsonwebtoken would also take a private key or a
    // certificate here and then fail every verification at run time.
    let label = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .ok_or_else(|| invalid("not a PEM file".into()))?;
    match label {
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {}
        l if l.contains("PRIVATE KEY") => {
            return Err(invalid(
                "is a private key; give the public key (`openssl pkey -in KEY -pubout`)".into(),
            ))
        }
        "CERTIFICATE" => {
            return Err(invalid(
                "is a certificate; give its public key (`openssl x509 -in CERT -pubkey -noout`)".into(),
            ))
        }
        other => return Err(invalid(format!("unsupported PEM block {other:?}"))),
    }
    let (decoding, algorithms, kind) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        (k, family_algorithms(AlgorithmFamily::Rsa, allowed), "an RSA key")
    } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        let alg = k
            .try_get_as_bytes()
            .ok()
            .and_then(ec_algorithm)
            .ok_or_else(|| invalid("unsupported elliptic curve (P-256 and P-384 are)".into()))?;
        let kind = if alg == Algorithm::ES256 { "an EC P-256 key" } else { "an EC P-384 key" };
        (k, vec![alg].into_iter().filter(|a| allowed.contains(a)).collect(), kind)
    } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        (k, family_algorithms(AlgorithmFamily::Ed, allowed), "an Ed25519 key")
    } else {
        return Err(invalid("not an RSA, EC (P-256/P-384) or Ed25519 public key".into()));
    };
    if algorithms.is_empty() {
        return Err(invalid(format!("{kind} verifies none of auth.algorithms ({})", names(allowed))));
    }
    Ok(ServingKey { key: decoding, algorithms })
}

/// What a JWK may verify: its type's algorithms, narrowed to its `alg` when
/// it names one, and to `allowed`. `Err` explains why it is unusable.
pub(crate) fn jwk_serving_key(jwk: &Jwk, allowed: &[Algorithm]) -> Result<ServingKey, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key (use=enc)".into());
    }
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa.algorithms().to_vec(),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err(format!("unsupported curve {:?}", p.curve)),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => return Err(format!("unsupported curve {:?}", p.curve)),
        },
        AlgorithmParameters::OctetKey(_) => AlgorithmFamily::Hmac.algorithms().to_vec(),
        _ => return Err("unsupported key type".into()),
    };
    let by_type = match jwk.common.key_algorithm {
        None => by_type,
        Some(ka) => {
            let alg = Algorithm::try_from(ka).map_err(|_| format!("unsupported alg {ka}"))?;
            if !by_type.contains(&alg) {
                return Err(format!("alg {ka} does not match its key type"));
            }
            vec![alg]
        }
    };
    let algorithms: Vec<Algorithm> = by_type.into_iter().filter(|a| allowed.contains(a)).collect();
    if algorithms.is_empty() {
        return Err(format!("verifies none of auth.algorithms ({})", names(allowed)));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key material: {e}"))?;
    if key.family() == AlgorithmFamily::Ec {
        // `from_ec_components` does not check the coordinates' lengths
        // against the curve; a mismatch would only fail at verification.
        let point_alg = key.try_get_as_bytes().ok().and_then(ec_algorithm);
        if point_alg.is_none_or(|a| !algorithms.contains(&a)) {
            return Err("coordinates do not match the curve".into());
        }
    }
    Ok(ServingKey { key, algorithms })
}

/// Loads a JWKS file: `{"keys": [...]}`. Keys the gateway cannot or may not
/// use (encryption keys, other curves, algorithms not allowed) are skipped
/// with a warning, since providers' sets routinely hold such keys; a file
/// with no usable key at all is an error.
fn load_jwks(path: &Path, allowed: &[Algorithm], set: &mut KeySet) -> Result<(), ConfigError> {
    let key = "auth.jwks_file";
    let invalid = |msg: String| ConfigError::Invalid { key, msg: format!("{}: {msg}", path.display()) };
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(&read(key, path)?)
        .map_err(|e| invalid(format!("not a JWKS document: {e}")))?;
    for (i, value) in raw.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(
                    file = %path.display(),
                    index = i,
                    error = %e,
                    "JWKS key skipped: unparseable"
                );
                continue;
            }
        };
        let kid = jwk.common.key_id.clone();
        let serving = match jwk_serving_key(&jwk, allowed) {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(
                    file = %path.display(),
                    index = i,
                    kid = kid.as_deref().unwrap_or(""),
                    "JWKS key skipped: {why}"
                );
                continue;
            }
        };
        match kid {
            Some(kid) if set.jwks.contains_key(&kid) => {
                tracing::warn!(
                    file = %path.display(),
                    index = i,
                    kid,
                    "JWKS key skipped: duplicate kid (the first one is used)"
                );
            }
            Some(kid) => {
                set.jwks.insert(kid, serving);
            }
            None => set.jwks_anonymous.push(serving),
        }
    }
    if set.jwks.is_empty() && set.jwks_anonymous.is_empty() {
        return Err(invalid(format!("no usable key for auth.algorithms ({})", names(allowed))));
    }
    Ok(())
}

impl KeySet {
    /// Loads every configured key. Errors name the config key at fault.
    pub fn load(cfg: &Auth) -> Result<KeySet, ConfigError> {
        let allowed = allowed_algorithms(cfg)?;
        let mut set = KeySet::default();
        let hs = family_algorithms(AlgorithmFamily::Hmac, &allowed);
        if !hs.is_empty() {
            if let Some(secret) = hmac_secret(cfg)? {
                if secret.len() < MIN_HMAC_SECRET_BYTES {
                    tracing::warn!(
                        bytes = secret.len(),
                        "auth.hmac_secret is shorter than {MIN_HMAC_SECRET_BYTES} bytes: \
                         tokens can be brute-forced offline"
                    );
                }
                let key = DecodingKey::from_secret(&secret)
                    .map_err(|e| ConfigError::Invalid { key: "auth.hmac_secret", msg: e.to_string() })?;
                set.hmac = Some(ServingKey { key, algorithms: hs });
            }
        }
        if !cfg.public_key_file.as_os_str().is_empty() {
            set.public = Some(load_public_key(&cfg.public_key_file, &allowed)?);
        }
        if !cfg.jwks_file.as_os_str().is_empty() {
            set.jwks_configured = true;
            load_jwks(&cfg.jwks_file, &allowed, &mut set)?;
        }
        // An allowed algorithm no key can verify is an operator mistake that
        // would otherwise surface as every such token being "invalid". With a
        // JWKS a kid-less key may still arrive on reload, so only warn there.
        for alg in &allowed {
            let served = set
                .hmac
                .iter()
                .chain(&set.public)
                .chain(set.jwks.values())
                .chain(&set.jwks_anonymous)
                .any(|k| k.serves(*alg).is_some());
            if !served {
                let msg = format!("{alg:?} is allowed but no configured key verifies it");
                // Keys fetched from a provider may serve it (config/jwks.rs).
                if crate::config::jwks::top_level_fetches(cfg) {
                    continue;
                }
                if set.jwks_configured {
                    tracing::warn!("auth.algorithms: {msg}");
                } else {
                    let key = if alg.family() == AlgorithmFamily::Hmac {
                        "auth.hmac_secret"
                    } else {
                        "auth.public_key_file"
                    };
                    return Err(ConfigError::Invalid { key, msg });
                }
            }
        }
        Ok(set)
    }

    /// The key to verify a token whose header says `alg` / `kid`, or `None`
    /// (the token is refused without verifying anything). See the module doc.
    pub fn select(&self, alg: Algorithm, kid: Option<&str>) -> Option<&DecodingKey> {
        if let (true, Some(kid)) = (self.jwks_configured, kid) {
            return self.jwks.get(kid)?.serves(alg);
        }
        let static_key = match alg.family() {
            AlgorithmFamily::Hmac => self.hmac.as_ref(),
            _ => self.public.as_ref(),
        };
        static_key
            .and_then(|k| k.serves(alg))
            .or_else(|| self.jwks_anonymous.iter().find_map(|k| k.serves(alg)))
    }

    /// With `auth.jwks_file`: its key of `kid`, if it has one (then that
    /// key and no other decides, whatever it serves).
    pub(crate) fn file_kid(&self, kid: &str) -> Option<&ServingKey> {
        self.jwks.get(kid).filter(|_| self.jwks_configured)
    }

    /// Whether `auth.jwks_file` is configured.
    pub(crate) fn has_jwks_file(&self) -> bool {
        self.jwks_configured
    }

    /// How many keys are loaded (for the reload log line).
    pub fn len(&self) -> usize {
        usize::from(self.hmac.is_some())
            + usize::from(self.public.is_some())
            + self.jwks.len()
            + self.jwks_anonymous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::EncodingKey;
    use std::path::PathBuf;

    pub(crate) fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys").join(name)
    }

    fn auth(algs: &[&str]) -> Auth {
        Auth { algorithms: algs.iter().map(|s| s.to_string()).collect(), ..Auth::default() }
    }

    fn err(cfg: &Auth) -> String {
        KeySet::load(cfg).unwrap_err().to_string()
    }

    #[test]
    fn pem_types_detected() {
        for (file, algs, want) in [
            ("rsa.pub", &["RS256", "PS512"][..], &[Algorithm::RS256, Algorithm::PS512][..]),
            ("ec256.pub", &["ES256"], &[Algorithm::ES256]),
            ("ec384.pub", &["ES384", "ES256"], &[Algorithm::ES384]),
            ("ed25519.pub", &["EdDSA"], &[Algorithm::EdDSA]),
        ] {
            let mut cfg = auth(algs);
            if file == "ec384.pub" {
                // ES256 allowed with only a P-384 key: refused as unserved.
                cfg.public_key_file = fixture(file);
                assert!(err(&cfg).starts_with("auth.public_key_file: ES256 is allowed"), "{}", err(&cfg));
                cfg.algorithms = vec!["ES384".into()];
            }
            cfg.public_key_file = fixture(file);
            let set = KeySet::load(&cfg).unwrap();
            for alg in want {
                assert!(set.select(*alg, None).is_some(), "{file} {alg:?}");
            }
            assert!(set.select(Algorithm::HS256, None).is_none(), "{file}");
        }
    }

    #[test]
    fn wrong_pem_is_named() {
        let mut cfg = auth(&["ES256"]);
        cfg.public_key_file = fixture("rsa.pub");
        assert!(err(&cfg).contains("an RSA key verifies none of auth.algorithms (ES256)"), "{}", err(&cfg));
        cfg.public_key_file = fixture("ec256.key");
        assert!(err(&cfg).starts_with("auth.public_key_file:") && err(&cfg).contains("private key"));
        cfg.public_key_file = fixture("missing.pub");
        assert!(err(&cfg).starts_with("auth.public_key_file:"));
        cfg.public_key_file = fixture("../../../Cargo.toml");
        assert!(err(&cfg).contains("not a PEM file"), "{}", err(&cfg));
    }

    #[test]
    fn hmac_never_serves_asymmetric_and_vice_versa() {
        let mut cfg = auth(&["HS256", "ES256"]);
        cfg.hmac_secret = "s".repeat(32);
        cfg.public_key_file = fixture("ec256.pub");
        let set = KeySet::load(&cfg).unwrap();
        let hs = set.select(Algorithm::HS256, None).unwrap();
        assert_eq!(hs.family(), AlgorithmFamily::Hmac);
        let es = set.select(Algorithm::ES256, None).unwrap();
        assert_eq!(es.family(), AlgorithmFamily::Ec);
        // Not allowed, even though a key of the family exists.
        assert!(set.select(Algorithm::HS512, None).is_none());
    }

    #[test]
    fn hmac_secret_file_drops_one_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        std::fs::write(&p, "abc\n\n").unwrap();
        let cfg = Auth { hmac_secret_file: p.clone(), ..Auth::default() };
        assert_eq!(hmac_secret(&cfg).unwrap().unwrap(), b"abc\n");
        std::fs::write(&p, "\n").unwrap();
        assert!(KeySet::load(&cfg).unwrap_err().to_string().starts_with("auth.hmac_secret_file"));
        let cfg = Auth { hmac_secret_file: dir.path().join("nope"), ..Auth::default() };
        assert!(KeySet::load(&cfg).unwrap_err().to_string().starts_with("auth.hmac_secret_file"));
    }

    pub(crate) fn jwk(private_pem: &str, alg: Algorithm, kid: Option<&str>) -> serde_json::Value {
        let pem = std::fs::read(fixture(private_pem)).unwrap();
        let ek = match alg.family() {
            AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(&pem),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
            AlgorithmFamily::Ed => EncodingKey::from_ed_pem(&pem),
            AlgorithmFamily::Hmac => unreachable!(),
        }
        .unwrap();
        let mut j = Jwk::from_encoding_key(&ek, alg).unwrap();
        j.common.key_id = kid.map(str::to_owned);
        serde_json::to_value(j).unwrap()
    }

    #[test]
    fn jwks_by_kid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("jwks.json");
        let mut enc = jwk("rsa.key", Algorithm::RS256, Some("enc"));
        enc["use"] = "enc".into();
        let keys = serde_json::json!({ "keys": [
            jwk("ec256.key", Algorithm::ES256, Some("a")),
            jwk("rsa.key", Algorithm::RS256, Some("b")),
            jwk("ed25519.key", Algorithm::EdDSA, None),
            enc,
            { "kty": "weird" },
        ]});
        std::fs::write(&p, keys.to_string()).unwrap();
        let mut cfg = auth(&["ES256", "RS256", "EdDSA"]);
        cfg.jwks_file = p.clone();
        let set = KeySet::load(&cfg).unwrap();
        assert_eq!(set.len(), 3);
        assert!(set.select(Algorithm::ES256, Some("a")).is_some());
        assert!(set.select(Algorithm::RS256, Some("b")).is_some());
        // The kid's key must serve the token's alg; no retry elsewhere.
        assert!(set.select(Algorithm::RS256, Some("a")).is_none());
        assert!(set.select(Algorithm::ES256, Some("unknown")).is_none());
        assert!(set.select(Algorithm::RS256, Some("enc")).is_none());
        // Without kid: the anonymous key.
        assert!(set.select(Algorithm::EdDSA, None).is_some());
        assert!(set.select(Algorithm::ES256, None).is_none());

        // No usable key at all.
        let mut cfg = auth(&["ES384"]);
        cfg.jwks_file = p.clone();
        assert!(err(&cfg).starts_with("auth.jwks_file:"), "{}", err(&cfg));
        std::fs::write(&p, "{not json").unwrap();
        cfg.jwks_file = p;
        assert!(err(&cfg).starts_with("auth.jwks_file:"));
    }
}
