//! The driver: validate the command line, then run the scenario in this
//! process (or fork workers), bound it in time, tick the timeline and the
//! progress line, scrape the gateway's metrics, and write the outputs.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::{interval_at, sleep, timeout_at, Instant, MissedTickBehavior};

use crate::cli::{Cli, Command, Common, Scenario, ZombieMode, MAX_DURATION};
use crate::client::ClientOpts;
use crate::metrics::{self, Scrape};
use crate::procstat::{Sampler, Source};
use crate::progress::{emit_json, ProgressLine};
use crate::report::{Report, RunData};
use crate::scenarios::{self, group_names, Ctx, Groups, Share};
use crate::stats::{sum_progress, Group};
use crate::target::{
    parse_http_url_with, parse_ip_ranges_with, parse_ws_url_with, Reach, SourcePool, Target,
};
use crate::tls::Trust;
use crate::token::{parse_kinds, unix_now, Minter, TokenKind, TokenOpts};

/// After the stop signal, tasks get this long to close before they are dropped.
pub const GRACE: Duration = Duration::from_secs(3);

/// Descriptors kept free for the runtime, stdio and files.
const FD_RESERVE: u64 = 64;

/// Everything validated from the command line.
pub struct Plan {
    /// The scenario and its options.
    pub scenario: Scenario,
    /// The target.
    pub target: Target,
    /// The run's time bound.
    pub duration: Duration,
    /// Source addresses.
    pub sources: SourcePool,
    /// Source addresses of attacks (`mixed`).
    pub attack_sources: SourcePool,
    /// `mixed`: slowloris, zombie and flood sources.
    pub slowloris_sources: SourcePool,
    /// See `slowloris_sources`.
    pub zombie_sources: SourcePool,
    /// See `slowloris_sources`.
    pub flood_sources: SourcePool,
    /// The `/metrics` URL.
    pub metrics: Option<Target>,
    /// Group names in display order.
    pub groups: Vec<String>,
    /// TLS client configuration (`wss://`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The gateway's process, when it can be read.
    pub gateway: Option<Source>,
    /// Wall-clock start (`--start-at`), Unix seconds.
    pub start_at: Option<f64>,
    /// Things the report must say loudly.
    pub warnings: Vec<String>,
}

/// Latest `--start-at` accepted: a day ahead.
const MAX_START_AHEAD_S: f64 = 86_400.0;

fn token_opts(c: &Common) -> TokenOpts {
    TokenOpts {
        hs256_secret: c.hs256_secret.clone(),
        secret_file: c.secret_file.clone(),
        es256_key: c.es256_key.clone(),
        gateway_config: c.gateway_config.clone(),
        token: c.token.clone(),
        sub_prefix: c.sub_prefix.clone(),
        ttl: c.ttl,
        issuer: c.iss.clone(),
        audience: c.aud.clone(),
    }
}

fn client_opts(c: &Common, tls: Option<Arc<rustls::ClientConfig>>) -> ClientOpts {
    ClientOpts {
        tls,
        connect_timeout: c.connect_timeout,
        response_timeout: c.response_timeout,
        carrier: c.carrier,
        cookie_name: c.cookie_name.clone(),
        origin: c.origin.clone(),
        ..ClientOpts::default()
    }
}

/// The token kinds a scenario will mint.
fn kinds_needed(s: &Scenario) -> Result<Vec<TokenKind>, String> {
    Ok(match s {
        Scenario::Handshake(a) => parse_kinds(&a.kinds)?,
        Scenario::Slowloris(a) if !a.with_token => vec![],
        Scenario::Capacity(a) if a.mode == crate::cli::CapacityMode::Stalled => vec![],
        Scenario::Mixed(a) => {
            let mut k = vec![TokenKind::Valid];
            if a.flood_rate > 0.0 {
                k.extend(parse_kinds(&a.flood_kinds)?);
            }
            k
        }
        _ => vec![TokenKind::Valid],
    })
}

/// Sockets one process may hold at once, at most (for the open-file check).
fn sockets_per_process(s: &Scenario, share: &Share) -> u64 {
    let c = s.common().count;
    match s {
        Scenario::Idle(_) => share.part(c.unwrap_or(scenarios::idle::DEFAULT_COUNT)),
        Scenario::Slowloris(_) => share.part(c.unwrap_or(scenarios::slowloris::DEFAULT_COUNT)),
        Scenario::Zombie(_) => share.part(c.unwrap_or(scenarios::zombie::DEFAULT_COUNT)),
        Scenario::Storm(_) => share.part(c.unwrap_or(scenarios::storm::DEFAULT_COUNT)),
        Scenario::Echo(a) => share.part(a.concurrency),
        Scenario::Handshake(a) => share.part(a.concurrency),
        Scenario::Mixed(a) => {
            share.part(a.legit)
                + share.part(a.slowloris)
                + share.part(a.zombies)
                + share.part(a.flood_concurrency)
        }
        Scenario::Capacity(_) => c.unwrap_or(scenarios::capacity::DEFAULT_COUNT),
    }
}

fn check_rates(s: &Scenario) -> Result<(), String> {
    let rates: Vec<(&str, f64)> = match s {
        Scenario::Idle(a) => vec![("--rate", a.rate)],
        Scenario::Echo(a) => vec![("--rate", a.rate)],
        Scenario::Handshake(a) => vec![("--rate", a.rate)],
        Scenario::Slowloris(a) => vec![("--rate", a.rate)],
        Scenario::Zombie(a) => vec![("--rate", a.rate)],
        Scenario::Storm(a) => vec![("--rate", a.rate)],
        Scenario::Mixed(a) => vec![
            ("--flood-rate", a.flood_rate),
            ("--attack-rate", a.attack_rate),
            ("--legit-rate", a.legit_rate),
        ],
        Scenario::Capacity(a) => vec![("--rate", a.rate), ("--msg-rate", a.msg_rate)],
    };
    for (name, r) in rates {
        if !r.is_finite() || r < 0.0 {
            return Err(format!("{name} must be a number ≥ 0, got {r}"));
        }
    }
    if let Scenario::Slowloris(a) = s {
        if a.interval.is_zero() {
            return Err("--interval must be > 0".into());
        }
    }
    if let Scenario::Mixed(a) = s {
        if a.slowloris > 0 && a.slowloris_interval.is_zero() {
            return Err("--slowloris-interval must be > 0".into());
        }
    }
    Ok(())
}

fn pool(spec: &str, reach: Reach, target: &Target) -> Result<SourcePool, String> {
    SourcePool::new(parse_ip_ranges_with(spec, reach).map_err(|e| e.to_string())?, &target.addr)
        .map_err(|e| e.to_string())
}

/// Validates the command line into a plan.
pub fn plan(s: Scenario) -> Result<Plan, String> {
    let c = s.common();
    let reach = if c.allow_remote { Reach::Remote } else { Reach::Loopback };
    let target = parse_ws_url_with(&c.url, reach).map_err(|e| e.to_string())?;
    let mut warnings = Vec::new();
    let tls = if target.tls {
        let trust = match (&c.ca, c.insecure) {
            (_, true) => Trust::Insecure,
            (Some(p), false) => Trust::CaFile(p.clone()),
            (None, false) => Trust::System,
        };
        if trust == Trust::Insecure {
            warnings.push(
                "--insecure: the gateway's TLS certificate was NOT verified (any certificate accepted)"
                    .into(),
            );
        }
        Some(crate::tls::client_config(&trust)?)
    } else {
        if c.ca.is_some() || c.insecure {
            return Err("--ca and --insecure apply to wss:// targets only".into());
        }
        None
    };
    let duration = s.duration();
    if duration.is_zero() || duration > MAX_DURATION {
        return Err(format!("--duration must be between 0 and {} s", MAX_DURATION.as_secs()));
    }
    if c.workers == 0 || c.workers > 64 {
        return Err("--workers must be between 1 and 64".into());
    }
    let metrics = match &c.metrics {
        Some(u) => Some(parse_http_url_with(u, reach).map_err(|e| e.to_string())?),
        None => None,
    };
    let sources = match &c.source_ips {
        Some(spec) => pool(spec, reach, &target)?,
        None => SourcePool::default(),
    };
    let (mut attack_sources, mut slowloris_sources, mut zombie_sources, mut flood_sources) =
        (sources.clone(), sources.clone(), sources.clone(), sources.clone());
    if let Scenario::Mixed(a) = &s {
        if let Some(spec) = &a.attack_source_ips {
            attack_sources = pool(spec, reach, &target)?;
        }
        let pick = |o: &Option<String>| match o {
            Some(spec) => pool(spec, reach, &target),
            None => Ok(attack_sources.clone()),
        };
        slowloris_sources = pick(&a.slowloris_source_ips)?;
        zombie_sources = pick(&a.zombie_source_ips)?;
        flood_sources = pick(&a.flood_source_ips)?;
    }
    let no_read = match &s {
        Scenario::Zombie(a) => a.mode == ZombieMode::NoRead,
        Scenario::Mixed(a) => a.zombies > 0 && a.zombie_mode == ZombieMode::NoRead,
        _ => false,
    };
    if no_read && target.tls {
        return Err("no-read zombies write raw frames and are not supported over wss://".into());
    }
    let gateway = match (c.gateway_pid, &metrics) {
        (Some(pid), _) => Some(Source::Proc(pid)),
        (None, Some(m)) => Some(Source::Metrics(m.clone())),
        (None, None) => None,
    };
    if let Scenario::Capacity(_) = &s {
        if gateway.is_none() {
            return Err(
                "capacity reads the gateway: give --metrics URL (its admin /metrics) or --gateway-pid".into(),
            );
        }
        if c.workers > 1 {
            return Err(
                "capacity runs in one process (its steps are measured together); drop --workers".into()
            );
        }
    }
    if let Some(at) = c.start_at {
        let now = unix_now_f64();
        if !at.is_finite() || at > now + MAX_START_AHEAD_S {
            return Err(format!("--start-at {at} is more than 24 h ahead (now {now:.0})"));
        }
        if at < now - 1.0 && c.worker_index.is_none() {
            return Err(format!("--start-at {at} has passed (now {now:.0})"));
        }
    }
    check_rates(&s)?;
    let groups = group_names(&s)?;
    Ok(Plan {
        target,
        duration,
        sources,
        attack_sources,
        slowloris_sources,
        zombie_sources,
        flood_sources,
        metrics,
        groups,
        tls,
        gateway,
        start_at: c.start_at,
        warnings,
        scenario: s,
    })
}

fn unix_now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Waits for `--start-at` (wall clock), if any.
async fn wait_start(at: Option<f64>) {
    if let Some(at) = at {
        let wait = at - unix_now_f64();
        if wait > 0.0 {
            sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// Raises the soft open-file limit to the hard one; returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024),
    }
}

/// Runs the scenario in this process, bounded by `plan.duration` (+ [`GRACE`]).
/// `json_progress` prints samples as JSON lines for a parent process.
pub async fn run_local(
    plan: &Plan,
    minter: Minter,
    share: Share,
    quiet: bool,
    json_progress: bool,
) -> RunData {
    wait_start(plan.start_at).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let start = Instant::now();
    let started_unix_s = unix_now();
    let started_unix_ms = (unix_now_f64() * 1000.0) as u64;
    let groups: Groups = plan.groups.iter().map(|n| (n.clone(), Arc::new(Group::new(n.clone())))).collect();
    let ctx = Arc::new(Ctx {
        target: plan.target.clone(),
        sources: plan.sources.clone(),
        attack_sources: plan.attack_sources.clone(),
        slowloris_sources: plan.slowloris_sources.clone(),
        zombie_sources: plan.zombie_sources.clone(),
        flood_sources: plan.flood_sources.clone(),
        gateway: plan.gateway.clone(),
        sizing: std::sync::Mutex::new(None),
        stop_tx: stop_tx.clone(),
        minter,
        client: client_opts(plan.scenario.common(), plan.tls.clone()),
        share,
        stop: stop_rx,
        start,
    });
    let duration = plan.duration;
    let stopper = tokio::spawn(async move {
        tokio::select! {
            _ = sleep(duration) => {}
            r = tokio::signal::ctrl_c() => {
                if r.is_ok() {
                    eprintln!("\nportcullis-loadtest: interrupted, stopping");
                } else {
                    // No signal handler: rely on the duration alone.
                    sleep(duration).await;
                }
            }
        }
        let _ = stop_tx.send(true);
        // Keep the sender alive until the run is over.
        std::future::pending::<()>().await;
    });
    let ticker_groups: Vec<Arc<Group>> = plan.groups.iter().filter_map(|n| groups.get(n).cloned()).collect();
    // A zero sample at t = 0 so that plots start from the origin.
    for g in &ticker_groups {
        g.tick(0);
    }
    let name = plan.scenario.name().to_string();
    let (done_tx, mut done_rx) = watch::channel(false);
    let ticker = tokio::spawn(async move {
        let mut line = ProgressLine::new(&name, quiet);
        let mut every = interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut t = 0u32;
        let show = |line: &mut ProgressLine, t: u32| {
            let samples: Vec<_> = ticker_groups.iter().map(|g| g.tick(t)).collect();
            let sum = sum_progress(&samples);
            if json_progress {
                emit_json(&sum);
            } else {
                line.show(&sum);
            }
        };
        loop {
            tokio::select! {
                _ = every.tick() => {
                    t += 1;
                    show(&mut line, t);
                }
                _ = done_rx.wait_for(|d| *d) => break,
            }
        }
        // A last sample for a partial second of at least half a second, so
        // that the timeline ends with the final state without a misleading
        // near-empty second.
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed - t as f64 >= 0.5 || t == 0 {
            show(&mut line, t + 1);
        }
        line.finish();
    });
    let _ = timeout_at(start + duration + GRACE, scenarios::run(&plan.scenario, ctx.clone(), &groups)).await;
    let elapsed = start.elapsed();
    let _ = done_tx.send(true);
    let _ = ticker.await;
    stopper.abort();
    let capacity = ctx.sizing.lock().map(|mut s| s.take()).unwrap_or(None);
    RunData {
        scenario: plan.scenario.name().to_string(),
        started_unix_s,
        started_unix_ms,
        elapsed_s: elapsed.as_secs_f64(),
        workers: 1,
        groups: groups.iter().map(|(n, g)| (n.clone(), g.snapshot())).collect(),
        capacity,
    }
}

async fn scrape_into(m: &mut Scrape, t: &Target, before: bool) {
    match metrics::scrape(t).await {
        Ok(s) if before => m.before = s,
        Ok(s) => {
            m.delta = metrics::delta(&m.before, &s);
            m.after = s;
        }
        Err(e) => {
            m.error = Some(e);
        }
    }
}

/// The whole command: returns an error message for exit code 2.
pub async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Merge(m) => crate::merge::run(&m),
        Command::Run(s) => run_scenario(s).await,
    }
}

async fn run_scenario(scenario: Scenario) -> Result<(), String> {
    let plan = plan(scenario)?;
    let c = plan.scenario.common().clone();
    let minter = Minter::new(&token_opts(&c))?;
    minter.check(&kinds_needed(&plan.scenario)?)?;
    let is_worker = c.worker_index.is_some();
    let share = match (c.worker_index, c.worker_count) {
        (Some(index), Some(count)) if index < count => Share { index, count },
        (Some(_), _) => return Err("bad internal worker options".into()),
        _ if c.workers > 1 => Share { index: 0, count: c.workers },
        _ => Share::ALL,
    };
    let fd_limit = raise_fd_limit();
    let per_process = sockets_per_process(&plan.scenario, &share);
    if per_process + FD_RESERVE > fd_limit {
        let need = (per_process * share.count as u64).div_ceil(fd_limit.saturating_sub(FD_RESERVE).max(1));
        return Err(format!(
            "each process would hold up to {per_process} sockets but the open-file limit is {fd_limit}; use --workers {need} or more"
        ));
    }

    if is_worker {
        let data = run_local(&plan, minter, share, true, true).await;
        let out = c.worker_out.as_ref().ok_or("missing --worker-out")?;
        let text = serde_json::to_string(&data).map_err(|e| e.to_string())?;
        std::fs::write(out, text).map_err(|e| format!("{}: {e}", out.display()))?;
        return Ok(());
    }

    let mut scrape = plan
        .metrics
        .as_ref()
        .map(|t| Scrape { url: format!("http://{}{}", t.host_header, t.path), ..Default::default() });
    for w in &plan.warnings {
        eprintln!("portcullis-loadtest: WARNING: {w}");
    }
    if let Some(at) = plan.start_at {
        eprintln!("portcullis-loadtest: starting at Unix time {at} (in {:.1} s)", at - unix_now_f64());
    }
    if let (Some(m), Some(t)) = (scrape.as_mut(), plan.metrics.as_ref()) {
        wait_start(plan.start_at).await;
        scrape_into(m, t, true).await;
    }
    let sampler = match &plan.gateway {
        Some(src) => {
            wait_start(plan.start_at).await;
            Some(Sampler::start(src.clone()).await)
        }
        None => None,
    };
    let data = if c.workers > 1 {
        drop(minter);
        let wait = plan.start_at.map(|at| (at - unix_now_f64()).max(0.0)).unwrap_or(0.0);
        let bound = plan.duration + GRACE + Duration::from_secs_f64(wait);
        crate::workers::run_parent(c.workers, bound, c.quiet, plan.scenario.name()).await?
    } else {
        run_local(&plan, minter, Share::ALL, c.quiet, false).await
    };
    let gateway = match (sampler, &plan.gateway) {
        (Some(s), Some(src)) => Some(s.finish(src).await),
        _ => None,
    };
    if let (Some(m), Some(t)) = (scrape.as_mut(), plan.metrics.as_ref()) {
        // The gateway counts a disconnect when it notices it: give it a moment.
        sleep(Duration::from_millis(500)).await;
        if m.error.is_none() {
            scrape_into(m, t, false).await;
        }
    }
    let params = serde_json::to_value(&plan.scenario).unwrap_or_default();
    let mut report = Report::new(&data, &plan.groups, plan.target.to_string(), params, scrape);
    report.gateway = gateway;
    report.warnings = plan.warnings.clone();
    print!("{}", report.table());
    if let Some(p) = &c.json {
        let text = serde_json::to_string_pretty(&report.to_json()).map_err(|e| e.to_string())?;
        std::fs::write(p, text + "\n").map_err(|e| format!("--json {}: {e}", p.display()))?;
    }
    if let Some(p) = &c.html {
        std::fs::write(p, crate::html::render(&report))
            .map_err(|e| format!("--html {}: {e}", p.display()))?;
    }
    Ok(())
}
