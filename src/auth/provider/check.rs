//! `check-config`'s look at the identity providers: one fetch of each
//! configured source (discovery and JWKS), so a wrong URL, an untrusted
//! certificate or a key set with no usable key is reported before `serve`,
//! naming the key at fault.

use std::sync::Arc;
use std::time::Duration;

use super::{Provider, Source, Spec};
use crate::auth::keys::allowed_algorithms;
use crate::config::{Auth, ConfigError};
use crate::metrics::Metrics;

/// Each configured source, with the key that names it and a prefix for
/// its message.
fn sources(cfg: &Auth) -> Result<Vec<(&'static str, String, Spec)>, ConfigError> {
    let spec = |source, algorithms| Spec {
        source,
        algorithms,
        ca_file: cfg.jwks_ca_file.clone(),
        timeout: Duration::from_millis(cfg.jwks_timeout_ms),
        refresh: Duration::from_secs(cfg.jwks_refresh_s),
    };
    let mut out = Vec::new();
    if !crate::config::jwks::top_level_off(cfg) {
        if !cfg.jwks_url.is_empty() {
            out.push((
                "auth.jwks_url",
                String::new(),
                spec(Source::Jwks(cfg.jwks_url.clone()), allowed_algorithms(cfg)?),
            ));
        } else if !cfg.oidc_issuer.is_empty() {
            let s = spec(Source::Oidc(cfg.oidc_issuer.clone()), allowed_algorithms(cfg)?);
            out.push(("auth.oidc_issuer", String::new(), s));
        }
    }
    for (i, e) in cfg.issuers.iter().enumerate() {
        let mut algs = Vec::new();
        for name in &e.algorithms {
            let alg = name.parse().map_err(|_| ConfigError::Invalid {
                key: "auth.issuers",
                msg: format!("entry {} ({:?}): unknown algorithm {name:?}", i + 1, e.issuer),
            })?;
            algs.push(alg);
        }
        let source = if e.oidc { Source::Oidc(e.issuer.clone()) } else { Source::Jwks(e.jwks_url.clone()) };
        out.push(("auth.issuers", format!("entry {} ({:?}): ", i + 1, e.issuer), spec(source, algs)));
    }
    Ok(out)
}

/// Fetches every configured source once; the first failure, naming its key.
/// Runs on a thread of its own with its own runtime, so it may be called
/// from inside a runtime or outside one.
pub fn check(cfg: &Auth) -> Result<(), ConfigError> {
    let sources = sources(cfg)?;
    if sources.is_empty() {
        return Ok(());
    }
    let run = move || -> Result<(), ConfigError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
            ConfigError::Invalid {
                key: "auth.jwks_url",
                msg: format!("cannot start a runtime to fetch keys: {e}"),
            }
        })?;
        rt.block_on(async {
            let metrics = Arc::new(Metrics::new());
            let mut checks = Vec::new();
            for (key, prefix, spec) in sources {
                let provider = Provider::new(spec, metrics.clone())?;
                checks.push(async move {
                    let r = provider.fetch_once().await;
                    (key, prefix, r)
                });
            }
            for (key, prefix, r) in futures_util::future::join_all(checks).await {
                if let Err(e) = r {
                    return Err(ConfigError::Invalid { key, msg: format!("{prefix}keys not fetched: {e}") });
                }
            }
            Ok(())
        })
    };
    std::thread::spawn(run).join().unwrap_or_else(|_| {
        Err(ConfigError::Invalid { key: "auth.jwks_url", msg: "internal: the key fetch panicked".into() })
    })
}
