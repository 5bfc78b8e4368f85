//! `idle`: open `--count` authenticated connections at `--rate` per second
//! and hold them, answering pings, until the run's duration ends. Measures
//! handshake latency and results, open connections over time, and how
//! connections the server ended went (close codes).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{connect, end_label, wait_stop, Ctx, Pacer};
use crate::cli::IdleArgs;
use crate::client::{Message, WsConn};
use crate::stats::{names, Group};
use crate::token::TokenKind;

/// Default number of connections.
pub const DEFAULT_COUNT: u64 = 1000;

/// How long a graceful close may wait for the server's answer at the end.
pub const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Runs the scenario.
pub async fn run(ctx: Arc<Ctx>, a: &IdleArgs, g: Arc<Group>) {
    let n = ctx.share.part(a.common.count.unwrap_or(DEFAULT_COUNT));
    let pacer = Pacer::new(ctx.share.rate(a.rate));
    let mut stop = ctx.stop.clone();
    let mut set = JoinSet::new();
    for i in 0..n {
        tokio::select! {
            _ = wait_stop(&mut stop) => break,
            _ = pacer.wait(i) => {}
        }
        let gi = ctx.share.global(i);
        set.spawn(one(ctx.clone(), g.clone(), gi, a.first_message, a.message_after));
    }
    while set.join_next().await.is_some() {}
}

async fn one(ctx: Arc<Ctx>, g: Arc<Group>, gi: u64, first_message: usize, after: Option<Duration>) {
    let source = ctx.sources.pick(gi);
    let Some(mut conn) = connect(&ctx, &g, TokenKind::Valid, gi, source).await else {
        return;
    };
    if first_message > 0 {
        if let Some(after) = after {
            // Pings are not answered meanwhile: keep `after` below the
            // server's ping interval plus pong timeout.
            let mut stop = ctx.stop.clone();
            tokio::select! {
                _ = wait_stop(&mut stop) => {
                    hold(&ctx, &g, conn).await;
                    return;
                }
                _ = tokio::time::sleep(after) => {}
            }
        }
        let payload = vec![(gi % 251) as u8; first_message];
        if conn.send(crate::frame::opcode::BINARY, &payload).await.is_err() {
            g.record_end("first_message_failed", None);
            return;
        }
        g.add(names::MSGS_SENT, 1);
        match conn.recv().await {
            Ok(Message::Binary(m)) if m == payload => {
                g.add(names::MSGS_RECV, 1);
                g.add(names::BYTES_RECV, m.len() as u64);
            }
            r => {
                g.record_end(&end_label(&r), None);
                return;
            }
        }
    }
    hold(&ctx, &g, conn).await;
}

/// Holds an open connection (answering pings, counting messages) until the
/// stop signal, then closes it gracefully; or until the server ends it,
/// which is recorded with the connection's lifetime.
pub async fn hold(ctx: &Ctx, g: &Group, mut conn: WsConn) {
    g.opened();
    let since = Instant::now();
    let mut stop = ctx.stop.clone();
    loop {
        tokio::select! {
            _ = wait_stop(&mut stop) => {
                conn.close(1000, CLOSE_WAIT).await;
                g.record_end("held_to_end", None);
                break;
            }
            r = conn.recv() => {
                if let Ok(Message::Text(m) | Message::Binary(m)) = &r {
                    g.add(names::MSGS_RECV, 1);
                    g.add(names::BYTES_RECV, m.len() as u64);
                    continue;
                }
                g.record_end(&end_label(&r), Some(since.elapsed()));
                break;
            }
        }
    }
    g.closed();
}
