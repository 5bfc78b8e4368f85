//! Redis Sentinel: which server is the master now, and when that changes.
//!
//! The crate's connection manager reconnects to the address it started
//! with, so after a failover it would keep talking to a demoted replica
//! (`READONLY`) or a dead host. Instead the link asks the sentinels
//! (`SENTINEL get-master-addr-by-name`, each in turn until one answers) at
//! every (re)connection, checks the answer with `ROLE` (a sentinel may be
//! behind), and [`watch`] subscribes to a sentinel's `+switch-master`: on a
//! switch of our master the link reconnects at once instead of waiting for
//! its next health check (every second) to find the old master gone or
//! demoted. Sentinels are reached with the URL's scheme (TLS or not, the
//! same roots) and without its credentials.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;

use super::target::Target;

/// Bound on one sentinel's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// The master's address as the first sentinel that knows it says.
pub async fn master(t: &Target) -> Result<(String, u16), String> {
    let mut errors = Vec::new();
    for (host, port) in &t.sentinels {
        let ask = async {
            let client = t.sentinel_client(host, *port).map_err(|e| e.to_string())?;
            let mut c = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
            let addr: Option<(String, u16)> = ::redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&t.master_name)
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            addr.ok_or_else(|| format!("does not know a master named {:?}", t.master_name))
        };
        match tokio::time::timeout(ASK_TIMEOUT, ask).await {
            Ok(Ok(addr)) => return Ok(addr),
            Ok(Err(e)) => errors.push(format!("{host}:{port}: {e}")),
            Err(_) => errors.push(format!("{host}:{port}: timed out")),
        }
    }
    Err(format!("no sentinel named the master ({})", errors.join("; ")))
}

/// Counts `+switch-master` announcements of our master, from whichever
/// sentinel answers (the next one when it goes away). Never returns.
pub async fn watch(t: Arc<Target>, switches: watch::Sender<u64>) {
    let mut i = 0usize;
    loop {
        let (host, port) = t.sentinels[i % t.sentinels.len()].clone();
        i = i.wrapping_add(1);
        let session = async {
            let client = t.sentinel_client(&host, port)?;
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe("+switch-master").await?;
            Ok::<_, ::redis::RedisError>(ps)
        };
        if let Ok(Ok(mut ps)) = tokio::time::timeout(ASK_TIMEOUT, session).await {
            let mut stream = ps.on_message();
            while let Some(msg) = stream.next().await {
                // "<name> <old ip> <old port> <new ip> <new port>"
                let payload: String = msg.get_payload().unwrap_or_default();
                if payload.split(' ').next() == Some(t.master_name.as_str()) {
                    tracing::info!(switch = %payload, "sentinel announced a new master");
                    switches.send_modify(|n| *n += 1);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
