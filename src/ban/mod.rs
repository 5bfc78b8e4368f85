//! Automatic bans: an address that keeps sending what no honest client
//! sends is shut out for a while, at accept, before a byte is read.
//!
//! # Strikes
//!
//! Every handshake verdict of a client address (IPv4 /32, IPv6 /64, as
//! [`IpKey`] keys it) is *judged* here: a refusal adds its weight
//! ([`Reject::strike`]) to the address's strike score, a success takes one
//! off. The score, and the counts of recent handshakes and of those that
//! struck, decay with `ban.half_life_s`. A ban starts when the score
//! reaches `ban.threshold` **and** at least `ban.min_bad_ratio` of the
//! recent handshakes struck, so an address with many honest clients (a
//! carrier NAT) is not banned for one of them misbehaving a little.
//!
//! # Bans
//!
//! The first ban lasts `ban.duration_s`; each repeat within a day doubles
//! it, up to `ban.max_duration_s`. Automatic bans get up to a tenth more
//! (jitter), so a botnet cannot time the unban. Manual bans (`POST
//! /admin/bans`) last what the operator asked; they may cover a CIDR range
//! wider than a key (kept apart, at most [`MAX_RANGES`]).
//!
//! # Bounds
//!
//! Both tables are bounded by the configuration: `ban.max_tracked`
//! addresses scored at once (a new address is not scored while the table
//! is full; the sweep drops the scores that decayed to nothing), and
//! `ban.max_entries` bans, active or remembered for doubling. When the ban
//! table is full, a sixteenth of it goes at once: expired entries first,
//! then the active bans nearest their end. Each entry is 32 bytes (a test
//! holds it there), about 37 with the hash table's own byte and load.
//!
//! # Where bans go
//!
//! Every change is written to the ban log beside the revocation log
//! ([`persist`]), so bans survive a restart, and with the Redis backend to
//! the fleet ([`fleet`]), so every instance enforces them within a second.

pub mod fleet;
pub mod persist;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use dashmap::DashMap;
use ipnet::IpNet;
use serde::Serialize;

use crate::admit::IpKey;
use crate::config;
use crate::metrics::{BanStarted as Counted, Metrics};
use crate::reject::Reject;

/// Manual bans of ranges wider than one key.
pub const MAX_RANGES: usize = 1024;
/// How long an expired ban is remembered, so that a repeat doubles.
pub const REMEMBER_S: u64 = 86_400;
/// Most jitter added to an automatic ban, as a share of its duration.
const JITTER: f64 = 0.1;

/// Why a ban started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BanReason {
    Strikes,
    Manual,
}

impl BanReason {
    pub const fn label(self) -> &'static str {
        match self {
            BanReason::Strikes => "strikes",
            BanReason::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<BanReason> {
        match s {
            "strikes" => Some(BanReason::Strikes),
            "manual" => Some(BanReason::Manual),
            _ => None,
        }
    }
}

/// Where a ban was made: here, or on another instance of the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Local,
    Fleet,
}

/// What is banned: one key, or (manual bans only) a wider range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BanKey {
    Key(IpKey),
    Range(IpNet),
}

impl BanKey {
    /// An address (keyed as the per-IP limits key it) or a CIDR. A v4
    /// prefix of 32, or a v6 prefix of 64 or longer, is one key; host bits
    /// of a range are cleared.
    pub fn parse(s: &str) -> Result<BanKey, String> {
        let s = s.trim();
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(BanKey::Key(IpKey::new(ip)));
        }
        let net: IpNet = s.parse().map_err(|_| format!("{s:?} is neither an IP address nor a CIDR"))?;
        let one_key = match net {
            IpNet::V4(n) => n.prefix_len() == 32,
            IpNet::V6(n) => n.prefix_len() >= 64 || n.addr().to_ipv4_mapped().is_some(),
        };
        if one_key {
            Ok(BanKey::Key(IpKey::new(net.addr())))
        } else {
            Ok(BanKey::Range(net.trunc()))
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match self {
            BanKey::Key(k) => *k == IpKey::new(ip),
            BanKey::Range(n) => n.contains(&ip) || mapped(ip).is_some_and(|v4| n.contains(&v4)),
        }
    }
}

fn mapped(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    }
}

impl std::fmt::Display for BanKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BanKey::Key(IpKey::V4(a)) => write!(f, "{}/32", Ipv4Addr::from(*a)),
            BanKey::Key(IpKey::V6(hi)) => write!(f, "{}/64", Ipv6Addr::from(u128::from(*hi) << 64)),
            BanKey::Range(n) => write!(f, "{n}"),
        }
    }
}

/// One ban, active or remembered. Times are unix seconds (u32: good to
/// 2106), kept small because an attacker decides how many there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub until: u32,
    /// When the latest ban of this key started (doubling looks at it).
    pub started: u32,
    /// Repeats within a day so far: the duration is doubled this often.
    pub level: u8,
    pub reason: BanReason,
    pub origin: Origin,
    /// A dry-run ban: counted, remembered so it is counted once, enforced
    /// never and listed never.
    pub dry: bool,
    /// The fleet (Redis) has it: a synced ban missing from the fleet's set
    /// was lifted elsewhere. Always false without the Redis backend.
    pub synced: bool,
    /// Its end was logged (by the sweep).
    pub ended: bool,
}

impl Entry {
    pub fn active(&self, now: u64) -> bool {
        !self.dry && u64::from(self.until) > now
    }
}

/// One address's strike score and what the ratio is taken from, all
/// decayed together. 16 bytes.
#[derive(Clone, Copy, Debug)]
struct Score {
    score: f32,
    /// Recent handshakes that struck, and all recent handshakes.
    bad: f32,
    total: f32,
    /// Deciseconds since the table's epoch, when last decayed.
    at: u32,
}

impl Score {
    fn decay(&mut self, now: u32, half_life_ds: f32) {
        let dt = now.saturating_sub(self.at);
        if dt > 0 {
            let f = (-(dt as f32) / half_life_ds).exp2();
            self.score *= f;
            self.bad *= f;
            self.total *= f;
            self.at = now;
        }
    }
}

/// An item of `GET /admin/bans`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub until: u64,
    pub reason: BanReason,
    pub origin: Origin,
}

/// A change to record: written to the ban log, and to the fleet.
#[derive(Clone, Debug)]
pub enum Change {
    Ban(BanKey, Entry),
    Lift(BanKey),
}

/// Where a change goes (the ban log's queue, the fleet's).
pub type Sink = Box<dyn Fn(&Change) + Send + Sync>;

/// The ban tables (see the module doc).
pub struct Bans {
    exact: DashMap<IpKey, Entry>,
    /// Manual bans of ranges; almost always empty, so read under a lock
    /// only when `ranges_len` says there is one.
    ranges: RwLock<Vec<(IpNet, Entry)>>,
    ranges_len: AtomicUsize,
    /// Active bans (exact and ranges): counted as they start and end,
    /// recounted by the sweep (which also sees the ones that ran out).
    /// Zero means no lookup at all; it is also `portcullis_bans`.
    active: AtomicUsize,
    strikes: DashMap<IpKey, Score>,
    epoch: Instant,
    metrics: Arc<Metrics>,
    /// Where changes go (the ban log's writer, the fleet's pusher).
    sinks: RwLock<Vec<Sink>>,
}

impl Bans {
    pub fn new(metrics: Arc<Metrics>) -> Bans {
        Bans {
            exact: DashMap::new(),
            ranges: RwLock::new(Vec::new()),
            ranges_len: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            strikes: DashMap::new(),
            epoch: Instant::now(),
            metrics,
            sinks: RwLock::new(Vec::new()),
        }
    }

    /// Sends every later change to `sink` too.
    pub fn add_sink(&self, sink: Sink) {
        write(&self.sinks).push(sink);
    }

    fn emit(&self, c: Change) {
        for s in read(&self.sinks).iter() {
            s(&c);
        }
    }

    /// Is `ip` banned now? The accept loop asks for every socket: no
    /// allocation, no lock and no clock read while nothing is banned.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        if self.active.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let now = crate::clock::unix_now();
        if self.exact.get(&IpKey::new(ip)).is_some_and(|e| e.active(now)) {
            return true;
        }
        if self.ranges_len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        read(&self.ranges).iter().any(|(n, e)| e.active(now) && BanKey::Range(*n).contains(ip))
    }

    fn now_ds(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_millis() / 100).unwrap_or(u32::MAX)
    }

    /// Judges one handshake verdict of `ip`: `weight` 0 for a verdict
    /// that is no strike, `None` for a success.
    pub fn judge(&self, cfg: &config::Ban, ip: IpAddr, weight: Option<f32>) {
        if !cfg.enabled || cfg.allow.iter().any(|n| n.contains(&ip)) {
            return;
        }
        let key = IpKey::new(ip);
        let now = self.now_ds();
        let half_life = (cfg.half_life_s * 10) as f32;
        let verdict = {
            let mut s = match self.strikes.get_mut(&key) {
                Some(s) => s,
                None => {
                    // Successes and weightless verdicts of an address that
                    // never struck are not worth a slot: the ratio starts at
                    // the first strike for them.
                    if weight.is_none_or(|w| w <= 0.0) || self.strikes.len() >= cfg.max_tracked {
                        return;
                    }
                    self.strikes.entry(key).or_insert(Score { score: 0.0, bad: 0.0, total: 0.0, at: now })
                }
            };
            s.decay(now, half_life);
            s.total += 1.0;
            match weight {
                None => s.score = (s.score - 1.0).max(0.0),
                Some(w) if w > 0.0 => {
                    s.score += w;
                    s.bad += 1.0;
                }
                Some(_) => {}
            }
            let ratio = if s.total > 0.0 { s.bad / s.total } else { 0.0 };
            (f64::from(s.score) >= cfg.threshold && f64::from(ratio) >= cfg.min_bad_ratio).then_some(s.score)
        };
        if let Some(score) = verdict {
            self.strikes.remove(&key);
            self.ban_for_strikes(cfg, BanKey::Key(key), score);
        }
    }

    fn ban_for_strikes(&self, cfg: &config::Ban, key: BanKey, score: f32) {
        let BanKey::Key(k) = key else { return };
        let now = crate::clock::unix_now();
        let prev = self.exact.get(&k).map(|e| *e);
        if prev.is_some_and(|e| e.dry && u64::from(e.until) > now) {
            return; // Counted already for this would-be ban.
        }
        let level = match prev {
            Some(p) if now.saturating_sub(u64::from(p.started)) < REMEMBER_S => p.level.saturating_add(1),
            _ => 0,
        };
        let base = cfg.duration_s.saturating_mul(1u64 << u32::from(level.min(20))).min(cfg.max_duration_s);
        let jitter = (base as f64 * JITTER * rand::random::<f64>()) as u64;
        let secs = (base + jitter).min(cfg.max_duration_s.max(base));
        let entry = Entry {
            until: clamp_u32(now + secs),
            started: clamp_u32(now),
            level,
            reason: BanReason::Strikes,
            origin: Origin::Local,
            dry: cfg.dry_run,
            synced: false,
            ended: false,
        };
        if cfg.dry_run {
            self.metrics.ban_dry_run();
            tracing::warn!(
                event = "ban",
                dry_run = true,
                key = %key,
                reason = "strikes",
                score = f64::from(score),
                duration_s = secs,
                "would ban (ban.dry_run)"
            );
            self.insert_exact(cfg, k, entry);
            return;
        }
        self.start(cfg, key, entry, Counted::Strikes, Some(score));
    }

    /// A manual ban (`POST /admin/bans`) of `duration_s` from now.
    pub fn ban_manual(&self, cfg: &config::Ban, key: BanKey, duration_s: u64) -> Result<Listed, String> {
        if cfg.allow.iter().any(|n| match key {
            BanKey::Key(k) => n.contains(&key_addr(k)),
            BanKey::Range(r) => n.contains(&r.network()) || r.contains(&n.network()),
        }) {
            return Err(format!("{key} overlaps ban.allow, which is never banned"));
        }
        let now = crate::clock::unix_now();
        let prev = match key {
            BanKey::Key(k) => self.exact.get(&k).map(|e| *e),
            BanKey::Range(_) => None,
        };
        let entry = Entry {
            until: clamp_u32(now + duration_s),
            started: clamp_u32(now),
            level: prev.map_or(0, |p| p.level),
            reason: BanReason::Manual,
            origin: Origin::Local,
            dry: false,
            synced: false,
            ended: false,
        };
        if let BanKey::Range(_) = key {
            if read(&self.ranges).len() >= MAX_RANGES {
                return Err(format!("at most {MAX_RANGES} range bans are held; lift one first"));
            }
        }
        self.start(cfg, key, entry, Counted::Manual, None);
        Ok(listed(key, &entry))
    }

    /// Starts (or replaces) a ban: table, gauge, counter, log, sinks.
    fn start(&self, cfg: &config::Ban, key: BanKey, entry: Entry, counted: Counted, score: Option<f32>) {
        let now = crate::clock::unix_now();
        let was = self.put(cfg, key, entry);
        if !was.is_some_and(|e| e.active(now)) {
            self.active.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.ban_started(counted);
        self.publish_gauge();
        tracing::warn!(
            event = "ban",
            key = %key,
            reason = entry.reason.label(),
            origin = if entry.origin == Origin::Local { "local" } else { "fleet" },
            until = entry.until,
            duration_s = u64::from(entry.until).saturating_sub(now),
            score = score.map_or(0.0, f64::from),
            "address banned"
        );
        if entry.origin == Origin::Local {
            self.emit(Change::Ban(key, entry));
        }
    }

    /// Puts an entry in its table; returns the one it replaced.
    fn put(&self, cfg: &config::Ban, key: BanKey, entry: Entry) -> Option<Entry> {
        match key {
            BanKey::Key(k) => self.insert_exact(cfg, k, entry),
            BanKey::Range(n) => {
                let mut r = write(&self.ranges);
                let was = r.iter().position(|(m, _)| *m == n).map(|i| r.remove(i).1);
                if r.len() < MAX_RANGES {
                    r.push((n, entry));
                }
                self.ranges_len.store(r.len(), Ordering::Relaxed);
                was
            }
        }
    }

    fn insert_exact(&self, cfg: &config::Ban, k: IpKey, entry: Entry) -> Option<Entry> {
        if !self.exact.contains_key(&k) && self.exact.len() >= cfg.max_entries {
            self.evict(cfg.max_entries / 16 + 1);
        }
        self.exact.insert(k, entry)
    }

    /// Makes room: expired entries first, then the bans nearest their end.
    fn evict(&self, n: usize) {
        let now = crate::clock::unix_now();
        let mut all: Vec<(u64, IpKey)> = self
            .exact
            .iter()
            .map(|e| (if e.active(now) { u64::from(e.until) } else { 0 }, *e.key()))
            .collect();
        let n = n.min(all.len());
        if n == 0 {
            return;
        }
        all.select_nth_unstable(n - 1);
        for (_, k) in &all[..n] {
            self.exact.remove(k);
        }
        tracing::warn!(event = "ban_table_full", evicted = n, "ban table full: oldest entries dropped");
    }

    /// Lifts a ban (`DELETE /admin/bans`). False if none was active.
    pub fn lift(&self, key: BanKey) -> bool {
        let lifted = self.remove(key, "lifted");
        if lifted {
            self.emit(Change::Lift(key));
        }
        lifted
    }

    /// Removes a ban without telling the fleet (it told us).
    fn remove(&self, key: BanKey, why: &'static str) -> bool {
        let now = crate::clock::unix_now();
        let was = match key {
            BanKey::Key(k) => self.exact.remove(&k).map(|(_, e)| e),
            BanKey::Range(n) => {
                let mut r = write(&self.ranges);
                let i = r.iter().position(|(m, _)| *m == n);
                let e = i.map(|i| r.remove(i).1);
                self.ranges_len.store(r.len(), Ordering::Relaxed);
                e
            }
        };
        let active = was.is_some_and(|e| e.active(now));
        if active {
            let _ =
                self.active.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
            tracing::info!(event = "unban", key = %key, why, "address ban ended");
            self.publish_gauge();
        }
        active
    }

    /// The active bans, soonest end first.
    pub fn list(&self) -> Vec<Listed> {
        let now = crate::clock::unix_now();
        let mut out: Vec<Listed> = self
            .exact
            .iter()
            .filter(|e| e.active(now))
            .map(|e| listed(BanKey::Key(*e.key()), e.value()))
            .collect();
        out.extend(
            read(&self.ranges)
                .iter()
                .filter(|(_, e)| e.active(now))
                .map(|(n, e)| listed(BanKey::Range(*n), e)),
        );
        out.sort_by(|a, b| a.until.cmp(&b.until).then_with(|| a.key.cmp(&b.key)));
        out
    }

    /// Every entry, for the ban log's compaction and the fleet's resync.
    pub fn snapshot(&self) -> Vec<(BanKey, Entry)> {
        let mut out: Vec<_> = self.exact.iter().map(|e| (BanKey::Key(*e.key()), *e.value())).collect();
        out.extend(read(&self.ranges).iter().map(|(n, e)| (BanKey::Range(*n), *e)));
        out
    }

    /// Restores an entry read back from the ban log (no log line, no
    /// counter: the ban started before this process did).
    pub fn restore(&self, cfg: &config::Ban, key: BanKey, entry: Entry) {
        let was = self.put(cfg, key, entry);
        let now = crate::clock::unix_now();
        if entry.active(now) && !was.is_some_and(|e| e.active(now)) {
            self.active.fetch_add(1, Ordering::Relaxed);
        }
        self.publish_gauge();
    }

    /// A ban another instance made, as the fleet's set has it.
    pub fn from_fleet(&self, cfg: &config::Ban, key: BanKey, mut entry: Entry) {
        let now = crate::clock::unix_now();
        let current = match key {
            BanKey::Key(k) => self.exact.get(&k).map(|e| *e),
            BanKey::Range(n) => read(&self.ranges).iter().find(|(m, _)| *m == n).map(|(_, e)| *e),
        };
        if let Some(c) = current {
            if c.active(now) && c.until >= entry.until {
                // Ours already (or at least as long): now known to the fleet.
                self.mark_synced(key);
                return;
            }
        }
        entry.origin = Origin::Fleet;
        entry.synced = true;
        entry.dry = false;
        entry.ended = false;
        self.start(cfg, key, entry, Counted::Fleet, None);
    }

    pub fn mark_synced(&self, key: BanKey) {
        match key {
            BanKey::Key(k) => {
                if let Some(mut e) = self.exact.get_mut(&k) {
                    e.synced = true;
                }
            }
            BanKey::Range(n) => {
                for (m, e) in write(&self.ranges).iter_mut() {
                    if *m == n {
                        e.synced = true;
                    }
                }
            }
        }
    }

    /// The fleet's set no longer has a ban it had: lifted elsewhere.
    pub fn lifted_by_fleet(&self, key: BanKey) {
        self.remove(key, "lifted");
    }

    /// Once a second: ends expired bans (logged), forgets what is older
    /// than a day, drops decayed scores, recounts the gauge.
    pub fn sweep(&self, cfg: &config::Ban) {
        let now = crate::clock::unix_now();
        let mut ended = Vec::new();
        let mut active = 0;
        self.exact.retain(|k, e| {
            if e.active(now) {
                active += 1;
            } else if !e.dry && !e.ended {
                e.ended = true;
                ended.push(BanKey::Key(*k));
            }
            u64::from(e.started) + REMEMBER_S > now || e.active(now)
        });
        {
            let mut r = write(&self.ranges);
            r.retain(|(n, e)| {
                if e.active(now) {
                    active += 1;
                    true
                } else {
                    if !e.dry {
                        ended.push(BanKey::Range(*n));
                    }
                    false
                }
            });
            self.ranges_len.store(r.len(), Ordering::Relaxed);
        }
        for k in ended {
            tracing::info!(event = "unban", key = %k, why = "expired", "address ban ended");
        }
        self.active.store(active, Ordering::Relaxed);
        self.metrics.set_bans(active);
        let t = self.now_ds();
        let half_life = (cfg.half_life_s * 10) as f32;
        self.strikes.retain(|_, s| {
            s.decay(t, half_life);
            s.score >= 0.05 || s.total >= 0.5
        });
    }

    fn publish_gauge(&self) {
        self.metrics.set_bans(self.active.load(Ordering::Relaxed));
    }

    /// Addresses scored now (for tests and the reference's bound).
    pub fn tracked(&self) -> usize {
        self.strikes.len()
    }

    /// Entries held (active and remembered).
    pub fn entries(&self) -> usize {
        self.exact.len() + read(&self.ranges).len()
    }
}

/// The weight of a refusal as a strike. `handshake_timeout` strikes only
/// for a partial head that ran past its deadline (`partial_expired`): not
/// for a silent socket (a client whose network died) nor for a client that
/// left in the middle of its head.
pub fn weight(reason: Reject, partial_expired: bool) -> f32 {
    if reason == Reject::HandshakeTimeout && !partial_expired {
        return 0.0;
    }
    reason.strike()
}

fn listed(key: BanKey, e: &Entry) -> Listed {
    Listed { key: key.to_string(), until: u64::from(e.until), reason: e.reason, origin: e.origin }
}

fn key_addr(k: IpKey) -> IpAddr {
    match k {
        IpKey::V4(a) => IpAddr::V4(Ipv4Addr::from(a)),
        IpKey::V6(hi) => IpAddr::V6(Ipv6Addr::from(u128::from(hi) << 64)),
    }
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

// A poisoned lock means a panic elsewhere mid-update of a plain Vec; the
// data is still a valid Vec, so go on with it.
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> config::Ban {
        config::Ban::default()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn bans() -> Bans {
        Bans::new(Arc::new(Metrics::new()))
    }

    #[test]
    fn an_entry_is_small() {
        assert!(std::mem::size_of::<(IpKey, Entry)>() <= 32, "{}", std::mem::size_of::<(IpKey, Entry)>());
        assert!(std::mem::size_of::<(IpKey, Score)>() <= 32);
    }

    #[test]
    fn keys_parse_and_print_as_listed() {
        assert_eq!(BanKey::parse("203.0.113.7").unwrap().to_string(), "203.0.113.7/32");
        assert_eq!(BanKey::parse("203.0.113.7/32").unwrap().to_string(), "203.0.113.7/32");
        assert_eq!(BanKey::parse("203.0.113.9/24").unwrap().to_string(), "203.0.113.0/24");
        assert_eq!(BanKey::parse("2001:db8:1:2::5").unwrap().to_string(), "2001:db8:1:2::/64");
        assert_eq!(BanKey::parse("2001:db8:1:2::/64").unwrap().to_string(), "2001:db8:1:2::/64");
        assert_eq!(BanKey::parse("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert!(BanKey::parse("nonsense").is_err());
        assert!(BanKey::parse("10.0.0.1/33").is_err());
        let r = BanKey::parse("10.1.0.0/16").unwrap();
        assert!(r.contains(ip("10.1.2.3")) && !r.contains(ip("10.2.0.1")));
        assert!(r.contains(ip("::ffff:10.1.2.3")));
    }

    #[test]
    fn forged_tokens_ban_at_the_threshold_and_the_neighbour_is_untouched() {
        let (b, c) = (bans(), cfg());
        for _ in 0..19 {
            b.judge(&c, ip("127.0.0.5"), Some(1.0));
        }
        assert!(!b.is_banned(ip("127.0.0.5")));
        b.judge(&c, ip("127.0.0.5"), Some(1.0));
        let now = crate::clock::unix_now();
        assert!(b.is_banned(ip("127.0.0.5")));
        assert!(!b.is_banned(ip("127.0.0.6")));
        let l = b.list();
        assert_eq!(l.len(), 1);
        assert_eq!(
            (l[0].key.as_str(), l[0].reason, l[0].origin),
            ("127.0.0.5/32", BanReason::Strikes, Origin::Local)
        );
        let d = l[0].until - now;
        assert!((60..=66).contains(&d), "{d}");
    }

    #[test]
    fn successes_keep_the_ratio_below_and_weightless_refusals_never_ban() {
        let (b, c) = (bans(), cfg());
        b.judge(&c, ip("127.0.0.7"), Some(1.0));
        for _ in 0..100 {
            b.judge(&c, ip("127.0.0.7"), None);
        }
        for _ in 0..30 {
            b.judge(&c, ip("127.0.0.7"), Some(1.0));
        }
        assert!(!b.is_banned(ip("127.0.0.7")), "30 of 131 is under half");
        for _ in 0..1000 {
            b.judge(&c, ip("127.0.0.8"), Some(Reject::ExpiredToken.strike()));
        }
        assert!(!b.is_banned(ip("127.0.0.8")));
        assert_eq!(b.tracked(), 1, "an address that never struck is not tracked");
    }

    #[test]
    fn repeats_double_up_to_the_cap() {
        let (b, mut c) = (bans(), cfg());
        c.max_duration_s = 200;
        let mut lengths = Vec::new();
        for _ in 0..4 {
            for _ in 0..20 {
                b.judge(&c, ip("127.0.0.9"), Some(1.0));
            }
            let now = crate::clock::unix_now();
            let l = b.list();
            lengths.push(l[0].until - now);
            // Expire it by hand: the next one is a repeat within a day.
            b.exact.get_mut(&IpKey::new(ip("127.0.0.9"))).unwrap().until = now as u32;
        }
        assert!((60..=66).contains(&lengths[0]), "{lengths:?}");
        assert!((120..=132).contains(&lengths[1]), "{lengths:?}");
        assert_eq!(&lengths[2..], &[200, 200], "capped");
    }

    #[test]
    fn allow_list_and_dry_run() {
        let (b, mut c) = (bans(), cfg());
        c.allow = vec!["127.0.0.0/30".parse().unwrap()];
        for _ in 0..100 {
            b.judge(&c, ip("127.0.0.2"), Some(1.0));
        }
        assert_eq!((b.tracked(), b.list().len()), (0, 0));
        c.dry_run = true;
        for _ in 0..100 {
            b.judge(&c, ip("127.0.0.10"), Some(1.0));
        }
        assert!(!b.is_banned(ip("127.0.0.10")));
        assert!(b.list().is_empty());
        assert!(b.metrics.render().contains("portcullis_ban_dry_run_total 1\n"));
    }

    #[test]
    fn manual_range_bans_and_lifts() {
        let (b, c) = (bans(), cfg());
        let k = BanKey::parse("198.51.100.0/24").unwrap();
        b.ban_manual(&c, k, 30).unwrap();
        assert!(b.is_banned(ip("198.51.100.77")));
        assert!(!b.is_banned(ip("198.51.101.1")));
        assert!(b.lift(k));
        assert!(!b.is_banned(ip("198.51.100.77")));
        assert!(!b.lift(k));
        let mut c2 = cfg();
        c2.allow = vec!["198.51.100.8/32".parse().unwrap()];
        assert!(b.ban_manual(&c2, k, 30).is_err(), "a range over an allowed address");
    }

    #[test]
    fn the_table_is_bounded() {
        let (b, mut c) = (bans(), cfg());
        c.max_entries = 64;
        for i in 0..1000u32 {
            b.ban_manual(&c, BanKey::Key(IpKey::V4(0x0a00_0000 + i)), 60 + u64::from(i)).unwrap();
        }
        assert!(b.entries() <= 64, "{}", b.entries());
        // The latest (longest) ban is kept; the first ones went.
        assert!(b.is_banned(ip("10.0.3.231")));
        assert!(!b.is_banned(ip("10.0.0.0")));
    }
}
