//! Redis Cluster: hash slots, the node that owns a slot, the cluster
//! connection the leases speak through, and the topology epoch the link
//! watches.
//!
//! Every script Portcullis runs declares its keys and keeps them in one
//! slot: the revocations are one key (`portcullis:revocations`), and a
//! user's lease keys carry their bucket as a hash tag (`{<b>}`), shared
//! with that bucket's heartbeats (see `session::leases`). [`LEASE_BUCKETS`]
//! buckets spread the users over the cluster's shards.
//!
//! The crate's cluster connection follows `MOVED`/`ASK` and failovers by
//! itself, silently; but a failover may lose the last writes a primary had
//! not yet replicated (lease claims, heartbeats). So the link reads
//! `cluster_current_epoch` (`CLUSTER INFO`) every health tick: the epoch
//! grows with every failover and slot move, and a change makes the leases
//! re-assert and the revocations resync.

use ::redis::aio::MultiplexedConnection;
use ::redis::Value;

/// Lease buckets on a cluster: enough to spread users over dozens of
/// shards, few enough that one heartbeat each per `lease_ttl_ms / 3` and
/// instance stays negligible (64 × 100 instances every 10 s: 640 calls/s).
pub const LEASE_BUCKETS: u32 = 64;
/// Hash slots of Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The slot of `key`: of its hash tag (the first non-empty `{…}`) if any.
pub fn slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let hashed = match b.iter().position(|&c| c == b'{') {
        Some(open) => match b[open + 1..].iter().position(|&c| c == b'}') {
            Some(len) if len > 0 => &b[open + 1..open + 1 + len],
            _ => b,
        },
        None => b,
    };
    crc16(hashed) % SLOTS
}

/// The master of `slot` as `CLUSTER SLOTS` names it on `conn`.
pub async fn slot_owner(conn: &mut MultiplexedConnection, slot: u16) -> Result<(String, u16), String> {
    let v: Value = ::redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await.map_err(|e| e.to_string())?;
    let Value::Array(ranges) = v else { return Err("CLUSTER SLOTS: not an array".into()) };
    for r in ranges {
        let Value::Array(r) = r else { continue };
        let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(Value::Array(master))) =
            (r.first(), r.get(1), r.get(2))
        else {
            continue;
        };
        if i64::from(slot) < *lo || i64::from(slot) > *hi {
            continue;
        }
        let host = match master.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => String::new(),
        };
        let Some(Value::Int(port)) = master.get(1) else { continue };
        let port = u16::try_from(*port).map_err(|_| "CLUSTER SLOTS: bad port".to_string())?;
        return Ok((host, port));
    }
    Err(format!("no node serves slot {slot} (is the cluster complete?)"))
}

/// `cluster_current_epoch` from `CLUSTER INFO`.
pub async fn epoch(conn: &mut MultiplexedConnection) -> Result<u64, String> {
    let info: String =
        ::redis::cmd("CLUSTER").arg("INFO").query_async(conn).await.map_err(|e| e.to_string())?;
    info.lines()
        .find_map(|l| l.strip_prefix("cluster_current_epoch:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "CLUSTER INFO: no cluster_current_epoch".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot("foo{{bar}}zap"), crc16(b"{bar") % SLOTS);
        assert_eq!(slot("portcullis:revocations"), crc16(b"portcullis:revocations") % SLOTS);
    }
}
