//! Active health checks: every `upstream.health_interval_ms`, each backend
//! gets a real WebSocket upgrade (its URL's path, through TLS for
//! `wss://`), answered 101 within `upstream.connect_timeout_ms`, then a
//! close. A backend that accepts TCP but not WebSockets counts as down.
//! The results feed the hysteresis in `pool` (`unhealthy_after` /
//! `healthy_after`).
//!
//! One task per gateway; the checks of one round run concurrently, so a
//! backend that hangs costs a round its timeout, not the sum.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::pool::{BackendState, PoolSet, Pools};
use super::Offer;

/// Without checks to run, how often a reload that adds some is looked for.
const IDLE_LOOK: Duration = Duration::from_secs(1);
/// The masked close frame (1000, no reason) a check ends with.
const CLOSE_FRAME: [u8; 8] = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8];

/// Runs the checks until the task is dropped, with the timing of the set
/// in force at each round (a reload may change it, or turn checks on).
pub async fn run(pools: Arc<Pools>) {
    loop {
        let set = pools.load();
        let (interval, timeout) = set.health_timing();
        let start = tokio::time::Instant::now();
        if interval.is_zero() || !set.backends().iter().any(|b| b.pooled) {
            tokio::time::sleep(IDLE_LOOK).await;
            continue;
        }
        let checks = set.backends().iter().filter(|b| b.pooled).map(|b| {
            let set = set.clone();
            let b = b.clone();
            async move {
                let result = check(&set, &b, timeout).await;
                let why = result.as_ref().err().map_or("", String::as_str);
                tracing::debug!(backend = %b.url.text, ok = result.is_ok(), error = why, "health check");
                set.checked(&b, result.is_ok(), why);
            }
        });
        futures_util::future::join_all(checks).await;
        drop(set);
        tokio::time::sleep_until(start + interval).await;
    }
}

/// One check: upgrade, then close.
async fn check(pools: &PoolSet, b: &BackendState, timeout: Duration) -> Result<(), String> {
    let target = if b.url.prefix.is_empty() { "/" } else { b.url.prefix.as_str() };
    // No identity: the check is nobody's connection. A backend that refuses
    // upgrades without `X-Portcullis-Sub` can recognise the check by this
    // header, which no client can send (the gateway strips every
    // client-sent `X-Portcullis-*`).
    let headers = [
        ("User-Agent".to_string(), "portcullis-health-check".to_string()),
        ("X-Portcullis-Health-Check".to_string(), "1".to_string()),
    ];
    let offer = Offer::new(&b.url, target, &headers, Vec::new(), None)?;
    let tls = match (b.url.tls, pools.tls()) {
        (true, Some(t)) => Some(t.connector(&b.url)?),
        _ => None,
    };
    let mut backend = super::connect(&b.url, tls, offer, timeout).await?;
    // The close is a courtesy: the check already passed with the 101.
    let _ = tokio::time::timeout(timeout, async {
        backend.io.write_all(&CLOSE_FRAME).await?;
        backend.io.shutdown().await
    })
    .await;
    Ok(())
}
