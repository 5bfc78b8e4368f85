//! Token minting: valid tokens for many users (`sub` = prefix + index) from a
//! key, a secret, the gateway's own config or a fixed `--token`, and every
//! kind of bad token the `handshake` and `mixed` scenarios send.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::Serialize;

/// A throwaway P-256 key, deliberately public: tokens signed with it carry a
/// well-formed ES256 signature that no gateway trusts (`bad-es256`).
const UNTRUSTED_ES256_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgwwpximLN4EGIuRmT
/9lKBr5aOTzvdz982+4USl+aFbuhRANCAASqfvT7Hyy4U8Nwgxf2+lO0HBDmEBFK
0WGra1GyL/NiAMHnI/a8jvV9zVflluzMt6qFwrkkKpFGb5E770QCYUsy
-----END PRIVATE KEY-----
";

/// How far in the past an `expired` token's `exp` lies: beyond any sane leeway.
const EXPIRED_BY: Duration = Duration::from_secs(3600);

/// The kinds of token a handshake can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenKind {
    /// Signed with the gateway's key, fresh.
    Valid,
    /// No token at all.
    Missing,
    /// Three dot-separated segments of random base64url: not a JWT.
    Garbage,
    /// HS256, well-formed, signed with a random secret.
    BadHs256,
    /// ES256, well-formed, signed with a key the gateway does not know.
    BadEs256,
    /// Signed with the right key but `exp` an hour ago.
    Expired,
    /// HS384 (outside a typical allow-list), signed with the right secret
    /// when one is known, so only the algorithm check can refuse it.
    WrongAlg,
    /// `alg: none`, unsigned.
    AlgNone,
}

impl TokenKind {
    /// Every kind, in a stable order.
    pub const ALL: [TokenKind; 8] = [
        TokenKind::Valid,
        TokenKind::Missing,
        TokenKind::Garbage,
        TokenKind::BadHs256,
        TokenKind::BadEs256,
        TokenKind::Expired,
        TokenKind::WrongAlg,
        TokenKind::AlgNone,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::Valid => "valid",
            TokenKind::Missing => "missing",
            TokenKind::Garbage => "garbage",
            TokenKind::BadHs256 => "bad-hs256",
            TokenKind::BadEs256 => "bad-es256",
            TokenKind::Expired => "expired",
            TokenKind::WrongAlg => "wrong-alg",
            TokenKind::AlgNone => "alg-none",
        }
    }

    /// True when minting it needs the gateway's signing key.
    pub fn needs_key(self) -> bool {
        matches!(self, TokenKind::Valid | TokenKind::Expired)
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TokenKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TokenKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<_> = TokenKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown token kind {s:?} (one of: {}, or all)", names.join(", "))
        })
    }
}

/// Parses `valid,missing` or `all` into kinds.
pub fn parse_kinds(spec: &str) -> Result<Vec<TokenKind>, String> {
    if spec.trim() == "all" {
        return Ok(TokenKind::ALL.to_vec());
    }
    let kinds: Vec<TokenKind> =
        spec.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect::<Result<_, _>>()?;
    if kinds.is_empty() {
        return Err("empty token kind list".into());
    }
    Ok(kinds)
}

/// Where the signing key comes from (command-line options).
#[derive(Debug, Clone, Default)]
pub struct TokenOpts {
    /// HS256 secret, raw bytes of the string.
    pub hs256_secret: Option<String>,
    /// File holding the HS256 secret (trailing newlines dropped).
    pub secret_file: Option<PathBuf>,
    /// PEM private key for ES256.
    pub es256_key: Option<PathBuf>,
    /// The gateway's TOML config: `[auth]` secret or private key, issuer, audience.
    pub gateway_config: Option<PathBuf>,
    /// A fixed token used for every valid connection.
    pub token: Option<String>,
    /// `sub` = prefix + index.
    pub sub_prefix: String,
    /// Lifetime of minted tokens.
    pub ttl: Duration,
    /// `iss` claim.
    pub issuer: Option<String>,
    /// `aud` claim.
    pub audience: Option<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Mints every kind of token. Cheap to share (`Arc`) across tasks.
pub struct Minter {
    /// The gateway's signing algorithm and key, when known.
    signing: Option<(Algorithm, EncodingKey)>,
    /// The HMAC secret itself, for `wrong-alg` with the right secret.
    hmac_secret: Option<Vec<u8>>,
    /// A fixed token (`--token`), used for valid connections without a key.
    fixed: Option<String>,
    sub_prefix: String,
    ttl: Duration,
    issuer: Option<String>,
    audience: Option<String>,
    /// A random per-run secret for `bad-hs256`.
    wrong_hs: EncodingKey,
    /// The untrusted ES256 key for `bad-es256`.
    wrong_es: EncodingKey,
}

fn read_secret_file(p: &Path) -> Result<Vec<u8>, String> {
    let mut s = std::fs::read(p).map_err(|e| format!("secret file {}: {e}", p.display()))?;
    while matches!(s.last(), Some(b'\n' | b'\r')) {
        s.pop();
    }
    if s.is_empty() {
        return Err(format!("secret file {} is empty", p.display()));
    }
    Ok(s)
}

fn hmac_alg(name: &str) -> Option<Algorithm> {
    match name {
        "HS256" => Some(Algorithm::HS256),
        "HS384" => Some(Algorithm::HS384),
        "HS512" => Some(Algorithm::HS512),
        _ => None,
    }
}

fn pem_key(alg: &str, pem: &[u8]) -> Result<Option<(Algorithm, EncodingKey)>, String> {
    let e = |x: jsonwebtoken::errors::Error| format!("private key for {alg}: {x}");
    Ok(Some(match alg {
        "ES256" => (Algorithm::ES256, EncodingKey::from_ec_pem(pem).map_err(e)?),
        "ES384" => (Algorithm::ES384, EncodingKey::from_ec_pem(pem).map_err(e)?),
        "RS256" => (Algorithm::RS256, EncodingKey::from_rsa_pem(pem).map_err(e)?),
        "RS384" => (Algorithm::RS384, EncodingKey::from_rsa_pem(pem).map_err(e)?),
        "RS512" => (Algorithm::RS512, EncodingKey::from_rsa_pem(pem).map_err(e)?),
        "PS256" => (Algorithm::PS256, EncodingKey::from_rsa_pem(pem).map_err(e)?),
        "EdDSA" => (Algorithm::EdDSA, EncodingKey::from_ed_pem(pem).map_err(e)?),
        _ => return Ok(None),
    }))
}

/// What a gateway config tells us: key, issuer, audience.
struct FromConfig {
    signing: (Algorithm, EncodingKey),
    hmac_secret: Option<Vec<u8>>,
    issuer: Option<String>,
    audience: Option<String>,
}

/// Reads `[auth]` of the gateway's TOML: the first algorithm of
/// `auth.algorithms` we can sign with, using `hmac_secret`,
/// `hmac_secret_file` or `private_key_file` (paths as written, else relative
/// to the config's folder).
fn from_gateway_config(path: &Path) -> Result<FromConfig, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("gateway config {}: {e}", path.display()))?;
    let doc: toml::Table = text.parse().map_err(|e| format!("gateway config {}: {e}", path.display()))?;
    let empty = toml::Table::new();
    let auth = doc.get("auth").and_then(|a| a.as_table()).unwrap_or(&empty);
    let s = |k: &str| auth.get(k).and_then(|v| v.as_str()).filter(|v| !v.is_empty());
    let resolve = |p: &str| {
        let p = PathBuf::from(p);
        if p.is_absolute() || p.exists() {
            p
        } else {
            path.parent().unwrap_or(Path::new(".")).join(p)
        }
    };
    let algs: Vec<String> = match auth.get("algorithms").and_then(|v| v.as_array()) {
        Some(a) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        None => vec!["HS256".into()],
    };
    let secret = match (s("hmac_secret"), s("hmac_secret_file")) {
        (Some(v), _) => Some(v.as_bytes().to_vec()),
        (None, Some(f)) => Some(read_secret_file(&resolve(f))?),
        _ => None,
    };
    let pem = match s("private_key_file") {
        Some(f) => {
            let p = resolve(f);
            Some(std::fs::read(&p).map_err(|e| format!("auth.private_key_file {}: {e}", p.display()))?)
        }
        None => None,
    };
    for alg in &algs {
        if let (Some(a), Some(sec)) = (hmac_alg(alg), &secret) {
            let key = EncodingKey::from_secret(sec).map_err(|e| format!("auth.hmac_secret: {e}"))?;
            return Ok(FromConfig {
                signing: (a, key),
                hmac_secret: Some(sec.clone()),
                issuer: s("issuer").map(str::to_string),
                audience: s("audience").map(str::to_string),
            });
        }
        if let Some(pem) = &pem {
            if let Some(k) = pem_key(alg, pem)? {
                return Ok(FromConfig {
                    signing: k,
                    hmac_secret: None,
                    issuer: s("issuer").map(str::to_string),
                    audience: s("audience").map(str::to_string),
                });
            }
        }
    }
    Err(format!(
        "gateway config {}: no signing key for auth.algorithms {algs:?} (need hmac_secret / hmac_secret_file or private_key_file)",
        path.display()
    ))
}

/// Unix seconds now; the load tester's one clock (token claims, run stamps).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Minter {
    /// Builds a minter from the options; at most one key source may be given.
    pub fn new(o: &TokenOpts) -> Result<Self, String> {
        let sources = [
            o.hs256_secret.is_some(),
            o.secret_file.is_some(),
            o.es256_key.is_some(),
            o.gateway_config.is_some(),
        ];
        if sources.iter().filter(|x| **x).count() > 1 {
            return Err("give one of --hs256-secret, --secret-file, --es256-key, --gateway-config".into());
        }
        let mut issuer = o.issuer.clone();
        let mut audience = o.audience.clone();
        let (signing, hmac_secret) = if let Some(s) = &o.hs256_secret {
            let key = EncodingKey::from_secret(s.as_bytes()).map_err(|e| format!("--hs256-secret: {e}"))?;
            (Some((Algorithm::HS256, key)), Some(s.as_bytes().to_vec()))
        } else if let Some(f) = &o.secret_file {
            let sec = read_secret_file(f)?;
            let key = EncodingKey::from_secret(&sec).map_err(|e| format!("--secret-file: {e}"))?;
            (Some((Algorithm::HS256, key)), Some(sec))
        } else if let Some(p) = &o.es256_key {
            let pem = std::fs::read(p).map_err(|e| format!("--es256-key {}: {e}", p.display()))?;
            let key = EncodingKey::from_ec_pem(&pem).map_err(|e| {
                format!(
                    "--es256-key {}: {e} (a PKCS#8 PEM is expected: openssl pkcs8 -topk8 -nocrypt -in KEY)",
                    p.display()
                )
            })?;
            (Some((Algorithm::ES256, key)), None)
        } else if let Some(p) = &o.gateway_config {
            let c = from_gateway_config(p)?;
            issuer = issuer.or(c.issuer);
            audience = audience.or(c.audience);
            (Some(c.signing), c.hmac_secret)
        } else {
            (None, None)
        };
        let wrong_hs = EncodingKey::from_secret(&rand::random::<[u8; 32]>())
            .map_err(|e| format!("random HS256 secret: {e}"))?;
        let wrong_es = EncodingKey::from_ec_pem(UNTRUSTED_ES256_PEM.as_bytes())
            .map_err(|e| format!("built-in untrusted ES256 key: {e}"))?;
        Ok(Minter {
            signing,
            hmac_secret,
            fixed: o.token.clone(),
            sub_prefix: o.sub_prefix.clone(),
            ttl: o.ttl,
            issuer,
            audience,
            wrong_hs,
            wrong_es,
        })
    }

    /// Checks up front that every kind in `kinds` can be minted.
    pub fn check(&self, kinds: &[TokenKind]) -> Result<(), String> {
        for k in kinds {
            let ok = match k {
                TokenKind::Valid => self.signing.is_some() || self.fixed.is_some(),
                TokenKind::Expired => self.signing.is_some(),
                _ => true,
            };
            if !ok {
                return Err(format!(
                    "{k} tokens need a signing key: --hs256-secret, --secret-file, --es256-key or --gateway-config{}",
                    if *k == TokenKind::Valid { " (or a fixed --token)" } else { "" }
                ));
            }
        }
        Ok(())
    }

    /// The subject of user `index`.
    pub fn sub(&self, index: u64) -> String {
        format!("{}{index}", self.sub_prefix)
    }

    fn sign(
        &self,
        alg: Algorithm,
        key: &EncodingKey,
        index: u64,
        iat: u64,
        exp: u64,
    ) -> Result<String, String> {
        let sub = self.sub(index);
        let claims = Claims {
            sub: &sub,
            iat,
            exp,
            jti: format!("{:016x}", rand::random::<u64>()),
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        encode(&Header::new(alg), &claims, key).map_err(|e| format!("minting a token: {e}"))
    }

    /// A token of `kind` for user `index`; `None` for [`TokenKind::Missing`].
    pub fn token(&self, kind: TokenKind, index: u64) -> Result<Option<String>, String> {
        let now = unix_now();
        let ttl = self.ttl.as_secs().max(1);
        let t = match kind {
            TokenKind::Missing => return Ok(None),
            TokenKind::Valid => match (&self.signing, &self.fixed) {
                (Some((alg, key)), _) => self.sign(*alg, key, index, now, now + ttl)?,
                (None, Some(t)) => t.clone(),
                (None, None) => return Err("valid tokens need a key or --token".into()),
            },
            TokenKind::Expired => {
                let Some((alg, key)) = &self.signing else {
                    return Err("expired tokens need a key".into());
                };
                let exp = now.saturating_sub(EXPIRED_BY.as_secs());
                self.sign(*alg, key, index, exp.saturating_sub(ttl), exp)?
            }
            TokenKind::Garbage => format!(
                "{}.{}.{}",
                b64url(&rand::random::<[u8; 24]>()),
                b64url(&rand::random::<[u8; 48]>()),
                b64url(&rand::random::<[u8; 32]>())
            ),
            TokenKind::BadHs256 => self.sign(Algorithm::HS256, &self.wrong_hs, index, now, now + ttl)?,
            TokenKind::BadEs256 => self.sign(Algorithm::ES256, &self.wrong_es, index, now, now + ttl)?,
            TokenKind::WrongAlg => {
                let key = match &self.hmac_secret {
                    Some(s) => EncodingKey::from_secret(s).map_err(|e| e.to_string())?,
                    None => {
                        EncodingKey::from_secret(&rand::random::<[u8; 32]>()).map_err(|e| e.to_string())?
                    }
                };
                self.sign(Algorithm::HS384, &key, index, now, now + ttl)?
            }
            TokenKind::AlgNone => {
                let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
                let body = serde_json::json!({
                    "sub": self.sub(index), "iat": now, "exp": now + ttl,
                    "jti": format!("{:016x}", rand::random::<u64>()),
                });
                format!("{header}.{}.", b64url(body.to_string().as_bytes()))
            }
        };
        Ok(Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};

    fn opts() -> TokenOpts {
        TokenOpts {
            hs256_secret: Some("s3cret".into()),
            sub_prefix: "u-".into(),
            ttl: Duration::from_secs(600),
            ..Default::default()
        }
    }

    #[derive(serde::Deserialize)]
    struct C {
        sub: String,
        exp: u64,
    }

    #[test]
    fn kinds_parse() {
        assert_eq!(parse_kinds("all").unwrap().len(), 8);
        assert_eq!(parse_kinds("valid, bad-es256").unwrap(), vec![TokenKind::Valid, TokenKind::BadEs256]);
        assert!(parse_kinds("valid,nope").is_err());
        assert!(parse_kinds(",").is_err());
        for k in TokenKind::ALL {
            assert_eq!(k.name().parse::<TokenKind>().unwrap(), k);
        }
    }

    #[test]
    fn valid_and_bad_tokens_verify_as_intended() {
        let m = Minter::new(&opts()).unwrap();
        let key = DecodingKey::from_secret(b"s3cret").unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.validate_aud = false;
        let t = m.token(TokenKind::Valid, 7).unwrap().unwrap();
        let c = decode::<C>(&t, &key, &v).unwrap().claims;
        assert_eq!(c.sub, "u-7");
        assert!(c.exp > unix_now() + 500);
        for bad in [TokenKind::BadHs256, TokenKind::Expired, TokenKind::Garbage] {
            let t = m.token(bad, 1).unwrap().unwrap();
            assert!(decode::<C>(&t, &key, &v).is_err(), "{bad} verified");
        }
        let t = m.token(TokenKind::WrongAlg, 1).unwrap().unwrap();
        assert_eq!(decode_header(&t).unwrap().alg, Algorithm::HS384);
        assert!(decode::<C>(&t, &key, &v).is_err());
        let t = m.token(TokenKind::BadEs256, 1).unwrap().unwrap();
        assert_eq!(decode_header(&t).unwrap().alg, Algorithm::ES256);
        let t = m.token(TokenKind::AlgNone, 1).unwrap().unwrap();
        assert!(t.ends_with('.') && t.starts_with("eyJhbGciOiJub25lIi"));
        assert_eq!(m.token(TokenKind::Missing, 1).unwrap(), None);
    }

    #[test]
    fn needs_a_key_for_valid_and_expired() {
        let mut o = opts();
        o.hs256_secret = None;
        let m = Minter::new(&o).unwrap();
        assert!(m.check(&[TokenKind::Missing, TokenKind::Garbage, TokenKind::BadEs256]).is_ok());
        assert!(m.check(&[TokenKind::Valid]).is_err());
        o.token = Some("fixed".into());
        let m = Minter::new(&o).unwrap();
        assert!(m.check(&[TokenKind::Valid]).is_ok());
        assert!(m.check(&[TokenKind::Expired]).is_err());
        assert_eq!(m.token(TokenKind::Valid, 3).unwrap().unwrap(), "fixed");
        o.secret_file = Some("/nonexistent".into());
        o.hs256_secret = Some("x".into());
        assert!(Minter::new(&o).is_err());
    }

    #[test]
    fn gateway_config_and_secret_file() {
        let dir = std::env::temp_dir().join(format!("lt-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), "from-file\n").unwrap();
        std::fs::write(
            dir.join("gw.toml"),
            "[auth]\nalgorithms = [\"HS256\"]\nhmac_secret_file = \"secret\"\nissuer = \"me\"\n",
        )
        .unwrap();
        let mut o = opts();
        o.hs256_secret = None;
        o.gateway_config = Some(dir.join("gw.toml"));
        let m = Minter::new(&o).unwrap();
        let t = m.token(TokenKind::Valid, 1).unwrap().unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&["me"]);
        v.validate_aud = false;
        decode::<C>(&t, &DecodingKey::from_secret(b"from-file").unwrap(), &v).unwrap();
        std::fs::write(dir.join("gw.toml"), "[auth]\nalgorithms = [\"ES256\"]\n").unwrap();
        assert!(Minter::new(&o).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
