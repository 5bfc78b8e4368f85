//! Wall-clock time as the protocol counts it: unix seconds (token `exp`,
//! `iat`, revocation cut-offs, `/admin/connections` times) and unix
//! milliseconds (Redis lease expiries). One clock for the whole crate, and a
//! leaf module, so that every part can read it without importing another.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now (0 for a clock set before 1970: no panic on a broken
/// host clock).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Unix milliseconds now (0 for a clock set before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
