//! Revocations: by `jti`, and by subject ("tokens of `sub` issued up to T").
//!
//! # The same-second rule
//!
//! `iat` and T are whole unix seconds, so a token minted in the very second
//! of a revocation cannot be told apart from one minted just before it. The
//! rule errs on the safe side: a subject revocation at T covers `iat <= T`
//! (the token minted in T's own second is refused), and a token minted in
//! a later second (`iat > T`) is accepted. An operator who revokes "now"
//! and mints a fresh token at once may therefore see it refused for up to
//! one second; a stolen token minted in the same second never survives.
//!
//! Every backend keeps an in-memory [`RevocationSet`] so the handshake path
//! never waits on I/O; backends differ in how they persist and share it:
//! [`file`](mod@file) keeps an embedded log, [`redis`](mod@redis) shares revocations across a
//! fleet and writes each one through to that same log.

pub mod file;
pub mod redis;

use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// One revocation, as the admin API receives it and the log stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Revocation {
    Jti { jti: String },
    Subject { sub: String, before: u64 },
}

impl Revocation {
    /// Does this revocation cover a credential with these claims?
    /// A token without `iat` counts as issued before any T; see the module
    /// notes for the same-second rule (`iat <= T`).
    pub fn matches(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool {
        match self {
            Revocation::Jti { jti: j } => jti == Some(j.as_str()),
            Revocation::Subject { sub: s, before } => s == sub && covered(iat, *before),
        }
    }
}

/// Is a token issued at `iat` covered by a subject cut-off `before`? The
/// same-second rule of the module notes: `iat <= before`.
fn covered(iat: Option<u64>, before: u64) -> bool {
    iat.is_none_or(|iat| iat <= before)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("revocation log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store backend: {0}")]
    Backend(String),
}

/// The in-memory view every backend keeps: lookups are lock-free reads.
#[derive(Debug, Default)]
pub struct RevocationSet {
    /// jti → unix seconds it was revoked (for compaction).
    jtis: DashMap<String, u64>,
    /// sub → the latest `before` revoked for it.
    subs: DashMap<String, u64>,
}

impl RevocationSet {
    /// Records `r` (made at unix time `at`); returns false if it changed nothing.
    pub fn insert(&self, r: &Revocation, at: u64) -> bool {
        match r {
            Revocation::Jti { jti } => self.jtis.insert(jti.clone(), at).is_none(),
            Revocation::Subject { sub, before } => {
                let mut e = self.subs.entry(sub.clone()).or_insert(0);
                if *e < *before {
                    *e = *before;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Would inserting `r` change nothing (it, or a later cut-off for the
    /// same subject, is already held)?
    pub fn contains(&self, r: &Revocation) -> bool {
        match r {
            Revocation::Jti { jti } => self.jtis.contains_key(jti),
            Revocation::Subject { sub, before } => self.subs.get(sub).is_some_and(|b| *b >= *before),
        }
    }

    pub fn is_revoked(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool {
        if let Some(j) = jti {
            if self.jtis.contains_key(j) {
                return true;
            }
        }
        match self.subs.get(sub) {
            Some(before) => covered(iat, *before),
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.jtis.len() + self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops revocations that no live token can match any more: a `jti`
    /// revoked before `horizon` and a subject cut-off before `horizon`
    /// (every token issued before it has expired by now).
    pub fn compact(&self, horizon: u64) {
        self.jtis.retain(|_, at| *at >= horizon);
        self.subs.retain(|_, before| *before >= horizon);
    }

    /// A snapshot for persistence: (revocation, at).
    pub fn entries(&self) -> Vec<(Revocation, u64)> {
        let mut v: Vec<_> =
            self.jtis.iter().map(|e| (Revocation::Jti { jti: e.key().clone() }, *e.value())).collect();
        v.extend(
            self.subs
                .iter()
                .map(|e| (Revocation::Subject { sub: e.key().clone(), before: *e.value() }, *e.value())),
        );
        v
    }
}

/// A revocation backend. Lookups are synchronous (served from memory);
/// `revoke` persists (and, for shared backends, publishes).
#[async_trait::async_trait]
pub trait RevocationStore: Send + Sync + 'static {
    fn is_revoked(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool;
    /// Persists a revocation; returns once it is durable locally.
    async fn revoke(&self, r: Revocation) -> Result<(), StoreError>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Revocations as they arrive, local or from other instances, so live
    /// connections can be kicked.
    fn subscribe(&self) -> broadcast::Receiver<Revocation>;
}

pub type SharedStore = Arc<dyn RevocationStore>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_cut_off_covers_its_own_second_and_not_the_next() {
        let r = Revocation::Subject { sub: "u".into(), before: 100 };
        assert!(r.matches("u", None, Some(99)));
        assert!(r.matches("u", None, Some(100)), "minted in the revocation's second: refused");
        assert!(!r.matches("u", None, Some(101)), "minted a second later: accepted");
        assert!(r.matches("u", None, None));
        assert!(!r.matches("v", None, Some(1)));
        let set = RevocationSet::default();
        set.insert(&r, 100);
        assert!(set.is_revoked("u", None, Some(100)));
        assert!(!set.is_revoked("u", None, Some(101)));
    }
}
