//! `portcullis connect`, the binary, against a real gateway: lines echoed
//! in order, the close code as the exit status, refusals named by their
//! HTTP status.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// What one run of `connect` left: exit status, stdout, stderr.
struct Run {
    status: i32,
    out: String,
    err: String,
}

/// What happens to `connect`'s stdin after the input is written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stdin {
    /// Closed at once (end of input).
    Close,
    /// Left open until `connect` exits (a terminal nobody types into).
    Open,
    /// Left open while `during` runs, then closed.
    OpenDuring,
}
use Stdin::*;

/// Runs `connect` with `args`, writing `input` to its stdin, then `during`.
async fn connect(
    args: &[&str],
    input: &str,
    stdin: Stdin,
    during: impl std::future::Future<Output = ()>,
) -> Run {
    let keep_open = stdin != Close;
    let mut child = Command::new(BIN)
        .arg("connect")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    // From a thread: more than a pipe's worth of input must not block the
    // test while the client is busy; a client that exits early is seen in
    // its status, not as a broken pipe here.
    let input = input.to_string();
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(input.as_bytes());
        keep_open.then_some(pipe)
    });
    during.await;
    let writer = if stdin == OpenDuring {
        drop(writer.join());
        None
    } else {
        Some(writer)
    };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out =
        tokio::time::timeout(Duration::from_secs(15), out).await.expect("connect exits").unwrap().unwrap();
    drop(writer.map(|w| w.join()));
    Run {
        status: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn lines_come_back_in_order_and_a_normal_close_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let url = format!("ws://{}/", gw.public);
    let lines: Vec<String> = (0..300).map(|i| format!("line {i}: {}", "x".repeat(i * 7 % 500))).collect();
    let input = lines.join("\n") + "\n";
    let t = token("alice");
    let r = connect(&["--token", &t, &url], &input, Close, async {}).await;
    assert_eq!(r.status, 0, "stderr: {}", r.err);
    assert_eq!(r.out, input, "every line echoed, in order, nothing else on stdout");
    assert_eq!(r.err.trim(), "closed: 1000");
    // The same through an extra header (the token as a header of ours).
    let auth = format!("Authorization: Bearer {t}");
    let r = connect(&["--header", &auth, "-H", "X-Debug: 1", &url], "one\n", Close, async {}).await;
    assert_eq!((r.status, r.out.as_str()), (0, "one\n"), "stderr: {}", r.err);
    gw.stop().await;
}

#[tokio::test]
async fn the_close_code_becomes_the_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_message_bytes = 100;
    let gw = start(cfg).await;
    let url = format!("ws://{}/", gw.public);
    // 1009 message_too_big: 1009 - 990.
    let long = "y".repeat(200) + "\n";
    let r = connect(&["--token", &token("bob"), &url], &long, Open, async {}).await;
    assert_eq!(r.status, 19, "stderr: {}", r.err);
    assert_eq!(r.err.trim(), "closed: 1009 message_too_big");
    // Revoked while connected (stdin still open): 1008 - 990.
    let r = connect(&["--token", &token("carol"), &url], "hi\n", Open, async {
        gw.wait_metric("portcullis_connections{state=\"open\"}", 1.0).await;
        assert_eq!(gw.revoke(r#"{"sub":"carol"}"#).await.status, 200);
    })
    .await;
    assert_eq!((r.status, r.out.as_str()), (18, "hi\n"), "stderr: {}", r.err);
    assert!(r.err.starts_with("closed: 1008 "), "{}", r.err);
    gw.stop().await;
}

#[tokio::test]
async fn refusals_name_the_http_status_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let url = format!("ws://{}/", gw.public);
    // A forged token: the signature is not the gateway's.
    let good = token("mallory");
    let forged =
        format!("{}.{}", good.rsplit_once('.').unwrap().0, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let r = connect(&["--token", &forged, &url], "hi\n", Close, async {}).await;
    assert_eq!(r.status, 3, "stderr: {}", r.err);
    assert_eq!(r.err.trim(), "refused: 401 Unauthorized (invalid_token)");
    assert_eq!(r.out, "", "nothing was sent or printed");
    let r = connect(&[&url], "", Close, async {}).await;
    assert_eq!((r.status, r.err.trim()), (3, "refused: 401 Unauthorized (missing_token)"));
    let r = connect(&["--token", &good, &format!("ws://{}/elsewhere", gw.public)], "", Close, async {}).await;
    assert_eq!((r.status, r.err.trim()), (3, "refused: 404 Not Found (bad_path)"));
    // Bad arguments: exit 2, naming the flag.
    let r = connect(&["--header", "no colon", &url], "", Close, async {}).await;
    assert_eq!(r.status, 2, "{}", r.err);
    assert!(r.err.contains("--header \"no colon\""), "{}", r.err);
    let r = connect(&["http://example.invalid/"], "", Close, async {}).await;
    assert_eq!(r.status, 2, "{}", r.err);
    gw.stop().await;
    // Nothing listening: could not connect, exit 1.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = l.local_addr().unwrap();
    drop(l);
    let r = connect(&[&format!("ws://{free}/")], "", Close, async {}).await;
    assert_eq!(r.status, 1, "{}", r.err);
    assert!(r.err.contains(&format!("connecting to 127.0.0.1:{}", free.port())), "{}", r.err);
}

#[tokio::test]
async fn wss_trusts_the_given_ca_and_refuses_an_unknown_one() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("gw.crt"), dir.path().join("gw.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut cfg = config(dir.path());
    cfg.listen.tls_cert_file = cert.clone();
    cfg.listen.tls_key_file = key;
    let gw = start(cfg).await;
    let url = format!("wss://localhost:{}/", gw.public.port());
    let t = token("tls");
    let r =
        connect(&["--token", &t, "--ca", cert.to_str().unwrap(), &url], "secure\n", Close, async {}).await;
    assert_eq!((r.status, r.out.as_str(), r.err.trim()), (0, "secure\n", "closed: 1000"));
    // Another CA: the handshake fails, exit 1, naming TLS.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let other_file = dir.path().join("other.crt");
    std::fs::write(&other_file, other.cert.pem()).unwrap();
    let r = connect(&["--token", &t, "--ca", other_file.to_str().unwrap(), &url], "", Close, async {}).await;
    assert_eq!(r.status, 1, "{}", r.err);
    assert!(r.err.contains("TLS handshake"), "{}", r.err);
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_client_answers_the_gateways_pings() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.heartbeat.ping_interval_ms = 100;
    cfg.heartbeat.pong_timeout_ms = 300;
    let gw = start(cfg).await;
    let url = format!("ws://{}/", gw.public);
    // Stdin open and silent for 1.5 s: five pong timeouts' worth.
    let r = connect(&["--token", &token("quiet"), &url], "", OpenDuring, async {
        gw.wait_metric("portcullis_connections{state=\"open\"}", 1.0).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(gw.metric("portcullis_connections{state=\"open\"}").await, 1.0, "still connected");
    })
    .await;
    assert_eq!((r.status, r.err.trim()), (0, "closed: 1000"));
    gw.stop().await;
}
