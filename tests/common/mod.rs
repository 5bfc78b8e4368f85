//! Shared test harness: a real gateway on port 0 and real clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use portcullis::config::Config;
use portcullis::Gateway;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789abcdef";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A configuration for tests: port 0, short deadlines, no leeway, the
/// revocation log in `dir`.
pub fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.listen.public = "127.0.0.1:0".parse().unwrap();
    c.listen.admin = "127.0.0.1:0".parse().unwrap();
    c.listen.drain_timeout_s = 2;
    c.auth.hmac_secret = SECRET.into();
    c.auth.leeway_s = 0;
    c.limits.handshake_timeout_ms = 500;
    c.limits.handshake_timeout_min_ms = 500;
    // Tests of silent sockets must see them at once; TCP_DEFER_ACCEPT has
    // its own test.
    c.listen.defer_accept_s = 0;
    c.limits.per_ip_rate = 1000.0;
    c.limits.per_ip_burst = 1000;
    // Most tests send many refusals from 127.0.0.1 on purpose; tests/bans.rs
    // turns automatic bans back on where they are the subject.
    c.ban.enabled = false;
    c.revocation.path = dir.join("revocations.log");
    c
}

pub struct TestGateway {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub async fn start(cfg: Config) -> TestGateway {
    let gw = Gateway::bind(cfg).await.expect("gateway binds");
    let (public, admin) = (gw.public_addr(), gw.admin_addr());
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(gw.run(async move {
        let _ = rx.await;
    }));
    TestGateway { public, admin, stop: Some(tx), task: Some(task) }
}

/// As [`start`], also handing back the gateway's shared state, for tests
/// that reload a configuration in-process (`Shared::reload`).
pub async fn start_shared(cfg: Config) -> (TestGateway, std::sync::Arc<portcullis::Shared>) {
    let gw = Gateway::bind(cfg).await.expect("gateway binds");
    let shared = gw.shared();
    let (public, admin) = (gw.public_addr(), gw.admin_addr());
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(gw.run(async move {
        let _ = rx.await;
    }));
    (TestGateway { public, admin, stop: Some(tx), task: Some(task) }, shared)
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// An HS256 token with these claims over the defaults (sub, iat, exp +1h).
pub fn token_with(extra: serde_json::Value) -> String {
    let mut claims = json!({ "sub": "alice", "iat": now(), "exp": now() + 3600 });
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            if v.is_null() {
                c.remove(k);
            } else {
                c.insert(k.clone(), v.clone());
            }
        }
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

pub fn token(sub: &str) -> String {
    token_with(json!({ "sub": sub }))
}

/// A well-formed upgrade request with extra header lines.
pub fn upgrade_request(path: &str, extra: &[(&str, &str)]) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in extra {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// The answer to a raw request: status (0 if none), the whole text, and
/// how the read ended.
pub struct Answer {
    pub status: u16,
    pub text: String,
    pub ended: Ended,
}

/// How reading an answer ended: a refusal must answer and close, an
/// upgrade ends at its 101; anything else hung until the test's bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The server closed (EOF or reset).
    Closed,
    /// A complete 101 head arrived (the connection stays open).
    Upgraded,
    /// Neither, within 5 s: the server kept the socket open silently.
    Hung,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.text.split("\r\n\r\n").next().unwrap_or("");
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Sends raw bytes and reads until the server closes (or 101's head ends).
/// A server that does neither within 5 s fails the test: a refusal that
/// never closes would otherwise pass as "some status".
pub async fn raw(addr: SocketAddr, req: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let a = read_answer(&mut s).await;
    assert_ne!(a.ended, Ended::Hung, "no close and no upgrade within 5 s after:\n{}", a.text);
    a
}

/// Reads an answer: until the server closes, a 101 head is complete, or
/// 5 s pass ([`Ended`] tells which).
pub async fn read_answer(s: &mut TcpStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.starts_with(b"HTTP/1.1 101") && buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        return Ended::Upgraded;
                    }
                }
            }
        }
    })
    .await
    .unwrap_or(Ended::Hung);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Answer { status, text, ended }
}

/// Is the socket closed by the server without an answer (EOF or reset)?
pub async fn closed_without_answer(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(tokio::time::timeout(within, s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
}

pub async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
}

pub async fn ws(addr: SocketAddr, token: &str) -> Ws {
    ws_connect(addr, "/", &[("Authorization", &format!("Bearer {token}"))]).await.expect("ws connects")
}

/// Sends one text message and expects it echoed.
pub async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo in time");
    assert_eq!(got.unwrap().unwrap(), Message::text(text));
}

/// Reads until a close frame; returns its code (None if the TCP closed
/// without one) and how long it took.
pub async fn close_code(ws: &mut Ws, within: Duration) -> (Option<u16>, Duration) {
    let start = tokio::time::Instant::now();
    let r = tokio::time::timeout(within, async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("closed in time");
    (r, start.elapsed())
}

pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    raw(addr, req.as_bytes()).await
}

pub fn body(a: &Answer) -> &str {
    a.text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

impl TestGateway {
    pub async fn metrics(&self) -> String {
        body(&http(self.admin, "GET", "/metrics", &[], "").await).to_string()
    }

    /// The value of one series, `name{labels}` exactly as rendered.
    pub async fn metric(&self, series: &str) -> f64 {
        value_of(&self.metrics().await, series)
    }

    pub async fn rejected(&self, reason: &str) -> f64 {
        self.metric(&format!("portcullis_handshakes_total{{outcome=\"rejected\",reason=\"{reason}\"}}")).await
    }

    pub async fn disconnects(&self, reason: &str) -> f64 {
        self.metric(&format!("portcullis_disconnects_total{{reason=\"{reason}\"}}")).await
    }

    /// Waits (bounded) until the connection gauges are back to zero.
    pub async fn assert_gauges_zero(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.metrics().await;
            let h = value_of(&m, "portcullis_connections{state=\"handshaking\"}");
            let o = value_of(&m, "portcullis_connections{state=\"open\"}");
            let u = value_of(&m, "portcullis_users_connected");
            if h == 0.0 && o == 0.0 && u == 0.0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gauges not back to zero: handshaking={h} open={o} users={u}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until a series reaches `want`.
    pub async fn wait_metric(&self, series: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(series).await;
            if v == want {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{series} = {v}, want {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn revoke(&self, body: &str) -> Answer {
        http(self.admin, "POST", "/admin/revoke", &[("Content-Type", "application/json")], body).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t).await.expect("gateway stops").unwrap();
        }
    }
}

pub fn value_of(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("series {series} not found in:\n{metrics}"))
}

/// A raw socket upgraded with `token`, for tests that need frames a
/// WebSocket library would refuse to send or receive.
pub async fn raw_ws(addr: SocketAddr, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_request("/", &[("Authorization", &format!("Bearer {token}"))]).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s).await.status, 101);
    s
}

/// A masked client text frame (payload < 126 bytes).
pub fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [7u8, 1, 9, 3];
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads server frames until a close frame or EOF; returns the close code.
pub async fn raw_close_code(s: &mut TcpStream, within: Duration) -> Option<u16> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    // Walk unmasked server frames (short and 16-bit lengths suffice here).
    let mut i = 0;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0f;
        let (len, hdr) = match buf[i + 1] & 0x7f {
            126 if i + 4 <= buf.len() => (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, 4),
            n if n < 126 => (n as usize, 2),
            _ => return None,
        };
        if op == 0x8 && len >= 2 && i + hdr + 2 <= buf.len() {
            return Some(u16::from_be_bytes([buf[i + hdr], buf[i + hdr + 1]]));
        }
        i += hdr + len;
    }
    None
}

/// A child process (the `portcullis` binary) whose stderr lines arrive on
/// `lines`; killed on drop so a failing test leaves nothing running.
pub struct ChildProc {
    pub child: std::process::Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl ChildProc {
    pub fn spawn(cmd: &mut std::process::Command) -> ChildProc {
        use std::io::BufRead;
        let mut child =
            cmd.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildProc { child, lines }
    }

    /// Sends a signal (`-TERM`, `-HUP`, …) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
