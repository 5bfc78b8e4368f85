//! Every scenario of the load tester, run as the real binary against the
//! fixture server on port 0, with what it reports checked against what the
//! server saw. Each run is bounded to a few seconds.

mod common;

use std::time::Duration;

use common::{num, run_lt, start, Opts, SECRET};

fn secret_args() -> Vec<&'static str> {
    vec!["--hs256-secret", SECRET]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_holds_connections_from_spread_sources_and_matches_server_metrics() {
    let f = start(Opts::default()).await;
    let url = f.url();
    let metrics = f.metrics_url();
    let html_dir = tempfile::tempdir().unwrap();
    let html = html_dir.path().join("r.html");
    let mut args = vec![
        "idle",
        "--url",
        &url,
        "--count",
        "30",
        "--rate",
        "200",
        "--duration",
        "1500ms",
        "--source-ips",
        "127.0.0.2-127.0.0.4",
        "--metrics",
        &metrics,
        "--html",
        html.to_str().unwrap(),
    ];
    args.extend(secret_args());
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "idle", "counters", "attempts"), 30);
    assert_eq!(num(&v, "idle", "status", "101"), 30);
    assert_eq!(num(&v, "idle", "ends", "held_to_end"), 30);
    assert_eq!(v["groups"]["idle"]["peak_open"], 30);
    assert!(v["elapsed_s"].as_f64().unwrap() < 4.0);
    // The server saw the same, from exactly the three source addresses.
    assert_eq!(f.seen.count("accepted", "ok"), 30);
    let peers: Vec<String> = f.seen.peers.lock().unwrap().iter().map(|p| p.to_string()).collect();
    assert_eq!(peers, ["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    // --metrics: the scraped change matches what the tester counted.
    let delta = v["metrics"]["delta"].as_array().expect("metrics delta");
    let accepted = delta
        .iter()
        .find(|s| s["name"] == "portcullis_handshakes_total" && s["labels"]["outcome"] == "accepted")
        .expect("accepted series");
    assert_eq!(accepted["value"], 30.0);
    let closes = delta
        .iter()
        .find(|s| s["name"] == "portcullis_disconnects_total" && s["labels"]["reason"] == "client_close")
        .expect("client_close series");
    assert_eq!(closes["value"], 30.0);
    // The timeline has one sample per second and the HTML report has plots.
    assert!(v["groups"]["idle"]["timeline"].as_array().unwrap().len() >= 2);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("open connections"), "html report");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_counts_and_verifies_every_message() {
    let f = start(Opts::default()).await;
    let url = f.url();
    let mut args = vec![
        "echo",
        "--url",
        &url,
        "--concurrency",
        "4",
        "--size",
        "1KiB",
        "--count",
        "400",
        "--duration",
        "10s",
    ];
    args.extend(secret_args());
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "echo", "counters", "messages_received"), 400);
    assert_eq!(num(&v, "echo", "counters", "bytes_received"), 400 * 1024);
    assert_eq!(num(&v, "echo", "counters", "echo_mismatch"), 0);
    assert_eq!(v["groups"]["echo"]["rtt_ms"]["count"], 400);
    assert!(v["groups"]["echo"]["rtt_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(v["elapsed_s"].as_f64().unwrap() < 9.0, "the count bound ends the run early");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_text_through_the_subprotocol_carrier() {
    let f = start(Opts::default()).await;
    let url = f.url();
    let mut args = vec![
        "echo",
        "--url",
        &url,
        "--concurrency",
        "2",
        "--size",
        "100",
        "--text",
        "--count",
        "50",
        "--carrier",
        "subprotocol",
        "--duration",
        "5s",
    ];
    args.extend(secret_args());
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "echo", "counters", "messages_received"), 50);
    assert_eq!(num(&v, "echo", "status", "101"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_counts_every_token_kind_by_status_and_reason() {
    // A long head deadline: on a loaded machine a head may take more than
    // the fixture's default 500 ms to arrive, and would then be counted as
    // a timeout rather than by its token kind.
    let f = start(Opts { handshake_timeout: Duration::from_secs(5), ..Opts::default() }).await;
    let url = f.url();
    let mut args = vec![
        "handshake",
        "--url",
        &url,
        "--kinds",
        "all",
        "--count",
        "80",
        "--concurrency",
        "8",
        "--duration",
        "10s",
    ];
    args.extend(secret_args());
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "valid", "status", "101"), 10);
    assert_eq!(num(&v, "missing", "reasons", "401 missing_token"), 10);
    assert_eq!(num(&v, "expired", "reasons", "401 invalid_token: token expired"), 10);
    for kind in ["garbage", "bad-hs256", "bad-es256", "wrong-alg", "alg-none"] {
        assert_eq!(
            num(&v, kind, "reasons", "401 invalid_token: token invalid"),
            10,
            "{kind}: {}",
            v["groups"][kind]
        );
    }
    // The tester's counts are the server's counts.
    assert_eq!(f.seen.count("accepted", "ok"), 10);
    assert_eq!(f.seen.count("rejected", "missing_token"), 10);
    assert_eq!(f.seen.count("rejected", "expired_token"), 10);
    assert_eq!(f.seen.count("rejected", "invalid_token"), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_split_the_work_and_results_are_merged() {
    let f = start(Opts::default()).await;
    let url = f.url();
    let mut args = vec![
        "handshake",
        "--url",
        &url,
        "--kinds",
        "valid,missing",
        "--count",
        "41",
        "--workers",
        "2",
        "--rate",
        "200",
        "--duration",
        "10s",
    ];
    args.extend(secret_args());
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["workers"], 2);
    assert_eq!(num(&v, "valid", "status", "101") + num(&v, "missing", "status", "401"), 41);
    assert_eq!(num(&v, "valid", "status", "101"), 21);
    assert_eq!(f.seen.count("accepted", "ok"), 21);
    assert_eq!(f.seen.count("rejected", "missing_token"), 20);
    assert_eq!(v["groups"]["valid"]["handshake_ms"]["count"], 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_sockets_get_408_at_the_deadline() {
    let f = start(Opts { handshake_timeout: Duration::from_millis(400), ..Opts::default() }).await;
    let url = f.url();
    let (code, err, v) =
        run_lt(&["slowloris", "--url", &url, "--count", "5", "--interval", "50ms", "--duration", "3s"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "slowloris", "ends", "408"), 5, "{v}");
    let life = &v["groups"]["slowloris"]["lifetime_ms"];
    assert_eq!(life["count"], 5);
    let p50 = life["p50"].as_f64().unwrap();
    assert!((350.0..1500.0).contains(&p50), "reaped near the 400 ms deadline: {p50}");
    assert_eq!(f.seen.count("rejected", "handshake_timeout"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombies_that_never_pong_are_reaped_with_1011() {
    let f = start(Opts {
        ping_interval: Duration::from_millis(100),
        pong_timeout: Duration::from_millis(200),
        ..Opts::default()
    })
    .await;
    let url = f.url();
    let mut args = vec!["zombie", "--url", &url, "--mode", "no-pong", "--count", "4", "--duration", "3s"];
    args.extend(secret_args());
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "zombie", "status", "101"), 4);
    assert_eq!(num(&v, "zombie", "ends", "close 1011"), 4, "{v}");
    assert!(num(&v, "zombie", "counters", "pings_ignored") >= 4);
    assert_eq!(f.seen.disconnects("pong_timeout"), 4);
    assert!(v["elapsed_s"].as_f64().unwrap() < 3.0, "all reaped: the run ends early");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombies_that_never_read_are_cut_off() {
    let f = start(Opts {
        ping_interval: Duration::from_secs(3600),
        write_timeout: Duration::from_millis(300),
        ..Opts::default()
    })
    .await;
    let url = f.url();
    let mut args = vec![
        "zombie",
        "--url",
        &url,
        "--mode",
        "no-read",
        "--count",
        "2",
        "--rcvbuf",
        "4KiB",
        "--send-size",
        "64KiB",
        "--send-interval",
        "10ms",
        "--duration",
        "6s",
    ];
    args.extend(secret_args());
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "zombie", "status", "101"), 2);
    assert_eq!(num(&v, "zombie", "ends", "held_to_end"), 0, "{v}");
    assert_eq!(v["groups"]["zombie"]["lifetime_ms"]["count"], 2, "{v}");
    assert_eq!(f.seen.disconnects("slow_reader"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_reconnects_every_user_each_round() {
    let f = start(Opts::default()).await;
    let url = f.url();
    let mut args = vec![
        "storm",
        "--url",
        &url,
        "--count",
        "15",
        "--rounds",
        "2",
        "--hold",
        "300ms",
        "--drop",
        "rst",
        "--duration",
        "10s",
    ];
    args.extend(secret_args());
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "storm", "status", "101"), 30);
    assert_eq!(num(&v, "storm", "counters", "round 1 upgraded"), 15);
    assert_eq!(num(&v, "storm", "counters", "round 2 upgraded"), 15);
    assert_eq!(num(&v, "storm", "ends", "dropped"), 30);
    assert!(num(&v, "storm", "maxima", "round 2 settle_ms") < 5000);
    assert_eq!(f.seen.count("accepted", "ok"), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_measures_legit_clients_under_attack() {
    let f = start(Opts {
        handshake_timeout: Duration::from_millis(500),
        ping_interval: Duration::from_millis(200),
        pong_timeout: Duration::from_millis(300),
        ..Opts::default()
    })
    .await;
    let url = f.url();
    let mut args = vec![
        "mixed",
        "--url",
        &url,
        "--legit",
        "3",
        "--messages",
        "3",
        "--msg-interval",
        "20ms",
        "--think",
        "20ms",
        "--slowloris",
        "3",
        "--slowloris-interval",
        "100ms",
        "--zombies",
        "2",
        "--flood-rate",
        "40",
        "--flood-kinds",
        "garbage,missing",
        "--attack-source-ips",
        "127.0.0.5-127.0.0.6",
        "--duration",
        "2500ms",
    ];
    args.extend(secret_args());
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    let legit = &v["groups"]["legit"];
    assert!(num(&v, "legit", "counters", "sessions") >= 3, "{legit}");
    assert_eq!(legit["success_ratio"], 1.0, "{legit}");
    assert!(legit["handshake_ms"]["p999"].as_f64().unwrap() > 0.0);
    assert!(legit["rtt_ms"]["count"].as_u64().unwrap() >= 9);
    assert!(num(&v, "slowloris", "ends", "408") >= 3, "{v}");
    assert_eq!(num(&v, "zombie", "ends", "close 1011"), 2, "{v}");
    let flood = num(&v, "flood", "counters", "attempts");
    assert!(flood >= 40, "flood ran: {flood}");
    assert_eq!(num(&v, "flood", "status", "401"), flood);
    let peers = f.seen.peers.lock().unwrap().clone();
    assert!(peers.contains(&"127.0.0.5".parse().unwrap()) && peers.contains(&"127.0.0.1".parse().unwrap()));
}

#[tokio::test]
async fn mixed_open_loop_legit_and_held_slowloris() {
    let f = start(Opts { handshake_timeout: Duration::from_millis(300), ..Opts::default() }).await;
    let url = f.url();
    let mut args = vec![
        "mixed",
        "--url",
        &url,
        "--legit-rate",
        "20",
        "--legit",
        "50",
        "--messages",
        "1",
        "--source-ips",
        "127.0.0.7-127.0.0.8",
        "--slowloris",
        "4",
        "--slowloris-reopen",
        "--slowloris-interval",
        "50ms",
        "--slowloris-source-ips",
        "127.0.0.9",
        "--flood-rate",
        "20",
        "--flood-source-ips",
        "127.0.0.10",
        "--duration",
        "2s",
    ];
    args.extend(secret_args());
    let (code, err, v) = run_lt(&args).await;
    assert_eq!(code, 0, "{err}");
    let legit = &v["groups"]["legit"];
    // Open loop: about 20 sessions a second whatever the server does.
    let sessions =
        num(&v, "legit", "counters", "sessions") + num(&v, "legit", "counters", "sessions_cut_by_end");
    assert!((30..=42).contains(&sessions), "{legit}");
    assert_eq!(legit["success_ratio"], 1.0, "{legit}");
    assert!(legit["hs_p99_per_second"]["seconds"].as_u64().unwrap() >= 2, "{legit}");
    // Cut at the 300 ms deadline and reopened: the attack held its level.
    assert!(num(&v, "slowloris", "ends", "408") >= 8, "{}", v["groups"]["slowloris"]);
    assert!(num(&v, "slowloris", "counters", "reopened") >= 8, "{}", v["groups"]["slowloris"]);
    let peers = f.seen.peers.lock().unwrap().clone();
    for ip in ["127.0.0.7", "127.0.0.8", "127.0.0.9", "127.0.0.10"] {
        assert!(peers.contains(&ip.parse().unwrap()), "{ip} in {peers:?}");
    }
}

#[tokio::test]
async fn refuses_non_loopback_and_bad_options() {
    for (args, needle) in [
        (vec!["idle", "--url", "ws://10.0.0.1:8080/", "--token", "t"], "not a loopback"),
        (
            vec!["idle", "--url", "ws://127.0.0.1:9/", "--source-ips", "192.168.0.1", "--token", "t"],
            "not a loopback",
        ),
        (
            vec!["idle", "--url", "ws://127.0.0.1:9/", "--metrics", "http://8.8.8.8/metrics", "--token", "t"],
            "not a loopback",
        ),
        (vec!["idle", "--url", "ws://127.0.0.1:9/"], "signing key"),
        (
            vec!["handshake", "--url", "ws://127.0.0.1:9/", "--kinds", "expired", "--token", "t"],
            "signing key",
        ),
        (vec!["idle", "--url", "ws://127.0.0.1:9/", "--token", "t", "--count", "100000"], "open-file limit"),
        (vec!["idle", "--url", "ws://127.0.0.1:9/", "--token", "t", "--duration", "0s"], "--duration"),
        (vec!["capacity", "--url", "ws://127.0.0.1:9/", "--token", "t"], "--metrics URL"),
        (vec!["idle", "--url", "ws://127.0.0.1:9/", "--token", "t", "--insecure"], "wss:// targets only"),
        (vec!["idle", "--url", "ws://127.0.0.1:9/", "--token", "t", "--start-at", "1000"], "has passed"),
        (
            vec!["zombie", "--url", "wss://127.0.0.1:9/", "--token", "t", "--mode", "no-read", "--insecure"],
            "not supported over wss://",
        ),
    ] {
        let (code, err, _) = run_lt(&args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn unreachable_target_is_counted_not_fatal() {
    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}/");
    let (code, err, v) =
        run_lt(&["handshake", "--url", &url, "--kinds", "missing", "--count", "5", "--duration", "3s"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "missing", "status", "connect_refused"), 5);
}
