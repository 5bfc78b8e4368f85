//! `mixed`: legitimate clients measured while attacks run at the same time.
//!
//! Each of `--legit` clients loops: connect with a valid token, echo
//! `--messages` messages `--msg-interval` apart, close, think, repeat (or,
//! with `--legit-rate`, sessions start on a clock: open loop). A session
//! succeeds when it upgraded and every echo came back intact; the `legit`
//! group reports the success ratio (`sessions_ok / sessions`) and handshake
//! and round-trip percentiles, per second too. Sessions cut short by the
//! end of the run are not counted. Concurrently: `--slowloris` slow sockets
//! (reopened when cut with `--slowloris-reopen`), `--zombies` zombies and a
//! bad-token flood at `--flood-rate`, each in its own group, from
//! `--attack-source-ips` or their own `--*-source-ips`.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::echo::{echo_loop, EchoOpts};
use super::handshake::{run_flood, Flood};
use super::slowloris::Trickle;
use super::{connect, wait_stop, Ctx, Groups, Pacer, FLOOD_USER_BASE};
use crate::cli::MixedArgs;
use crate::stats::{names, Group};
use crate::token::{parse_kinds, TokenKind};

/// Runs the scenario.
pub async fn run(ctx: Arc<Ctx>, a: &MixedArgs, groups: &Groups) {
    let legit = legit_clients(ctx.clone(), a, groups);
    let slow = async {
        if let Some(g) = groups.get("slowloris") {
            let t = Trickle { interval: a.slowloris_interval, bytes_per_tick: 1, with_token: false };
            let n = ctx.share.part(a.slowloris);
            super::slowloris::spawn_all(
                ctx.clone(),
                g.clone(),
                n,
                a.attack_rate,
                t,
                ctx.slowloris_sources.clone(),
                a.slowloris_reopen,
            )
            .await;
        }
    };
    let zombies = async {
        if let Some(g) = groups.get("zombie") {
            let n = ctx.share.part(a.zombies);
            super::zombie::spawn_all(
                ctx.clone(),
                g.clone(),
                n,
                a.attack_rate,
                a.zombie_mode,
                a.no_read.clone(),
                ctx.zombie_sources.clone(),
            )
            .await;
        }
    };
    let flood = async {
        if let (Some(g), Ok(kinds)) = (groups.get("flood"), parse_kinds(&a.flood_kinds)) {
            let f = Flood {
                count: u64::MAX,
                rate: ctx.share.rate(a.flood_rate),
                concurrency: ctx.share.part(a.flood_concurrency).max(1) as usize,
                kinds,
                user_base: FLOOD_USER_BASE,
            };
            run_flood(ctx.clone(), f, &ctx.flood_sources, |_| Some(g.clone())).await;
        }
    };
    tokio::join!(legit, slow, zombies, flood);
}

async fn legit_clients(ctx: Arc<Ctx>, a: &MixedArgs, groups: &Groups) {
    let Some(g) = groups.get("legit").cloned() else {
        return;
    };
    if a.legit_rate > 0.0 {
        return legit_open_loop(ctx, a, g).await;
    }
    let n = ctx.share.part(a.legit);
    let opts = EchoOpts { size: a.size, text: false, interval: a.msg_interval };
    let (messages, think) = (a.messages as u64, a.think);
    let mut set = JoinSet::new();
    for i in 0..n {
        let gi = ctx.share.global(i);
        let (ctx, g) = (ctx.clone(), g.clone());
        set.spawn(async move {
            // No shared budget for legit clients: only the run's end stops them.
            let budget = AtomicI64::new(i64::MAX);
            let mut stop = ctx.stop.clone();
            while !ctx.stopped() {
                if !session(&ctx, &g, gi, opts, &budget, messages).await {
                    break;
                }
                tokio::select! {
                    _ = wait_stop(&mut stop) => break,
                    _ = tokio::time::sleep(think) => {}
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// One legit session: connect, echo `messages`, close; recorded in `g`.
/// False when the end of the run cut it short (then it is not counted).
async fn session(ctx: &Ctx, g: &Group, gi: u64, opts: EchoOpts, budget: &AtomicI64, messages: u64) -> bool {
    let conn = connect(ctx, g, TokenKind::Valid, gi, ctx.sources.pick(gi)).await;
    let end = match conn {
        None => None,
        Some(conn) => {
            g.opened();
            let end = echo_loop(ctx, g, conn, opts, budget, messages).await;
            g.closed();
            Some(end)
        }
    };
    if ctx.stopped() && !end.as_ref().is_some_and(|e| e.complete) {
        // Cut short by the end of the run: neither success nor failure.
        g.add("sessions_cut_by_end", 1);
        return false;
    }
    g.add(names::SESSIONS, 1);
    match end {
        Some(e) if e.complete => {
            g.add(names::SESSIONS_OK, 1);
            g.record_end("ok", None);
        }
        Some(e) => g.record_end(&format!("failed: {}", e.label), e.lifetime),
        None => g.record_end("failed: not upgraded", None),
    }
    true
}

/// `--legit-rate`: sessions start on a clock, whatever the gateway's
/// speed (open loop), so a slow gateway shows as latency and failures
/// rather than as fewer attempts. At most `--legit` run at once.
async fn legit_open_loop(ctx: Arc<Ctx>, a: &MixedArgs, g: Arc<Group>) {
    let opts = EchoOpts { size: a.size, text: false, interval: a.msg_interval };
    let messages = a.messages as u64;
    let in_flight = Arc::new(Semaphore::new(ctx.share.part(a.legit).max(1) as usize));
    let pacer = Pacer::new(ctx.share.rate(a.legit_rate));
    let budget = Arc::new(AtomicI64::new(i64::MAX));
    let mut stop = ctx.stop.clone();
    let mut set = JoinSet::new();
    for i in 0.. {
        tokio::select! {
            _ = wait_stop(&mut stop) => break,
            _ = pacer.wait(i) => {}
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            g.add(names::SESSIONS, 1);
            g.record_end("failed: all --legit sessions in flight", None);
            continue;
        };
        let gi = ctx.share.global(i);
        let (ctx, g, budget) = (ctx.clone(), g.clone(), budget.clone());
        set.spawn(async move {
            session(&ctx, &g, gi, opts, &budget, messages).await;
            drop(permit);
        });
        while set.try_join_next().is_some() {}
    }
    while set.join_next().await.is_some() {}
}
