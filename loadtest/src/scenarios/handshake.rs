//! `handshake`: new connections as fast as `--rate` / `--concurrency` allow,
//! each with a token of one of `--kinds` (round-robin), counted per kind by
//! HTTP status and reason with the time to the answer. An upgraded
//! connection is closed at once (close 1000, bounded wait).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{wait_stop, Ctx, Groups, Pacer};
use crate::cli::HandshakeArgs;
use crate::client::{self, Outcome};
use crate::stats::Group;
use crate::target::SourcePool;
use crate::token::{parse_kinds, TokenKind};

/// Default number of attempts.
pub const DEFAULT_COUNT: u64 = 1000;

/// How long an upgraded connection waits for the server's close answer.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// A stream of handshake attempts: what `handshake` and the `mixed` flood share.
pub struct Flood {
    /// Attempts to make (this worker's share); `u64::MAX` = until stopped.
    pub count: u64,
    /// Attempts per second (this worker's share); 0 = unpaced.
    pub rate: f64,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// Kinds, round-robin by global attempt index.
    pub kinds: Vec<TokenKind>,
    /// Added to the attempt index to form the user index.
    pub user_base: u64,
}

/// Runs the scenario.
pub async fn run(ctx: Arc<Ctx>, a: &HandshakeArgs, groups: &Groups) {
    let Ok(kinds) = parse_kinds(&a.kinds) else {
        // Validated at start-up (`group_names`); nothing to do otherwise.
        return;
    };
    let flood = Flood {
        count: ctx.share.part(a.common.count.unwrap_or(DEFAULT_COUNT)),
        rate: ctx.share.rate(a.rate),
        concurrency: ctx.share.part(a.concurrency).max(1) as usize,
        kinds,
        user_base: 0,
    };
    let sources = ctx.sources.clone();
    run_flood(ctx, flood, &sources, |k| groups.get(k.name()).cloned()).await;
}

/// Runs a flood, recording each attempt in the group `group_of` picks.
pub async fn run_flood(
    ctx: Arc<Ctx>,
    f: Flood,
    sources: &SourcePool,
    group_of: impl Fn(TokenKind) -> Option<Arc<Group>>,
) {
    let sem = Arc::new(Semaphore::new(f.concurrency));
    let pacer = Pacer::new(f.rate);
    let mut stop = ctx.stop.clone();
    let mut set = JoinSet::new();
    for i in 0..f.count {
        tokio::select! {
            _ = wait_stop(&mut stop) => break,
            _ = pacer.wait(i) => {}
        }
        let permit = tokio::select! {
            _ = wait_stop(&mut stop) => break,
            p = sem.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed; a closed semaphore ends the flood
            },
        };
        let gi = ctx.share.global(i);
        let kind = f.kinds[(gi % f.kinds.len() as u64) as usize];
        let Some(g) = group_of(kind) else { continue };
        let source = sources.pick(gi);
        let ctx = ctx.clone();
        let user = f.user_base + gi;
        set.spawn(async move {
            attempt(&ctx, &g, kind, user, source).await;
            drop(permit);
        });
        // Reap finished tasks as we go so the set stays small in long floods.
        while set.try_join_next().is_some() {}
    }
    while set.join_next().await.is_some() {}
}

async fn attempt(ctx: &Ctx, g: &Group, kind: TokenKind, user: u64, source: Option<std::net::IpAddr>) {
    let Ok(token) = super::token_for(ctx, g, kind, user) else {
        return;
    };
    let (res, took) = client::open(&ctx.target, source, token.as_deref(), &ctx.client).await;
    match res {
        Ok(mut conn) => {
            g.record_open(&Outcome::Upgraded, &took);
            conn.close(1000, CLOSE_WAIT).await;
        }
        Err(o) => g.record_open(&o, &took),
    }
}
