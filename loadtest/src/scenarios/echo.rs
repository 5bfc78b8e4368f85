//! `echo`: `--concurrency` authenticated connections each send a `--size`
//! message, wait for its echo, and repeat. Measures messages and bytes per
//! second and the round-trip latency; every echo is checked byte for byte.
//! Bounded by `--duration` and, when given, `--count` messages in total.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

use super::{connect, end_label, wait_stop, Ctx, Pacer};
use crate::cli::EchoArgs;
use crate::client::{Message, WsConn};
use crate::frame::opcode;
use crate::stats::{names, Group};
use crate::token::TokenKind;

/// Runs the scenario.
pub async fn run(ctx: Arc<Ctx>, a: &EchoArgs, g: Arc<Group>) {
    let n = ctx.share.part(a.concurrency);
    // Messages this worker may still send; shared by its connections.
    let budget = Arc::new(AtomicI64::new(match a.common.count {
        Some(c) => ctx.share.part(c).min(i64::MAX as u64) as i64,
        None => i64::MAX,
    }));
    let pacer = Pacer::new(ctx.share.rate(a.rate));
    let mut stop = ctx.stop.clone();
    let mut set = JoinSet::new();
    for i in 0..n {
        tokio::select! {
            _ = wait_stop(&mut stop) => break,
            _ = pacer.wait(i) => {}
        }
        let gi = ctx.share.global(i);
        let (ctx, g, budget) = (ctx.clone(), g.clone(), budget.clone());
        let opts = EchoOpts { size: a.size, text: a.text, interval: a.interval };
        set.spawn(async move {
            let Some(conn) = connect(&ctx, &g, TokenKind::Valid, gi, ctx.sources.pick(gi)).await else {
                return;
            };
            g.opened();
            let end = echo_loop(&ctx, &g, conn, opts, &budget, u64::MAX).await;
            g.record_end(&end.label, end.lifetime);
            g.closed();
        });
    }
    while set.join_next().await.is_some() {}
}

/// Message shape of an echo loop.
#[derive(Debug, Clone, Copy)]
pub struct EchoOpts {
    /// Payload size.
    pub size: usize,
    /// Text (ASCII) rather than binary.
    pub text: bool,
    /// Pause between messages.
    pub interval: Duration,
}

/// How an echo loop ended.
pub struct EchoEnd {
    /// Label for the `ends` table.
    pub label: String,
    /// Set when the server ended the connection.
    pub lifetime: Option<Duration>,
    /// Messages echoed correctly.
    pub ok: u64,
    /// True when every message sent came back intact and the loop ended by
    /// reaching `max` (not by the stop signal or an error).
    pub complete: bool,
}

/// A payload of `size` bytes whose first 16 are the sequence number in hex
/// (so an out-of-order or foreign echo is caught), the rest random.
fn payload(size: usize, text: bool, seq: u64) -> Vec<u8> {
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut p: Vec<u8> = if text {
        (0..size).map(|_| ALNUM[rand::random_range(0..ALNUM.len())]).collect()
    } else {
        (0..size).map(|_| rand::random()).collect()
    };
    let tag = format!("{seq:016x}");
    let n = size.min(16);
    p[..n].copy_from_slice(&tag.as_bytes()[16 - n..]);
    p
}

/// Sends up to `max` messages on `conn` (fewer if the shared `budget` runs
/// out or the run stops), each awaiting its echo; closes the connection.
pub async fn echo_loop(
    ctx: &Ctx,
    g: &Group,
    mut conn: WsConn,
    o: EchoOpts,
    budget: &AtomicI64,
    max: u64,
) -> EchoEnd {
    let since = Instant::now();
    let mut stop = ctx.stop.clone();
    let op = if o.text { opcode::TEXT } else { opcode::BINARY };
    let mut ok = 0u64;
    let fail = |label: String, server: bool, ok| EchoEnd {
        label,
        lifetime: server.then(|| since.elapsed()),
        ok,
        complete: false,
    };
    for seq in 0..max {
        if ctx.stopped() || budget.fetch_sub(1, Ordering::Relaxed) <= 0 {
            conn.close(1000, super::idle::CLOSE_WAIT).await;
            return fail("closed_by_client".into(), false, ok);
        }
        let msg = payload(o.size, o.text, seq);
        let t0 = Instant::now();
        if let Err(e) = conn.send(op, &msg).await {
            return fail(crate::client::WsError::Io(e).label().into(), true, ok);
        }
        g.add(names::MSGS_SENT, 1);
        g.add(names::BYTES_SENT, msg.len() as u64);
        let r = tokio::select! {
            _ = wait_stop(&mut stop) => {
                conn.close(1000, super::idle::CLOSE_WAIT).await;
                return fail("closed_by_client".into(), false, ok);
            }
            r = timeout(ctx.client.response_timeout, conn.recv()) => r,
        };
        match r {
            Err(_) => return fail("echo_timeout".into(), false, ok),
            Ok(Ok(Message::Text(m) | Message::Binary(m))) => {
                g.record_rtt(t0.elapsed());
                g.add(names::MSGS_RECV, 1);
                g.add(names::BYTES_RECV, m.len() as u64);
                if m != msg {
                    g.add(names::ECHO_MISMATCH, 1);
                    conn.close(1000, super::idle::CLOSE_WAIT).await;
                    return fail("echo_mismatch".into(), false, ok);
                }
                ok += 1;
            }
            Ok(other) => return fail(end_label(&other), true, ok),
        }
        if !o.interval.is_zero() {
            tokio::select! {
                _ = wait_stop(&mut stop) => {}
                _ = tokio::time::sleep(o.interval) => {}
            }
        }
    }
    conn.close(1000, super::idle::CLOSE_WAIT).await;
    EchoEnd { label: "closed_by_client".into(), lifetime: None, ok, complete: true }
}

#[cfg(test)]
mod tests {
    use super::payload;

    #[test]
    fn payloads_are_tagged() {
        let p = payload(40, true, 255);
        assert_eq!(&p[..16], b"00000000000000ff");
        assert!(p.iter().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(payload(4, false, 0x1234).as_slice()[..4], *b"1234");
        assert!(payload(0, false, 1).is_empty());
    }
}
