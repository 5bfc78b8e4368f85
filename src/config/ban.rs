//! `[ban]`: automatic bans of addresses that keep sending what no honest
//! client sends (the `ban` module applies them). Reloaded on SIGHUP; a
//! ban already in force keeps the duration it started with.

use ipnet::IpNet;
use serde::Deserialize;

use super::{invalid, within, ConfigError};

pub const DEFAULT_BAN_ENABLED: bool = true;
pub const DEFAULT_BAN_DRY_RUN: bool = false;
/// Twenty forged tokens in quick succession: no honest client sends that
/// many, and an attacker at 200 a second reaches it in a tenth of a second.
pub const DEFAULT_BAN_THRESHOLD: f64 = 20.0;
pub const DEFAULT_BAN_MIN_BAD_RATIO: f64 = 0.5;
pub const DEFAULT_BAN_HALF_LIFE_S: u64 = 60;
pub const DEFAULT_BAN_DURATION_S: u64 = 60;
pub const DEFAULT_BAN_MAX_DURATION_S: u64 = 3600;
/// Bans held (active, and expired ones remembered a day for doubling).
pub const DEFAULT_BAN_MAX_ENTRIES: usize = 100_000;
/// Addresses whose strike score is tracked at once.
pub const DEFAULT_BAN_MAX_TRACKED: usize = 100_000;

/// Bounds of the `[ban]` keys.
pub const MAX_BAN_S: u64 = 30 * 86_400;
pub const MAX_ENTRIES: u64 = 10_000_000;
pub const MAX_THRESHOLD: f64 = 1_000_000.0;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ban {
    /// Strikes counted and automatic bans made. Manual bans and bans
    /// shared by the fleet are enforced either way.
    pub enabled: bool,
    /// Count would-be automatic bans, refuse nothing for them.
    pub dry_run: bool,
    /// Strike score (decaying) that starts a ban.
    pub threshold: f64,
    /// ...and the share of the address's recent handshakes that struck.
    pub min_bad_ratio: f64,
    pub half_life_s: u64,
    /// The first ban; each repeat within a day doubles it.
    pub duration_s: u64,
    pub max_duration_s: u64,
    /// Addresses never counted nor banned.
    pub allow: Vec<IpNet>,
    pub max_entries: usize,
    pub max_tracked: usize,
}

impl Default for Ban {
    fn default() -> Self {
        Ban {
            enabled: DEFAULT_BAN_ENABLED,
            dry_run: DEFAULT_BAN_DRY_RUN,
            threshold: DEFAULT_BAN_THRESHOLD,
            min_bad_ratio: DEFAULT_BAN_MIN_BAD_RATIO,
            half_life_s: DEFAULT_BAN_HALF_LIFE_S,
            duration_s: DEFAULT_BAN_DURATION_S,
            max_duration_s: DEFAULT_BAN_MAX_DURATION_S,
            allow: Vec::new(),
            max_entries: DEFAULT_BAN_MAX_ENTRIES,
            max_tracked: DEFAULT_BAN_MAX_TRACKED,
        }
    }
}

impl Ban {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.threshold.is_finite() && self.threshold >= 1.0 && self.threshold <= MAX_THRESHOLD) {
            return Err(invalid(
                "ban.threshold",
                format!("must be between 1 and {MAX_THRESHOLD}, got {}", self.threshold),
            ));
        }
        if !(self.min_bad_ratio.is_finite() && (0.0..=1.0).contains(&self.min_bad_ratio)) {
            return Err(invalid(
                "ban.min_bad_ratio",
                format!("must be between 0 and 1, got {}", self.min_bad_ratio),
            ));
        }
        within("ban.half_life_s", self.half_life_s, 1, 86_400)?;
        within("ban.duration_s", self.duration_s, 1, MAX_BAN_S)?;
        within("ban.max_duration_s", self.max_duration_s, self.duration_s, MAX_BAN_S).map_err(|_| {
            invalid(
                "ban.max_duration_s",
                format!(
                    "must be between ban.duration_s ({}) and {MAX_BAN_S}, got {}",
                    self.duration_s, self.max_duration_s
                ),
            )
        })?;
        within("ban.max_entries", self.max_entries as u64, 16, MAX_ENTRIES)?;
        within("ban.max_tracked", self.max_tracked as u64, 16, MAX_ENTRIES)?;
        Ok(())
    }
}
