//! The gateway's process as the operator sees it: resident memory, CPU time
//! and open descriptors, read from `/proc/PID` (`--gateway-pid`, this
//! machine only; works for any server, HAProxy included) or else from the
//! standard `process_*` series of its `/metrics` page (`--metrics`, also
//! remote). Sampled once a second during a run ([`Sampler`]) and on demand
//! by `capacity`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::{interval, MissedTickBehavior};

use crate::metrics;
use crate::target::Target;

/// Linux's USER_HZ: the unit of utime/stime in /proc/PID/stat. It is 100 on
/// every architecture Linux ships (the kernel scales to it for userspace).
const USER_HZ: f64 = 100.0;

/// Where the numbers come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `/proc/PID` on this machine.
    Proc(u32),
    /// The `process_*` series of a `/metrics` page.
    Metrics(Target),
}

impl Source {
    /// Resolution of the CPU time it reports, seconds: USER_HZ ticks in
    /// /proc; whole seconds in the `process_cpu_seconds_total` the gateway
    /// exports (its collector truncates).
    pub fn cpu_resolution_s(&self) -> f64 {
        match self {
            Source::Proc(_) => 1.0 / USER_HZ,
            Source::Metrics(_) => 1.0,
        }
    }

    /// How the source is described in reports.
    pub fn describe(&self) -> String {
        match self {
            Source::Proc(pid) => {
                format!("/proc/{pid} (VmRSS in status, utime+stime in stat, entries of fd/)")
            }
            Source::Metrics(t) => format!(
                "http://{}{} (process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds)",
                t.host_header, t.path
            ),
        }
    }
}

/// One reading.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Reading {
    /// Resident set size, bytes.
    pub rss_bytes: f64,
    /// User + system CPU time so far, seconds.
    pub cpu_s: f64,
    /// Open descriptors.
    pub fds: f64,
    /// Descriptor limit (soft), when known.
    pub max_fds: Option<f64>,
}

fn proc_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}

/// Reads `/proc/PID` (status, stat, fd/, limits).
pub fn read_proc(pid: u32) -> Result<Reading, String> {
    let base = format!("/proc/{pid}");
    let status =
        std::fs::read_to_string(format!("{base}/status")).map_err(|e| format!("{base}/status: {e}"))?;
    let rss_kb: f64 = proc_field(&status, "VmRSS:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{base}/status: no VmRSS"))?;
    let stat = std::fs::read_to_string(format!("{base}/stat")).map_err(|e| format!("{base}/stat: {e}"))?;
    // Fields after the command name (which may hold spaces, so split at the last ')').
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu_s = (ticks(14) + ticks(15)) / USER_HZ;
    let fds = std::fs::read_dir(format!("{base}/fd")).map(|d| d.count() as f64).unwrap_or(0.0);
    let max_fds = std::fs::read_to_string(format!("{base}/limits")).ok().and_then(|l| {
        proc_field(&l, "Max open files")
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    });
    Ok(Reading { rss_bytes: rss_kb * 1024.0, cpu_s, fds, max_fds })
}

/// The process series of a `/metrics` page.
pub const PROCESS_SERIES: [&str; 4] =
    ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_max_fds"];

/// Reads the `process_*` series of a `/metrics` page.
pub async fn read_metrics(t: &Target) -> Result<Reading, String> {
    let page = metrics::fetch(t).await?;
    let s = metrics::parse(&page, &PROCESS_SERIES);
    let get = |n: &str| s.iter().find(|x| x.name == n).map(|x| x.value);
    Ok(Reading {
        rss_bytes: get(PROCESS_SERIES[0]).ok_or("metrics: no process_resident_memory_bytes")?,
        cpu_s: get(PROCESS_SERIES[1]).unwrap_or(0.0),
        fds: get(PROCESS_SERIES[2]).unwrap_or(0.0),
        max_fds: get(PROCESS_SERIES[3]),
    })
}

/// One reading from `src`.
pub async fn read(src: &Source) -> Result<Reading, String> {
    match src {
        Source::Proc(pid) => read_proc(*pid),
        Source::Metrics(t) => read_metrics(t).await,
    }
}

/// One second of the gateway's process during a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcTick {
    /// Seconds since the run started.
    pub t: u32,
    /// Resident set size, bytes.
    pub rss_bytes: f64,
    /// CPU used during the last second, in cores (1.0 = one core busy).
    pub cpu_cores: f64,
    /// Open descriptors.
    pub fds: f64,
}

/// The gateway's process over a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcStats {
    /// Where the numbers came from.
    pub source: String,
    /// Reading before the run.
    pub before: Reading,
    /// Reading after the run.
    pub after: Reading,
    /// Highest RSS sampled, bytes.
    pub peak_rss_bytes: f64,
    /// CPU seconds used during the run.
    pub cpu_s: f64,
    /// Mean CPU over the run, in cores.
    pub mean_cpu_cores: f64,
    /// Highest one-second CPU, in cores.
    pub peak_cpu_cores: f64,
    /// Highest descriptor count sampled.
    pub peak_fds: f64,
    /// One sample per second.
    pub timeline: Vec<ProcTick>,
    /// Set when a reading failed (the numbers cover what was read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Samples the gateway's process once a second until told to stop.
pub struct Sampler {
    stats: Arc<Mutex<ProcStats>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    started: tokio::time::Instant,
}

impl Sampler {
    /// Takes the "before" reading and starts sampling.
    pub async fn start(src: Source) -> Self {
        let mut stats = ProcStats { source: src.describe(), ..Default::default() };
        match read(&src).await {
            Ok(r) => {
                stats.before = r;
                stats.peak_rss_bytes = r.rss_bytes;
                stats.peak_fds = r.fds;
            }
            Err(e) => stats.error = Some(e),
        }
        let stats = Arc::new(Mutex::new(stats));
        let (stop, mut rx) = watch::channel(false);
        let started = tokio::time::Instant::now();
        let shared = stats.clone();
        let task = tokio::spawn(async move {
            let mut every = interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(MissedTickBehavior::Delay);
            every.tick().await;
            let mut prev_cpu = shared.lock().map(|s| s.before.cpu_s).unwrap_or(0.0);
            let mut prev_at = started;
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = rx.wait_for(|s| *s) => break,
                }
                let Ok(r) = read(&src).await else { continue };
                let now = tokio::time::Instant::now();
                let dt = (now - prev_at).as_secs_f64().max(1e-3);
                let tick = ProcTick {
                    t: (now - started).as_secs_f64().round() as u32,
                    rss_bytes: r.rss_bytes,
                    cpu_cores: ((r.cpu_s - prev_cpu) / dt).max(0.0),
                    fds: r.fds,
                };
                (prev_cpu, prev_at) = (r.cpu_s, now);
                if let Ok(mut s) = shared.lock() {
                    s.peak_rss_bytes = s.peak_rss_bytes.max(r.rss_bytes);
                    s.peak_fds = s.peak_fds.max(r.fds);
                    s.peak_cpu_cores = s.peak_cpu_cores.max(tick.cpu_cores);
                    s.timeline.push(tick);
                }
            }
        });
        Sampler { stats, stop, task, started }
    }

    /// Stops sampling, takes the "after" reading and returns the stats.
    pub async fn finish(self, src: &Source) -> ProcStats {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let mut s = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        match read(src).await {
            Ok(r) => {
                s.after = r;
                s.peak_rss_bytes = s.peak_rss_bytes.max(r.rss_bytes);
                s.cpu_s = (r.cpu_s - s.before.cpu_s).max(0.0);
                s.mean_cpu_cores = s.cpu_s / elapsed;
            }
            Err(e) => s.error = Some(e),
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let r = read_proc(std::process::id()).unwrap();
        assert!(r.rss_bytes > 1e5, "{r:?}");
        assert!(r.fds >= 3.0 && r.max_fds.unwrap_or(0.0) >= r.fds, "{r:?}");
        assert!(read_proc(u32::MAX).is_err());
    }
}
