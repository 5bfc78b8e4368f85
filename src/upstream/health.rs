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

use super::pool::{BackendState, Pools};
use super::Offer;

/// The masked close frame (1000, no reason) a check ends with.
const CLOSE_FRAME: [u8; 8] = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8];

/// Runs the checks until the task is dropped. Nothing to do without
/// backends or with `interval` zero (passive ejection only).
pub async fn run(pools: Arc<Pools>, interval: Duration, timeout: Duration) {
    if interval.is_zero() || !pools.backends().iter().any(|b| b.pooled) {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let checks = pools.backends().iter().filter(|b| b.pooled).map(|b| {
            let pools = pools.clone();
            let b = b.clone();
            async move {
                let result = check(&pools, &b, timeout).await;
                let why = result.as_ref().err().map_or("", String::as_str);
                tracing::debug!(backend = %b.url.text, ok = result.is_ok(), error = why, "health check");
                pools.checked(&b, result.is_ok(), why);
            }
        });
        futures_util::future::join_all(checks).await;
    }
}

/// One check: upgrade, then close.
async fn check(pools: &Pools, b: &BackendState, timeout: Duration) -> Result<(), String> {
    let target = if b.url.prefix.is_empty() { "/" } else { b.url.prefix.as_str() };
    let headers = [("User-Agent".to_string(), "portcullis-health-check".to_string())];
    let offer = Offer::new(&b.url, target, &headers, Vec::new(), None)?;
    let tls = pools.tls();
    let tls = match (b.url.tls, tls.as_ref()) {
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
