//! The scenarios and what they share: the run context, a worker's share of
//! counts and rates, pacing, the stop signal, and "open one authenticated
//! connection and record it".
//!
//! Every scenario honours the stop signal (set at `--duration` or Ctrl-C);
//! the driver in `run.rs` additionally drops whatever is left after a short
//! grace period, so a run can never outlive its bound by much.

pub mod capacity;
pub mod echo;
pub mod handshake;
pub mod idle;
pub mod mixed;
pub mod slowloris;
pub mod storm;
pub mod zombie;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::cli::Scenario;
use crate::client::{self, ClientOpts, Message, Outcome, WsConn, WsError};
use crate::stats::Group;
use crate::target::{SourcePool, Target};
use crate::token::{Minter, TokenKind};

/// User indexes of zombies start here, so they never share a `sub` (and its
/// per-user cap) with legit users.
pub const ZOMBIE_USER_BASE: u64 = 1_000_000;
/// User indexes of flood tokens start here.
pub const FLOOD_USER_BASE: u64 = 2_000_000;

/// This process's part of the work when `--workers` splits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// This worker's index, `0..count`.
    pub index: u32,
    /// Number of workers.
    pub count: u32,
}

impl Share {
    /// The whole run in one process.
    pub const ALL: Share = Share { index: 0, count: 1 };

    /// This worker's part of `n` (the remainder goes to the first workers).
    pub fn part(&self, n: u64) -> u64 {
        let c = self.count.max(1) as u64;
        n / c + u64::from((self.index as u64) < n % c)
    }

    /// This worker's part of a rate.
    pub fn rate(&self, r: f64) -> f64 {
        r / self.count.max(1) as f64
    }

    /// The run-wide index of this worker's `i`-th item (interleaved, so every
    /// worker spreads over all source addresses and users alike).
    pub fn global(&self, i: u64) -> u64 {
        i * self.count.max(1) as u64 + self.index as u64
    }
}

/// What every task of a run can see.
pub struct Ctx {
    /// Where to connect.
    pub target: Target,
    /// Source addresses of legit (or all) traffic.
    pub sources: SourcePool,
    /// Source addresses of attacks in `mixed`.
    pub attack_sources: SourcePool,
    /// `mixed`: slowloris sources (default `attack_sources`).
    pub slowloris_sources: SourcePool,
    /// `mixed`: zombie sources (default `attack_sources`).
    pub zombie_sources: SourcePool,
    /// `mixed`: flood sources (default `attack_sources`).
    pub flood_sources: SourcePool,
    /// The gateway's process, when it can be read (`capacity`).
    pub gateway: Option<crate::procstat::Source>,
    /// What `capacity` found.
    pub sizing: Mutex<Option<capacity::Sizing>>,
    /// Ends the run early (a scenario that finished its own measurement).
    pub stop_tx: Arc<watch::Sender<bool>>,
    /// Token minting.
    pub minter: Minter,
    /// Client knobs.
    pub client: ClientOpts,
    /// This worker's share.
    pub share: Share,
    /// Turns true when the run must stop.
    pub stop: watch::Receiver<bool>,
    /// When the run started.
    pub start: Instant,
}

impl Ctx {
    /// True once the run must stop.
    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Tells every task to stop now.
    pub fn end_run(&self) {
        let _ = self.stop_tx.send(true);
    }

    /// Stores `capacity`'s result.
    pub fn set_sizing(&self, s: capacity::Sizing) {
        // A poisoned lock only means a task panicked; the slot is still usable.
        *self.sizing.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    }
}

/// Resolves when the run must stop (or the signal's sender is gone).
pub async fn wait_stop(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Spaces starts evenly at `per_sec` (0 = no pacing), catching up in bursts
/// when the timer is late so that the average rate holds.
pub struct Pacer {
    start: Instant,
    per_sec: f64,
}

impl Pacer {
    /// A pacer starting now.
    pub fn new(per_sec: f64) -> Self {
        Pacer { start: Instant::now(), per_sec }
    }

    /// Waits for the `i`-th start.
    pub async fn wait(&self, i: u64) {
        if self.per_sec > 0.0 {
            sleep_until(self.start + Duration::from_secs_f64(i as f64 / self.per_sec)).await;
        }
    }
}

/// How an established connection ended, as a bounded label.
pub fn end_label(r: &Result<Message, WsError>) -> String {
    match r {
        Ok(Message::Close(Some(code), _)) => format!("close {code}"),
        Ok(Message::Close(None, _)) => "close (no code)".into(),
        Ok(_) => "message".into(),
        Err(e) => e.label().into(),
    }
}

/// Minting failed (already recorded and reported).
#[derive(Debug)]
pub struct MintFailed;

/// Mints a token of `kind` for user `user`, counting a failure as an attempt
/// result (it can only happen when key options are inconsistent).
pub fn token_for(ctx: &Ctx, g: &Group, kind: TokenKind, user: u64) -> Result<Option<String>, MintFailed> {
    ctx.minter.token(kind, user).map_err(|e| {
        g.record_attempt(&Outcome::BadResponse("token_error"), Duration::ZERO);
        eprintln!("portcullis-loadtest: {e}");
        MintFailed
    })
}

/// Opens a connection with a token of `kind` for `user` from `source`,
/// recording the attempt; the connection when it upgraded.
pub async fn connect(
    ctx: &Ctx,
    g: &Group,
    kind: TokenKind,
    user: u64,
    source: Option<IpAddr>,
) -> Option<WsConn> {
    let token = token_for(ctx, g, kind, user).ok()?;
    let (res, took) = client::open(&ctx.target, source, token.as_deref(), &ctx.client).await;
    match res {
        Ok(conn) => {
            g.record_open(&Outcome::Upgraded, &took);
            Some(conn)
        }
        Err(o) => {
            g.record_open(&o, &took);
            None
        }
    }
}

/// The groups a scenario reports, in display order.
pub fn group_names(s: &Scenario) -> Result<Vec<String>, String> {
    Ok(match s {
        Scenario::Handshake(a) => {
            let mut kinds = crate::token::parse_kinds(&a.kinds)?;
            kinds.sort();
            kinds.dedup();
            kinds.iter().map(|k| k.name().to_string()).collect()
        }
        Scenario::Mixed(a) => {
            let mut v = vec!["legit".to_string()];
            if a.slowloris > 0 {
                v.push("slowloris".into());
            }
            if a.zombies > 0 {
                v.push("zombie".into());
            }
            if a.flood_rate > 0.0 {
                v.push("flood".into());
            }
            v
        }
        other => vec![other.name().to_string()],
    })
}

/// The groups of a run, by name.
pub type Groups = BTreeMap<String, Arc<Group>>;

fn group(groups: &Groups, name: &str) -> Arc<Group> {
    match groups.get(name) {
        Some(g) => g.clone(),
        // The driver builds `groups` from `group_names`, which lists every
        // name a scenario asks for; a miss is a programming error.
        None => panic!("group {name:?} not registered"),
    }
}

/// Runs the scenario to completion (it returns once its tasks have ended).
pub async fn run(s: &Scenario, ctx: Arc<Ctx>, groups: &Groups) {
    match s {
        Scenario::Idle(a) => idle::run(ctx, a, group(groups, "idle")).await,
        Scenario::Echo(a) => echo::run(ctx, a, group(groups, "echo")).await,
        Scenario::Handshake(a) => handshake::run(ctx, a, groups).await,
        Scenario::Slowloris(a) => slowloris::run(ctx, a, group(groups, "slowloris")).await,
        Scenario::Zombie(a) => zombie::run(ctx, a, group(groups, "zombie")).await,
        Scenario::Storm(a) => storm::run(ctx, a, group(groups, "storm")).await,
        Scenario::Mixed(a) => mixed::run(ctx, a, groups).await,
        Scenario::Capacity(a) => capacity::run(ctx, a, group(groups, "capacity")).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_split_exactly() {
        for count in 1..6u32 {
            for n in [0u64, 1, 7, 100, 101] {
                let total: u64 = (0..count).map(|index| Share { index, count }.part(n)).sum();
                assert_eq!(total, n);
            }
            let mut seen: Vec<u64> =
                (0..count).flat_map(|index| (0..3).map(move |i| Share { index, count }.global(i))).collect();
            seen.sort();
            assert_eq!(seen, (0..3 * count as u64).collect::<Vec<_>>());
        }
        assert_eq!(Share { index: 1, count: 4 }.rate(100.0), 25.0);
    }
}
