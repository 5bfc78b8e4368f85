//! The cache of verified claims, so a reconnecting client costs a hash and a
//! lookup instead of a signature verification.
//!
//! Keys are the SHA-256 of the token: the cache never holds a token, so a
//! heap dump does not leak credentials, and every key is 32 bytes whatever
//! the token's size. Each entry expires no later than its token (`exp` +
//! leeway, per entry via moka's [`Expiry`]); moka evicts lazily, so a hit is
//! also checked against the clock. Only successful verifications are cached:
//! caching refusals would let a flood of garbage tokens evict good entries.
//! Revocation is *not* cached: the caller checks it on every handshake.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;
use sha2::{Digest, Sha256};

/// A cache key: the SHA-256 of the token.
pub type CacheKey = [u8; 32];

/// The claims of a token whose signature and claims were verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub sub: String,
    /// The token's `exp` (unix seconds).
    pub exp: u64,
    /// `exp` + leeway: the last second the token is accepted.
    pub expires_at: u64,
    pub iat: Option<u64>,
    pub jti: Option<String>,
    /// Claim headers for upstream, computed once at verification.
    pub forward: Vec<(String, String)>,
    /// The fetched key that verified it (`None`: a static key); a hit is
    /// only good while its provider still publishes that key.
    pub key: Option<crate::auth::provider::KeyRef>,
}

// Kept here for the modules that still import it from here; the clock
// itself lives in `crate::clock`.
pub use crate::clock::unix_now;

/// Expires each entry at its token's `expires_at`.
struct UntilTokenExpiry;

impl Expiry<CacheKey, Arc<Verified>> for UntilTokenExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Verified>,
        _created_at: Instant,
    ) -> Option<Duration> {
        // +1: `expires_at` is the last *accepted* second, inclusive.
        Some(Duration::from_secs(value.expires_at.saturating_add(1).saturating_sub(unix_now())))
    }
}

/// Verified claims by token hash.
#[derive(Clone)]
pub struct TokenCache {
    inner: Cache<CacheKey, Arc<Verified>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("entries", &self.inner.entry_count()).finish()
    }
}

impl TokenCache {
    /// A cache of at most `capacity` entries (0: nothing is cached).
    pub fn new(capacity: u64) -> TokenCache {
        TokenCache { inner: Cache::builder().max_capacity(capacity).expire_after(UntilTokenExpiry).build() }
    }

    /// The key of `token`.
    pub fn key(token: &str) -> CacheKey {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The cached claims of `key`, if present and not expired by the clock.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Verified>> {
        let v = self.inner.get(key).await?;
        if unix_now() > v.expires_at {
            self.inner.invalidate(key).await;
            return None;
        }
        Some(v)
    }

    pub async fn insert(&self, key: CacheKey, v: Arc<Verified>) {
        self.inner.insert(key, v).await;
    }

    /// Drops one entry (its key was removed).
    pub async fn invalidate(&self, key: &CacheKey) {
        self.inner.invalidate(key).await;
    }

    /// Drops every entry (keys or validation rules changed).
    pub fn clear(&self) {
        self.inner.invalidate_all();
    }

    /// Approximate entry count (moka counts lazily).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Runs moka's pending housekeeping (tests and exact counts).
    pub async fn sync(&self) {
        self.inner.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(expires_at: u64) -> Arc<Verified> {
        Arc::new(Verified {
            sub: "u".into(),
            exp: expires_at,
            expires_at,
            iat: None,
            jti: None,
            forward: Vec::new(),
            key: None,
        })
    }

    #[test]
    fn key_is_sha256_not_the_token() {
        let k = TokenCache::key("abc");
        assert_eq!(k[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_ne!(TokenCache::key("abd"), k);
    }

    #[tokio::test]
    async fn hit_then_expired_entry_is_a_miss() {
        let c = TokenCache::new(10);
        let now = unix_now();
        c.insert(TokenCache::key("live"), verified(now + 100)).await;
        c.insert(TokenCache::key("dead"), verified(now - 1)).await;
        assert!(c.get(&TokenCache::key("live")).await.is_some());
        assert!(c.get(&TokenCache::key("dead")).await.is_none());
        assert!(c.get(&TokenCache::key("other")).await.is_none());
    }

    #[test]
    fn entry_lives_until_token_expiry() {
        let now = unix_now();
        let d = UntilTokenExpiry.expire_after_create(&[0; 32], &verified(now + 60), Instant::now()).unwrap();
        assert!(d <= Duration::from_secs(61) && d >= Duration::from_secs(59), "{d:?}");
        let d = UntilTokenExpiry.expire_after_create(&[0; 32], &verified(now - 60), Instant::now()).unwrap();
        assert_eq!(d, Duration::ZERO);
    }

    #[tokio::test]
    async fn clear_drops_everything() {
        let c = TokenCache::new(10);
        c.insert(TokenCache::key("a"), verified(unix_now() + 100)).await;
        c.clear();
        assert!(c.get(&TokenCache::key("a")).await.is_none());
    }
}
