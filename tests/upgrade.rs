//! The binary upgraded with every live connection kept: the real binary,
//! started through a symlink (the path an upgrade starts again), live
//! WebSockets streaming sequence-numbered messages both ways while
//! SIGUSR2 or `POST /admin/upgrade` replaces the process; rollback when the
//! "new binary" (the symlink swapped to a script) exits, never answers, or
//! is killed mid-transfer; one upgrade at a time; systemd's notify socket.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// A gateway started through `dir/portcullis` (a symlink to the binary, or
/// whatever a test swaps in), and every process an upgrade started, killed
/// at the end.
struct Gw {
    proc: ChildProc,
    public: SocketAddr,
    admin: SocketAddr,
    link: PathBuf,
    dir: tempfile::TempDir,
    /// Every log line read so far.
    seen: std::sync::Mutex<Vec<String>>,
}

impl Drop for Gw {
    fn drop(&mut self) {
        // The new processes are not our children (their parent exited):
        // by the pid they report.
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("pids")) {
            for p in pid.split_whitespace() {
                let _ = Command::new("kill").args(["-9", p]).status();
            }
        }
    }
}

fn write_config(
    dir: &Path,
    upstream: &str,
    extra_listen: &str,
    extra_limits: &str,
    extra_revocation: &str,
) -> PathBuf {
    let path = dir.join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndrain_timeout_s = 2\ndefer_accept_s = 0\n{extra_listen}\n\
             [limits]\nper_ip_rate = 1000.0\nper_ip_burst = 1000\n{extra_limits}\n\
             [auth]\nhmac_secret = \"{SECRET}\"\nleeway_s = 0\n\
             [upstream]\nurl = \"{upstream}\"\n\
             [revocation]\npath = \"{}\"\n{extra_revocation}\n",
            dir.join("r.log").display()
        ),
    )
    .unwrap();
    path
}

fn start(upstream: &str, extra_listen: &str, env: &[(&str, &str)]) -> Gw {
    start_with(upstream, extra_listen, "", "", env)
}

/// As [`start`], with lines for `[limits]` (and tables after it).
fn start_with(
    upstream: &str,
    extra_listen: &str,
    extra_limits: &str,
    extra_revocation: &str,
    env: &[(&str, &str)],
) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("portcullis");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let cfg = write_config(dir.path(), upstream, extra_listen, extra_limits, extra_revocation);
    let mut cmd = Command::new(&link);
    cmd.args(["serve", "--config", cfg.to_str().unwrap()]).env("PORTCULLIS_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let proc = ChildProc::spawn(&mut cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut public, mut admin) = (None, None);
    while Instant::now() < deadline && public.is_none() {
        let Ok(line) = proc.lines.recv_timeout(Duration::from_millis(200)) else { continue };
        if let Some(rest) = line.strip_prefix("listening ") {
            for kv in rest.split_whitespace() {
                match kv.split_once('=') {
                    Some(("public", a)) => public = a.parse().ok(),
                    Some(("admin", a)) => admin = a.parse().ok(),
                    _ => {}
                }
            }
        }
    }
    Gw { proc, public: public.expect("banner"), admin: admin.unwrap(), link, dir, seen: Default::default() }
}

impl Gw {
    /// Points the symlink at `target` (the binary, or a script).
    fn swap(&self, target: &Path) {
        let tmp = self.dir.path().join("portcullis.new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, &self.link).unwrap();
    }

    fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn signal(&self, sig: &str) {
        self.proc.signal(sig);
    }

    async fn pid(&self) -> Option<u32> {
        let a = http(self.admin, "GET", "/readyz", &[], "").await;
        let v: serde_json::Value = serde_json::from_str(body(&a)).ok()?;
        v["pid"].as_u64().map(|p| p as u32)
    }

    /// Waits for a log line containing every one of `parts`.
    fn wait_line(&self, parts: &[&str], within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(line) = self.proc.lines.recv_timeout(Duration::from_millis(50)) {
                self.seen.lock().unwrap().push(line.clone());
                if parts.iter().all(|p| line.contains(p)) {
                    return Some(line);
                }
            }
        }
        None
    }

    /// Waits for the process answering the admin port to change from
    /// `old`, and remembers the new one for clean-up.
    async fn wait_new_pid(&self, old: u32, within: Duration) -> u32 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = self.pid().await {
                if p != old {
                    let f = self.dir.path().join("pids");
                    let mut s = std::fs::read_to_string(&f).unwrap_or_default();
                    s.push_str(&format!("{p} "));
                    std::fs::write(f, s).unwrap();
                    return p;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no new process answered in {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn wait_old_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.proc.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "the old process did not exit in {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn connections(&self) -> Vec<String> {
        let a = http(self.admin, "GET", "/admin/connections", &[], "").await;
        let v: serde_json::Value = serde_json::from_str(body(&a)).unwrap();
        v.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect()
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// A backend that echoes every message and, on its own, pushes `s-<k>`
/// every few milliseconds; counts connections that ended.
async fn backend(ended: Arc<AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let ended = ended.clone();
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                let (mut tx, mut rx) = ws.split();
                let (etx, mut erx) = tokio::sync::mpsc::channel::<Message>(1024);
                let reader = tokio::spawn(async move {
                    while let Some(Ok(m)) = rx.next().await {
                        if m.is_close() {
                            break;
                        }
                        if (m.is_text() || m.is_binary()) && etx.send(m).await.is_err() {
                            break;
                        }
                    }
                });
                let mut k = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(4));
                loop {
                    tokio::select! {
                        m = erx.recv() => match m {
                            Some(m) => if tx.send(m).await.is_err() { break },
                            None => break,
                        },
                        _ = tick.tick() => {
                            if tx.send(Message::text(format!("s-{k}"))).await.is_err() { break }
                            k += 1;
                        }
                    }
                }
                reader.abort();
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    addr
}

/// One client: sends `c-<i>` (every 40th a 1 MiB binary message) every
/// couple of milliseconds for `for_`, then waits for every echo. Checks
/// each echo arrives once and in order, and in proxy mode that the
/// backend's own `s-<k>` arrive gap-free and in order. Any close or error
/// fails it.
async fn stream(addr: SocketAddr, sub: String, for_: Duration, proxy: bool) -> Result<(u64, u64), String> {
    let ws = ws(addr, &token(&sub)).await;
    let (mut tx, mut rx) = ws.split();
    let sent = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (sent, done) = (sent.clone(), done.clone());
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + for_;
            let mut i = 0u64;
            while tokio::time::Instant::now() < end {
                let m = if i % 40 == 39 {
                    let mut b = vec![(i % 251) as u8; 1 << 20];
                    b[..8].copy_from_slice(&i.to_be_bytes());
                    Message::binary(b)
                } else {
                    Message::text(format!("c-{i}"))
                };
                if let Err(e) = tx.send(m).await {
                    return Err(format!("send {i}: {e}"));
                }
                i += 1;
                sent.store(i as usize, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            done.store(true, Ordering::SeqCst);
            Ok(tx)
        })
    };
    let (mut echoed, mut pushed) = (0u64, 0u64);
    let deadline = tokio::time::Instant::now() + for_ + Duration::from_secs(20);
    loop {
        if done.load(Ordering::SeqCst) && echoed as usize == sent.load(Ordering::SeqCst) {
            break;
        }
        let m = match tokio::time::timeout_at(deadline, rx.next()).await {
            Err(_) => {
                return Err(format!("{sub}: echoes stopped at {echoed} of {}", sent.load(Ordering::SeqCst)))
            }
            Ok(None) => return Err(format!("{sub}: stream ended at {echoed}")),
            Ok(Some(Err(e))) => return Err(format!("{sub}: error at {echoed}: {e}")),
            Ok(Some(Ok(m))) => m,
        };
        match m {
            Message::Text(t) if t.starts_with("s-") => {
                let k: u64 = t[2..].parse().unwrap();
                if k != pushed {
                    return Err(format!("{sub}: backend message {k}, expected {pushed}"));
                }
                pushed += 1;
            }
            Message::Text(t) => {
                if t.as_str() != format!("c-{echoed}") {
                    return Err(format!("{sub}: echo {t}, expected c-{echoed}"));
                }
                echoed += 1;
            }
            Message::Binary(b) => {
                let i = u64::from_be_bytes(b[..8].try_into().unwrap());
                let whole = b.len() == 1 << 20 && b[8..].iter().all(|x| *x == (i % 251) as u8);
                if i != echoed || !whole {
                    return Err(format!("{sub}: binary {i} (whole: {whole}), expected {echoed}"));
                }
                echoed += 1;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => return Err(format!("{sub}: unexpected {other:?} at {echoed}")),
        }
    }
    let _tx = writer.await.unwrap()?;
    if proxy && pushed == 0 {
        return Err(format!("{sub}: nothing from the backend"));
    }
    Ok((echoed, pushed))
}

/// A raw WebSocket whose 101 is read byte by byte, so that no frame after
/// it is swallowed with it.
async fn raw_ws_exact(addr: SocketAddr, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_request("/", &[("Authorization", &format!("Bearer {token}"))]).as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "answered: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// A masked frame, or the given part of one.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [9u8, 8, 7, 6];
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    assert!(payload.len() < 126);
    f.push(0x80 | payload.len() as u8);
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads frames (unmasked, from the gateway) until `n` text or
/// continuation frames have arrived; returns their payloads.
async fn read_frames(s: &mut TcpStream, n: usize) -> Vec<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        let mut b = [0u8; 4096];
        let got = tokio::time::timeout_at(deadline, s.read(&mut b)).await.expect("frames in time").unwrap();
        assert!(got > 0, "closed after {out:?}");
        buf.extend_from_slice(&b[..got]);
        while buf.len() >= 2 && buf.len() >= 2 + usize::from(buf[1] & 0x7f) {
            let len = usize::from(buf[1] & 0x7f);
            let op = buf[0] & 0x0f;
            let payload = buf[2..2 + len].to_vec();
            buf.drain(..2 + len);
            // Not the gateway's pings, nor the backend's own pushes.
            if op != 0x9 && !payload.starts_with(b"s-") {
                out.push((op, payload));
            }
        }
    }
    out
}

/// Starts the clients, upgrades mid-stream, and checks what the issue
/// demands: no close either side, every message once in order, the old
/// process gone, every connection listed by the new one under its id.
async fn moves_everything(proxy: bool) {
    let ended = Arc::new(AtomicUsize::new(0));
    let upstream = if proxy { format!("ws://{}/", backend(ended.clone()).await) } else { "echo".into() };
    let mut gw = start(&upstream, "", &[]);
    let old = gw.pid().await.unwrap();
    const N: usize = 6;
    let clients: Vec<_> = (0..N)
        .map(|i| {
            tokio::spawn(stream(gw.public, format!("user{}", i % 3), Duration::from_millis(4000), proxy))
        })
        .collect();
    // A frame cut in two by the upgrade, and a fragmented message whose
    // fragments straddle it (raw bytes: the split is exactly where we say).
    let mut raw = raw_ws_exact(gw.public, &token("rawuser")).await;
    raw.write_all(&frame(false, 0x1, b"first fragment ")).await.unwrap();
    let last = frame(true, 0x0, b"and the last");
    raw.write_all(&last[..9]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = gw.connections().await;
    assert_eq!(before.len(), N + 1, "{before:?}");

    gw.signal("-USR2");
    let line = gw
        .wait_line(&["event=\"upgrade\"", "result=\"ok\"", "stayed="], Duration::from_secs(20))
        .expect("upgrade ok");
    assert!(line.contains(&format!("moved={}", N + 1)), "{line}");
    assert!(line.contains("stayed=0"), "{line}");
    let new = gw.wait_new_pid(old, Duration::from_secs(5)).await;
    assert_eq!(gw.wait_old_exit(Duration::from_secs(10)), 0, "the old process exits cleanly");
    assert!(!pid_alive(old));
    assert!(pid_alive(new));
    // Listed by the new process, each under the id it had.
    let mut after = gw.connections().await;
    after.sort();
    let mut want = before.clone();
    want.sort();
    assert_eq!(after, want);
    // The clients are still streaming: no backend connection has ended.
    assert_eq!(ended.load(Ordering::SeqCst), 0, "no backend connection ended");

    // The raw connection's last fragment, cut by the upgrade, completes in
    // the new process.
    raw.write_all(&last[9..]).await.unwrap();
    if proxy {
        // The backend reassembles the message and answers it whole.
        let got = read_frames(&mut raw, 1).await;
        assert_eq!(got[0].1, b"first fragment and the last".to_vec());
    } else {
        // Echo mode answers each frame as it completes.
        let got = read_frames(&mut raw, 2).await;
        assert_eq!(got[0].1, b"first fragment ".to_vec());
        assert_eq!(got[1].1, b"and the last".to_vec());
    }

    for c in clients {
        let r = c.await.unwrap();
        let (echoed, _) = r.unwrap_or_else(|e| panic!("{e}"));
        assert!(echoed > 100, "{echoed}");
    }
    let m = body(&http(gw.admin, "GET", "/metrics", &[], "").await).to_string();
    assert_eq!(value_of(&m, "portcullis_upgrades_total{result=\"ok\"}"), 1.0, "the new process counts it");
    // The streaming clients have closed (their closing handshakes take a
    // moment); the raw one is left, counted open by the new process.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = body(&http(gw.admin, "GET", "/metrics", &[], "").await).to_string();
        let open = value_of(&m, "portcullis_connections{state=\"open\"}");
        if open == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "open connections: {open}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_sessions_move_with_every_byte_once_and_in_order() {
    moves_everything(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_sessions_move_with_every_byte_once_and_in_order() {
    moves_everything(true).await;
}

/// Keeps one connection echoing while an upgrade fails; then checks it
/// is whole and that the failure was logged and counted.
async fn survives_a_failed_upgrade(gw: &Gw, within: Duration, others: usize) -> Duration {
    let mut live = ws(gw.public, &token("keeper")).await;
    echo(&mut live, "before").await;
    let old = gw.pid().await.unwrap();
    let start = Instant::now();
    gw.signal("-USR2");
    let line =
        gw.wait_line(&["event=\"upgrade\"", "result=\"error\""], within).expect("upgrade error logged");
    let took = start.elapsed();
    assert!(line.contains("moved=0"), "{line}");
    for i in 0..20 {
        echo(&mut live, &format!("after {i}")).await;
    }
    assert_eq!(gw.pid().await, Some(old), "the old process serves on");
    let m = body(&http(gw.admin, "GET", "/metrics", &[], "").await).to_string();
    assert!(value_of(&m, "portcullis_upgrades_total{result=\"error\"}") >= 1.0);
    assert_eq!(value_of(&m, "portcullis_connections{state=\"open\"}"), (1 + others) as f64);
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_exits_1_rolls_back_and_a_later_upgrade_works() {
    let mut gw = start("echo", "", &[]);
    let fails = gw.script("fails.sh", "exit 1");
    gw.swap(&fails);
    survives_a_failed_upgrade(&gw, Duration::from_secs(10), 0).await;

    // Back to the real binary: the next upgrade (over HTTP this time) works.
    let mut live = ws(gw.public, &token("later")).await;
    let old = gw.pid().await.unwrap();
    gw.swap(Path::new(BIN));
    let a = http(gw.admin, "POST", "/admin/upgrade", &[], "").await;
    assert_eq!(a.status, 202, "{}", a.text);
    gw.wait_new_pid(old, Duration::from_secs(20)).await;
    gw.wait_old_exit(Duration::from_secs(10));
    echo(&mut live, "in the new process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_never_becomes_ready_rolls_back_after_the_timeout() {
    let gw = start("echo", "upgrade_timeout_s = 2", &[]);
    let silent = gw.script("silent.sh", "exec sleep 60");
    gw.swap(&silent);
    let took = survives_a_failed_upgrade(&gw, Duration::from_secs(10), 0).await;
    assert!(took >= Duration::from_secs(2), "not before the timeout: {took:?}");
    assert!(took < Duration::from_secs(5), "by the timeout and some slack: {took:?}");
    // The silent "binary" was killed, not left behind.
    let out = Command::new("pgrep").args(["-f", silent.to_str().unwrap()]).output().unwrap();
    assert!(out.stdout.is_empty(), "left running: {}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_killed_mid_transfer_rolls_back_with_every_byte() {
    let gw = start("echo", "", &[]);
    let killed =
        gw.script("killed.sh", &format!("PORTCULLIS_UPGRADE_FAULT=kill-after-state exec {BIN} \"$@\""));
    gw.swap(&killed);
    // A half-sent frame across the failed hand-over.
    let mut raw = raw_ws_exact(gw.public, &token("rawuser")).await;
    let whole = frame(true, 0x1, b"half before, half after");
    raw.write_all(&whole[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    survives_a_failed_upgrade(&gw, Duration::from_secs(20), 1).await;
    // The state had arrived when it died (the fault says so before it strikes).
    assert!(gw.seen.lock().unwrap().iter().any(|l| l.contains("kill-after-state")));
    raw.write_all(&whole[10..]).await.unwrap();
    let got = read_frames(&mut raw, 1).await;
    assert_eq!(got[0].1, b"half before, half after".to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_while_an_upgrade_runs_is_refused() {
    let gw = start("echo", "upgrade_timeout_s = 3", &[]);
    let silent = gw.script("silent.sh", "exec sleep 60");
    gw.swap(&silent);
    let a = http(gw.admin, "POST", "/admin/upgrade", &[], "").await;
    assert_eq!(a.status, 202);
    let a = http(gw.admin, "POST", "/admin/upgrade", &[], "").await;
    assert_eq!(a.status, 409, "{}", a.text);
    gw.signal("-USR2");
    assert!(gw
        .wait_line(&["event=\"upgrade_refused\"", "reason=\"running\""], Duration::from_secs(5))
        .is_some());
    assert!(gw.wait_line(&["event=\"upgrade\"", "result=\"error\""], Duration::from_secs(10)).is_some());
    // Over: the next request is taken again.
    let a = http(gw.admin, "POST", "/admin/upgrade", &[], "").await;
    assert_eq!(a.status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_and_the_new_main_pid() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut gw = start("echo", "", &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    let old = gw.pid().await.unwrap();
    assert!(first.contains("READY=1") && first.contains(&format!("MAINPID={old}")), "{first}");
    gw.signal("-USR2");
    let n = sock.recv(&mut buf).unwrap();
    let second = String::from_utf8_lossy(&buf[..n]).to_string();
    let new = gw.wait_new_pid(old, Duration::from_secs(5)).await;
    assert!(second.contains("READY=1") && second.contains(&format!("MAINPID={new}")), "{second}");
    gw.wait_old_exit(Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_under_way_at_the_switch_follows_in_a_late_round() {
    let mut gw = start("echo", "", &[]);
    let old = gw.pid().await.unwrap();
    // Accepted by the old process, its head not yet complete.
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    let req = upgrade_request("/", &[("Authorization", &format!("Bearer {}", token("late")))]);
    let (a, b) = req.as_bytes().split_at(40);
    s.write_all(a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.signal("-USR2");
    gw.wait_new_pid(old, Duration::from_secs(20)).await;
    assert!(pid_alive(old), "the old process waits for its handshake under way");
    s.write_all(b).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut c = [0u8; 1];
        assert_eq!(s.read(&mut c).await.unwrap(), 1);
        head.push(c[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let line = gw.wait_line(&["event=\"upgrade_late\""], Duration::from_secs(10)).expect("a late round");
    assert!(line.contains("moved=1"), "{line}");
    assert_eq!(gw.wait_old_exit(Duration::from_secs(10)), 0);
    s.write_all(&frame(true, 0x1, b"served by the new process")).await.unwrap();
    let got = read_frames(&mut s, 1).await;
    assert_eq!(got[0].1, b"served by the new process".to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_offered_a_newer_state_format_refuses_it_and_says_so() {
    let gw = start("echo", "", &[("PORTCULLIS_UPGRADE_FAULT", "newer-format")]);
    survives_a_failed_upgrade(&gw, Duration::from_secs(20), 0).await;
    let seen = gw.seen.lock().unwrap();
    let line = seen.iter().find(|l| l.contains("result=\"error\"")).unwrap();
    assert!(line.contains("refused") && line.contains("format v2") && line.contains("(v1)"), "{line}");
}

/// A self-signed certificate for `localhost` in `dir`, and a client
/// trusting it alone.
fn tls_files(dir: &Path) -> (String, tokio_rustls::TlsConnector) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("c.crt"), dir.join("c.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let listen = format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"", cert.display(), key.display());
    (listen, tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn wss(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    sub: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let io = tls.connect(name, TcpStream::connect(addr).await.unwrap()).await.unwrap();
    let mut req = "wss://localhost/".into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {}", token(sub)).parse().unwrap());
    tokio_tungstenite::client_async(req, io).await.unwrap().0
}

/// TLS sessions cannot move (no kTLS here): they stay with the old
/// process, which accepts no more, serves them on, and closes them with
/// 1001 over `listen.drain_timeout_s` (2 s here) before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_stay_with_the_old_process_and_end_cleanly() {
    let certs = tempfile::tempdir().unwrap();
    let (listen, tls) = tls_files(certs.path());
    let mut gw = start("echo", &listen, &[]);
    let old = gw.pid().await.unwrap();
    let mut stays = wss(gw.public, &tls, "tls-user").await;
    stays.send(Message::text("before")).await.unwrap();
    assert_eq!(stays.next().await.unwrap().unwrap(), Message::text("before"));
    gw.signal("-USR2");
    let line = gw
        .wait_line(&["event=\"upgrade\"", "result=\"ok\"", "stayed="], Duration::from_secs(20))
        .expect("upgrade ok");
    assert!(line.contains("moved=0") && line.contains("stayed=1"), "{line}");
    let switched = Instant::now();
    gw.wait_new_pid(old, Duration::from_secs(5)).await;
    // New TLS connections are the new process's (the same certificate, read again).
    let mut fresh = wss(gw.public, &tls, "tls-new").await;
    fresh.send(Message::text("new")).await.unwrap();
    assert_eq!(fresh.next().await.unwrap().unwrap(), Message::text("new"));
    // The one that stayed ends with 1001, within the drain window.
    let code = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stays.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(code, Some(1001));
    gw.wait_old_exit(Duration::from_secs(5));
    assert!(switched.elapsed() < Duration::from_secs(4), "within drain_timeout_s: {:?}", switched.elapsed());
    fresh.send(Message::text("still")).await.unwrap();
    assert_eq!(fresh.next().await.unwrap().unwrap(), Message::text("still"));
}

/// After the move the rules still hold, with the deadlines they had: the
/// token's expiry, a revocation, the per-user cap (the registry came along),
/// and the heartbeat reaping a client that stopped answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_revocation_user_cap_and_ping_reaping_hold_after_the_move() {
    let mut gw = start_with(
        "echo",
        "",
        "per_user_max_connections = 1\n[heartbeat]\nping_interval_ms = 700\npong_timeout_ms = 700",
        "",
        &[],
    );
    let old = gw.pid().await.unwrap();
    let exp = now() + 4;
    // Read all along (a client reading answers the gateway's pings).
    let mut expiring = ws(gw.public, &token_with(serde_json::json!({ "sub": "exp", "exp": exp }))).await;
    let expiring = tokio::spawn(async move {
        let (code, _) = close_code(&mut expiring, Duration::from_secs(30)).await;
        (code, now())
    });
    let mut revoked = ws(gw.public, &token("rev")).await;
    let revoked = tokio::spawn(async move { close_code(&mut revoked, Duration::from_secs(30)).await });
    // Answers nothing, reads nothing: only the heartbeat can tell.
    let mut silent = raw_ws_exact(gw.public, &token("silent")).await;
    gw.signal("-USR2");
    gw.wait_new_pid(old, Duration::from_secs(20)).await;
    gw.wait_old_exit(Duration::from_secs(10));

    // The per-user cap counts the moved connection.
    let second = raw(
        gw.public,
        upgrade_request("/", &[("Authorization", &format!("Bearer {}", token("rev")))]).as_bytes(),
    )
    .await;
    assert_eq!(second.status, 429, "{}", second.text);
    // A revocation at the new process closes the moved connection.
    let a = http(gw.admin, "POST", "/admin/revoke", &[], r#"{"sub": "rev"}"#).await;
    assert!(body(&a).contains("\"closed\":1"), "{}", a.text);
    let (code, within) = revoked.await.unwrap();
    assert_eq!(code, Some(1008));
    assert!(within < Duration::from_secs(20));
    // The silent client is reaped by the heartbeat it never answers.
    let mut buf = vec![0u8; 4096];
    let reaped = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(reaped.is_ok(), "the silent client was not reaped");
    // The token's expiry fires at its instant, not later.
    let (code, at) = expiring.await.unwrap();
    assert_eq!(code, Some(1008));
    assert!(at >= exp && at <= exp + 2, "closed at {at}, token expired at {exp}");
}

/// Ten upgrades in a row, live connections carried through each: the last
/// process holds as many descriptors as the first (nothing leaks into the
/// next process), and its memory has not grown with the upgrades.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upgrades_in_a_row_keep_descriptors_and_memory_flat() {
    let mut gw = start("echo", "", &[]);
    let mut live = Vec::new();
    for i in 0..3 {
        live.push(ws(gw.public, &token(&format!("ten{i}"))).await);
    }
    let gauge = |m: &str, name: &str| value_of(m, name);
    let first = body(&http(gw.admin, "GET", "/metrics", &[], "").await).to_string();
    let mut pid = gw.pid().await.unwrap();
    for round in 0..10 {
        let a = http(gw.admin, "POST", "/admin/upgrade", &[], "").await;
        assert_eq!(a.status, 202, "round {round}: {}", a.text);
        pid = gw.wait_new_pid(pid, Duration::from_secs(20)).await;
        // Wait until the previous process is gone before the next round.
        for (i, w) in live.iter_mut().enumerate() {
            echo(w, &format!("round {round} conn {i}")).await;
        }
        // One upgrade at a time: the previous one is over (its old process
        // gone) before the next is asked for.
        gw.wait_line(&["event=\"drain\"", "drained"], Duration::from_secs(10));
    }
    gw.wait_old_exit(Duration::from_secs(10));
    let last = body(&http(gw.admin, "GET", "/metrics", &[], "").await).to_string();
    let (fds0, fds1) = (gauge(&first, "process_open_fds"), gauge(&last, "process_open_fds"));
    assert_eq!(fds1, fds0, "descriptors: first process {fds0}, tenth successor {fds1}");
    let (rss0, rss1) =
        (gauge(&first, "process_resident_memory_bytes"), gauge(&last, "process_resident_memory_bytes"));
    assert!(rss1 < rss0 * 1.5 + 4e6, "memory: first {rss0}, tenth successor {rss1}");
    assert_eq!(gauge(&last, "portcullis_connections{state=\"open\"}"), 3.0);
}

/// One command to a redis-server on a unix socket; its raw RESP reply.
fn redis_cmd(sock: &Path, args: &[&str]) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// With the Redis backend, a moved connection keeps its fleet lease under
/// the same name: counted once throughout, renewed by the new process,
/// released by it when the connection ends; the per-user cap holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_leases_and_caps_carry_over_counted_once() {
    let rdir = tempfile::tempdir().unwrap();
    let sock = rdir.path().join("redis.sock");
    let mut redis = Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(&sock)
        .args(["--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--loglevel", "warning"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server installed");
    let up = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < up, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let revocation =
        format!("backend = \"redis\"\nredis_url = \"unix://{}\"\nlease_ttl_ms = 1000", sock.display());
    let mut gw = start_with("echo", "", "per_user_max_connections = 1", &revocation, &[]);
    let mut live = ws(gw.public, &token("leased")).await;
    echo(&mut live, "before").await;
    let members = || redis_cmd(&sock, &["ZRANGE", "portcullis:lease:{0}:leased", "0", "-1"]);
    let before = members();
    assert!(before.starts_with("*1\r\n"), "one lease: {before:?}");
    let old = gw.pid().await.unwrap();
    gw.signal("-USR2");
    gw.wait_new_pid(old, Duration::from_secs(20)).await;
    gw.wait_old_exit(Duration::from_secs(10));
    echo(&mut live, "after").await;
    // Past two lease lifetimes: renewed by the new process, under the same name.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(members(), before, "the same single lease");
    let second = raw(
        gw.public,
        upgrade_request("/", &[("Authorization", &format!("Bearer {}", token("leased")))]).as_bytes(),
    )
    .await;
    assert_eq!(second.status, 429, "the cap counts the moved connection: {}", second.text);
    drop(live);
    let gone = Instant::now() + Duration::from_secs(5);
    while !members().starts_with("*0\r\n") {
        assert!(Instant::now() < gone, "lease not released: {}", members());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = redis.kill();
    let _ = redis.wait();
}
