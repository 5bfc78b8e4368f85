//! `mixed`: legitimate clients measured while attacks run at the same time.
//!
//! Each of `--legit` clients loops: connect with a valid token, echo
//! `--messages` messages `--msg-interval` apart, close, think, repeat. A
//! session succeeds when it upgraded and every echo came back intact; the
//! `legit` group reports the success ratio (`sessions_ok / sessions`) and
//! handshake and round-trip percentiles. Sessions cut short by the end of
//! the run are not counted. Concurrently: `--slowloris` slow sockets,
//! `--zombies` zombies and a bad-token flood at `--flood-rate`, each in its
//! own group, from `--attack-source-ips`.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use tokio::task::JoinSet;

use super::echo::{echo_loop, EchoOpts};
use super::handshake::{run_flood, Flood};
use super::slowloris::Trickle;
use super::{connect, wait_stop, Ctx, Groups, FLOOD_USER_BASE};
use crate::cli::MixedArgs;
use crate::stats::names;
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
                ctx.attack_sources.clone(),
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
                ctx.attack_sources.clone(),
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
            run_flood(ctx.clone(), f, &ctx.attack_sources, |_| Some(g.clone())).await;
        }
    };
    tokio::join!(legit, slow, zombies, flood);
}

async fn legit_clients(ctx: Arc<Ctx>, a: &MixedArgs, groups: &Groups) {
    let Some(g) = groups.get("legit").cloned() else {
        return;
    };
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
                let conn = connect(&ctx, &g, TokenKind::Valid, gi, ctx.sources.pick(gi)).await;
                let end = match conn {
                    None => None,
                    Some(conn) => {
                        g.opened();
                        let end = echo_loop(&ctx, &g, conn, opts, &budget, messages).await;
                        g.closed();
                        Some(end)
                    }
                };
                if ctx.stopped() && !end.as_ref().is_some_and(|e| e.complete) {
                    // Cut short by the end of the run: neither success nor failure.
                    g.add("sessions_cut_by_end", 1);
                    break;
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
                tokio::select! {
                    _ = wait_stop(&mut stop) => break,
                    _ = tokio::time::sleep(think) => {}
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}
