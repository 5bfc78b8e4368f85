//! The demo page: served only in demo mode, at `GET /` without an upgrade,
//! with a token that works through the subprotocol carrier; and a real
//! headless Chromium (Debian's `chromium`, which `scripts/test.sh`
//! installs) driven through the DevTools protocol: the page connects, a
//! line typed into it comes back and is shown.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// `serve --demo` on free ports; its public and admin addresses and the
/// page address the banner printed.
fn demo() -> (ChildProc, SocketAddr, SocketAddr, String) {
    let proc = ChildProc::spawn(Command::new(BIN).args([
        "serve",
        "--demo",
        "--public",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut public, mut admin, mut open) = (None, None, None);
    let mut seen = Vec::new();
    while Instant::now() < deadline && open.is_none() {
        let Ok(line) = proc.lines.recv_timeout(Duration::from_millis(200)) else { continue };
        seen.push(line.clone());
        if let Some(rest) = line.strip_prefix("listening ") {
            for kv in rest.split_whitespace() {
                match kv.split_once('=') {
                    Some(("public", a)) => public = a.parse().ok(),
                    Some(("admin", a)) => admin = a.parse().ok(),
                    _ => {}
                }
            }
        }
        if let Some(url) = line.strip_prefix("open: ") {
            open = Some(url.to_string());
        }
    }
    let (Some(public), Some(admin), Some(open)) = (public, admin, open) else {
        panic!("the banner names the addresses and the page: {seen:?}")
    };
    assert_eq!(open, format!("http://{public}/"));
    (proc, public, admin, open)
}

/// The token in a page's script.
fn page_token(page: &str) -> String {
    page.split("const token = \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a token in the page")
        .into()
}

#[tokio::test]
async fn the_page_is_served_in_demo_mode_only_and_its_token_opens_the_subprotocol_carrier() {
    let dir = tempfile::tempdir().unwrap();
    // Not the demo: `GET /` without an upgrade keeps its answer.
    let gw = start(config(dir.path())).await;
    let a = http(gw.public, "GET", "/", &[], "").await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(gw.rejected("bad_request").await, 1.0);
    gw.stop().await;

    let (_proc, public, admin, _) = demo();
    let a = http(public, "GET", "/", &[], "").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.header("content-type").as_deref(), Some("text/html; charset=utf-8"));
    assert_eq!(a.header("cache-control").as_deref(), Some("no-store"));
    assert!(a.header("content-security-policy").unwrap().contains("default-src 'none'"));
    let first = page_token(body(&a));
    // A fresh token per load.
    let second = page_token(body(&http(public, "GET", "/", &[], "").await));
    assert_ne!(first, second);
    // Other paths and methods, and a broken upgrade, are refused as ever.
    assert_eq!(http(public, "GET", "/other", &[], "").await.status, 404);
    assert_eq!(http(public, "POST", "/", &[], "").await.status, 400);
    let broken = "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    assert_eq!(raw(public, broken.as_bytes()).await.status, 426, "no version: as ever");

    // The page's own way in: `Sec-WebSocket-Protocol: bearer, <token>`.
    let protocols = format!("bearer, {first}");
    let mut ws = ws_connect(public, "/", &[("Sec-WebSocket-Protocol", &protocols), ("Origin", "http://x")])
        .await
        .expect("the page's token upgrades");
    echo(&mut ws, "through the subprotocol carrier").await;
    let conns = body(&http(admin, "GET", "/admin/connections", &[], "").await).to_string();
    assert!(conns.contains("\"sub\":\"demo\""), "{conns}");
}

/// The first of these on `PATH`.
fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Some(p) = std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.exists()))
        {
            return p;
        }
    }
    panic!("no chromium on PATH: `apt-get install chromium` (scripts/test.sh installs it)");
}

/// A headless Chromium in a process group of its own, the whole group
/// killed (and its profile removed) on drop: the browser forks helpers,
/// and Debian's `chromium` is a wrapper script.
struct Browser {
    child: std::process::Child,
    profile: tempfile::TempDir,
    /// Where its stderr goes, shown when it does not start.
    log: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(url: &str) -> (Browser, SocketAddr) {
    use std::os::unix::process::CommandExt;
    let profile = tempfile::tempdir().unwrap();
    let log = profile.path().join("stderr.log");
    let child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("chromium starts");
    // Owned before anything can fail: a failed start leaves nothing behind.
    let browser = Browser { child, profile, log };
    let port = devtools_port(&browser, Duration::from_secs(30));
    (browser, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Chromium writes the port it chose into `DevToolsActivePort`.
fn devtools_port(b: &Browser, within: Duration) -> u16 {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = std::fs::read_to_string(b.profile.path().join("DevToolsActivePort")) {
            if let Some(p) = s.lines().next().and_then(|l| l.trim().parse().ok()) {
                return p;
            }
        }
        let log = std::fs::read_to_string(&b.log).unwrap_or_default();
        assert!(Instant::now() < deadline, "chromium wrote no DevToolsActivePort in {within:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One DevTools protocol session on a page.
struct Cdp {
    ws: Ws,
    next: u64,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(Message::text(msg)).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let m = self.ws.next().await.expect("devtools open").unwrap();
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(&t).unwrap();
                // Events (no id) are not ours to read.
                if v["id"] == id {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{method}: no answer"));
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// A JavaScript expression's value in the page.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true })).await;
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is true, within `within`.
    async fn wait_for(&mut self, expr: &str, within: Duration, what: &str, show: &str) {
        let deadline = Instant::now() + within;
        while self.eval(expr).await != Value::Bool(true) {
            assert!(Instant::now() < deadline, "{what}: {}", self.eval(show).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A GET to DevTools' HTTP endpoint: it answers only a `Host` that is an
/// address or localhost, and keeps the connection open (read to
/// `Content-Length`).
async fn devtools_get(devtools: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(devtools).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {devtools}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = s.read(&mut chunk).await.unwrap_or(0);
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
                });
                if len.is_some_and(|len| body.len() >= len) {
                    return body.to_string();
                }
            }
            if n == 0 {
                return String::new();
            }
        }
    })
    .await;
    read.unwrap_or_default()
}

/// The page's DevTools WebSocket, once Chromium lists it.
async fn page_target(devtools: SocketAddr, url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = devtools_get(devtools, "/json/list").await;
        if let Ok(Value::Array(targets)) = serde_json::from_str::<Value>(&list) {
            let page = targets.iter().find(|t| t["type"] == "page" && t["url"].as_str() == Some(url));
            if let Some(ws) = page.and_then(|t| t["webSocketDebuggerUrl"].as_str()) {
                return ws.to_string();
            }
        }
        assert!(Instant::now() < deadline, "no page target for {url}: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_real_browser_connects_through_the_page_and_sees_its_line_echoed() {
    let (_proc, _public, admin, url) = demo();
    let (browser, devtools) = launch(&url);
    let target = page_target(devtools, &url).await;
    let (ws, _) = tokio_tungstenite::connect_async(target.as_str()).await.expect("devtools connects");
    let mut cdp = Cdp { ws, next: 0 };

    // The page's handshake got its 101 through the subprotocol carrier:
    // a browser opens the socket only if the server named one it offered.
    let state = "document.getElementById('state').textContent";
    let open = "document.getElementById('state').dataset.state === 'open'";
    cdp.wait_for(open, Duration::from_secs(20), "the page's WebSocket opened", state).await;
    assert_eq!(cdp.eval(state).await, json!("open (subprotocol bearer)"));
    // Chromium offers compression; echo mode agrees, without the client's
    // context between messages (so the line below comes back inflated).
    assert_eq!(cdp.eval("ws.extensions").await, json!("permessage-deflate; client_no_context_takeover"));
    let m = body(&http(admin, "GET", "/metrics", &[], "").await).to_string();
    assert_eq!(value_of(&m, "portcullis_connections{state=\"open\"}"), 1.0);
    // The input has the focus from the load: typing goes into it.
    assert_eq!(cdp.eval("document.activeElement && document.activeElement.id").await, json!("line"));

    let line = "hello from a real browser";
    cdp.call("Input.insertText", json!({ "text": line })).await;
    for kind in ["keyDown", "keyUp"] {
        let key = json!({ "type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13 });
        cdp.call("Input.dispatchKeyEvent", key).await;
    }
    let echoes = "[...document.querySelectorAll('#log li.echo')].map(e => e.textContent)";
    cdp.wait_for(
        &format!("{echoes}.includes({})", json!(line)),
        Duration::from_secs(10),
        "the typed line came back and is shown",
        echoes,
    )
    .await;
    assert_eq!(cdp.eval("document.getElementById('line').value").await, json!(""), "the input is cleared");
    drop(browser);
}
