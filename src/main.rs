//! The `portcullis` binary: a thin shell over the library (CLI, config,
//! logging, signals). Errors are one line and exit 2; never a backtrace.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use portcullis::config::{Config, LogFormat};
use portcullis::upgrade::{self, Incoming, Launch};
use portcullis::Gateway;
use tokio::signal::unix::{signal, SignalKind};

/// mimalloc rather than glibc's malloc: its pages each hold one size of
/// block, so the short-lived buffers of handshakes that overlap under load
/// leave no holes among long-lived session state, and RSS comes back down
/// once they end (BENCHMARKS.md, "Memory after a large message").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "A hardened WebSocket gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Serve {
        /// The TOML configuration file.
        #[arg(long, conflicts_with = "demo")]
        config: Option<PathBuf>,
        /// Run the embedded demo: echo upstream, ephemeral HS256 key.
        #[arg(long)]
        demo: bool,
        /// Override `listen.public`.
        #[arg(long)]
        public: Option<SocketAddr>,
        /// Override `listen.admin`.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Mint a token with the configured signing key; prints it alone.
    Token {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        sub: String,
        /// Lifetime: `90s`, `30m`, `1h`, `2d`, `1h 30m`, or plain seconds.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        #[arg(long)]
        jti: Option<String>,
    },
    /// Read a password on stdin, print its argon2id PHC hash.
    HashPassword,
    /// Validate a configuration file.
    CheckConfig { file: PathBuf },
    /// A minimal WebSocket client: stdin lines are sent as text, messages
    /// received are printed; the close code becomes the exit status
    /// (0 for 1000; docs/reference.md lists the others).
    Connect {
        /// `ws://host:port/path` or `wss://…`.
        url: String,
        /// Sent as `Authorization: Bearer <token>`.
        #[arg(long)]
        token: Option<String>,
        /// An extra request header, `'Name: value'` (repeatable).
        #[arg(long = "header", short = 'H', value_name = "'K: V'")]
        headers: Vec<String>,
        /// CA certificates (PEM) for `wss://`, instead of the system's.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration (e.g. 90s, 30m, 1h): {e}"))?,
    };
    if d.is_zero() {
        return Err("the duration must be positive".into());
    }
    // Far beyond any token's life, and safe to add to a unix time.
    if d.as_secs() > 100 * 365 * 86_400 {
        return Err(format!("{s:?} is too long"));
    }
    Ok(d)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Connect { url, token, headers, ca } = cli.cmd {
        return connect(portcullis::connect::Options { url, token, headers, ca });
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// `portcullis connect`: how the connection ended on stderr, and as the
/// exit status.
fn connect(opts: portcullis::connect::Options) -> ExitCode {
    use portcullis::connect;
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let ended = rt.block_on(connect::run(&opts, stdin, tokio::io::stdout()));
    // Not waiting for the blocking read of stdin: the server may end the
    // connection while a terminal's stdin is still open.
    rt.shutdown_background();
    match ended {
        Ok(outcome) => {
            eprintln!("{outcome}");
            ExitCode::from(connect::exit_code(&outcome))
        }
        Err(e) => {
            eprintln!("portcullis: error: {e}");
            ExitCode::from(connect::error_exit_code(&e))
        }
    }
}

/// The error and its causes on one line, each cause once: many errors
/// already quote their source in their own message.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out.replace('\n', " ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::CheckConfig { file } => {
            // What `serve` checks before binding, files opened and all.
            let cfg = Config::load(&file)?;
            portcullis::gateway::preflight(&cfg, true)?;
            if cfg.revocation.backend == portcullis::config::RevocationBackend::Redis {
                // A wrong password or CA is an error now, not a retry loop
                // once serving; an unreachable Redis only a warning.
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                match rt.block_on(portcullis::redis_link::target::probe(&cfg.revocation)) {
                    Ok(None) => {}
                    Ok(Some(why)) => {
                        eprintln!("portcullis: warning: revocation.redis_url: redis not reachable now: {why}")
                    }
                    Err(e) => anyhow::bail!("{e}"),
                }
            }
            println!("{}: ok", file.display());
            Ok(())
        }
        Cmd::HashPassword => {
            let mut pw = String::new();
            std::io::stdin().read_to_string(&mut pw).context("reading stdin")?;
            let pw = pw.strip_suffix('\n').unwrap_or(&pw);
            let pw = pw.strip_suffix('\r').unwrap_or(pw);
            if pw.is_empty() {
                anyhow::bail!("empty password on stdin");
            }
            println!("{}", portcullis::login::hash_password(pw.as_bytes()).map_err(anyhow::Error::msg)?);
            Ok(())
        }
        Cmd::Token { config, sub, ttl, jti } => {
            let cfg = Config::load(&config)?;
            if ttl.as_secs() > cfg.auth.max_token_ttl_s {
                anyhow::bail!(
                    "--ttl: longer than auth.max_token_ttl_s ({} s); the gateway would refuse it",
                    cfg.auth.max_token_ttl_s
                );
            }
            let token = portcullis::auth::sign::mint(&cfg.auth, &sub, ttl, jti.as_deref())?;
            println!("{token}");
            Ok(())
        }
        // Dispatched in `main`, for its own exit statuses.
        Cmd::Connect { .. } => Ok(()),
        Cmd::Serve { config, demo, public, admin } => {
            // Before anything else: how this process was started (to start
            // its successor alike), and whether an upgrade started it.
            let launch = Launch::from_start().ok();
            let incoming = match Incoming::from_env().transpose() {
                Ok(i) => i,
                Err(e) => anyhow::bail!("taking over from the old process: {e}"),
            };
            // Before the config: the default `limits.max_connections` is
            // derived from the limit in force.
            portcullis::fdlimit::raise_to_hard();
            // Held until `serve` returns: dropping it removes the demo's files.
            let mut demo_dir = None;
            let (mut cfg, path) = match (config, demo) {
                (Some(p), _) => match Config::load(&p) {
                    Ok(c) => (c, Some(p)),
                    Err(e) => {
                        // The old process logs why and keeps everything.
                        if let Some(i) = &incoming {
                            i.refuse(&e.to_string());
                        }
                        return Err(e.into());
                    }
                },
                (None, true) => {
                    let dir = tempfile::Builder::new()
                        .prefix("portcullis-demo-")
                        .tempdir()
                        .context("creating the demo's temporary directory")?;
                    let cfg = demo_config(dir.path());
                    demo_dir = Some(dir);
                    (cfg, None)
                }
                (None, false) => anyhow::bail!("serve: give --config FILE or --demo"),
            };
            if let Some(a) = public {
                cfg.listen.public = a;
            }
            if let Some(a) = admin {
                cfg.listen.admin = a;
            }
            init_logging(&cfg);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let served = rt.block_on(serve(cfg, path, demo, launch, incoming));
            drop(rt);
            drop(demo_dir);
            served
        }
    }
}

/// The embedded demo: defaults, an echo upstream, an ephemeral HS256 key,
/// and its revocation log in `dir`, a private directory (mode 0700, an
/// unpredictable name: no symlink planted in /tmp can redirect the log)
/// that is removed when the demo exits.
fn demo_config(dir: &std::path::Path) -> Config {
    let mut cfg = Config::default();
    let secret: [u8; 32] = rand::random();
    cfg.auth.hmac_secret = secret.iter().map(|b| format!("{b:02x}")).collect();
    cfg.revocation.path = dir.join("revocations.log");
    cfg
}

/// How to run this binary again from a shell: `portcullis` when that
/// name on `PATH` is this binary, else its full path (quoted if needed),
/// so that the banner's `try:` line works as pasted (after `cargo run`,
/// the binary is not on `PATH`).
fn self_command() -> String {
    let Ok(exe) = std::env::current_exe() else { return "portcullis".into() };
    let same = |p: &std::path::Path| p.canonicalize().ok() == exe.canonicalize().ok();
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| same(&d.join("portcullis"))));
    let shown = exe.display().to_string();
    if on_path {
        "portcullis".into()
    } else if shown.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c)) {
        shown
    } else {
        format!("'{}'", shown.replace('\'', "'\\''"))
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    // Colours only for a person at a terminal, never into journald or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match cfg.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(
    cfg: Config,
    path: Option<PathBuf>,
    demo: bool,
    launch: Option<Launch>,
    incoming: Option<Incoming>,
) -> anyhow::Result<()> {
    let gateway = match incoming {
        None => Gateway::bind(cfg.clone()).await?,
        Some(mut inc) => {
            let inherited = portcullis::gateway::Inherited {
                public: inc.public.take().context("inherited public listener")?,
                admin: inc.admin.take().context("inherited admin listener")?,
                instance: inc.preamble.instance.clone(),
                clock_age: inc.clock_age(),
                next_id: inc.preamble.next_id,
                redis_node: inc.preamble.node.clone(),
            };
            let gateway = match Gateway::bind_inherited(cfg.clone(), inherited).await {
                Ok(g) => g,
                Err(e) => {
                    inc.refuse(&e.to_string());
                    return Err(e.into());
                }
            };
            inc.take_over(&gateway.shared()).await.context("taking over from the old process")?;
            gateway
        }
    };
    let public = gateway.public_addr();
    let admin = gateway.admin_addr();
    if cfg.log.format == LogFormat::Json {
        // Log shippers get one JSON object per line, the banner included.
        eprintln!("{}", serde_json::json!({ "event": "listening", "public": public, "admin": admin }));
    } else {
        eprintln!("listening public={public} admin={admin}");
    }
    if demo {
        gateway.serve_demo_page();
        let token = portcullis::auth::sign::mint(
            &cfg.auth,
            portcullis::demo::SUB,
            portcullis::demo::TOKEN_TTL,
            None,
        )?;
        eprintln!("token: {token}");
        eprintln!("open: http://{public}/");
        eprintln!("try: {} connect --token {token} ws://{public}/", self_command());
        eprintln!("metrics: curl http://{admin}/metrics");
    }
    let shared = gateway.shared();
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    let upgrader = launch.map(|l| tokio::spawn(upgrade::serve(shared.clone(), l, gateway.listener_fds())));
    let asker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while usr2.recv().await.is_some() {
                let _ = upgrade::request(&shared, "signal");
            }
        })
    };
    // Serving: systemd (Type=notify) learns it, and which process is main.
    upgrade::notify::ready();
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let reloader = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match &path {
                Some(p) => match Config::load(p) {
                    Ok(new) => {
                        let _ = shared.reload(new);
                    }
                    Err(e) => {
                        shared.metrics.config_reload(false);
                        tracing::error!(event = "reload", result = "error", error = %e, "configuration reload refused; the old one stays");
                    }
                },
                None => tracing::info!("SIGHUP: the demo has no configuration file to reload"),
            }
        }
    });
    gateway
        .run(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await;
    reloader.abort();
    asker.abort();
    if let Some(u) = upgrader {
        u.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_in_units_or_seconds() {
        for (s, secs) in
            [("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172_800), ("1h 30m", 5400), ("3600", 3600)]
        {
            assert_eq!(parse_duration(s), Ok(Duration::from_secs(secs)), "{s}");
        }
        for bad in ["0", "0s", "", "abc", "1x", "-5", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
