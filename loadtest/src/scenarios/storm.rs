//! `storm`: a reconnect storm. `--count` users connect at once (or at
//! `--rate`), hold for `--hold` (answering pings), drop the way `--drop`
//! says (close frame, FIN or RST), and reconnect as the same users for the
//! next of `--rounds`. Per round it records the results and how long the
//! round took to settle (time to the last upgrade), which shows whether
//! rate limits and per-user caps let a legitimate herd back in.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{connect, end_label, wait_stop, Ctx, Pacer};
use crate::cli::{DropMode, StormArgs};
use crate::client::Message;
use crate::stats::{names, Group};
use crate::token::TokenKind;

/// Default number of users.
pub const DEFAULT_COUNT: u64 = 1000;

/// Runs the scenario.
pub async fn run(ctx: Arc<Ctx>, a: &StormArgs, g: Arc<Group>) {
    let n = ctx.share.part(a.common.count.unwrap_or(DEFAULT_COUNT));
    let mut stop = ctx.stop.clone();
    for round in 1..=a.rounds.max(1) {
        if ctx.stopped() {
            break;
        }
        let started = Instant::now();
        let pacer = Pacer::new(ctx.share.rate(a.rate));
        let mut set = JoinSet::new();
        for i in 0..n {
            tokio::select! {
                _ = wait_stop(&mut stop) => break,
                _ = pacer.wait(i) => {}
            }
            let gi = ctx.share.global(i);
            let (ctx, g) = (ctx.clone(), g.clone());
            let (hold, drop_mode) = (a.hold, a.drop_mode);
            set.spawn(async move { one(&ctx, &g, gi, round, started, hold, drop_mode).await });
        }
        while set.join_next().await.is_some() {}
        g.max(&format!("round {round} duration_ms"), started.elapsed().as_millis() as u64);
    }
}

async fn one(
    ctx: &Ctx,
    g: &Group,
    gi: u64,
    round: u32,
    started: Instant,
    hold: Duration,
    drop_mode: DropMode,
) {
    let Some(mut conn) = connect(ctx, g, TokenKind::Valid, gi, ctx.sources.pick(gi)).await else {
        g.add(&format!("round {round} failed"), 1);
        return;
    };
    g.add(&format!("round {round} upgraded"), 1);
    g.max(&format!("round {round} settle_ms"), started.elapsed().as_millis() as u64);
    g.opened();
    let since = Instant::now();
    let until = since + hold;
    let mut stop = ctx.stop.clone();
    let ended_by_server = loop {
        tokio::select! {
            _ = wait_stop(&mut stop) => break false,
            _ = tokio::time::sleep_until(until) => break false,
            r = conn.recv() => {
                if let Ok(Message::Text(_) | Message::Binary(_)) = r {
                    g.add(names::MSGS_RECV, 1);
                    continue;
                }
                g.record_end(&end_label(&r), Some(since.elapsed()));
                break true;
            }
        }
    };
    if !ended_by_server {
        match drop_mode {
            DropMode::Close => conn.close(1000, super::idle::CLOSE_WAIT).await,
            DropMode::Fin => {}
            DropMode::Rst => {
                // SO_LINGER 0 makes the drop below send RST; if it cannot be
                // set, the drop sends FIN instead, which is still a drop.
                let _ = conn.into_stream().tcp().set_zero_linger();
                g.record_end("dropped", None);
                g.closed();
                return;
            }
        }
        g.record_end("dropped", None);
    }
    g.closed();
}
