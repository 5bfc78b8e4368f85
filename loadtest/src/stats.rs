//! Measurements: live per-group counters and latency histograms that tasks
//! record into, a once-per-second timeline, and the serializable, mergeable
//! snapshot ([`GroupData`]) that workers hand to the parent process.
//!
//! A *group* is one population of connections measured together: the single
//! population of `idle`, one token kind of `handshake`, or the `legit`,
//! `slowloris`, `zombie` and `flood` populations of `mixed`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::client::Outcome;

/// Highest latency recorded, in µs (one hour); longer values saturate.
const MAX_MICROS: u64 = 3_600_000_000;

/// Counter names shared by scenarios, the progress line and the report.
pub mod names {
    /// Connection attempts (TCP connect + upgrade request).
    pub const ATTEMPTS: &str = "attempts";
    /// 101 answers.
    pub const UPGRADED: &str = "upgraded";
    /// Everything else: HTTP refusals, closes, resets, timeouts.
    pub const FAILED: &str = "failed";
    /// Data messages sent.
    pub const MSGS_SENT: &str = "messages_sent";
    /// Data messages received.
    pub const MSGS_RECV: &str = "messages_received";
    /// Payload bytes sent.
    pub const BYTES_SENT: &str = "bytes_sent";
    /// Payload bytes received.
    pub const BYTES_RECV: &str = "bytes_received";
    /// Echoes that did not match what was sent.
    pub const ECHO_MISMATCH: &str = "echo_mismatch";
    /// Legit sessions started (mixed).
    pub const SESSIONS: &str = "sessions";
    /// Legit sessions that upgraded and got every echo back (mixed).
    pub const SESSIONS_OK: &str = "sessions_ok";
}

fn new_hist() -> Histogram<u64> {
    // Bounds and precision are constants known valid (1 ≤ low, high ≥ 2·low, 3 sig figs).
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_MICROS)
}

/// A histogram as `(value, count)` pairs: small, exact to the histogram's
/// precision, and mergeable across processes without a binary format.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HistData(pub Vec<(u64, u64)>);

impl HistData {
    /// Captures a histogram.
    pub fn from_hist(h: &Histogram<u64>) -> Self {
        HistData(h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect())
    }

    /// Rebuilds a histogram.
    pub fn to_hist(&self) -> Histogram<u64> {
        let mut h = new_hist();
        self.add_to(&mut h);
        h
    }

    /// Adds these counts into `h`.
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.0 {
            h.saturating_record_n(v.clamp(1, MAX_MICROS), n);
        }
    }

    /// Merges `other` into self.
    pub fn merge(&mut self, other: &HistData) {
        let mut h = self.to_hist();
        other.add_to(&mut h);
        *self = HistData::from_hist(&h);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }
}

/// One second of a group's life: gauges, cumulative counters and the
/// latencies recorded during that second.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RawTick {
    /// Seconds since the start.
    pub t: u32,
    /// Open connections at the sample.
    pub open: u64,
    /// Cumulative counters at the sample (only the ones set so far).
    pub counters: BTreeMap<String, u64>,
    /// Handshake latencies (µs) recorded in this second.
    pub handshake_us: HistData,
    /// Message round trips (µs) recorded in this second.
    pub rtt_us: HistData,
}

/// Everything measured for one group: what a worker sends to its parent and
/// what the report is computed from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GroupData {
    /// Named counters ([`names`] and scenario-specific ones).
    pub counters: BTreeMap<String, u64>,
    /// Attempt results by HTTP status or failure kind (`101`, `401`, `closed`).
    pub status: BTreeMap<String, u64>,
    /// Attempt results with their reason (`401 missing_token`).
    pub reasons: BTreeMap<String, u64>,
    /// How established connections ended (`close 1011`, `eof`, `reset`,
    /// `held_to_end`, `408` for slowloris sockets).
    pub ends: BTreeMap<String, u64>,
    /// Values merged by maximum (e.g. time for a storm round to settle).
    pub maxima: BTreeMap<String, u64>,
    /// Highest number of open connections seen.
    pub peak_open: u64,
    /// Handshake latency (µs): connect to parsed answer, HTTP answers only.
    pub handshake_us: HistData,
    /// Message round trip (µs).
    pub rtt_us: HistData,
    /// Lifetime (µs) of connections the server ended (time to reap).
    pub lifetime_us: HistData,
    /// TLS handshake alone (µs), `wss://` only; `handshake_us` includes it.
    #[serde(default)]
    pub tls_us: HistData,
    /// One sample per second.
    pub timeline: Vec<RawTick>,
}

fn add_map(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// A timeline's value at second `t`: the tick itself, or between ticks the
/// last one's counters (cumulative, they hold) with no latencies, or after
/// the end the final counters with nothing open; nothing before the start.
fn tick_at(line: &[RawTick], t: u32) -> Option<RawTick> {
    if let Some(x) = line.iter().find(|x| x.t == t) {
        return Some(x.clone());
    }
    let prev = line.iter().filter(|x| x.t < t).max_by_key(|x| x.t)?;
    let ended = line.iter().all(|x| x.t < t);
    Some(RawTick {
        t,
        open: if ended { 0 } else { prev.open },
        counters: prev.counters.clone(),
        ..Default::default()
    })
}

/// Sums two timelines second by second over the union of their seconds
/// (see [`tick_at`] for seconds only one of them has).
pub fn merge_timelines(a: &[RawTick], b: &[RawTick]) -> Vec<RawTick> {
    let mut ts: Vec<u32> = a.iter().chain(b).map(|x| x.t).collect();
    ts.sort_unstable();
    ts.dedup();
    ts.into_iter()
        .map(|t| {
            let mut out = RawTick { t, ..Default::default() };
            for x in [tick_at(a, t), tick_at(b, t)].into_iter().flatten() {
                out.open += x.open;
                add_map(&mut out.counters, &x.counters);
                out.handshake_us.merge(&x.handshake_us);
                out.rtt_us.merge(&x.rtt_us);
            }
            out
        })
        .collect()
}

impl GroupData {
    /// Adds another worker's data for the same group.
    pub fn merge(&mut self, o: &GroupData) {
        self.merge_shifted(o, 0);
    }

    /// Adds another run's data for the same group whose timeline starts
    /// `shift` seconds after this one's (wall-clock alignment).
    pub fn merge_shifted(&mut self, o: &GroupData, shift: u32) {
        add_map(&mut self.counters, &o.counters);
        add_map(&mut self.status, &o.status);
        add_map(&mut self.reasons, &o.reasons);
        add_map(&mut self.ends, &o.ends);
        for (k, v) in &o.maxima {
            let e = self.maxima.entry(k.clone()).or_default();
            *e = (*e).max(*v);
        }
        self.handshake_us.merge(&o.handshake_us);
        self.rtt_us.merge(&o.rtt_us);
        self.lifetime_us.merge(&o.lifetime_us);
        self.tls_us.merge(&o.tls_us);
        let shifted: Vec<RawTick> =
            o.timeline.iter().map(|x| RawTick { t: x.t + shift, ..x.clone() }).collect();
        self.timeline = merge_timelines(&self.timeline, &shifted);
        // Workers peak at different moments: the merged peak is the highest
        // summed sample, and at least the highest single worker's peak.
        let sampled = self.timeline.iter().map(|t| t.open).max().unwrap_or(0);
        self.peak_open = sampled.max(self.peak_open).max(o.peak_open);
    }

    /// A counter's value (0 when never set).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

/// The live side of a group: cheap atomics for the gauge, one mutex for the
/// rest (critical sections are a few map/histogram updates, never an await).
pub struct Group {
    /// The group's name in reports.
    pub name: String,
    /// Open connections now.
    open: AtomicU64,
    /// Highest `open` so far.
    peak: AtomicU64,
    /// Everything else. A std mutex: held for microseconds, never across an await.
    inner: Mutex<Inner>,
}

struct Inner {
    counters: BTreeMap<String, u64>,
    status: BTreeMap<String, u64>,
    reasons: BTreeMap<String, u64>,
    ends: BTreeMap<String, u64>,
    maxima: BTreeMap<String, u64>,
    handshake: Histogram<u64>,
    rtt: Histogram<u64>,
    lifetime: Histogram<u64>,
    tls: Histogram<u64>,
    /// This second's latencies, reset at every tick.
    tick_handshake: Histogram<u64>,
    tick_rtt: Histogram<u64>,
    timeline: Vec<RawTick>,
}

/// The latest per-second sample of a group, for the progress line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Seconds since the start.
    pub t: u32,
    /// Open connections.
    pub open: u64,
    /// Cumulative attempts.
    pub attempts: u64,
    /// Cumulative 101s.
    pub upgraded: u64,
    /// Cumulative failures.
    pub failed: u64,
    /// Cumulative messages received.
    pub messages: u64,
    /// Handshake p50 / p99 of the last second (µs, 0 when none).
    pub hs_p50_us: u64,
    /// See `hs_p50_us`.
    pub hs_p99_us: u64,
    /// Round-trip p50 / p99 of the last second (µs, 0 when none).
    pub rtt_p50_us: u64,
    /// See `rtt_p50_us`.
    pub rtt_p99_us: u64,
}

impl Group {
    /// A new, empty group.
    pub fn new(name: impl Into<String>) -> Self {
        Group {
            name: name.into(),
            open: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                counters: BTreeMap::new(),
                status: BTreeMap::new(),
                reasons: BTreeMap::new(),
                ends: BTreeMap::new(),
                maxima: BTreeMap::new(),
                handshake: new_hist(),
                rtt: new_hist(),
                lifetime: new_hist(),
                tls: new_hist(),
                tick_handshake: new_hist(),
                tick_rtt: new_hist(),
                timeline: Vec::new(),
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A poisoned lock only means another task panicked mid-update; the
        // counters are still usable, so take them rather than cascade.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Adds `n` to a named counter.
    pub fn add(&self, name: &str, n: u64) {
        self.with(|i| *i.counters.entry(name.to_string()).or_default() += n);
    }

    /// Raises a named maximum to at least `v`.
    pub fn max(&self, name: &str, v: u64) {
        self.with(|i| {
            let e = i.maxima.entry(name.to_string()).or_default();
            *e = (*e).max(v);
        });
    }

    /// Records one connection attempt's result and latency.
    pub fn record_attempt(&self, outcome: &Outcome, took: Duration) {
        let (status, reason) = (outcome.status_key(), outcome.reason_key());
        self.with(|i| {
            *i.counters.entry(names::ATTEMPTS.into()).or_default() += 1;
            let key = if *outcome == Outcome::Upgraded { names::UPGRADED } else { names::FAILED };
            *i.counters.entry(key.into()).or_default() += 1;
            *i.status.entry(status).or_default() += 1;
            *i.reasons.entry(reason).or_default() += 1;
            if outcome.answered() {
                i.handshake.saturating_record(micros(took));
                i.tick_handshake.saturating_record(micros(took));
            }
        });
    }

    /// Records an attempt timed by [`crate::client::open`]: its result and
    /// total latency, and the TLS handshake apart when there was one.
    pub fn record_open(&self, outcome: &Outcome, t: &crate::client::Timing) {
        self.record_attempt(outcome, t.total);
        if let Some(d) = t.tls {
            self.with(|i| i.tls.saturating_record(micros(d)));
        }
    }

    /// Records a message round trip.
    pub fn record_rtt(&self, took: Duration) {
        self.with(|i| {
            i.rtt.saturating_record(micros(took));
            i.tick_rtt.saturating_record(micros(took));
        });
    }

    /// Records how an established connection (or a slowloris socket) ended;
    /// `lifetime` when the server ended it, to measure time-to-reap.
    pub fn record_end(&self, how: &str, lifetime: Option<Duration>) {
        self.with(|i| {
            *i.ends.entry(how.to_string()).or_default() += 1;
            if let Some(d) = lifetime {
                i.lifetime.saturating_record(micros(d));
            }
        });
    }

    /// One more open connection.
    pub fn opened(&self) {
        let now = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// One fewer open connection.
    pub fn closed(&self) {
        // Saturate rather than wrap if a caller ever double-counts.
        let _ = self.open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)));
    }

    /// Open connections now.
    pub fn open_now(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes the per-second sample at `t` seconds and returns it as progress.
    pub fn tick(&self, t: u32) -> Progress {
        let open = self.open_now();
        self.with(|i| {
            let c = |k: &str| i.counters.get(k).copied().unwrap_or(0);
            let q = |h: &Histogram<u64>, p: f64| {
                if h.is_empty() {
                    0
                } else {
                    h.value_at_quantile(p)
                }
            };
            let p = Progress {
                t,
                open,
                attempts: c(names::ATTEMPTS),
                upgraded: c(names::UPGRADED),
                failed: c(names::FAILED),
                messages: c(names::MSGS_RECV),
                hs_p50_us: q(&i.tick_handshake, 0.5),
                hs_p99_us: q(&i.tick_handshake, 0.99),
                rtt_p50_us: q(&i.tick_rtt, 0.5),
                rtt_p99_us: q(&i.tick_rtt, 0.99),
            };
            let tick = RawTick {
                t,
                open,
                counters: i.counters.clone(),
                handshake_us: HistData::from_hist(&i.tick_handshake),
                rtt_us: HistData::from_hist(&i.tick_rtt),
            };
            i.tick_handshake.reset();
            i.tick_rtt.reset();
            i.timeline.push(tick);
            p
        })
    }

    /// The serializable snapshot.
    pub fn snapshot(&self) -> GroupData {
        let peak_open = self.peak.load(Ordering::Relaxed);
        self.with(|i| GroupData {
            counters: i.counters.clone(),
            status: i.status.clone(),
            reasons: i.reasons.clone(),
            ends: i.ends.clone(),
            maxima: i.maxima.clone(),
            peak_open,
            handshake_us: HistData::from_hist(&i.handshake),
            rtt_us: HistData::from_hist(&i.rtt),
            lifetime_us: HistData::from_hist(&i.lifetime),
            tls_us: HistData::from_hist(&i.tls),
            timeline: i.timeline.clone(),
        })
    }
}

/// Sums progress samples (several groups or several workers); latency
/// percentiles take the worst.
pub fn sum_progress<'a>(it: impl IntoIterator<Item = &'a Progress>) -> Progress {
    let mut s = Progress::default();
    for p in it {
        s.t = s.t.max(p.t);
        s.open += p.open;
        s.attempts += p.attempts;
        s.upgraded += p.upgraded;
        s.failed += p.failed;
        s.messages += p.messages;
        s.hs_p50_us = s.hs_p50_us.max(p.hs_p50_us);
        s.hs_p99_us = s.hs_p99_us.max(p.hs_p99_us);
        s.rtt_p50_us = s.rtt_p50_us.max(p.rtt_p50_us);
        s.rtt_p99_us = s.rtt_p99_us.max(p.rtt_p99_us);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_merges() {
        let g = Group::new("g");
        g.record_attempt(&Outcome::Upgraded, Duration::from_millis(2));
        g.record_attempt(
            &Outcome::Rejected { status: 401, detail: "missing_token".into() },
            Duration::from_millis(1),
        );
        g.record_attempt(&Outcome::Timeout, Duration::from_secs(10));
        g.opened();
        g.opened();
        g.closed();
        g.record_end("close 1011", Some(Duration::from_secs(3)));
        g.tick(1);
        let a = g.snapshot();
        assert_eq!(a.counter(names::ATTEMPTS), 3);
        assert_eq!(a.counter(names::UPGRADED), 1);
        assert_eq!(a.counter(names::FAILED), 2);
        assert_eq!(a.status["401"], 1);
        assert_eq!(a.reasons["401 missing_token"], 1);
        assert_eq!(a.handshake_us.count(), 2, "timeouts carry no latency");
        assert_eq!(a.peak_open, 2);
        assert_eq!(a.timeline.len(), 1);
        assert_eq!(a.timeline[0].open, 1);

        let mut m = a.clone();
        m.merge(&a);
        assert_eq!(m.counter(names::ATTEMPTS), 6);
        assert_eq!(m.handshake_us.count(), 4);
        assert_eq!(m.timeline.len(), 1);
        assert_eq!(m.timeline[0].open, 2);
        assert_eq!(m.peak_open, 2);
        let h = m.handshake_us.to_hist();
        assert!((1900..=2100).contains(&h.value_at_quantile(0.99)));
        // Round-trips through JSON unchanged.
        let back: GroupData = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn progress_sums() {
        let a = Progress { open: 2, hs_p99_us: 5, ..Default::default() };
        let b = Progress { open: 3, hs_p99_us: 9, ..Default::default() };
        let s = sum_progress([&a, &b]);
        assert_eq!((s.open, s.hs_p99_us), (5, 9));
    }
}
