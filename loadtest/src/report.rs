//! Results: [`RunData`] (what a run or a worker measured, mergeable), the
//! [`Report`] computed from it (rates, percentiles, the per-second timeline),
//! the summary table on stdout, and the `--json` file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::metrics::Scrape;
use crate::stats::{names, GroupData, HistData};

/// What one process measured (or several, merged). It travels in the
/// `--json` file as `raw`, histograms included, so that `merge` can combine
/// runs exactly.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunData {
    /// Scenario name.
    pub scenario: String,
    /// Wall-clock start, Unix seconds.
    pub started_unix_s: u64,
    /// Wall-clock start, Unix milliseconds (aligns runs of several machines).
    #[serde(default)]
    pub started_unix_ms: u64,
    /// Run length in seconds (the longest worker's).
    pub elapsed_s: f64,
    /// Worker processes merged in.
    pub workers: u32,
    /// Per-group measurements.
    pub groups: BTreeMap<String, GroupData>,
    /// `capacity`'s sizing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<crate::scenarios::capacity::Sizing>,
}

impl RunData {
    /// Merges another worker's data (same start).
    pub fn merge(&mut self, o: &RunData) {
        if self.scenario.is_empty() {
            self.scenario = o.scenario.clone();
        }
        self.started_unix_s = if self.started_unix_s == 0 {
            o.started_unix_s
        } else {
            self.started_unix_s.min(o.started_unix_s)
        };
        self.started_unix_ms = if self.started_unix_ms == 0 {
            o.started_unix_ms
        } else {
            self.started_unix_ms.min(o.started_unix_ms)
        };
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
        self.workers += o.workers;
        for (name, g) in &o.groups {
            self.groups.entry(name.clone()).or_default().merge(g);
        }
        if self.capacity.is_none() {
            self.capacity = o.capacity.clone();
        }
    }

    fn start_ms(&self) -> u64 {
        if self.started_unix_ms > 0 {
            self.started_unix_ms
        } else {
            self.started_unix_s * 1000
        }
    }

    /// Combines runs of several machines: counts summed, histograms merged,
    /// per-second timelines aligned on the wall clock (to the nearest
    /// second of each run's start), the span from the first start to the
    /// last end.
    pub fn merge_runs(runs: &[RunData]) -> RunData {
        let first = runs.iter().map(RunData::start_ms).min().unwrap_or(0);
        let end = runs.iter().map(|r| r.start_ms() as f64 / 1000.0 + r.elapsed_s).fold(0.0, f64::max);
        let mut out = RunData {
            scenario: runs.first().map(|r| r.scenario.clone()).unwrap_or_default(),
            started_unix_s: first / 1000,
            started_unix_ms: first,
            elapsed_s: if runs.is_empty() { 0.0 } else { end - first as f64 / 1000.0 },
            ..Default::default()
        };
        for r in runs {
            let shift = ((r.start_ms() - first) as f64 / 1000.0).round() as u32;
            out.workers += r.workers;
            for (name, g) in &r.groups {
                out.groups.entry(name.clone()).or_default().merge_shifted(g, shift);
            }
        }
        out
    }
}

/// Latency summary, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn q(h: &Histogram<u64>, p: f64) -> Option<f64> {
    (!h.is_empty()).then(|| ms(h.value_at_quantile(p)))
}

impl Percentiles {
    /// Summarizes µs samples; `None` when there are none.
    pub fn of(d: &HistData) -> Option<Self> {
        let h = d.to_hist();
        if h.is_empty() {
            return None;
        }
        Some(Percentiles {
            count: h.len(),
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }
}

/// One second of a group, as reported.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Tick {
    /// Seconds since the start.
    pub t: u32,
    /// Open connections.
    pub open: u64,
    /// Cumulative attempts / 101s / failures / messages received.
    pub attempts: u64,
    /// See `attempts`.
    pub upgraded: u64,
    /// See `attempts`.
    pub failed: u64,
    /// See `attempts`.
    pub messages: u64,
    /// Handshake latency percentiles of this second (ms).
    pub hs_p50_ms: Option<f64>,
    /// See `hs_p50_ms`.
    pub hs_p99_ms: Option<f64>,
    /// See `hs_p50_ms`.
    pub hs_p999_ms: Option<f64>,
    /// Round-trip percentiles of this second (ms).
    pub rtt_p50_ms: Option<f64>,
    /// See `rtt_p50_ms`.
    pub rtt_p99_ms: Option<f64>,
    /// See `rtt_p50_ms`.
    pub rtt_p999_ms: Option<f64>,
}

/// A per-second percentile summarized over the run's seconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PerSecond {
    /// Seconds with samples.
    pub seconds: usize,
    /// The worst second's value (ms).
    pub worst_ms: f64,
    /// When it was (seconds since the start).
    pub worst_t: u32,
    /// The median of the seconds' values (ms).
    pub median_ms: f64,
}

fn per_second(ticks: &[Tick]) -> Option<PerSecond> {
    let mut v: Vec<(f64, u32)> = ticks.iter().filter_map(|t| t.hs_p99_ms.map(|p| (p, t.t))).collect();
    if v.is_empty() {
        return None;
    }
    let (worst_ms, worst_t) = v.iter().copied().fold((f64::MIN, 0), |a, b| if b.0 > a.0 { b } else { a });
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some(PerSecond { seconds: v.len(), worst_ms, worst_t, median_ms: v[v.len() / 2].0 })
}

/// A group's results.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupReport {
    /// Named counters.
    pub counters: BTreeMap<String, u64>,
    /// Attempts by HTTP status or failure kind.
    pub status: BTreeMap<String, u64>,
    /// Attempts by status and reason.
    pub reasons: BTreeMap<String, u64>,
    /// How established connections / slow sockets ended.
    pub ends: BTreeMap<String, u64>,
    /// Maxima (storm round timings).
    pub maxima: BTreeMap<String, u64>,
    /// Highest open connections.
    pub peak_open: u64,
    /// Attempts per second over the run.
    pub attempts_per_s: f64,
    /// 101s per second over the run.
    pub upgraded_per_s: f64,
    /// Messages received per second over the run.
    pub messages_per_s: f64,
    /// Payload bytes received per second over the run.
    pub bytes_per_s: f64,
    /// Legit sessions ok / sessions (mixed), else 101s / attempts.
    pub success_ratio: Option<f64>,
    /// Handshake latency (ms), HTTP answers only.
    pub handshake_ms: Option<Percentiles>,
    /// Message round trip (ms).
    pub rtt_ms: Option<Percentiles>,
    /// Lifetime of connections the server ended (ms): time to reap.
    pub lifetime_ms: Option<Percentiles>,
    /// TLS handshake alone (ms), `wss://` only; `handshake_ms` includes it.
    pub tls_ms: Option<Percentiles>,
    /// Handshake p99 of each second, over the whole run (nothing excluded):
    /// the worst second and the median second.
    pub hs_p99_per_second: Option<PerSecond>,
    /// One sample per second.
    pub timeline: Vec<Tick>,
}

impl GroupReport {
    /// Computes the report of one group over `elapsed_s` seconds.
    pub fn of(g: &GroupData, elapsed_s: f64) -> Self {
        let per_s = |n: u64| {
            if elapsed_s > 0.0 {
                n as f64 / elapsed_s
            } else {
                0.0
            }
        };
        let attempts = g.counter(names::ATTEMPTS);
        let sessions = g.counter(names::SESSIONS);
        let success_ratio = if sessions > 0 {
            Some(g.counter(names::SESSIONS_OK) as f64 / sessions as f64)
        } else if attempts > 0 {
            Some(g.counter(names::UPGRADED) as f64 / attempts as f64)
        } else {
            None
        };
        let timeline: Vec<Tick> = g
            .timeline
            .iter()
            .map(|t| {
                let hs = t.handshake_us.to_hist();
                let rtt = t.rtt_us.to_hist();
                let c = |k: &str| t.counters.get(k).copied().unwrap_or(0);
                Tick {
                    t: t.t,
                    open: t.open,
                    attempts: c(names::ATTEMPTS),
                    upgraded: c(names::UPGRADED),
                    failed: c(names::FAILED),
                    messages: c(names::MSGS_RECV),
                    hs_p50_ms: q(&hs, 0.5),
                    hs_p99_ms: q(&hs, 0.99),
                    hs_p999_ms: q(&hs, 0.999),
                    rtt_p50_ms: q(&rtt, 0.5),
                    rtt_p99_ms: q(&rtt, 0.99),
                    rtt_p999_ms: q(&rtt, 0.999),
                }
            })
            .collect();
        GroupReport {
            counters: g.counters.clone(),
            status: g.status.clone(),
            reasons: g.reasons.clone(),
            ends: g.ends.clone(),
            maxima: g.maxima.clone(),
            peak_open: g.peak_open,
            attempts_per_s: per_s(attempts),
            upgraded_per_s: per_s(g.counter(names::UPGRADED)),
            messages_per_s: per_s(g.counter(names::MSGS_RECV)),
            bytes_per_s: per_s(g.counter(names::BYTES_RECV)),
            success_ratio,
            handshake_ms: Percentiles::of(&g.handshake_us),
            rtt_ms: Percentiles::of(&g.rtt_us),
            lifetime_ms: Percentiles::of(&g.lifetime_us),
            tls_ms: Percentiles::of(&g.tls_us),
            hs_p99_per_second: per_second(&timeline),
            timeline,
        }
    }
}

/// The whole result, as written to `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `portcullis-loadtest <version>`.
    pub tool: String,
    /// Scenario name.
    pub scenario: String,
    /// Target URL.
    pub target: String,
    /// Every option of the run (secrets and tokens left out).
    pub params: serde_json::Value,
    /// Worker processes.
    pub workers: u32,
    /// Wall-clock start, Unix seconds.
    pub started_unix_s: u64,
    /// Run length in seconds.
    pub elapsed_s: f64,
    /// Per-group results, in the scenario's order.
    pub groups: Vec<(String, GroupReport)>,
    /// The gateway's counters, with `--metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Scrape>,
    /// The gateway's process (RSS, CPU, descriptors), with `--gateway-pid`
    /// or `--metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<crate::procstat::ProcStats>,
    /// `capacity`'s sizing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<crate::scenarios::capacity::Sizing>,
    /// Things the reader must not miss (`--insecure`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The measurements themselves, histograms included (what `merge` reads).
    pub raw: RunData,
}

impl Report {
    /// Builds the report; `order` lists group names in display order.
    pub fn new(
        data: &RunData,
        order: &[String],
        target: String,
        params: serde_json::Value,
        metrics: Option<Scrape>,
    ) -> Self {
        let groups = order
            .iter()
            .filter_map(|n| data.groups.get(n).map(|g| (n.clone(), GroupReport::of(g, data.elapsed_s))))
            .collect();
        Report {
            tool: format!("portcullis-loadtest {}", env!("CARGO_PKG_VERSION")),
            scenario: data.scenario.clone(),
            target,
            params,
            workers: data.workers,
            started_unix_s: data.started_unix_s,
            elapsed_s: data.elapsed_s,
            groups,
            metrics,
            gateway: None,
            capacity: data.capacity.clone(),
            warnings: Vec::new(),
            raw: data.clone(),
        }
    }

    /// The JSON document.
    pub fn to_json(&self) -> serde_json::Value {
        // Groups as an ordered object for readers; serde_json keeps insertion
        // order only with a feature, so the order is also given as a list.
        let mut v = serde_json::to_value(self).unwrap_or_default();
        let groups: serde_json::Map<String, serde_json::Value> = self
            .groups
            .iter()
            .map(|(n, g)| (n.clone(), serde_json::to_value(g).unwrap_or_default()))
            .collect();
        v["groups"] = serde_json::Value::Object(groups);
        v["group_order"] = self.groups.iter().map(|(n, _)| n.clone()).collect();
        v
    }

    /// The summary table printed on stdout.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "scenario {}  target {}  workers {}  elapsed {:.1} s",
            self.scenario, self.target, self.workers, self.elapsed_s
        );
        for w in &self.warnings {
            let _ = writeln!(s, "WARNING: {w}");
        }
        for (name, g) in &self.groups {
            let _ = writeln!(s, "\n== {name} ==");
            let row = |s: &mut String, k: &str, v: String| {
                let _ = writeln!(s, "  {k:<22} {v}");
            };
            let attempts = g.counters.get(names::ATTEMPTS).copied().unwrap_or(0);
            if attempts > 0 {
                row(&mut s, "attempts", format!("{attempts}  ({:.1}/s)", g.attempts_per_s));
                row(
                    &mut s,
                    "upgraded (101)",
                    format!(
                        "{}  ({:.1}/s)",
                        g.counters.get(names::UPGRADED).copied().unwrap_or(0),
                        g.upgraded_per_s
                    ),
                );
            }
            row(&mut s, "peak open", g.peak_open.to_string());
            if let Some(r) = g.success_ratio {
                row(&mut s, "success ratio", format!("{:.4}", r));
            }
            let msgs = g.counters.get(names::MSGS_RECV).copied().unwrap_or(0);
            if msgs > 0 {
                row(
                    &mut s,
                    "messages received",
                    format!("{msgs}  ({:.1}/s, {:.2} MB/s)", g.messages_per_s, g.bytes_per_s / 1e6),
                );
            }
            for (label, p) in [
                ("handshake ms", &g.handshake_ms),
                ("  of which TLS ms", &g.tls_ms),
                ("round trip ms", &g.rtt_ms),
                ("lifetime (reaped) ms", &g.lifetime_ms),
            ] {
                if let Some(p) = p {
                    row(
                        &mut s,
                        label,
                        format!(
                            "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})",
                            p.p50, p.p90, p.p99, p.p999, p.max, p.count
                        ),
                    );
                }
            }
            if let Some(p) = &g.hs_p99_per_second {
                row(
                    &mut s,
                    "handshake p99 per s",
                    format!(
                        "worst {:.2} (t={} s)  median {:.2}  over {} s",
                        p.worst_ms, p.worst_t, p.median_ms, p.seconds
                    ),
                );
            }
            for (label, m) in [("status", &g.status), ("reasons", &g.reasons), ("ends", &g.ends)] {
                if !m.is_empty() {
                    let _ = writeln!(s, "  {label}:");
                    for (k, v) in m {
                        let _ = writeln!(s, "    {k:<40} {v:>9}");
                    }
                }
            }
            let skip = [
                names::ATTEMPTS,
                names::UPGRADED,
                names::FAILED,
                names::MSGS_RECV,
                names::SESSIONS,
                names::SESSIONS_OK,
            ];
            let extra: Vec<_> = g.counters.iter().filter(|(k, _)| !skip.contains(&k.as_str())).collect();
            if !extra.is_empty() || !g.maxima.is_empty() {
                let _ = writeln!(s, "  counters:");
                for (k, v) in extra.into_iter().chain(g.maxima.iter()) {
                    let _ = writeln!(s, "    {k:<40} {v:>9}");
                }
            }
        }
        if let Some(p) = &self.gateway {
            let _ = writeln!(s, "\n== gateway process: {} ==", p.source);
            if let Some(e) = &p.error {
                let _ = writeln!(s, "  error: {e}");
            }
            let mib = |b: f64| b / (1024.0 * 1024.0);
            let _ = writeln!(
                s,
                "  RSS MiB                before {:.1}  peak {:.1}  after {:.1}",
                mib(p.before.rss_bytes),
                mib(p.peak_rss_bytes),
                mib(p.after.rss_bytes)
            );
            let _ = writeln!(
                s,
                "  CPU                    {:.2} s  mean {:.2} cores  peak {:.2} cores (1 s samples)",
                p.cpu_s, p.mean_cpu_cores, p.peak_cpu_cores
            );
            let _ = writeln!(s, "  descriptors            before {}  peak {}", p.before.fds, p.peak_fds);
        }
        if let Some(c) = &self.capacity {
            let _ = writeln!(s, "\n== capacity ({}) ==", c.mode);
            let _ = writeln!(s, "  readings from {}", c.source);
            let _ = writeln!(s, "  stopped: {}", c.stop_reason);
            let _ = writeln!(s, "  {:>8} {:>12} {:>8} {:>10}", "open", "RSS MiB", "fds", "CPU s");
            for st in &c.steps {
                let _ = writeln!(
                    s,
                    "  {:>8} {:>12.1} {:>8} {:>10.2}",
                    st.open,
                    st.reading.rss_bytes / (1024.0 * 1024.0),
                    st.reading.fds,
                    st.reading.cpu_s
                );
            }
            for f in &c.figures {
                let _ = writeln!(s, "  {:<28} {:>12.2} {}", f.name, f.value, f.unit);
                let _ = writeln!(s, "      {}", f.how);
            }
        }
        if let Some(m) = &self.metrics {
            let _ = writeln!(s, "\n== gateway metrics (change over the run) {} ==", m.url);
            if let Some(e) = &m.error {
                let _ = writeln!(s, "  error: {e}");
            }
            for d in m.delta.iter().filter(|d| d.value != 0.0) {
                let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(s, "  {:<60} {:>9}", format!("{}{{{}}}", d.name, labels.join(",")), d.value);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Outcome;
    use crate::stats::Group;
    use std::time::Duration;

    /// Deterministic samples: a log-uniform spread from ~100 µs to ~1 s.
    fn samples(seed: u64, n: usize) -> Vec<u64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (x >> 11) as f64 / (1u64 << 53) as f64;
                (100.0 * 10f64.powf(4.0 * u)) as u64
            })
            .collect()
    }

    fn run_of(samples: &[u64], start_ms: u64, ticks: u32) -> RunData {
        let g = Group::new("legit");
        g.tick(0);
        for (i, us) in samples.iter().enumerate() {
            g.record_attempt(&Outcome::Upgraded, Duration::from_micros(*us));
            if (i + 1) % (samples.len() / ticks as usize) == 0 {
                g.tick((i / (samples.len() / ticks as usize)) as u32 + 1);
            }
        }
        let mut d = RunData {
            scenario: "mixed".into(),
            started_unix_ms: start_ms,
            started_unix_s: start_ms / 1000,
            elapsed_s: ticks as f64,
            workers: 1,
            ..Default::default()
        };
        d.groups.insert("legit".into(), g.snapshot());
        d
    }

    #[test]
    fn merged_runs_equal_the_combined_samples() {
        let (a, b) = (samples(1, 20_000), samples(2, 7_000));
        // b started 3 s after a (a second load machine).
        let (ra, rb) = (run_of(&a, 1_700_000_000_000, 10), run_of(&b, 1_700_000_003_000, 7));
        let m = RunData::merge_runs(&[ra.clone(), rb.clone()]);
        let g = &m.groups["legit"];
        assert_eq!(g.counter(names::ATTEMPTS), 27_000);
        assert_eq!(g.counter(names::UPGRADED), 27_000);
        assert_eq!(m.workers, 2);
        assert_eq!(m.elapsed_s, 10.0);
        // Percentiles of the merged histograms are those of one histogram
        // fed every raw sample...
        let all = Group::new("all");
        for us in a.iter().chain(&b) {
            all.record_attempt(&Outcome::Upgraded, Duration::from_micros(*us));
        }
        let merged = Percentiles::of(&g.handshake_us).unwrap();
        assert_eq!(Some(merged.clone()), Percentiles::of(&all.snapshot().handshake_us));
        // ...and those of the sorted samples, to the histogram's precision.
        let mut sorted: Vec<u64> = a.iter().chain(&b).copied().collect();
        sorted.sort_unstable();
        for (q, got) in [(0.5, merged.p50), (0.9, merged.p90), (0.99, merged.p99), (0.999, merged.p999)] {
            let exact = sorted[((q * sorted.len() as f64).ceil() as usize).max(1) - 1] as f64 / 1000.0;
            assert!((got - exact).abs() <= exact * 0.002 + 0.001, "q{q}: {got} vs {exact}");
        }
        assert_eq!(merged.count, 27_000);
        // Averaging the two runs' p99 would not give this (the point of merging histograms).
        let (pa, pb) = (
            Percentiles::of(&ra.groups["legit"].handshake_us).unwrap(),
            Percentiles::of(&rb.groups["legit"].handshake_us).unwrap(),
        );
        assert!(merged.p99 <= pa.p99.max(pb.p99) && merged.p99 >= pa.p99.min(pb.p99));
        // Seconds aligned by wall clock: at t = 3 s, a's 3rd second plus b's start.
        let at = |t: u32| g.timeline.iter().find(|x| x.t == t).unwrap().counters[names::ATTEMPTS];
        assert_eq!(at(3), 6_000);
        assert_eq!(at(4), 8_000 + 1_000);
        // After b's end (t = 10 is a's last), b's final counts carry forward.
        assert_eq!(at(10), 27_000);
        assert_eq!(g.timeline.len(), 11);
    }

    #[test]
    fn report_from_groups() {
        let g = Group::new("idle");
        for i in 0..100 {
            g.record_attempt(&Outcome::Upgraded, Duration::from_micros(1000 + i * 10));
        }
        g.record_attempt(&Outcome::Rejected { status: 429, detail: String::new() }, Duration::from_millis(1));
        g.tick(1);
        let mut data = RunData { scenario: "idle".into(), elapsed_s: 2.0, workers: 1, ..Default::default() };
        data.groups.insert("idle".into(), g.snapshot());
        let r = Report::new(&data, &["idle".into()], "ws://127.0.0.1:1/".into(), serde_json::json!({}), None);
        let (_, gr) = &r.groups[0];
        assert_eq!(gr.attempts_per_s, 50.5);
        assert!((gr.success_ratio.unwrap() - 100.0 / 101.0).abs() < 1e-9);
        let p = gr.handshake_ms.as_ref().unwrap();
        assert_eq!(p.count, 101);
        assert!(p.p50 > 1.4 && p.p50 < 1.6, "{p:?}");
        assert_eq!(gr.timeline.len(), 1);
        let table = r.table();
        assert!(table.contains("attempts") && table.contains("429"), "{table}");
        let j = r.to_json();
        assert_eq!(j["groups"]["idle"]["status"]["101"], 100);
        assert_eq!(j["group_order"][0], "idle");
    }
}
