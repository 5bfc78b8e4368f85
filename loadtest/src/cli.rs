//! The command line: one subcommand per scenario, each with the common
//! options flattened in, plus the duration and size parsers they use.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::client::Carrier;

/// Longest run allowed: every run stops by itself.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Load and attack generator for the Portcullis WebSocket gateway.
///
/// Targets are loopback (127.0.0.0/8 or ::1) unless --allow-remote. Every
/// run is bounded by --duration (and --count where it applies) and stops by
/// itself.
#[derive(Debug, Parser)]
#[command(name = "portcullis-loadtest", version, about, long_about = None)]
pub struct Cli {
    /// A scenario to run, or `merge`.
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run a scenario.
    #[command(flatten)]
    Run(Scenario),
    /// Combine the `--json` results of runs (e.g. from several load machines
    /// started with the same --start-at) exactly: counts summed, latency
    /// percentiles from the merged histograms, per-second series aligned by
    /// wall-clock time.
    Merge(MergeArgs),
}

/// `merge` options.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// The `--json` files of the runs.
    #[arg(required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Write the merged results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the merged HTML report to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
}

/// The scenarios.
#[derive(Debug, Clone, Subcommand, Serialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum Scenario {
    /// Open --count authenticated connections at --rate per second and hold
    /// them (answering pings) until --duration ends.
    Idle(IdleArgs),
    /// Message throughput and round-trip latency: --concurrency connections
    /// each echoing --size-byte messages back to back.
    Echo(EchoArgs),
    /// New-connection rate with valid and bad tokens (--kinds); results
    /// counted by HTTP status and reason, one group per token kind.
    Handshake(HandshakeArgs),
    /// Sockets that trickle a request head, --bytes-per-tick every --interval.
    Slowloris(SlowlorisArgs),
    /// Upgraded connections that never answer pings (no-pong) or never read
    /// (no-read, small SO_RCVBUF).
    Zombie(ZombieArgs),
    /// Reconnect storm: --count users connect at once, hold, drop, repeat.
    Storm(StormArgs),
    /// Legit clients measured while slowloris, zombies and a bad-token flood run.
    Mixed(MixedArgs),
    /// Ramp idle authenticated connections (or stalled handshakes) against
    /// a gateway whose /metrics it reads, until a stop condition; print what
    /// an operator sizes with (RSS and descriptors per connection, CPU per
    /// handshake and per message) and the measurement behind each number.
    Capacity(CapacityArgs),
}

impl Scenario {
    /// The scenario's name.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Idle(_) => "idle",
            Scenario::Echo(_) => "echo",
            Scenario::Handshake(_) => "handshake",
            Scenario::Slowloris(_) => "slowloris",
            Scenario::Zombie(_) => "zombie",
            Scenario::Storm(_) => "storm",
            Scenario::Mixed(_) => "mixed",
            Scenario::Capacity(_) => "capacity",
        }
    }

    /// The options every scenario shares.
    pub fn common(&self) -> &Common {
        match self {
            Scenario::Idle(a) => &a.common,
            Scenario::Echo(a) => &a.common,
            Scenario::Handshake(a) => &a.common,
            Scenario::Slowloris(a) => &a.common,
            Scenario::Zombie(a) => &a.common,
            Scenario::Storm(a) => &a.common,
            Scenario::Mixed(a) => &a.common,
            Scenario::Capacity(a) => &a.common,
        }
    }

    /// The run's time bound: --duration, else the scenario's default.
    pub fn duration(&self) -> Duration {
        let default = match self {
            Scenario::Idle(_) | Scenario::Slowloris(_) | Scenario::Handshake(_) | Scenario::Mixed(_) => 30,
            Scenario::Echo(_) => 10,
            Scenario::Zombie(_) | Scenario::Storm(_) => 60,
            Scenario::Capacity(_) => 300,
        };
        self.common().duration.unwrap_or(Duration::from_secs(default))
    }
}

/// Options shared by every scenario.
#[derive(Debug, Clone, Args, Serialize)]
pub struct Common {
    /// Target WebSocket URL (`ws://` or `wss://`); loopback unless --allow-remote.
    #[arg(long, default_value = "ws://127.0.0.1:8080/")]
    pub url: String,

    /// Allow a target (and --metrics URL) that is not on this machine. Off
    /// by default so that a mistyped URL cannot aim an attack at a host you
    /// do not run; with it, --source-ips may be any address of this host.
    #[arg(long)]
    pub allow_remote: bool,

    /// `wss://`: trust only the CA certificates in this PEM file (default:
    /// the system's CA bundle).
    #[arg(long, conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,

    /// `wss://`: accept any server certificate (self-signed staging
    /// gateways). Said loudly in the output.
    #[arg(long)]
    pub insecure: bool,

    /// Start at this Unix time (seconds, may be fractional), so that runs
    /// on several load machines begin together; at most 24 h ahead.
    #[arg(long)]
    pub start_at: Option<f64>,

    /// The gateway's process id, on this machine: its RSS, CPU and
    /// descriptors are read from /proc every second and reported.
    #[arg(long)]
    pub gateway_pid: Option<u32>,

    /// Source addresses to bind before connecting, spread round-robin:
    /// `127.0.0.2-127.0.0.41,127.0.0.50`. Loopback unless --allow-remote,
    /// then any address of this host (checked before the run).
    #[arg(long)]
    pub source_ips: Option<String>,

    /// Fork this many worker processes, each taking an equal share of counts
    /// and rates (one process may hold at most ~20,000 open files).
    #[arg(long, default_value_t = 1)]
    pub workers: u32,

    /// Time bound of the run (`30s`, `2m`, `500ms`); the run always stops by then.
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "ser_opt_duration")]
    pub duration: Option<Duration>,

    /// Count bound: connections (idle, slowloris, zombie), users (storm),
    /// attempts (handshake) or messages (echo). Split among workers.
    #[arg(long)]
    pub count: Option<u64>,

    /// HS256 secret for minting valid tokens.
    #[arg(long, conflicts_with_all = ["secret_file", "es256_key", "gateway_config"])]
    #[serde(skip)]
    pub hs256_secret: Option<String>,

    /// File holding the HS256 secret (trailing newlines dropped).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,

    /// PEM private key for minting ES256 tokens.
    #[arg(long)]
    pub es256_key: Option<PathBuf>,

    /// The gateway's TOML config: mint with its `[auth]` secret or private key,
    /// issuer and audience.
    #[arg(long)]
    pub gateway_config: Option<PathBuf>,

    /// A fixed token for every valid connection (e.g. the demo's `token:` line).
    #[arg(long)]
    #[serde(skip)]
    pub token: Option<String>,

    /// Subjects are this prefix plus the user index.
    #[arg(long, default_value = "lt-")]
    pub sub_prefix: String,

    /// Lifetime of minted tokens.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub ttl: Duration,

    /// `iss` claim of minted tokens.
    #[arg(long)]
    pub iss: Option<String>,

    /// `aud` claim of minted tokens.
    #[arg(long)]
    pub aud: Option<String>,

    /// Where the token travels.
    #[arg(long, value_enum, default_value_t = Carrier::Header)]
    pub carrier: Carrier,

    /// Cookie name for `--carrier cookie`.
    #[arg(long, default_value = "portcullis_token")]
    pub cookie_name: String,

    /// Send this `Origin` header.
    #[arg(long)]
    pub origin: Option<String>,

    /// TCP connect timeout.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,

    /// Timeout for the handshake answer and for each echo.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub response_timeout: Duration,

    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write an offline HTML report with plots to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,

    /// The gateway's admin /metrics URL: scraped before and after,
    /// `portcullis_handshakes_total` and `portcullis_disconnects_total` kept.
    #[arg(long)]
    pub metrics: Option<String>,

    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,

    /// Internal: this process is worker N of --worker-count.
    #[arg(long, hide = true, requires_all = ["worker_count", "worker_out"])]
    #[serde(skip)]
    pub worker_index: Option<u32>,

    /// Internal: number of workers.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub worker_count: Option<u32>,

    /// Internal: where a worker writes its results.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub worker_out: Option<PathBuf>,
}

/// `idle` options.
#[derive(Debug, Clone, Args, Serialize)]
pub struct IdleArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// New connections per second (all workers together).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Before idling, each connection sends one binary message of this
    /// size and waits for it back (`1MiB`; 0 = none): what a gateway keeps
    /// after a large message has passed.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub first_message: usize,
    /// How long after its handshake a connection sends `--first-message`
    /// (`5s`; default: at once). Longer than the time all connections take
    /// to open, the messages pass while no handshake is in flight: what the
    /// messages leave behind, apart from what concurrent handshakes do.
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "ser_opt_duration")]
    pub message_after: Option<Duration>,
}

/// `echo` options.
#[derive(Debug, Clone, Args, Serialize)]
pub struct EchoArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// Connections echoing at once (all workers together).
    #[arg(long, default_value_t = 50)]
    pub concurrency: u64,
    /// Message size (`1024`, `1KiB`, `64k`).
    #[arg(long, default_value = "1KiB", value_parser = parse_size)]
    pub size: usize,
    /// Send text messages instead of binary.
    #[arg(long)]
    pub text: bool,
    /// Pause between a connection's messages (0 = back to back).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Connections opened per second while ramping up.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
}

/// `handshake` options.
#[derive(Debug, Clone, Args, Serialize)]
pub struct HandshakeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// Token kinds, round-robin: valid, missing, garbage, bad-hs256,
    /// bad-es256, expired, wrong-alg, alg-none, or `all`.
    #[arg(long, default_value = "valid")]
    pub kinds: String,
    /// Attempts per second (all workers together); 0 = as fast as --concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Attempts in flight at once (all workers together).
    #[arg(long, default_value_t = 64)]
    pub concurrency: u64,
}

/// `slowloris` options.
#[derive(Debug, Clone, Args, Serialize)]
pub struct SlowlorisArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// Sockets opened per second.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Time between trickles.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Bytes sent per trickle.
    #[arg(long, default_value_t = 1)]
    pub bytes_per_tick: usize,
    /// Put a valid `Authorization` header in the trickled head.
    #[arg(long)]
    pub with_token: bool,
    /// Reopen a socket as soon as the gateway cuts it (hold --count
    /// partial heads for the whole run).
    #[arg(long)]
    pub reopen: bool,
}

/// How a zombie misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZombieMode {
    /// Reads, but never answers pings and never sends.
    NoPong,
    /// Never reads after the 101 (small SO_RCVBUF); may keep sending.
    NoRead,
}

/// `zombie` options.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ZombieArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// no-pong or no-read.
    #[arg(long, value_enum, default_value_t = ZombieMode::NoPong)]
    pub mode: ZombieMode,
    /// Connections opened per second.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub no_read: NoReadArgs,
}

/// Options of never-read zombies (also used by `mixed`).
#[derive(Debug, Clone, Args, Serialize)]
pub struct NoReadArgs {
    /// SO_RCVBUF of no-read zombies (the kernel doubles it, minimum ~2 KiB).
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    pub rcvbuf: usize,
    /// Size of the messages a no-read zombie sends to make the echo pile up.
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    pub send_size: usize,
    /// Time between those messages (0 = never send).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub send_interval: Duration,
}

/// How storm clients leave at the end of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DropMode {
    /// WebSocket close 1000, then TCP close.
    Close,
    /// TCP FIN without a close frame.
    Fin,
    /// TCP RST (SO_LINGER 0).
    Rst,
}

/// `storm` options.
#[derive(Debug, Clone, Args, Serialize)]
pub struct StormArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// Rounds of connect, hold, drop.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// How long connections live each round.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub hold: Duration,
    /// How clients drop at the end of a round.
    #[arg(long = "drop", value_enum, default_value_t = DropMode::Fin)]
    pub drop_mode: DropMode,
    /// Connections per second within a round; 0 = all at once.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
}

/// `mixed` options.
#[derive(Debug, Clone, Args, Serialize)]
pub struct MixedArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// Legit clients, each looping connect → echo --messages → close.
    #[arg(long, default_value_t = 20)]
    pub legit: u64,
    /// Messages per legit session.
    #[arg(long, default_value_t = 5)]
    pub messages: u32,
    /// Legit message size.
    #[arg(long, default_value = "128", value_parser = parse_size)]
    pub size: usize,
    /// Pause between a legit client's messages.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub msg_interval: Duration,
    /// Pause between a legit client's sessions.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub think: Duration,
    /// Slowloris sockets.
    #[arg(long, default_value_t = 0)]
    pub slowloris: u64,
    /// Slowloris trickle interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub slowloris_interval: Duration,
    /// Zombie connections.
    #[arg(long, default_value_t = 0)]
    pub zombies: u64,
    /// Zombie behaviour.
    #[arg(long, value_enum, default_value_t = ZombieMode::NoPong)]
    pub zombie_mode: ZombieMode,
    #[command(flatten)]
    #[serde(flatten)]
    pub no_read: NoReadArgs,
    /// Bad-token handshakes per second (0 = no flood).
    #[arg(long, default_value_t = 0.0)]
    pub flood_rate: f64,
    /// Token kinds of the flood (see `handshake --kinds`).
    #[arg(long, default_value = "garbage")]
    pub flood_kinds: String,
    /// Flood attempts in flight at once.
    #[arg(long, default_value_t = 64)]
    pub flood_concurrency: u64,
    /// Source addresses of the attacks (default: --source-ips).
    #[arg(long)]
    pub attack_source_ips: Option<String>,
    /// Attack sockets (slowloris, zombies) opened per second.
    #[arg(long, default_value_t = 500.0)]
    pub attack_rate: f64,
    /// Open-loop legit load: sessions started per second (all workers
    /// together), each connect → --messages echoes → close, whatever the
    /// gateway's speed. --legit then bounds the sessions in flight (a start
    /// that finds them all busy counts as a failed session). 0 = closed
    /// loop: --legit clients each looping.
    #[arg(long, default_value_t = 0.0)]
    pub legit_rate: f64,
    /// Reopen a slowloris socket as soon as the gateway cuts it, so the
    /// attack holds its level for the whole run.
    #[arg(long)]
    pub slowloris_reopen: bool,
    /// Source addresses of the slowloris sockets (default: --attack-source-ips).
    #[arg(long)]
    pub slowloris_source_ips: Option<String>,
    /// Source addresses of the zombies (default: --attack-source-ips).
    #[arg(long)]
    pub zombie_source_ips: Option<String>,
    /// Source addresses of the bad-token flood (default: --attack-source-ips).
    #[arg(long)]
    pub flood_source_ips: Option<String>,
}

/// What `capacity` ramps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityMode {
    /// Authenticated WebSocket connections that stay open (answering pings).
    Idle,
    /// Sockets holding a partial request head (stalled handshakes),
    /// reopened when cut.
    Stalled,
}

/// `capacity` options.
#[derive(Debug, Clone, Args, Serialize)]
pub struct CapacityArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// What to ramp.
    #[arg(long, value_enum, default_value_t = CapacityMode::Idle)]
    pub mode: CapacityMode,
    /// New connections per second while ramping.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Connections added per step; the gateway is measured after each.
    #[arg(long, default_value_t = 1000)]
    pub step: u64,
    /// Pause after each step before measuring (the gateway settles).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub settle: Duration,
    /// Length of each measured hold at the top (idle CPU, then messages).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub hold: Duration,
    /// Messages per second per connection during the message hold (0 = no
    /// message phase, no CPU-per-message figure).
    #[arg(long, default_value_t = 0.0)]
    pub msg_rate: f64,
    /// Message size.
    #[arg(long, default_value = "128", value_parser = parse_size)]
    pub size: usize,
    /// Stop once the gateway's RSS reaches 90 % of this (`2GiB`); e.g. its
    /// container's memory limit.
    #[arg(long, value_parser = parse_size)]
    pub max_rss: Option<usize>,
    /// `stalled`: time between the bytes a stalled socket trickles.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub stall_interval: Duration,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// Parses `500ms`, `2s`, `1.5s`, `3m`, `1h`, `1d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let mult = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "us" | "µs" => 0.000_001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        u => return Err(format!("bad duration unit {u:?} in {s:?} (ms, s, m, h, d)")),
    };
    let secs = n * mult;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `1024`, `1k`/`1KiB`, `4m`/`4MiB`, `1g`/`1GiB` (powers of two).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("bad size unit {u:?} in {s:?}")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("3m").unwrap(), Duration::from_secs(180));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("1KiB").unwrap(), 1024);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert!(parse_size("1.5k").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn cli_parses_every_scenario() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        for args in [
            vec!["lt", "idle", "--count", "10", "--rate", "5", "--duration", "2s"],
            vec!["lt", "echo", "--size", "1KiB", "--concurrency", "4"],
            vec!["lt", "handshake", "--kinds", "all", "--hs256-secret", "s"],
            vec!["lt", "slowloris", "--interval", "200ms"],
            vec!["lt", "zombie", "--mode", "no-read", "--rcvbuf", "2k"],
            vec!["lt", "storm", "--rounds", "2", "--drop", "rst"],
            vec!["lt", "mixed", "--slowloris", "4", "--zombies", "2", "--flood-rate", "10"],
            vec![
                "lt",
                "mixed",
                "--legit-rate",
                "200",
                "--slowloris-reopen",
                "--flood-source-ips",
                "127.0.0.9",
            ],
            vec!["lt", "capacity", "--count", "100", "--msg-rate", "1", "--max-rss", "1GiB"],
            vec!["lt", "capacity", "--mode", "stalled", "--allow-remote", "--start-at", "1.5"],
        ] {
            let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let Command::Run(s) = cli.command else { panic!("{args:?}: not a scenario") };
            assert_eq!(s.name(), args[1]);
            assert!(s.duration() > Duration::ZERO);
        }
        let cli = Cli::try_parse_from(["lt", "merge", "a.json", "b.json", "--json", "m.json"]).unwrap();
        assert!(matches!(cli.command, Command::Merge(m) if m.inputs.len() == 2));
        assert!(Cli::try_parse_from(["lt", "merge"]).is_err());
        assert!(Cli::try_parse_from(["lt", "idle", "--ca", "x.pem", "--insecure"]).is_err());
        assert!(Cli::try_parse_from(["lt", "idle", "--hs256-secret", "a", "--secret-file", "b"]).is_err());
    }
}
