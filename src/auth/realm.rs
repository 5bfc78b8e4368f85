//! Realms: who may have signed a token, and with which keys.
//!
//! The top-level `[auth]` is one realm (static keys: secret, PEM, JWKS
//! file; plus the keys of `auth.jwks_url` / `auth.oidc_issuer`), each
//! `[[auth.issuers]]` entry another (only its provider's keys). A token's
//! `iss`, read before any signature, selects an entry when it equals that
//! entry's issuer exactly; any other token goes to the top level (refused
//! there when the top level has no keys of its own). Inside a realm only its
//! algorithms, keys, issuer and audience apply, so a token claiming issuer
//! A and signed with issuer B's key is refused: B's keys are never tried.
//!
//! Choosing a key in a realm for the token's `alg` / `kid`:
//! - a `kid` names a key of the JWKS file (top level) or of the fetched set;
//!   one the fetched set lacks asks the provider for a refetch first
//!   ([`Pick::UnknownKid`]); still unknown after it, the top level falls back
//!   to its static key (as before fetched keys existed: a static key ignores
//!   `kid`) unless a JWKS file is configured;
//! - without `kid`: the static key of the algorithm's family, then a JWKS
//!   file key without `kid`, then a fetched key without `kid`.

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

use super::keys::KeySet;
use super::provider::{FetchedKey, KeyRef, Provider};

/// One family's rules for `jsonwebtoken` (it refuses a `Validation` whose
/// algorithms span families).
pub(crate) fn validations(
    allowed: &[Algorithm],
    leeway: u64,
    issuer: &str,
    audience: &str,
) -> Vec<(AlgorithmFamily, Validation)> {
    let mut out = Vec::new();
    for family in [AlgorithmFamily::Hmac, AlgorithmFamily::Rsa, AlgorithmFamily::Ec, AlgorithmFamily::Ed] {
        let algs: Vec<Algorithm> =
            family.algorithms().iter().copied().filter(|a| allowed.contains(a)).collect();
        if let Some(&first) = algs.first() {
            let mut v = Validation::new(first);
            v.algorithms = algs;
            v.leeway = leeway;
            v.validate_exp = true;
            v.validate_nbf = true;
            let mut required = vec!["exp", "sub"];
            // A configured check must also require the claim:
            // `jsonwebtoken` passes a token that simply omits it.
            if !issuer.is_empty() {
                v.set_issuer(&[issuer]);
                required.push("iss");
            }
            if audience.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&[audience]);
                v.validate_aud = true;
                required.push("aud");
            }
            v.set_required_spec_claims(&required);
            out.push((family, v));
        }
    }
    out
}

/// One realm's algorithms, rules and keys.
pub(crate) struct Realm {
    pub allowed: Vec<Algorithm>,
    pub validations: Vec<(AlgorithmFamily, Validation)>,
    /// Static keys (the top level only; empty for an entry).
    pub keys: KeySet,
    /// The realm's identity provider, and its index in the state's list
    /// (what a cached verification's [`KeyRef`] names).
    pub provider: Option<(u32, Arc<Provider>)>,
    /// The top level with no key of its own (`[[auth.issuers]]` only).
    pub off: bool,
}

/// A key chosen for a token.
pub(crate) enum Chosen<'a> {
    Static(&'a DecodingKey),
    Fetched(Arc<FetchedKey>, KeyRef),
}

impl Chosen<'_> {
    pub fn key(&self) -> &DecodingKey {
        match self {
            Chosen::Static(k) => k,
            // `Fetched` is only built for a key serving the token's alg.
            Chosen::Fetched(k, _) => k.decoding(),
        }
    }
    pub fn key_ref(&self) -> Option<KeyRef> {
        match self {
            Chosen::Static(_) => None,
            Chosen::Fetched(_, r) => Some(*r),
        }
    }
}

/// The outcome of choosing a key.
pub(crate) enum Pick<'a> {
    Key(Chosen<'a>),
    /// The `kid` is not in the fetched set: ask this provider to refetch.
    UnknownKid(&'a Arc<Provider>),
    None,
}

impl Realm {
    pub fn validation(&self, family: AlgorithmFamily) -> Option<&Validation> {
        self.validations.iter().find(|(f, _)| *f == family).map(|(_, v)| v)
    }

    /// The key for `alg` / `kid` (see the module doc). `after_refetch`: the
    /// provider was already asked; an unknown `kid` is final.
    pub fn pick(&self, alg: Algorithm, kid: Option<&str>, after_refetch: bool) -> Pick<'_> {
        if self.off || !self.allowed.contains(&alg) {
            return Pick::None;
        }
        let fetched = |k: &Arc<FetchedKey>, index: u32| {
            if k.serves(alg).is_some() {
                Pick::Key(Chosen::Fetched(k.clone(), KeyRef { provider: index, id: k.id() }))
            } else {
                Pick::None
            }
        };
        if let Some(kid) = kid {
            if let Some(sk) = self.keys.file_kid(kid) {
                return sk.serves(alg).map_or(Pick::None, |k| Pick::Key(Chosen::Static(k)));
            }
            // A provider's keys are public keys: an HMAC token never asks it.
            let provider = self.provider.as_ref().filter(|_| alg.family() != AlgorithmFamily::Hmac);
            if let Some((index, p)) = provider {
                if let Some(k) = p.keys().by_kid(kid) {
                    return fetched(k, *index);
                }
                if !after_refetch {
                    return Pick::UnknownKid(p);
                }
            }
            if self.keys.has_jwks_file() {
                return Pick::None;
            }
        }
        if let Some(k) = self.keys.select(alg, None) {
            return Pick::Key(Chosen::Static(k));
        }
        match &self.provider {
            Some((index, p)) if kid.is_none() => match p.keys().anonymous(alg) {
                Some(k) => fetched(k, *index),
                None => Pick::None,
            },
            _ => Pick::None,
        }
    }
}

/// The top-level realm and the `[[auth.issuers]]` entries by issuer.
pub(crate) struct Realms {
    pub top: Realm,
    pub entries: Vec<Realm>,
    pub by_issuer: HashMap<String, usize>,
}

impl Realms {
    /// The realm of `token`: the entry its `iss` names, else the top level.
    /// Reads the claims unverified (only to choose; the chosen realm's
    /// validation checks `iss` again after the signature).
    pub fn for_token(&self, token: &str) -> &Realm {
        if self.entries.is_empty() {
            return &self.top;
        }
        match peek_issuer(token).and_then(|iss| self.by_issuer.get(&iss)) {
            Some(&i) => &self.entries[i],
            None => &self.top,
        }
    }
}

/// The `iss` claim of an unverified token, when it is a string.
fn peek_issuer(token: &str) -> Option<String> {
    use jwt_base64::Engine;
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    let payload = token.split('.').nth(1)?;
    let bytes = jwt_base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Iss>(&bytes).ok()?.iss
}

#[cfg(test)]
mod tests {
    use super::peek_issuer;
    use jwt_base64::Engine;

    #[test]
    fn issuer_peeked_only_when_a_string() {
        let enc = |v: &str| jwt_base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let t = |claims: &str| format!("{}.{}.sig", enc("{}"), enc(claims));
        assert_eq!(peek_issuer(&t(r#"{"iss":"https://a","sub":"x"}"#)).as_deref(), Some("https://a"));
        assert_eq!(peek_issuer(&t(r#"{"iss":5}"#)), None);
        assert_eq!(peek_issuer(&t(r#"{"sub":"x"}"#)), None);
        assert_eq!(peek_issuer("garbage"), None);
    }
}
