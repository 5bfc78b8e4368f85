//! Minting tokens with the configured signing key: `portcullis token`,
//! `/login` and the demo mode.
//!
//! The algorithm is the FIRST of `auth.algorithms`: HS* signs with the HMAC
//! secret, anything else with `auth.private_key_file` (PKCS#8 PEM for EC and
//! Ed25519; PKCS#1 or PKCS#8 for RSA). Tokens carry `sub`, `iat`, `exp`,
//! `jti` and, when configured, `iss` and `aud`, so the gateway's own
//! verifier accepts them. No `kid` is set: the verifier matches kid-less
//! tokens against `hmac_secret` / `public_key_file` (and kid-less JWKS keys).

use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, EncodingKey, Header};
use serde::Serialize;

use super::keys::{allowed_algorithms, hmac_secret};
use crate::clock::unix_now;
use crate::config::{Auth, ConfigError};

/// Why a token could not be minted; the message names the key or argument.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A configuration key is missing or unusable for signing.
    #[error("{key}: {msg}")]
    Config { key: &'static str, msg: String },
    /// A bad argument (subject, ttl, jti).
    #[error("{0}")]
    Argument(String),
    /// The signature itself failed (should not happen with a loaded key).
    #[error("signing failed: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
}

impl From<ConfigError> for SignError {
    fn from(e: ConfigError) -> Self {
        match e {
            ConfigError::Invalid { key, msg } => SignError::Config { key, msg },
            other => SignError::Argument(other.to_string()),
        }
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    jti: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// A loaded signing key with the claims it stamps; build once for `/login`
/// rather than reading the key file per request.
pub struct Signer {
    alg: Algorithm,
    key: EncodingKey,
    issuer: Option<String>,
    audience: Option<String>,
    /// `auth.max_token_ttl_s`: longer tokens would be refused by the gateway
    /// itself, so they are not minted.
    max_ttl_s: u64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("alg", &self.alg).finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the signing key for the first algorithm of `auth.algorithms`.
    pub fn new(cfg: &Auth) -> Result<Signer, SignError> {
        let alg = *allowed_algorithms(cfg)?.first().ok_or_else(|| SignError::Config {
            key: "auth.algorithms",
            msg: "needs at least one algorithm".into(),
        })?;
        let key = if alg.family() == AlgorithmFamily::Hmac {
            let secret = hmac_secret(cfg)?.ok_or_else(|| SignError::Config {
                key: "auth.hmac_secret",
                msg: format!("required to sign {alg:?} tokens"),
            })?;
            EncodingKey::from_secret(&secret)?
        } else {
            let key = "auth.private_key_file";
            let path = &cfg.private_key_file;
            if path.as_os_str().is_empty() {
                return Err(SignError::Config { key, msg: format!("required to sign {alg:?} tokens") });
            }
            let pem = std::fs::read(path)
                .map_err(|e| SignError::Config { key, msg: format!("{}: {e}", path.display()) })?;
            let (parsed, kind) = match alg.family() {
                AlgorithmFamily::Rsa => (EncodingKey::from_rsa_pem(&pem), "an RSA"),
                AlgorithmFamily::Ec => (EncodingKey::from_ec_pem(&pem), "a PKCS#8 EC"),
                _ => (EncodingKey::from_ed_pem(&pem), "a PKCS#8 Ed25519"),
            };
            parsed.map_err(|_| SignError::Config {
                key,
                msg: format!("{}: not {kind} private key PEM (needed for {alg:?})", path.display()),
            })?
        };
        let signer = Signer {
            alg,
            key,
            issuer: Some(cfg.issuer.clone()).filter(|s| !s.is_empty()),
            audience: Some(cfg.audience.clone()).filter(|s| !s.is_empty()),
            max_ttl_s: cfg.max_token_ttl_s,
        };
        // A trial signature: a P-384 key configured for ES256 (or similar)
        // parses fine and only fails here, so fail at load, naming the key.
        signer.mint("probe", Duration::from_secs(1), Some("probe")).map_err(|e| match e {
            SignError::Jwt(e) if alg.family() != AlgorithmFamily::Hmac => SignError::Config {
                key: "auth.private_key_file",
                msg: format!("cannot sign {alg:?} with this key: {e}"),
            },
            other => other,
        })?;
        Ok(signer)
    }

    /// The algorithm tokens are signed with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Mints a token for `sub` living `ttl` (whole seconds, at least 1, at
    /// most `auth.max_token_ttl_s`); `jti` defaults to 128 random bits in hex.
    pub fn mint(&self, sub: &str, ttl: Duration, jti: Option<&str>) -> Result<String, SignError> {
        if sub.is_empty() {
            return Err(SignError::Argument("--sub: must not be empty".into()));
        }
        let ttl_s = ttl.as_secs();
        if ttl_s == 0 || ttl_s > self.max_ttl_s {
            return Err(SignError::Argument(format!(
                "--ttl: must be between 1s and auth.max_token_ttl_s ({}s), got {}s",
                self.max_ttl_s, ttl_s
            )));
        }
        let random;
        let jti = match jti {
            Some("") => return Err(SignError::Argument("--jti: must not be empty".into())),
            Some(j) => j,
            None => {
                random = format!("{:032x}", rand::random::<u128>());
                &random
            }
        };
        let iat = unix_now();
        let claims = Claims {
            sub,
            iat,
            exp: iat.saturating_add(ttl_s),
            jti,
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        Ok(jsonwebtoken::encode(&Header::new(self.alg), &claims, &self.key)?)
    }
}

/// Mints one token (loads the key each call): `portcullis token`.
pub fn mint(cfg: &Auth, sub: &str, ttl: Duration, jti: Option<&str>) -> Result<String, SignError> {
    Signer::new(cfg)?.mint(sub, ttl, jti)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::JwtAuthenticator;
    use crate::auth::keys::tests::fixture;
    use crate::metrics::Metrics;
    use crate::revocation::RevocationSet;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn cfg(algs: &[&str]) -> Auth {
        Auth {
            algorithms: algs.iter().map(|s| s.to_string()).collect(),
            max_token_ttl_s: 7200,
            ..Auth::default()
        }
    }

    struct NoRevocations(RevocationSet);

    #[async_trait::async_trait]
    impl crate::revocation::RevocationStore for NoRevocations {
        fn is_revoked(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool {
            self.0.is_revoked(sub, jti, iat)
        }
        async fn revoke(
            &self,
            _r: crate::revocation::Revocation,
        ) -> Result<(), crate::revocation::StoreError> {
            Ok(())
        }
        fn len(&self) -> usize {
            0
        }
        fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::revocation::Revocation> {
            tokio::sync::broadcast::channel(1).1
        }
    }

    async fn verifies(cfg: &Auth, token: &str) -> crate::auth::Identity {
        let store = Arc::new(NoRevocations(RevocationSet::default()));
        let a = JwtAuthenticator::new(cfg, &BTreeMap::new(), store, Arc::new(Metrics::new())).unwrap();
        a.verify_token(token).await.unwrap()
    }

    #[tokio::test]
    async fn minted_tokens_verify() {
        let mut c = cfg(&["HS384"]);
        c.hmac_secret = "a-secret-that-is-long-enough-123".into();
        c.issuer = "me".into();
        c.audience = "gw".into();
        let t = mint(&c, "alice", Duration::from_secs(3600), Some("j1")).unwrap();
        let id = verifies(&c, &t).await;
        assert_eq!((id.sub.as_str(), id.jti.as_deref()), ("alice", Some("j1")));
        let exp = id.expires_at.unwrap() - c.leeway_s;
        assert_eq!(exp - id.issued_at.unwrap(), 3600);

        for (alg, private, public) in [
            ("RS256", "rsa.key", "rsa.pub"),
            ("PS384", "rsa.key", "rsa.pub"),
            ("ES256", "ec256.key", "ec256.pub"),
            ("ES384", "ec384.key", "ec384.pub"),
            ("EdDSA", "ed25519.key", "ed25519.pub"),
        ] {
            let mut c = cfg(&[alg]);
            c.private_key_file = fixture(private);
            c.public_key_file = fixture(public);
            let t = mint(&c, "bob", Duration::from_secs(60), None).unwrap();
            let id = verifies(&c, &t).await;
            assert_eq!(id.sub, "bob", "{alg}");
            let jti = id.jti.unwrap();
            assert_eq!(jti.len(), 32, "{alg}");
            assert!(jti.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn random_jtis_differ() {
        let mut c = cfg(&["HS256"]);
        c.hmac_secret = "s".into();
        let s = Signer::new(&c).unwrap();
        assert_ne!(
            s.mint("u", Duration::from_secs(5), None).unwrap(),
            s.mint("u", Duration::from_secs(5), None).unwrap()
        );
    }

    #[test]
    fn missing_keys_are_named() {
        let e = mint(&cfg(&["ES256"]), "u", Duration::from_secs(60), None).unwrap_err().to_string();
        assert_eq!(e, "auth.private_key_file: required to sign ES256 tokens");
        let e = mint(&cfg(&["HS256"]), "u", Duration::from_secs(60), None).unwrap_err().to_string();
        assert_eq!(e, "auth.hmac_secret: required to sign HS256 tokens");
        let mut c = cfg(&["ES256"]);
        c.private_key_file = fixture("rsa.key");
        let e = mint(&c, "u", Duration::from_secs(60), None).unwrap_err().to_string();
        assert!(e.starts_with("auth.private_key_file:") && e.contains("EC"), "{e}");
        c.private_key_file = fixture("ec384.key");
        let e = mint(&c, "u", Duration::from_secs(60), None).unwrap_err().to_string();
        assert!(e.starts_with("auth.private_key_file: cannot sign ES256"), "{e}");
        c.private_key_file = fixture("nope.key");
        let e = mint(&c, "u", Duration::from_secs(60), None).unwrap_err().to_string();
        assert!(e.starts_with("auth.private_key_file:"), "{e}");
    }

    #[test]
    fn bad_arguments() {
        let mut c = cfg(&["HS256"]);
        c.hmac_secret = "s".into();
        assert!(mint(&c, "", Duration::from_secs(60), None).unwrap_err().to_string().starts_with("--sub"));
        assert!(mint(&c, "u", Duration::from_millis(10), None).unwrap_err().to_string().starts_with("--ttl"));
        assert!(mint(&c, "u", Duration::from_secs(7201), None).unwrap_err().to_string().starts_with("--ttl"));
        assert!(mint(&c, "u", Duration::from_secs(60), Some(""))
            .unwrap_err()
            .to_string()
            .starts_with("--jti"));
    }
}
