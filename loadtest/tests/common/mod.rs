//! A tiny gateway stand-in for the load tester's tests: it follows the gateway's
//! contract closely enough (head deadline with 408, 401 + WWW-Authenticate
//! for token failures, 101 with the accept key, echo, pings with a pong
//! timeout closing 1011, a write timeout for slow readers) and counts what
//! it saw, also as a Prometheus-style `/metrics` page, so tests can compare
//! the load tester's numbers with the server's. Binds 127.0.0.1:0.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{interval, timeout, timeout_at, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const SECRET: &str = "fixture-secret";

#[derive(Clone, Copy)]
pub struct Opts {
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub write_timeout: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            handshake_timeout: Duration::from_millis(500),
            ping_interval: Duration::from_secs(3600),
            pong_timeout: Duration::from_secs(3600),
            write_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Default)]
pub struct Seen {
    /// (outcome, reason) -> count.
    pub handshakes: Mutex<BTreeMap<(String, String), u64>>,
    /// reason -> count.
    pub disconnects: Mutex<BTreeMap<String, u64>>,
    /// Distinct peer addresses.
    pub peers: Mutex<BTreeSet<IpAddr>>,
}

impl Seen {
    fn handshake(&self, outcome: &str, reason: &str) {
        *self.handshakes.lock().unwrap().entry((outcome.into(), reason.into())).or_default() += 1;
    }
    fn disconnect(&self, reason: &str) {
        *self.disconnects.lock().unwrap().entry(reason.into()).or_default() += 1;
    }
    pub fn count(&self, outcome: &str, reason: &str) -> u64 {
        self.handshakes.lock().unwrap().get(&(outcome.to_string(), reason.to_string())).copied().unwrap_or(0)
    }
    pub fn disconnects(&self, reason: &str) -> u64 {
        self.disconnects.lock().unwrap().get(reason).copied().unwrap_or(0)
    }
    fn metrics_page(&self) -> String {
        let mut s = String::from(
            "# HELP portcullis_handshakes_total x\n# TYPE portcullis_handshakes_total counter\n",
        );
        for ((o, r), n) in self.handshakes.lock().unwrap().iter() {
            s.push_str(&format!("portcullis_handshakes_total{{outcome=\"{o}\",reason=\"{r}\"}} {n}\n"));
        }
        for (r, n) in self.disconnects.lock().unwrap().iter() {
            s.push_str(&format!("portcullis_disconnects_total{{reason=\"{r}\"}} {n}\n"));
        }
        s.push_str("portcullis_connections{state=\"open\"} 0\n");
        s
    }
}

pub struct Fixture {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub seen: Arc<Seen>,
}

impl Fixture {
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.admin)
    }
}

pub async fn start(opts: Opts) -> Fixture {
    let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let seen = Arc::new(Seen::default());
    let f = Fixture {
        addr: public.local_addr().unwrap(),
        admin: admin.local_addr().unwrap(),
        seen: seen.clone(),
    };
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = admin.accept().await else {
                continue;
            };
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let _ = sock.read(&mut buf).await;
                let body = seen.metrics_page();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((sock, peer)) = public.accept().await else {
                continue;
            };
            seen.peers.lock().unwrap().insert(peer.ip());
            tokio::spawn(conn(sock, seen.clone(), opts));
        }
    });
    f
}

enum Head {
    Complete(String),
    Nothing,
    Partial,
    TooLarge,
}

async fn read_head(s: &mut TcpStream, deadline: Instant) -> Head {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 1024];
    loop {
        match timeout_at(deadline, s.read(&mut tmp)).await {
            Err(_) if buf.is_empty() => return Head::Nothing,
            Err(_) => return Head::Partial,
            Ok(Ok(0)) | Ok(Err(_)) => return Head::Nothing,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&tmp[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return Head::Complete(String::from_utf8_lossy(&buf[..i]).into_owned());
                }
                if buf.len() > 8192 {
                    return Head::TooLarge;
                }
            }
        }
    }
}

fn accept_key(key: &str) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.digest().bytes())
}

async fn refuse(s: &mut TcpStream, status: &str, extra: &str) {
    let r = format!("HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(r.as_bytes()).await;
}

#[derive(serde::Deserialize)]
struct Claims {
    #[allow(dead_code)]
    sub: String,
}

async fn conn(mut s: TcpStream, seen: Arc<Seen>, o: Opts) {
    let deadline = Instant::now() + o.handshake_timeout;
    let head = match read_head(&mut s, deadline).await {
        Head::Complete(h) => h,
        Head::Nothing => {
            seen.handshake("rejected", "handshake_timeout");
            return;
        }
        Head::Partial => {
            seen.handshake("rejected", "handshake_timeout");
            refuse(&mut s, "408 Request Timeout", "").await;
            return;
        }
        Head::TooLarge => {
            seen.handshake("rejected", "header_too_large");
            refuse(&mut s, "431 Request Header Fields Too Large", "").await;
            return;
        }
    };
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    let (Some(key), true) = (h("sec-websocket-key"), request.starts_with("GET ")) else {
        seen.handshake("rejected", "bad_request");
        refuse(&mut s, "400 Bad Request", "").await;
        return;
    };
    let key = key.to_string();
    let mut subprotocol = false;
    let token = if let Some(a) = h("authorization") {
        a.strip_prefix("Bearer ").map(str::to_string)
    } else if let Some(p) = h("sec-websocket-protocol") {
        subprotocol = true;
        p.strip_prefix("bearer, ").map(str::to_string)
    } else {
        None
    };
    let Some(token) = token else {
        seen.handshake("rejected", "missing_token");
        refuse(&mut s, "401 Unauthorized", "WWW-Authenticate: Bearer realm=\"portcullis\"\r\n").await;
        return;
    };
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = 0;
    v.validate_aud = false;
    if let Err(e) = decode::<Claims>(&token, &DecodingKey::from_secret(SECRET.as_bytes()).unwrap(), &v) {
        let (reason, desc) = match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => ("expired_token", "token expired"),
            _ => ("invalid_token", "token invalid"),
        };
        seen.handshake("rejected", reason);
        let extra = format!(
            "WWW-Authenticate: Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"{desc}\"\r\n"
        );
        refuse(&mut s, "401 Unauthorized", &extra).await;
        return;
    }
    let proto = if subprotocol { "Sec-WebSocket-Protocol: bearer\r\n" } else { "" };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{proto}\r\n",
        accept_key(&key)
    );
    if s.write_all(resp.as_bytes()).await.is_err() {
        return;
    }
    seen.handshake("accepted", "ok");
    let reason = session(s, o).await;
    seen.disconnect(reason);
}

async fn session(s: TcpStream, o: Opts) -> &'static str {
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let mut ws = WebSocketStream::from_raw_socket(s, Role::Server, Some(cfg)).await;
    let mut ping = interval(o.ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping.tick().await;
    let mut ping_sent: Option<Instant> = None;
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    ping_sent = None;
                    match timeout(o.write_timeout, ws.send(m)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return "error",
                        Err(_) => return "slow_reader",
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    let _ = timeout(Duration::from_millis(100), ws.close(None)).await;
                    return "client_close";
                }
                Some(Ok(_)) => ping_sent = None,
                Some(Err(_)) | None => return "error",
            },
            _ = ping.tick() => {
                if let Some(t) = ping_sent {
                    if t.elapsed() >= o.pong_timeout {
                        let close = Message::Close(Some(CloseFrame { code: CloseCode::from(1011), reason: "pong timeout".into() }));
                        let _ = timeout(Duration::from_millis(50), ws.send(close)).await;
                        return "pong_timeout";
                    }
                } else {
                    match timeout(o.write_timeout, ws.send(Message::Ping(vec![1, 2, 3].into()))).await {
                        Ok(Ok(())) => ping_sent = Some(Instant::now()),
                        Ok(Err(_)) => return "error",
                        Err(_) => return "slow_reader",
                    }
                }
            }
        }
    }
}

/// Runs the load tester with `args` (plus `--json FILE --quiet`), bounded in
/// time; returns its exit status, stderr and the JSON report.
pub async fn run_lt(args: &[&str]) -> (i32, String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis-loadtest"))
            .args(args)
            .arg("--json")
            .arg(&json)
            .arg("--quiet")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("load tester overran its bound")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    let v = std::fs::read_to_string(&json)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    (code, stderr, v)
}

/// `report.groups.<g>.<field>.<key>` as a number, 0 when absent.
pub fn num(v: &serde_json::Value, group: &str, field: &str, key: &str) -> u64 {
    v["groups"][group][field][key].as_u64().unwrap_or(0)
}
