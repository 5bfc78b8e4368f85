//! Real Redis deployments started by the tests (standalone with TLS and an
//! ACL user, Sentinel, Cluster) on free loopback ports, and the fleet
//! scenario every one of them must pass with two gateway instances: one in
//! this process, one the `portcullis` binary as a child (so it can be
//! killed with SIGKILL). Each deployment is killed on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portcullis::config::{Config, OnCapStoreError, RevocationBackend};
use tokio::time::Instant;

use crate::common::*;

/// A free loopback TCP port (bound then released: the server binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` (or sentinel) of our own, killed on drop.
pub struct Server {
    pub port: u16,
    pub args: Vec<String>,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Server {
    /// Starts `redis-server` with `args` (plus `--port`), waits for PING.
    pub fn start(dir: &Path, port: u16, args: &[String]) -> Server {
        let mut s = Server { port, args: args.to_vec(), dir: dir.to_owned(), child: None };
        s.restart();
        s
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        std::fs::create_dir_all(&self.dir).unwrap();
        let spawned = Command::new("redis-server")
            .args(&self.args)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--daemonize", "no"])
            .args(["--loglevel", "warning", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        self.child = Some(match spawned {
            Ok(c) => c,
            Err(e) => panic!("cannot start redis-server (install it: ./scripts/test.sh does): {e}"),
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cmd(self.port, &["PING"]).starts_with("+PONG") {
            assert!(std::time::Instant::now() < deadline, "redis-server on {} did not answer", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One command over plain TCP to 127.0.0.1:`port`; the raw RESP reply (or
/// an empty string when the server is not there).
pub fn cmd(port: u16, args: &[&str]) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    if s.write_all(req.as_bytes()).is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    // Replies here are small; read until the server pauses briefly.
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.ends_with(b"\r\n") && n < buf.len() {
                    let _ = s.set_read_timeout(Some(Duration::from_millis(30)));
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Redis deployment under test.
pub trait Deployment {
    /// Sets the `[revocation]` keys that reach it.
    fn apply(&self, cfg: &mut Config);
    /// The same keys as TOML lines, for the binary.
    fn toml(&self) -> String;
    /// Makes a failover happen (returns once it has been started).
    fn failover(&mut self);
    /// Is the deployment whole again (a master everywhere it needs one)?
    fn settled(&self) -> bool;
}

/// A `portcullis serve` child process.
pub struct Proc {
    pub proc: ChildProc,
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

pub fn spawn_instance(dir: &Path, d: &dyn Deployment, name: &str) -> Proc {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndrain_timeout_s = 1\n\
             [limits]\nper_ip_rate = 1000.0\nper_ip_burst = 1000\nper_user_max_connections = 2\n\
             [auth]\nhmac_secret = \"{SECRET}\"\nleeway_s = 0\n\
             [revocation]\nbackend = \"redis\"\npath = \"{}\"\nlease_ttl_ms = 1500\nredis_timeout_ms = 300\n{}\n",
            dir.join(format!("{name}-revocations.log")).display(),
            d.toml()
        ),
    )
    .unwrap();
    let proc = ChildProc::spawn(
        Command::new(env!("CARGO_BIN_EXE_portcullis")).args(["serve", "--config"]).arg(&path),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let line = loop {
        assert!(std::time::Instant::now() < deadline, "the instance printed no address");
        let Ok(line) = proc.lines.recv_timeout(Duration::from_millis(200)) else { continue };
        if line.starts_with("listening public=") {
            break line;
        }
    };
    let field = |k: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or_default().parse().unwrap()
    };
    Proc { proc, public: field("public="), admin: field("admin=") }
}

/// An in-process instance's configuration for deployment `d`.
pub fn instance(dir: &Path, name: &str, d: &dyn Deployment) -> Config {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    let mut c = config(&sub);
    c.revocation.backend = RevocationBackend::Redis;
    c.revocation.lease_ttl_ms = 1500;
    c.revocation.redis_timeout_ms = 300;
    c.limits.per_user_max_connections = 2;
    c.limits.on_cap_store_error = OnCapStoreError::Local;
    c.listen.drain_timeout_s = 1;
    d.apply(&mut c);
    c
}

pub async fn status(addr: SocketAddr, token: &str) -> u16 {
    raw(addr, upgrade_request("/", &[("Authorization", &format!("Bearer {token}"))]).as_bytes()).await.status
}

async fn metric_at(admin: SocketAddr, series: &str) -> f64 {
    let m = http(admin, "GET", "/metrics", &[], "").await;
    value_of(body(&m), series)
}

/// Waits until `admin`'s `portcullis_store_up` is 1.
async fn wait_up(admin: SocketAddr, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while metric_at(admin, "portcullis_store_up").await != 1.0 {
        assert!(Instant::now() < deadline, "{what}: the store link did not come back within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until a handshake of `token` on `addr` gets `want`.
async fn until_status(addr: SocketAddr, token: &str, want: u16, within: Duration, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let got = status(addr, token).await;
        if got == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{what}: still {got} after {within:?}, wanted {want}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn revoke_at(admin: SocketAddr, body_json: &str) -> serde_json::Value {
    let a = http(admin, "POST", "/admin/revoke", &[("Content-Type", "application/json")], body_json).await;
    assert_eq!(a.status, 200, "{}", a.text);
    serde_json::from_str(body(&a)).unwrap()
}

/// Closed with 1008 within one second of `since`.
async fn closed_within_a_second(ws: &mut Ws, what: &str) {
    let (code, took) = close_code(ws, Duration::from_secs(3)).await;
    assert_eq!(code, Some(1008), "{what}: not closed as revoked");
    assert!(took < Duration::from_secs(1), "{what}: closed after {took:?}");
}

/// The scenario of the module notes.
pub async fn fleet_scenario(dir: &Path, d: &mut dyn Deployment) {
    let a = start(instance(dir, "a", d)).await;
    let b = spawn_instance(dir, d, "b");
    wait_up(a.admin, Duration::from_secs(5), "A at start").await;
    wait_up(b.admin, Duration::from_secs(5), "B at start").await;

    // 1. A revocation on A closes B's connection within a second.
    let t1 = token_with(serde_json::json!({ "sub": "rv1", "jti": "j-1" }));
    let mut on_b = ws(b.public, &t1).await;
    revoke_at(a.admin, r#"{"jti":"j-1"}"#).await;
    closed_within_a_second(&mut on_b, "revoked on A, live on B").await;

    // 2. The per-user cap (2) is exact across both instances.
    let cap = token("cap");
    let _cap_a = ws(a.public, &cap).await;
    let _cap_b = ws(b.public, &cap).await;
    assert_eq!(status(a.public, &cap).await, 429, "a third connection on A");
    assert_eq!(status(b.public, &cap).await, 429, "a third connection on B");

    // 3. A failover mid-run: a revocation made while it happens is not
    // lost, and the cap is exact again once the fleet has reconnected.
    let t2 = token("rv2");
    let mut rv2_on_b = ws(b.public, &t2).await;
    let mut rv2_on_a = ws(a.public, &t2).await;
    d.failover();
    let during =
        revoke_at(a.admin, &serde_json::json!({ "sub": "rv2", "before": now() + 1 }).to_string()).await;
    assert_eq!(during["closed"], 1, "{during}");
    assert_eq!(close_code(&mut rv2_on_a, Duration::from_secs(3)).await.0, Some(1008));
    let started = Instant::now();
    while !d.settled() {
        assert!(started.elapsed() < Duration::from_secs(30), "the deployment did not settle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each instance checks its primary every second: give them that long
    // to notice the switch (a graceful failover may not drop a
    // connection), then they must be up again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_up(a.admin, Duration::from_secs(15), "A after the failover").await;
    wait_up(b.admin, Duration::from_secs(15), "B after the failover").await;
    let (code, _) = close_code(&mut rv2_on_b, Duration::from_secs(10)).await;
    assert_eq!(code, Some(1008), "the revocation made during the failover reached B");
    assert_eq!(status(b.public, &t2).await, 401);
    // A revocation after it, the other way round.
    let t3 = token_with(serde_json::json!({ "sub": "rv3", "jti": "j-3" }));
    let mut on_a = ws(a.public, &t3).await;
    revoke_at(b.admin, r#"{"jti":"j-3"}"#).await;
    closed_within_a_second(&mut on_a, "revoked on B after the failover, live on A").await;
    // The cap recovers: both earlier connections count again (re-asserted).
    let took = until_status(a.public, &cap, 429, Duration::from_secs(5), "cap after the failover").await;
    assert_eq!(status(b.public, &cap).await, 429, "cap after the failover, on B");
    eprintln!("cap exact again {took:?} after the links came back");

    // 4. kill -9 of B: its lease stops counting within lease_ttl_ms.
    let mut b = b;
    b.proc.child.kill().unwrap();
    b.proc.child.wait().unwrap();
    let freed =
        until_status(a.public, &cap, 101, Duration::from_millis(1500 + 700), "B's slot after kill -9").await;
    eprintln!("a killed instance's slot freed after {freed:?}");
    drop(_cap_b);

    // 5. A clean stop frees its users' slots at once.
    let c = start(instance(dir, "c", d)).await;
    wait_up(c.admin, Duration::from_secs(5), "C at start").await;
    let stop = token("stop");
    let _one = ws(a.public, &stop).await;
    let _two = ws(c.public, &stop).await;
    let third = status(a.public, &stop).await;
    if third != 429 {
        for g in [a.admin, c.admin] {
            let m = http(g, "GET", "/metrics", &[], "").await;
            let errs: Vec<&str> = body(&m).lines().filter(|l| l.starts_with("portcullis_store")).collect();
            eprintln!("{g}: {errs:?}");
        }
    }
    assert_eq!(third, 429, "the cap across A and a new instance C");
    c.stop().await;
    let freed = until_status(a.public, &stop, 101, Duration::from_millis(300), "a clean stop's slot").await;
    eprintln!("a stopped instance's slot freed after {freed:?}");

    for op in ["lease_claim", "revoke"] {
        let n = metric_at(a.admin, &format!("portcullis_store_errors_total{{op=\"{op}\"}}")).await;
        eprintln!("A's store errors {op}: {n}");
    }
    a.stop().await;
}
