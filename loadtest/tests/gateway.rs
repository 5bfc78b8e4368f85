//! The load tester against the real gateway, started on port 0 with a
//! config of short timeouts, checking that what the tester reports matches
//! the gateway's own `/metrics`.
//!
//! Opt-in: set `PORTCULLIS_BIN` to the `portcullis` binary (e.g.
//! `PORTCULLIS_BIN=$PWD/target/debug/portcullis cargo test -p
//! portcullis-loadtest --test gateway`). Without it each test says it was
//! skipped and passes, so this crate's tests do not depend on the gateway's
//! build.

//! The load tester against the real gateway, started on port 0 with a
//! config of short timeouts, checking that what the tester reports matches
//! the gateway's own `/metrics` and `/proc`.
//!
//! The gateway binary is `PORTCULLIS_BIN` when set, else built here with
//! `cargo build -p portcullis --bin portcullis` at the workspace root; a
//! failure to build fails the tests (they never pass silently).
//!
//! "Remote" targets are a gateway inside a network namespace these tests
//! create (`ip netns add`, a veth pair with addresses of its own), torn down
//! afterwards; where namespaces are unavailable (not root, no `ip`) those
//! tests say so and skip. No traffic leaves this machine.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use common::{num, run_lt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout, Instant};

const SECRET: &str = "loadtest-gateway-secret";

/// The gateway binary: `PORTCULLIS_BIN`, else built once for all tests.
fn portcullis_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = std::env::var_os("PORTCULLIS_BIN") {
            return PathBuf::from(b);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "portcullis", "--bin", "portcullis"])
            .current_dir(root)
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!(
                "PORTCULLIS_BIN is unset and `cargo build -p portcullis --bin portcullis` failed ({other:?}); \
                 set PORTCULLIS_BIN to the gateway binary"
            ),
        }
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
        let bin = target.join("debug").join("portcullis");
        assert!(bin.exists(), "built the gateway but {} is missing", bin.display());
        bin
    })
    .clone()
}

/// A network namespace with a veth pair: `host_ip` on this side,
/// `ns_ip` inside. Deleted on drop (which removes both veth ends).
struct Netns {
    name: String,
    host_ip: String,
    ns_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// Creates the namespace, or says why it cannot (then the test skips).
    fn create(tag: u8) -> Option<Netns> {
        let id = std::process::id() % 10_000;
        let name = format!("plt-{id}-{tag}");
        let (a, b) = (format!("vplt{id}{tag}a"), format!("vplt{id}{tag}b"));
        let subnet = format!("10.{}.{}", 200 + tag, id % 250);
        let ns = Netns { name: name.clone(), host_ip: format!("{subnet}.1"), ns_ip: format!("{subnet}.2") };
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &name])?;
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            ip(&["link", "set", &b, "netns", &name])?;
            ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &a])?;
            ip(&["link", "set", &a, "up"])?;
            ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{}/30", ns.ns_ip), "dev", &b])?;
            ip(&["netns", "exec", &name, "ip", "link", "set", &b, "up"])?;
            ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])
        };
        match setup() {
            Ok(()) => Some(ns),
            Err(e) => {
                eprintln!("skipped: network namespaces unavailable here ({e})");
                let _ = ip(&["link", "del", &a]);
                drop(ns);
                None
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth end inside it, and with it the pair.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

struct Gateway {
    /// Killed on drop (`kill_on_drop`).
    child: Child,
    public: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn pid(&self) -> u32 {
        self.child.id().expect("gateway running")
    }
}

#[derive(Default)]
struct GwOpts<'a> {
    /// Extra config sections.
    extra: &'a str,
    /// Run inside this namespace, listening on its address.
    netns: Option<&'a Netns>,
    /// `(cert PEM, key PEM)`: serve TLS.
    tls: Option<(String, String)>,
}

async fn gateway(extra: &str) -> Gateway {
    gateway_with(GwOpts { extra, ..Default::default() }).await
}

async fn gateway_with(o: GwOpts<'_>) -> Gateway {
    let bin = portcullis_bin();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    let host = o.netns.map(|n| n.ns_ip.as_str()).unwrap_or("127.0.0.1");
    let mut listen = format!("[listen]\npublic = \"{host}:0\"\nadmin = \"{host}:0\"\n");
    if let Some((cert, key)) = &o.tls {
        let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        listen.push_str(&format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            c.display(),
            k.display()
        ));
    }
    std::fs::write(
        &cfg,
        format!(
            "{listen}[auth]\nhmac_secret = \"{SECRET}\"\nleeway_s = 0\n\
             [revocation]\npath = \"{}\"\n{}",
            dir.path().join("revocations.log").display(),
            o.extra
        ),
    )
    .unwrap();
    let mut cmd = match o.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let mut child = cmd
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the gateway");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let listening = timeout(Duration::from_secs(10), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if let Some(rest) = l.split("listening ").nth(1) {
                return Some(rest.to_string());
            }
            seen.push(l);
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| panic!("the gateway prints `listening public=… admin=…`; it said: {seen:?}"));
    // Keep draining stderr so the gateway never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let field = |k: &str| {
        listening
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("{k} in {listening:?}"))
            .to_string()
    };
    Gateway { public: field("public="), admin: field("admin="), child, _dir: dir }
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
    let gw =
        gateway("[limits]\nper_ip_rate = 10000.0\nper_ip_burst = 10000\nper_ip_max_handshakes = 10000\n[ban]\nenabled = false\n")
            .await;
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
    let gw = gateway(
        "[limits]\nper_ip_rate = 10000.0\nper_ip_burst = 10000\nper_ip_max_handshakes = 10000\nhandshake_timeout_ms = 500\n\
         [ban]\nenabled = false\n[heartbeat]\nping_interval_ms = 200\npong_timeout_ms = 300\n",
    )
    .await;
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

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_targets_need_allow_remote() {
    let Some(ns) = Netns::create(1) else {
        return;
    };
    let gw = gateway_with(GwOpts {
        extra: "[limits]\nper_ip_rate = 10000.0\nper_ip_burst = 10000\nper_ip_max_handshakes = 10000\n[ban]\nenabled = false\n",
        netns: Some(&ns),
        ..Default::default()
    })
    .await;
    assert!(gw.public.starts_with(&ns.ns_ip), "{}", gw.public);
    let url = format!("ws://{}/", gw.public);
    let metrics = format!("http://{}/metrics", gw.admin);
    let base = ["handshake", "--url", &url, "--hs256-secret", SECRET, "--count", "20", "--duration", "10s"];

    // Refused without the opt-in, saying how to opt in; nothing was sent.
    let (code, err, _) = run_lt(&base).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a loopback address") && err.contains("--allow-remote"), "{err}");

    // With it: the run goes through, bound to this host's end of the veth.
    let mut args = base.to_vec();
    args.extend(["--allow-remote", "--metrics", &metrics, "--source-ips", &ns.host_ip]);
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "valid", "status", "101"), 20, "{}", v["groups"]);
    assert_eq!(delta(&v, "portcullis_handshakes_total", "outcome", "accepted"), 20.0);

    // Source addresses must be this host's, checked before the run.
    let mut args = base.to_vec();
    args.extend(["--allow-remote", "--source-ips", "192.0.2.77"]);
    let (code, err, _) = run_lt(&args).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not an address of this host"), "{err}");
}

/// A private CA and a server certificate it signed for 127.0.0.1 / localhost.
fn ca_and_server() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_insecure_and_with_ca() {
    let (ca, cert, key) = ca_and_server();
    let gw = gateway_with(GwOpts {
        extra: "[limits]\nper_ip_rate = 10000.0\nper_ip_burst = 10000\nper_ip_max_handshakes = 10000\n[ban]\nenabled = false\n",
        tls: Some((cert, key)),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, ca_and_server().0).unwrap();
    let url = format!("wss://{}/", gw.public);
    let run = |extra: Vec<String>| {
        let url = url.clone();
        async move {
            let mut args: Vec<String> =
                ["handshake", "--url", &url, "--hs256-secret", SECRET, "--count", "10"]
                    .into_iter()
                    .map(String::from)
                    .collect();
            args.extend(["--duration".into(), "10s".into()]);
            args.extend(extra);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run_lt(&refs).await
        }
    };

    // --insecure: upgraded, said loudly, TLS time reported apart.
    let (code, err, v) = run(vec!["--insecure".into()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("WARNING") && err.contains("--insecure"), "{err}");
    assert!(v["warnings"][0].as_str().unwrap_or_default().contains("NOT verified"), "{}", v["warnings"]);
    assert_eq!(num(&v, "valid", "status", "101"), 10, "{}", v["groups"]);
    let g = &v["groups"]["valid"];
    assert_eq!(g["tls_ms"]["count"], 10, "{g}");
    assert!(g["tls_ms"]["p50"].as_f64().unwrap() <= g["handshake_ms"]["p50"].as_f64().unwrap(), "{g}");

    // --ca with the gateway's CA: verified, no warning.
    let (code, err, v) = run(vec!["--ca".into(), ca_file.display().to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("WARNING") && v.get("warnings").is_none(), "{err}");
    assert_eq!(num(&v, "valid", "status", "101"), 10, "{}", v["groups"]);

    // Another CA: every attempt fails in TLS, none reaches the upgrade.
    let (code, err, v) = run(vec!["--ca".into(), other_ca.display().to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "valid", "status", "tls_error"), 10, "{}", v["groups"]);
    assert_eq!(num(&v, "valid", "reasons", "tls_error: bad_certificate"), 10, "{}", v["groups"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_of_two_machines_sums_counts() {
    let gw =
        gateway("[limits]\nper_ip_rate = 10000.0\nper_ip_burst = 10000\nper_ip_max_handshakes = 10000\n[ban]\nenabled = false\n")
            .await;
    let url = format!("ws://{}/", gw.public);
    // Two "machines" started together by --start-at.
    let at = format!("{:.3}", unix_now() + 1.5);
    let run = |count: &'static str, kinds: &'static str| {
        let (url, at) = (url.clone(), at.clone());
        async move {
            run_lt(&[
                "handshake",
                "--url",
                &url,
                "--hs256-secret",
                SECRET,
                "--kinds",
                kinds,
                "--count",
                count,
                "--rate",
                "20",
                "--start-at",
                &at,
                "--duration",
                "10s",
            ])
            .await
        }
    };
    let ((ca, ea, va), (cb, eb, vb)) = tokio::join!(run("30", "valid"), run("20", "valid,missing"));
    assert_eq!((ca, cb), (0, 0), "{ea}\n{eb}");
    let dir = tempfile::tempdir().unwrap();
    let (a, b, m) = (dir.path().join("a.json"), dir.path().join("b.json"), dir.path().join("m.json"));
    std::fs::write(&a, va.to_string()).unwrap();
    std::fs::write(&b, vb.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-loadtest"))
        .arg("merge")
        .args([&a, &b])
        .arg("--json")
        .arg(&m)
        .arg("--html")
        .arg(dir.path().join("m.html"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
    assert_eq!(num(&v, "valid", "counters", "attempts"), 40, "{}", v["groups"]);
    assert_eq!(num(&v, "valid", "status", "101"), 40);
    assert_eq!(num(&v, "missing", "status", "401"), 10);
    assert_eq!(v["groups"]["valid"]["handshake_ms"]["count"], 40);
    assert_eq!(v["workers"], 2);
    // Started together: the merged span is one run's, not the sum.
    let (sa, sb) =
        (va["raw"]["started_unix_ms"].as_u64().unwrap(), vb["raw"]["started_unix_ms"].as_u64().unwrap());
    assert!(sa.abs_diff(sb) < 500, "{sa} vs {sb}");
    assert!(
        v["elapsed_s"].as_f64().unwrap()
            < va["elapsed_s"].as_f64().unwrap().max(vb["elapsed_s"].as_f64().unwrap()) + 1.0
    );
    // The per-second series are summed second by second (wall-clock aligned).
    let last = |v: &Value| {
        v["groups"]["valid"]["timeline"].as_array().unwrap().last().unwrap()["attempts"].as_u64().unwrap()
    };
    assert_eq!(last(&v), last(&va) + last(&vb), "{}", v["groups"]["valid"]["timeline"]);
}

fn vm_rss(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    kb * 1024.0
}

async fn open_connections(admin: &str) -> u64 {
    let t = portcullis_loadtest::target::parse_http_url(&format!("http://{admin}/metrics")).unwrap();
    let page = portcullis_loadtest::metrics::fetch(&t).await.unwrap_or_default();
    portcullis_loadtest::metrics::parse(&page, &["portcullis_connections"])
        .iter()
        .find(|s| s.labels.get("state").map(String::as_str) == Some("open"))
        .map(|s| s.value as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_rss_per_connection_matches_proc() {
    const N: u64 = 3000;
    let gw = gateway(
        "[limits]\nper_ip_rate = 100000.0\nper_ip_burst = 100000\nper_ip_max_connections = 100000\nper_ip_max_handshakes = 100000\n\
         per_user_max_connections = 100000\n[ban]\nenabled = false\n",
    )
    .await;
    let pid = gw.pid();
    let url = format!("ws://{}/", gw.public);
    let metrics = format!("http://{}/metrics", gw.admin);
    // Both baselines after a first scrape: capacity's base reading comes
    // from one, and the exporter's first rendering grows the heap (about a
    // megabyte, a third of a kilobyte per connection here).
    open_connections(&gw.admin).await;
    let base_rss = vm_rss(pid);
    let lt = tokio::spawn(async move {
        run_lt(&[
            "capacity",
            "--url",
            &url,
            "--metrics",
            &metrics,
            "--hs256-secret",
            SECRET,
            "--count",
            "3000",
            "--step",
            "1000",
            "--rate",
            "2000",
            "--settle",
            "2s",
            "--hold",
            "3s",
            "--msg-rate",
            "1",
            "--duration",
            "50s",
        ])
        .await
    });
    // What /proc says for the same run: at the top, while capacity holds it.
    let deadline = Instant::now() + Duration::from_secs(40);
    while open_connections(&gw.admin).await < N {
        assert!(Instant::now() < deadline, "never reached {N} open connections");
        sleep(Duration::from_millis(100)).await;
    }
    // Inside the top step's settle time (2 s), when capacity takes its own
    // reading too: before the message hold, whose buffers would count in
    // one reading and not the other.
    sleep(Duration::from_millis(1000)).await;
    let proc_per_conn = (vm_rss(pid) - base_rss) / N as f64;
    let (code, err, v) = lt.await.unwrap();
    assert_eq!(code, 0, "{err}");
    let c = &v["capacity"];
    assert!(c["stop_reason"].as_str().unwrap_or_default().contains("target count"), "{c}");
    let fig = |name: &str| {
        c["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {c}"))["value"]
            .as_f64()
            .unwrap()
    };
    let reported = fig("RSS per connection");
    assert!(
        (reported - proc_per_conn).abs() <= 0.10 * proc_per_conn,
        "capacity says {reported:.0} B per connection, /proc/{pid}/status says {proc_per_conn:.0} B"
    );
    assert!(fig("descriptors per connection") >= 0.9, "{c}");
    // CPU through /metrics counts whole seconds: the figures are there, but
    // a short run may read 0 (their resolution is said in the report).
    assert!(fig("CPU per handshake") >= 0.0 && fig("CPU per message") >= 0.0, "{c}");
    assert_eq!(c["cpu_resolution_s"], 1.0, "{c}");
    assert!(
        num(&v, "capacity", "counters", "messages_received") >= N,
        "every connection sent in the message hold"
    );
    assert_eq!(num(&v, "capacity", "status", "101"), N);
}
