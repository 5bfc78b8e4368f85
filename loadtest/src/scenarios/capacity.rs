//! `capacity`: the sizing answer. Ramps idle authenticated connections (or
//! stalled handshakes) in `--step`s at `--rate`, reading the gateway's
//! process (RSS, CPU, descriptors; `procstat`) after each step, until a stop
//! condition: `--count` reached, refusals appearing, RSS near `--max-rss`,
//! descriptors near the gateway's limit, or the run's duration. Then holds
//! the top for `--hold` (idle CPU) and, with `--msg-rate`, a second `--hold`
//! with every connection sending (CPU per message). The [`Sizing`] it
//! reports carries each figure with the readings it was computed from.
//!
//! Differences of two readings of the same process are used throughout, so
//! what the gateway holds before the run (runtime, caches, buffers) is not
//! charged to connections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant};

use super::slowloris::Trickle;
use super::{connect, end_label, wait_stop, Ctx, Pacer};
use crate::cli::{CapacityArgs, CapacityMode};
use crate::client::Message;
use crate::frame::opcode;
use crate::procstat::{self, Reading};
use crate::stats::{names, Group};
use crate::token::TokenKind;

/// Default target count.
pub const DEFAULT_COUNT: u64 = 10_000;

/// Stop ramping when RSS or descriptors reach this share of their limit.
const NEAR_LIMIT: f64 = 0.9;

/// One GiB: the unit of "connections per GB".
const GIB: f64 = (1u64 << 30) as f64;

/// The gateway measured after one step.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Step {
    /// Connections (or stalled sockets) open when measured.
    pub open: u64,
    /// Successful handshakes so far (idle mode).
    pub handshakes: u64,
    /// The reading.
    pub reading: Reading,
    /// Seconds since the ramp began.
    pub at_s: f64,
}

/// One sizing figure and how it was obtained.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Figure {
    /// What it is (`RSS per connection`).
    pub name: String,
    /// The value, in `unit`.
    pub value: f64,
    /// Its unit (`bytes`, `ms`, …).
    pub unit: String,
    /// The measurement behind it, with the readings.
    pub how: String,
}

/// What `capacity` found.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sizing {
    /// `idle` or `stalled`.
    pub mode: String,
    /// Where the readings came from.
    pub source: String,
    /// Why the ramp stopped.
    pub stop_reason: String,
    /// Resolution of the CPU readings, seconds (each CPU figure is a
    /// difference of two readings, so ± this).
    pub cpu_resolution_s: f64,
    /// Reading before the first connection.
    pub base: Reading,
    /// One reading per step.
    pub steps: Vec<Step>,
    /// The figures, in display order.
    pub figures: Vec<Figure>,
}

impl Sizing {
    /// A figure's value by name.
    pub fn figure(&self, name: &str) -> Option<f64> {
        self.figures.iter().find(|f| f.name == name).map(|f| f.value)
    }
}

/// Figure names (also read by tests and scripts).
pub mod figures {
    /// Resident memory per connection, bytes.
    pub const RSS_PER_CONN: &str = "RSS per connection";
    /// Descriptors per connection.
    pub const FDS_PER_CONN: &str = "descriptors per connection";
    /// CPU time per handshake, ms.
    pub const CPU_PER_HANDSHAKE: &str = "CPU per handshake";
    /// CPU time per message, µs.
    pub const CPU_PER_MESSAGE: &str = "CPU per message";
    /// Idle CPU at the top, in cores.
    pub const IDLE_CPU: &str = "idle CPU at the top";
    /// 1 GiB / RSS per connection.
    pub const CONNS_PER_GIB: &str = "connections per GiB";
    /// 1 / CPU per handshake.
    pub const HANDSHAKES_PER_CORE: &str = "handshakes per core-second";
    /// 1 / CPU per message.
    pub const MESSAGES_PER_CORE: &str = "messages per core-second";
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1024.0 * 1024.0))
}

/// Runs the scenario and stores its [`Sizing`] in the context.
pub async fn run(ctx: Arc<Ctx>, a: &CapacityArgs, g: Arc<Group>) {
    let Some(src) = ctx.gateway.clone() else {
        // The driver refuses capacity without --gateway-pid or --metrics.
        return;
    };
    let mut sizing = Sizing {
        mode: match a.mode {
            CapacityMode::Idle => "idle".into(),
            CapacityMode::Stalled => "stalled".into(),
        },
        source: src.describe(),
        cpu_resolution_s: src.cpu_resolution_s(),
        ..Default::default()
    };
    let base = match procstat::read(&src).await {
        Ok(r) => r,
        Err(e) => {
            sizing.stop_reason = format!("cannot read the gateway: {e}");
            ctx.set_sizing(sizing);
            ctx.end_run();
            return;
        }
    };
    sizing.base = base;
    let sending = Arc::new(AtomicBool::new(false));
    let count = a.common.count.unwrap_or(DEFAULT_COUNT);
    let step = a.step.max(1);
    let pacer = Pacer::new(a.rate);
    let ramp_start = Instant::now();
    let mut set = JoinSet::new();
    let mut stop = ctx.stop.clone();
    let mut started = 0u64;
    let stop_reason = 'ramp: loop {
        let upto = (started + step).min(count);
        while started < upto {
            tokio::select! {
                _ = wait_stop(&mut stop) => break 'ramp "the run's --duration ended".to_string(),
                _ = pacer.wait(started) => {}
            }
            let (ctx2, g2, sending2) = (ctx.clone(), g.clone(), sending.clone());
            let gi = started;
            match a.mode {
                CapacityMode::Idle => {
                    let msg = (a.msg_rate > 0.0).then(|| (a.size, Duration::from_secs_f64(1.0 / a.msg_rate)));
                    set.spawn(async move { hold(&ctx2, &g2, gi, msg, &sending2).await });
                }
                CapacityMode::Stalled => {
                    let t = Trickle { interval: a.stall_interval, bytes_per_tick: 1, with_token: false };
                    let src = ctx.sources.pick(gi);
                    set.spawn(super::slowloris::reopening(ctx2, g2, gi, src, t));
                }
            }
            started += 1;
            while set.try_join_next().is_some() {}
        }
        // Every attempt of the step answered (or gave up), then settle.
        let settle_until = Instant::now() + ctx.client.connect_timeout + ctx.client.response_timeout;
        while Instant::now() < settle_until && !ctx.stopped() && attempts_done(&g, a.mode) < started {
            sleep(Duration::from_millis(50)).await;
        }
        tokio::select! {
            _ = wait_stop(&mut stop) => break 'ramp "the run's --duration ended".to_string(),
            _ = sleep(a.settle) => {}
        }
        let reading = match procstat::read(&src).await {
            Ok(r) => r,
            Err(e) => break 'ramp format!("cannot read the gateway: {e}"),
        };
        sizing.steps.push(Step {
            open: g.open_now(),
            handshakes: g.snapshot().counter(names::UPGRADED),
            reading,
            at_s: ramp_start.elapsed().as_secs_f64(),
        });
        let refused = refusals(&g, a.mode);
        if refused > 0 {
            break format!("refusals appeared: {refused} attempts failed or were cut (see status/ends)");
        }
        if let Some(max) = a.max_rss {
            if reading.rss_bytes >= NEAR_LIMIT * max as f64 {
                break format!(
                    "RSS {} reached 90 % of --max-rss {}",
                    mib(reading.rss_bytes),
                    mib(max as f64)
                );
            }
        }
        if let Some(max) = reading.max_fds {
            if reading.fds >= NEAR_LIMIT * max {
                break format!("descriptors {} reached 90 % of the gateway's limit {max}", reading.fds);
            }
        }
        if started >= count {
            break format!("target count {count} reached");
        }
    };
    sizing.stop_reason = stop_reason;
    // Holds at the top: idle, then (optionally) every connection sending.
    let mut idle_cpu = None;
    let mut per_message = None;
    if !ctx.stopped() {
        if let Ok(r0) = procstat::read(&src).await {
            let t0 = Instant::now();
            sleep_or_stop(&ctx, a.hold).await;
            if let Ok(r1) = procstat::read(&src).await {
                let dt = t0.elapsed().as_secs_f64();
                idle_cpu = Some(((r1.cpu_s - r0.cpu_s) / dt, r0, r1, dt));
            }
        }
    }
    if a.mode == CapacityMode::Idle && a.msg_rate > 0.0 && !ctx.stopped() {
        let m0 = g.snapshot().counter(names::MSGS_RECV);
        sending.store(true, Ordering::Relaxed);
        if let Ok(r0) = procstat::read(&src).await {
            let t0 = Instant::now();
            sleep_or_stop(&ctx, a.hold).await;
            if let Ok(r1) = procstat::read(&src).await {
                let m1 = g.snapshot().counter(names::MSGS_RECV);
                per_message = Some((r0, r1, t0.elapsed().as_secs_f64(), m1.saturating_sub(m0)));
            }
        }
        sending.store(false, Ordering::Relaxed);
    }
    sizing.figures = compute(&sizing, idle_cpu, per_message);
    ctx.set_sizing(sizing);
    ctx.end_run();
    while set.join_next().await.is_some() {}
}

async fn sleep_or_stop(ctx: &Ctx, d: Duration) {
    let mut stop = ctx.stop.clone();
    tokio::select! {
        _ = wait_stop(&mut stop) => {}
        _ = sleep(d) => {}
    }
}

/// Attempts that have ended one way or another.
fn attempts_done(g: &Group, mode: CapacityMode) -> u64 {
    let s = g.snapshot();
    match mode {
        CapacityMode::Idle => s.counter(names::ATTEMPTS),
        CapacityMode::Stalled => s.counter("opened") + s.counter("connect_failed"),
    }
}

/// Attempts refused, failed or cut so far.
fn refusals(g: &Group, mode: CapacityMode) -> u64 {
    let s = g.snapshot();
    match mode {
        CapacityMode::Idle => {
            s.counter(names::FAILED)
                + s.ends.iter().filter(|(k, _)| *k != "held_to_end").map(|(_, v)| v).sum::<u64>()
        }
        CapacityMode::Stalled => s.counter("connect_failed"),
    }
}

/// Holds one authenticated connection; sends `msg` (size, interval) while
/// `sending` is set, counting the echoes.
async fn hold(ctx: &Ctx, g: &Group, gi: u64, msg: Option<(usize, Duration)>, sending: &AtomicBool) {
    let Some(mut conn) = connect(ctx, g, TokenKind::Valid, gi, ctx.sources.pick(gi)).await else {
        return;
    };
    g.opened();
    let since = Instant::now();
    let mut stop = ctx.stop.clone();
    // Spread the connections' sends over the interval.
    let phase = msg.map(|(_, every)| every.mul_f64((gi % 1000) as f64 / 1000.0)).unwrap_or_default();
    let mut next = Instant::now() + phase;
    loop {
        let due = msg.is_some() && sending.load(Ordering::Relaxed);
        tokio::select! {
            _ = wait_stop(&mut stop) => {
                conn.close(1000, super::idle::CLOSE_WAIT).await;
                g.record_end("held_to_end", None);
                break;
            }
            _ = sleep_until(next) => {
                if let (true, Some((size, every))) = (due, msg) {
                    if conn.send(opcode::BINARY, &vec![b'c'; size]).await.is_err() {
                        g.record_end("send_failed", Some(since.elapsed()));
                        break;
                    }
                    g.add(names::MSGS_SENT, 1);
                    next += every;
                } else {
                    next = Instant::now() + Duration::from_millis(200);
                }
            }
            r = conn.recv() => {
                if let Ok(Message::Text(m) | Message::Binary(m)) = &r {
                    g.add(names::MSGS_RECV, 1);
                    g.add(names::BYTES_RECV, m.len() as u64);
                    continue;
                }
                g.record_end(&end_label(&r), Some(since.elapsed()));
                break;
            }
        }
    }
    g.closed();
}

/// The figures, each with its measurement.
fn compute(
    s: &Sizing,
    idle: Option<(f64, Reading, Reading, f64)>,
    msgs: Option<(Reading, Reading, f64, u64)>,
) -> Vec<Figure> {
    let mut out = Vec::new();
    let fig = |name: &str, value: f64, unit: &str, how: String| Figure {
        name: name.into(),
        value,
        unit: unit.into(),
        how,
    };
    let Some(top) = s.steps.iter().rev().find(|st| st.open > 0) else {
        return out;
    };
    let what = if s.mode == "stalled" { "stalled sockets" } else { "connections" };
    // Every CPU figure is a difference of two readings of this resolution.
    let res = if s.cpu_resolution_s > 0.0 {
        format!(
            "; CPU readings have a resolution of {} s{}",
            s.cpu_resolution_s,
            if s.cpu_resolution_s >= 1.0 {
                ": use --gateway-pid on the gateway's host, or a longer ramp/--hold"
            } else {
                ""
            }
        )
    } else {
        String::new()
    };
    let n = top.open as f64;
    let (b, t) = (&s.base, &top.reading);
    let rss = (t.rss_bytes - b.rss_bytes) / n;
    out.push(fig(
        figures::RSS_PER_CONN,
        rss,
        "bytes",
        format!(
            "RSS {} with 0 {what} → {} with {} open: ({} − {}) / {} = {:.0} B{}",
            mib(b.rss_bytes),
            mib(t.rss_bytes),
            top.open,
            t.rss_bytes as u64,
            b.rss_bytes as u64,
            top.open,
            rss,
            slope(&s.steps, b.rss_bytes)
                .map(|k| format!(" (least-squares slope over the {} steps: {k:.0} B)", s.steps.len()))
                .unwrap_or_default()
        ),
    ));
    let fds = (t.fds - b.fds) / n;
    out.push(fig(
        figures::FDS_PER_CONN,
        fds,
        "",
        format!(
            "descriptors {} → {} with {} open: ({} − {}) / {} = {fds:.2}",
            b.fds, t.fds, top.open, t.fds, b.fds, top.open
        ),
    ));
    if s.mode != "stalled" && top.handshakes > 0 {
        let cpu = t.cpu_s - b.cpu_s;
        let per = cpu / top.handshakes as f64;
        out.push(fig(
            figures::CPU_PER_HANDSHAKE,
            per * 1e3,
            "ms",
            format!(
                "CPU (user+system) {:.2} s → {:.2} s over the ramp of {} handshakes ({:.1} s): {cpu:.3} s / {} = {:.3} ms (includes the idle connections' heartbeats during the ramp){res}",
                b.cpu_s, t.cpu_s, top.handshakes, top.at_s, top.handshakes, per * 1e3
            ),
        ));
        if per > 0.0 {
            out.push(fig(figures::HANDSHAKES_PER_CORE, 1.0 / per, "/s", format!("1 / {:.3} ms", per * 1e3)));
        }
    }
    let mut idle_cores = 0.0;
    if let Some((cores, r0, r1, dt)) = idle {
        idle_cores = cores;
        out.push(fig(
            figures::IDLE_CPU,
            cores,
            "cores",
            format!(
                "CPU {:.2} s → {:.2} s over a {dt:.1} s hold with {} open = {cores:.4} cores{res}",
                r0.cpu_s, r1.cpu_s, top.open
            ),
        ));
    }
    if let Some((r0, r1, dt, m)) = msgs {
        if m > 0 {
            let measured = (r1.cpu_s - r0.cpu_s) - idle_cores * dt;
            // Coarse readings (whole seconds) can put the idle estimate
            // above the hold's own CPU: a cost is never negative.
            let cpu = measured.max(0.0);
            let floor = if measured < 0.0 { " (below the readings' resolution: counted as 0)" } else { "" };
            let per = cpu / m as f64;
            out.push(fig(
                figures::CPU_PER_MESSAGE,
                per * 1e6,
                "µs",
                format!(
                    "CPU {:.2} s → {:.2} s over a {dt:.1} s hold in which {m} messages were echoed, minus the idle CPU ({idle_cores:.4} cores × {dt:.1} s): {cpu:.3} s{floor} / {m} = {:.1} µs (each message crosses the gateway twice: in and back){res}",
                    r0.cpu_s, r1.cpu_s, per * 1e6
                ),
            ));
            if per > 0.0 {
                out.push(fig(
                    figures::MESSAGES_PER_CORE,
                    1.0 / per,
                    "/s",
                    format!("1 / {:.1} µs", per * 1e6),
                ));
            }
        }
    }
    if rss > 0.0 {
        out.push(fig(
            figures::CONNS_PER_GIB,
            GIB / rss,
            "",
            format!(
                "1 GiB / {rss:.0} B (memory for {what} alone; add the base RSS {} once)",
                mib(b.rss_bytes)
            ),
        ));
    }
    out
}

/// Least-squares slope of RSS over open connections, through the base.
fn slope(steps: &[Step], base_rss: f64) -> Option<f64> {
    let pts: Vec<(f64, f64)> =
        steps.iter().map(|s| (s.open as f64, s.reading.rss_bytes - base_rss)).collect();
    if pts.len() < 2 {
        return None;
    }
    let sxx: f64 = pts.iter().map(|(x, _)| x * x).sum();
    let sxy: f64 = pts.iter().map(|(x, y)| x * y).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(rss: f64, cpu: f64, fds: f64) -> Reading {
        Reading { rss_bytes: rss, cpu_s: cpu, fds, max_fds: Some(1024.0) }
    }

    #[test]
    fn figures_from_readings() {
        let s = Sizing {
            mode: "idle".into(),
            base: reading(10e6, 1.0, 10.0),
            steps: vec![
                Step { open: 1000, handshakes: 1000, reading: reading(15e6, 1.5, 1010.0), at_s: 2.0 },
                Step { open: 2000, handshakes: 2000, reading: reading(20e6, 2.0, 2010.0), at_s: 4.0 },
            ],
            ..Default::default()
        };
        let idle = Some((0.01, reading(20e6, 2.0, 2010.0), reading(20e6, 2.1, 2010.0), 10.0));
        let msgs = Some((reading(20e6, 2.1, 2010.0), reading(20e6, 3.1, 2010.0), 10.0, 20_000));
        let f = compute(&Sizing { figures: vec![], ..s.clone() }, idle, msgs);
        let get = |n: &str| f.iter().find(|x| x.name == n).unwrap().value;
        assert_eq!(get(figures::RSS_PER_CONN), 5000.0);
        assert_eq!(get(figures::FDS_PER_CONN), 1.0);
        assert!((get(figures::CPU_PER_HANDSHAKE) - 0.5).abs() < 1e-9);
        assert!((get(figures::HANDSHAKES_PER_CORE) - 2000.0).abs() < 1e-6);
        // (1.0 s − 0.01 × 10 s) / 20,000 = 45 µs.
        assert!((get(figures::CPU_PER_MESSAGE) - 45.0).abs() < 1e-6);
        assert!((get(figures::CONNS_PER_GIB) - GIB / 5000.0).abs() < 1e-6);
        assert_eq!(slope(&s.steps, 10e6), Some(5000.0));
        assert!(f[0].how.contains("/ 2000"), "{}", f[0].how);
    }

    #[test]
    fn coarse_cpu_readings_never_give_a_negative_cost() {
        // Whole-second readings: the idle estimate (1 s over 3 s) is above
        // the hold's own CPU (0 s).
        let s = Sizing {
            base: reading(10e6, 0.0, 10.0),
            steps: vec![Step {
                open: 3000,
                handshakes: 3000,
                reading: reading(18e6, 1.0, 3010.0),
                at_s: 5.0,
            }],
            ..Default::default()
        };
        let idle = Some((0.333, reading(20e6, 1.0, 10.0), reading(20e6, 2.0, 10.0), 3.0));
        let msgs = Some((reading(20e6, 2.0, 10.0), reading(20e6, 2.0, 10.0), 3.0, 9_000));
        let f = compute(&s, idle, msgs);
        let per = f.iter().find(|x| x.name == figures::CPU_PER_MESSAGE).unwrap();
        assert_eq!(per.value, 0.0);
        assert!(per.how.contains("resolution"), "{}", per.how);
        assert!(f.iter().all(|x| x.name != figures::MESSAGES_PER_CORE));
    }
}
