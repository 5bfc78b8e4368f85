//! The load tester against the real gateway, started on port 0 with a
//! config of short timeouts, checking that what the tester reports matches
//! the gateway's own `/metrics`.
//!
//! Opt-in: set `PORTCULLIS_BIN` to the `portcullis` binary (e.g.
//! `PORTCULLIS_BIN=$PWD/target/debug/portcullis cargo test -p
//! portcullis-loadtest --test gateway`). Without it each test says it was
//! skipped and passes, so this crate's tests do not depend on the gateway's
//! build.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{num, run_lt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::timeout;

const SECRET: &str = "loadtest-gateway-secret";

struct Gateway {
    /// Killed on drop (`kill_on_drop`).
    _child: Child,
    public: String,
    admin: String,
    _dir: tempfile::TempDir,
}

async fn gateway(extra: &str) -> Option<Gateway> {
    let Ok(bin) = std::env::var("PORTCULLIS_BIN") else {
        eprintln!("skipped: set PORTCULLIS_BIN to run the load tester against the gateway");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [auth]\nhmac_secret = \"{SECRET}\"\nleeway_s = 0\n\
             [revocation]\npath = \"{}\"\n{extra}",
            dir.path().join("revocations.log").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the gateway");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = timeout(Duration::from_secs(10), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if let Some(rest) = l.split("listening ").nth(1) {
                return Some(rest.to_string());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("the gateway prints `listening public=… admin=…`");
    // Keep draining stderr so the gateway never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let field = |k: &str| {
        listening
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("{k} in {listening:?}"))
            .to_string()
    };
    Some(Gateway { public: field("public="), admin: field("admin="), _child: child, _dir: dir })
}

/// The change of `name{label=value}` over the run, summed over other labels.
fn delta(v: &Value, name: &str, label: &str, value: &str) -> f64 {
    v["metrics"]["delta"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| s["name"] == name && s["labels"][label] == value)
                .filter_map(|s| s["value"].as_f64())
                .sum()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_match_gateway_metrics() {
    let Some(gw) = gateway("[limits]\nper_ip_rate = 10000.0\nper_ip_burst = 10000\n").await else {
        return;
    };
    let url = format!("ws://{}/", gw.public);
    let metrics = format!("http://{}/metrics", gw.admin);
    let (code, err, v) = run_lt(&[
        "handshake",
        "--url",
        &url,
        "--metrics",
        &metrics,
        "--hs256-secret",
        SECRET,
        "--kinds",
        "missing,garbage,bad-hs256,bad-es256,expired,wrong-alg,alg-none",
        "--count",
        "70",
        "--concurrency",
        "8",
        "--duration",
        "10s",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let rejected = delta(&v, "portcullis_handshakes_total", "outcome", "rejected");
    assert_eq!(rejected, 70.0, "{}", v["metrics"]);
    assert_eq!(num(&v, "missing", "reasons", "401 missing_token"), 10);
    assert_eq!(delta(&v, "portcullis_handshakes_total", "reason", "missing_token"), 10.0);
    assert_eq!(delta(&v, "portcullis_handshakes_total", "reason", "expired_token"), 10.0);
    assert_eq!(delta(&v, "portcullis_handshakes_total", "reason", "invalid_token"), 50.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_zombies_match_gateway_metrics() {
    let Some(gw) = gateway(
        "[limits]\nper_ip_rate = 10000.0\nper_ip_burst = 10000\nhandshake_timeout_ms = 500\n\
         [heartbeat]\nping_interval_ms = 200\npong_timeout_ms = 300\n",
    )
    .await
    else {
        return;
    };
    let url = format!("ws://{}/", gw.public);
    let metrics = format!("http://{}/metrics", gw.admin);
    let (code, err, v) = run_lt(&[
        "idle",
        "--url",
        &url,
        "--metrics",
        &metrics,
        "--hs256-secret",
        SECRET,
        "--count",
        "20",
        "--rate",
        "200",
        "--duration",
        "2s",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "idle", "status", "101"), 20, "{}", v["groups"]);
    assert_eq!(num(&v, "idle", "ends", "held_to_end"), 20, "pongs were answered");
    assert_eq!(delta(&v, "portcullis_handshakes_total", "outcome", "accepted"), 20.0);
    assert_eq!(delta(&v, "portcullis_disconnects_total", "reason", "client_close"), 20.0);

    let (code, err, v) = run_lt(&[
        "zombie",
        "--url",
        &url,
        "--metrics",
        &metrics,
        "--hs256-secret",
        SECRET,
        "--count",
        "5",
        "--mode",
        "no-pong",
        "--duration",
        "4s",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "zombie", "ends", "close 1011"), 5, "{}", v["groups"]);
    assert_eq!(delta(&v, "portcullis_disconnects_total", "reason", "pong_timeout"), 5.0);

    let (code, err, v) = run_lt(&[
        "slowloris",
        "--url",
        &url,
        "--metrics",
        &metrics,
        "--count",
        "5",
        "--interval",
        "50ms",
        "--duration",
        "3s",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "slowloris", "ends", "408"), 5, "{}", v["groups"]);
    assert_eq!(delta(&v, "portcullis_handshakes_total", "reason", "handshake_timeout"), 5.0);
}
