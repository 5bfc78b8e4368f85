//! The binary-upgrade bench (`scripts/upgrade-bench.sh` runs it): `N` live
//! WebSockets through the gateway, each sending a small sequence-numbered
//! message every `--interval-ms` and timing its echo, while the gateway is
//! sent SIGUSR2. Reports the longest pause any connection saw (its worst
//! round trip from the signal until the new process has answered for 2 s),
//! as p50 / p99 / max over connections, against the round trips before the
//! signal; the total time until the new process answers `/readyz`; the
//! resident memory of both processes, sampled every 20 ms; and any
//! connection that closed, failed, or saw a message out of order (must be 0).
//!
//! Run with `cargo run --release -p portcullis-loadtest --bin upgrade-bench --
//! --public 127.0.0.1:18090 --admin 127.0.0.1:19090 --token T --pid P -n 9000`
//! (loopback only).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    public: SocketAddr,
    #[arg(long)]
    admin: SocketAddr,
    #[arg(long)]
    token: String,
    /// The gateway's pid (signalled, and its memory sampled).
    #[arg(long)]
    pid: u32,
    #[arg(short, long, default_value_t = 1000)]
    n: usize,
    /// Per connection: one message every this long.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Round trips before the signal (the baseline).
    #[arg(long, default_value_t = 5)]
    warmup_s: u64,
}

/// What every connection shares with the reporter.
struct Shared {
    /// Set at the signal: round trips from then on count as the move's.
    moving: AtomicBool,
    /// Cleared at the end: connections stop.
    running: AtomicBool,
    failures: AtomicU64,
    connected: AtomicU64,
}

fn frame(payload: &[u8], opcode: u8) -> Vec<u8> {
    let mask: [u8; 4] = rand::random();
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// One connection: (baseline round trips in µs, worst round trip during the move in µs).
async fn conn(a: Arc<Args>, s: Arc<Shared>, i: usize) -> Result<(Vec<u64>, u64), String> {
    let mut tcp = TcpStream::connect(a.public).await.map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).ok();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {}\r\n\r\n",
        a.token
    );
    tcp.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if tcp.read(&mut b).await.map_err(|e| e.to_string())? == 0 {
            return Err(format!("closed in the handshake: {}", String::from_utf8_lossy(&head)));
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(format!("refused: {}", String::from_utf8_lossy(&head)));
    }
    s.connected.fetch_add(1, Ordering::Relaxed);
    // Spread the first sends over one interval.
    tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % a.interval_ms.max(1))).await;
    let (mut baseline, mut worst) = (Vec::new(), 0u64);
    let mut buf = Vec::with_capacity(256);
    let mut seq = 0u64;
    while s.running.load(Ordering::Relaxed) {
        let moving = s.moving.load(Ordering::Relaxed);
        let sent = Instant::now();
        tcp.write_all(&frame(&seq.to_be_bytes(), 0x1)).await.map_err(|e| format!("write {seq}: {e}"))?;
        // Read frames until the echo of `seq`.
        'round: loop {
            while let Some((op, payload)) = take_frame(&mut buf) {
                match op {
                    0x9 => tcp.write_all(&frame(&payload, 0xA)).await.map_err(|e| e.to_string())?,
                    0x8 => return Err(format!("closed by the gateway: {payload:?}")),
                    0x1 => {
                        let got = u64::from_be_bytes(payload.as_slice().try_into().map_err(|_| "bad echo")?);
                        if got != seq {
                            return Err(format!("echo {got}, expected {seq}"));
                        }
                        let rtt = sent.elapsed().as_micros() as u64;
                        if moving {
                            worst = worst.max(rtt);
                        } else {
                            baseline.push(rtt);
                        }
                        seq += 1;
                        break 'round;
                    }
                    _ => {}
                }
            }
            let mut b = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut b))
                .await
                .map_err(|_| format!("no echo of {seq} in 30 s"))?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("closed at {seq}"));
            }
            buf.extend_from_slice(&b[..n]);
        }
        let left = Duration::from_millis(a.interval_ms).saturating_sub(sent.elapsed());
        tokio::time::sleep(left).await;
    }
    Ok((baseline, worst))
}

/// One whole frame (unmasked, payload under 126 bytes: all this bench
/// sends and the gateway sends back) off the front of `buf`.
fn take_frame(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    let len = usize::from(*buf.get(1)? & 0x7f);
    if buf.len() < 2 + len {
        return None;
    }
    let op = buf[0] & 0x0f;
    let payload = buf[2..2 + len].to_vec();
    buf.drain(..2 + len);
    Some((op, payload))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

async fn readyz_pid(admin: SocketAddr) -> Option<u32> {
    let mut t = TcpStream::connect(admin).await.ok()?;
    t.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.ok()?;
    let mut out = String::new();
    t.read_to_string(&mut out).await.ok()?;
    let body = out.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["pid"].as_u64().map(|p| p as u32)
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let a = Arc::new(Args::parse());
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let s = Arc::new(Shared {
        moving: AtomicBool::new(false),
        running: AtomicBool::new(true),
        failures: AtomicU64::new(0),
        connected: AtomicU64::new(0),
    });
    let mut tasks = Vec::with_capacity(a.n);
    for i in 0..a.n {
        tasks.push(tokio::spawn(conn(a.clone(), s.clone(), i)));
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let t0 = Instant::now();
    while (s.connected.load(Ordering::Relaxed) as usize) < a.n && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("connected {} of {} in {:?}", s.connected.load(Ordering::Relaxed), a.n, t0.elapsed());
    tokio::time::sleep(Duration::from_secs(a.warmup_s)).await;
    let before_rss = rss_kib(a.pid).unwrap_or(0);
    s.moving.store(true, Ordering::Relaxed);
    let signalled = Instant::now();
    let ok = std::process::Command::new("kill")
        .args(["-USR2", &a.pid.to_string()])
        .status()
        .is_ok_and(|st| st.success());
    assert!(ok, "could not signal {}", a.pid);
    let (mut peak_old, mut peak_new, mut new_pid) = (0u64, 0u64, None);
    let mut switched = None;
    while signalled.elapsed() < Duration::from_secs(60) {
        peak_old = peak_old.max(rss_kib(a.pid).unwrap_or(0));
        if new_pid.is_none() {
            if let Some(p) = readyz_pid(a.admin).await.filter(|p| *p != a.pid) {
                new_pid = Some(p);
                switched = Some(signalled.elapsed());
            }
        }
        if let Some(p) = new_pid {
            peak_new = peak_new.max(rss_kib(p).unwrap_or(0));
            if !std::path::Path::new(&format!("/proc/{}", a.pid)).exists()
                && switched.is_some_and(|t| signalled.elapsed() > t + Duration::from_secs(2))
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.running.store(false, Ordering::Relaxed);
    let (mut base, mut worst) = (Vec::new(), Vec::new());
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok((b, w))) => {
                base.extend(b);
                worst.push(w);
            }
            Ok(Err(e)) => {
                s.failures.fetch_add(1, Ordering::Relaxed);
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    println!("connections: {} (failed or closed: {}) {errors:?}", a.n, s.failures.load(Ordering::Relaxed));
    println!("new process answering after: {:?}", switched);
    println!(
        "round trip before the signal: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        ms(pct(&mut base, 0.5)),
        ms(pct(&mut base, 0.99)),
        ms(pct(&mut base, 1.0)),
        base.len()
    );
    println!(
        "longest round trip per connection during the move: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(pct(&mut worst, 0.5)),
        ms(pct(&mut worst, 0.99)),
        ms(pct(&mut worst, 1.0))
    );
    println!("rss: old before {before_rss} KiB, old peak {peak_old} KiB, new peak {peak_new} KiB (new pid {new_pid:?})");
}
