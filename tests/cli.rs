//! The binary itself: the demo end to end, drain on SIGTERM, SIGHUP
//! reload, and the one-line errors with exit code 2.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// A running `portcullis serve`, its addresses and what it printed.
struct Proc {
    proc: ChildProc,
    public: SocketAddr,
    admin: SocketAddr,
    token: Option<String>,
}

fn spawn(args: &[&str]) -> Proc {
    spawn_cmd(Command::new(BIN).args(args), args.contains(&"--demo")).0
}

/// Runs `cmd` until it printed its banner; also returns every line so far.
fn spawn_cmd(cmd: &mut Command, want_token: bool) -> (Proc, Vec<String>) {
    let proc = ChildProc::spawn(cmd.env("PORTCULLIS_LOG", "info"));
    let rx = &proc.lines;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut public, mut admin, mut token) = (None, None, None);
    let mut seen = Vec::new();
    while Instant::now() < deadline && !(public.is_some() && (!want_token || token.is_some())) {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
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
        if let Some(t) = line.strip_prefix("token: ") {
            token = Some(t.to_string());
        }
    }
    let public = public.unwrap_or_else(|| panic!("printed its public address: {seen:?}"));
    (Proc { proc, public, admin: admin.unwrap(), token }, seen)
}

fn signal(p: &Proc, sig: &str) {
    p.proc.signal(sig);
}

fn wait_exit(p: &mut Proc, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = p.proc.child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "did not exit in {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn demo_runs_end_to_end_and_drains_on_sigterm() {
    let mut p = spawn(&["serve", "--demo", "--public", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let token = p.token.clone().expect("printed a token");
    let mut c = ws(p.public, &token).await;
    echo(&mut c, "hello from the demo").await;
    let m = body(&http(p.admin, "GET", "/metrics", &[], "").await).to_string();
    assert_eq!(value_of(&m, "portcullis_connections{state=\"open\"}"), 1.0);
    assert_eq!(http(p.admin, "GET", "/readyz", &[], "").await.status, 200);

    signal(&p, "-TERM");
    let (code, _) = close_code(&mut c, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1001));
    drop(c);
    assert_eq!(wait_exit(&mut p, Duration::from_secs(10)), 0);
}

#[tokio::test]
async fn readiness_turns_503_during_the_drain_delay_while_still_accepting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndrain_delay_s = 1\ndrain_timeout_s = 2\n\
             [auth]\nhmac_secret = \"{SECRET}\"\n[revocation]\npath = \"{}\"\n",
            dir.path().join("r.log").display()
        ),
    )
    .unwrap();
    let mut p = spawn(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(http(p.admin, "GET", "/readyz", &[], "").await.status, 200);
    signal(&p, "-INT");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while http(p.admin, "GET", "/readyz", &[], "").await.status != 503 {
        assert!(tokio::time::Instant::now() < deadline, "readiness never turned 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = ws(p.public, &token("late")).await;
    echo(&mut c, "still accepted during the delay").await;
    assert_eq!(close_code(&mut c, Duration::from_secs(5)).await.0, Some(1001));
    assert_eq!(wait_exit(&mut p, Duration::from_secs(10)), 0);
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    for (text, key) in [
        ("[limits]\nmax_conections = 5\n", "max_conections"),
        ("[auth]\nalgorithms = [\"none\"]\nhmac_secret = \"s\"\n", "auth.algorithms"),
        ("[auth]\nalgorithms = [\"HS256\"]\n", "auth.hmac_secret"),
        ("[auth]\nhmac_secret = \"s\"\ncarriers = [\"cookie\"]\n", "auth.allowed_origins"),
        (
            "[auth]\nhmac_secret = \"s\"\n[limits]\nmax_message_bytes = 100\nmax_outbound_bytes = 100\n",
            "limits.max_outbound_bytes",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        for args in
            [vec!["check-config", path.to_str().unwrap()], vec!["serve", "--config", path.to_str().unwrap()]]
        {
            let out = Command::new(BIN).args(&args).output().unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?} on {text:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(key), "{err} should name {key}");
            assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    let out = Command::new(BIN).args(["serve", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The stderr of a run that must fail with exit code 2.
fn fails(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn a_wrong_type_names_the_dotted_key_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typed.toml");
    let file = path.to_str().unwrap();
    for (text, want) in [
        (
            "[auth]\nhmac_secret = \"s\"\n[limits]\nmax_connections = \"abc\"\n",
            "limits.max_connections: expected a non-negative integer, got \"abc\"",
        ),
        (
            "[listen]\npublic = 18080\n",
            "listen.public: expected an address such as \"127.0.0.1:8080\", got 18080",
        ),
        (
            "[auth.login]\nper_ip_burst = 1.5\n",
            "auth.login.per_ip_burst: expected a non-negative integer, got 1.5",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        for args in [vec!["check-config", file], vec!["serve", "--config", file]] {
            let err = fails(&args);
            assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
            assert!(err.contains(want), "{err} should say {want}");
            assert!(err.contains(&format!("({file}, line ")), "{err} names the file and line");
            for rust in ["usize", "u32", "u64", "f64", "invalid type"] {
                assert!(!err.contains(rust), "{err} speaks Rust ({rust})");
            }
        }
    }
}

#[test]
fn a_missing_file_is_reported_once() {
    for args in [
        vec!["check-config", "/nonexistent/p.toml"],
        vec!["serve", "--config", "/nonexistent/p.toml"],
        vec!["token", "--config", "/nonexistent/p.toml", "--sub", "x"],
    ] {
        let err = fails(&args);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
        assert_eq!(err.matches("/nonexistent/p.toml").count(), 1, "{err}");
    }
}

#[tokio::test]
async fn the_demo_leaves_no_file_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["serve", "--demo", "--public", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
    let (mut p, _) = spawn_cmd(Command::new(BIN).args(args).env("TMPDIR", tmp.path()), true);
    // While it runs, its revocation log lives in a private directory there.
    let entries = || std::fs::read_dir(tmp.path()).unwrap().count();
    assert_eq!(entries(), 1, "the demo's own directory");
    let mut c = ws(p.public, p.token.as_deref().unwrap()).await;
    echo(&mut c, "hello").await;
    let revoked = http(p.admin, "POST", "/admin/revoke", &[], "{\"jti\":\"j-1\"}").await;
    assert_eq!(revoked.status, 200, "a revocation is written to the demo's log");
    signal(&p, "-INT");
    assert_eq!(close_code(&mut c, Duration::from_secs(5)).await.0, Some(1001));
    drop(c);
    assert_eq!(wait_exit(&mut p, Duration::from_secs(10)), 0);
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `serve` under an open-file limit of `nofile` (hard and soft, so that
/// raising the soft limit cannot help), with a config that does not set
/// `limits.max_connections` unless `extra` does.
fn serve_under_nofile(nofile: u32, extra: &str) -> (Proc, Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[auth]\nhmac_secret = \"{SECRET}\"\n\
             [revocation]\npath = \"{}\"\n{extra}",
            dir.path().join("r.log").display()
        ),
    )
    .unwrap();
    let script = format!("ulimit -n {nofile} && exec \"$0\" serve --config \"$1\"");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, BIN, path.to_str().unwrap()]);
    let (p, mut lines) = spawn_cmd(&mut cmd, false);
    // The start-up lines come before the banner; give stragglers a moment.
    while let Ok(l) = p.proc.lines.recv_timeout(Duration::from_millis(300)) {
        lines.push(l);
    }
    (p, lines, dir)
}

#[tokio::test]
async fn the_default_connection_cap_fits_the_descriptor_limit() {
    // `ulimit -n 256` needs a hard limit of at least that (any sane host).
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    if hard < 256 {
        eprintln!("skipped: the hard open-file limit is {hard}");
        return;
    }
    let warning = "needs more file descriptors";
    // Echo mode: one descriptor per connection, 64 held back.
    let (p, lines, _dir) = serve_under_nofile(256, "");
    assert!(!lines.iter().any(|l| l.contains(warning)), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("max_connections=192")), "{lines:#?}");
    let mut c = ws(p.public, &token("fits")).await;
    echo(&mut c, "served").await;
    drop((c, p));
    // Proxy mode: two per connection (the backend need not be up to start).
    let (p, lines, _dir) = serve_under_nofile(256, "[upstream]\nurl = \"ws://127.0.0.1:9/\"\n");
    assert!(!lines.iter().any(|l| l.contains(warning)), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("max_connections=96")), "{lines:#?}");
    drop(p);
    // An explicit cap that does not fit is still warned about.
    let (p, lines, _dir) = serve_under_nofile(256, "[limits]\nmax_connections = 10000\n");
    assert!(lines.iter().any(|l| l.contains(warning)), "{lines:#?}");
    drop(p);
}

#[tokio::test]
async fn token_subcommand_mints_a_token_the_gateway_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, format!("[auth]\nhmac_secret = \"{SECRET}\"\n")).unwrap();
    let out = Command::new(BIN)
        .args(["token", "--config", path.to_str().unwrap(), "--sub", "olga", "--ttl", "10m", "--jti", "t-1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3);
    let gw = start(config(dir.path())).await;
    let mut c = ws(gw.public, token).await;
    echo(&mut c, "minted").await;
    let list = body(&http(gw.admin, "GET", "/admin/connections", &[], "").await).to_string();
    assert!(list.contains("\"sub\":\"olga\""), "{list}");
    drop(c);
    gw.stop().await;
}

#[test]
fn hash_password_prints_an_argon2id_phc_hash() {
    let mut child =
        Command::new(BIN).arg("hash-password").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"hunter2\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
}

#[tokio::test]
async fn sighup_applies_a_good_config_and_keeps_the_old_on_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let write = |origins: &str, extra: &str| {
        std::fs::write(
            &path,
            format!(
                "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[auth]\nhmac_secret = \"{SECRET}\"\nallowed_origins = [{origins}]\n{extra}[revocation]\npath = \"{}\"\n",
                dir.path().join("r.log").display()
            ),
        )
        .unwrap()
    };
    write("\"https://old.example\"", "");
    let p = spawn(&["serve", "--config", path.to_str().unwrap()]);
    let auth = format!("Bearer {}", token("pat"));
    let try_origin = |o: &'static str| {
        let auth = auth.clone();
        let addr = p.public;
        async move {
            raw(addr, upgrade_request("/", &[("Origin", o), ("Authorization", &auth)]).as_bytes())
                .await
                .status
        }
    };
    assert_eq!(try_origin("https://new.example").await, 403);
    let mut live = ws(p.public, &token("keeper")).await;

    write("\"https://new.example\"", "");
    signal(&p, "-HUP");
    let m = wait_series(p.admin, "portcullis_config_reloads_total{result=\"ok\"}", 1.0).await;
    assert!(m);
    assert_eq!(try_origin("https://new.example").await, 101);
    echo(&mut live, "untouched by the reload").await;

    write("\"https://new.example\"", "bogus_key = 1\n");
    signal(&p, "-HUP");
    assert!(wait_series(p.admin, "portcullis_config_reloads_total{result=\"error\"}", 1.0).await);
    assert_eq!(try_origin("https://new.example").await, 101, "the old config stays");
    echo(&mut live, "still").await;
    drop(live);
    drop(p);
}

async fn wait_series(admin: SocketAddr, series: &str, want: f64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let m = body(&http(admin, "GET", "/metrics", &[], "").await).to_string();
        if value_of(&m, series) == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The line `portcullis: error: …` a command printed, and its exit code.
fn error_of(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).args(args).env("PORTCULLIS_LOG", "off").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    let line = err.lines().find(|l| l.starts_with("portcullis: error:")).unwrap_or("").to_string();
    (out.status.code(), line)
}

#[test]
fn check_config_reports_exactly_what_serve_would() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("garbage.pem"), "not a key\n").unwrap();
    std::fs::write(d.join("jwks.json"), "{\"keys\": 7}").unwrap();
    std::fs::write(d.join("users.toml"), "alice = \"not-a-hash\"\n").unwrap();
    let listen = "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n";
    let rev = format!("[revocation]\npath = \"{}\"\n", d.join("r.log").display());
    let p = |name: &str| d.join(name).display().to_string();
    let cases: Vec<(String, &str)> = vec![
        (format!("[auth]\nhmac_secret_file = \"{}\"\n", p("missing.secret")), "auth.hmac_secret"),
        (format!("[auth]\nalgorithms = [\"ES256\"]\npublic_key_file = \"{}\"\n", p("missing.pem")), "auth.public_key_file"),
        (format!("[auth]\nalgorithms = [\"ES256\"]\npublic_key_file = \"{}\"\n", p("garbage.pem")), "auth.public_key_file"),
        (format!("[auth]\nalgorithms = [\"ES256\"]\njwks_file = \"{}\"\n", p("jwks.json")), "auth.jwks_file"),
        (
            format!("[auth]\nhmac_secret = \"{SECRET}\"\n[auth.login]\nenabled = true\nusers_file = \"{}\"\n", p("nope.toml")),
            "auth.login.users_file",
        ),
        (
            format!("[auth]\nhmac_secret = \"{SECRET}\"\n[auth.login]\nenabled = true\nusers_file = \"{}\"\n", p("users.toml")),
            "auth.login.users_file",
        ),
        (
            format!("[auth]\nhmac_secret = \"{SECRET}\"\n[listen]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", p("c.pem"), p("k.pem")),
            "listen.tls_cert_file",
        ),
        (format!("[auth]\nhmac_secret = \"{SECRET}\"\n[limits]\nper_ip_rate = 1e-30\n"), "limits.per_ip_rate"),
        (format!("[auth]\nhmac_secret = \"{SECRET}\"\n[limits]\nmax_lifetime_s = 18446744073709551615\n"), "limits.max_lifetime_s"),
    ];
    let path = d.join("c.toml");
    for (body, key) in &cases {
        // The revocation log's own table goes last (a key may open [listen]).
        let text = if body.contains("[listen]") {
            format!("{}{rev}", body.replace("[listen]\n", listen))
        } else {
            format!("{listen}{body}{rev}")
        };
        std::fs::write(&path, &text).unwrap();
        let check = error_of(&["check-config", path.to_str().unwrap()]);
        let serve = error_of(&["serve", "--config", path.to_str().unwrap()]);
        assert_eq!(check.0, Some(2), "{text}");
        assert!(check.1.contains(key), "{key}: {}", check.1);
        assert_eq!(check, serve, "check-config and serve disagree on\n{text}");
    }
    // A revocation log in a directory that does not exist.
    let text = format!(
        "{listen}[auth]\nhmac_secret = \"{SECRET}\"\n[revocation]\npath = \"{}\"\n",
        p("no/dir/r.log")
    );
    std::fs::write(&path, &text).unwrap();
    let check = error_of(&["check-config", path.to_str().unwrap()]);
    assert_eq!(check.0, Some(2));
    assert_eq!(check, error_of(&["serve", "--config", path.to_str().unwrap()]));
    assert!(!d.join("no").exists());
    // A good one passes, and leaves no revocation log behind.
    let fresh = format!("[revocation]\npath = \"{}\"\n", p("fresh.log"));
    std::fs::write(&path, format!("{listen}[auth]\nhmac_secret = \"{SECRET}\"\n{fresh}")).unwrap();
    let out = Command::new(BIN).args(["check-config", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!d.join("fresh.log").exists(), "check-config left a revocation log behind");
}

#[test]
fn an_absurd_token_ttl_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, format!("[auth]\nhmac_secret = \"{SECRET}\"\n")).unwrap();
    for ttl in ["999999999999999999d", "18446744073709551615h", "100000000000000000000"] {
        let (code, line) =
            error_of(&["token", "--config", path.to_str().unwrap(), "--sub", "x", "--ttl", ttl]);
        assert_eq!(code, Some(2), "{ttl}");
        let _ = line;
    }
}

#[tokio::test]
async fn a_trusted_proxy_entry_covering_everything_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::/0\"]\n\
             [auth]\nhmac_secret = \"{SECRET}\"\n[revocation]\npath = \"{}\"\n",
            dir.path().join("r.log").display()
        ),
    )
    .unwrap();
    let proc = ChildProc::spawn(Command::new(BIN).args(["serve", "--config", path.to_str().unwrap()]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Ok(line) = proc.lines.recv_timeout(Duration::from_millis(200)) else { continue };
        let done = line.starts_with("listening ");
        seen.push(line);
        if done {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.contains("trusted_proxies covers every address")), "{seen:#?}");
}

#[tokio::test]
async fn sighup_with_a_rate_no_limiter_can_hold_is_refused_and_the_reloader_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let write = |extra: &str| {
        std::fs::write(
            &path,
            format!(
                "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[auth]\nhmac_secret = \"{SECRET}\"\n\
                 [revocation]\npath = \"{}\"\n{extra}",
                dir.path().join("r.log").display()
            ),
        )
        .unwrap()
    };
    write("");
    let p = spawn(&["serve", "--config", path.to_str().unwrap()]);
    let mut live = ws(p.public, &token("hugo")).await;
    write("[limits]\nper_ip_rate = 1e-30\n");
    signal(&p, "-HUP");
    assert!(wait_series(p.admin, "portcullis_config_reloads_total{result=\"error\"}", 1.0).await);
    echo(&mut live, "after the refused reload").await;
    // The reloader is still there: a good file applies.
    write("[limits]\nper_ip_rate = 5.0\n");
    signal(&p, "-HUP");
    assert!(wait_series(p.admin, "portcullis_config_reloads_total{result=\"ok\"}", 1.0).await);
    let mut again = ws(p.public, &token("hugo")).await;
    echo(&mut again, "after the good reload").await;
    drop((live, again));
    drop(p);
}
