//! `zombie`: authenticated connections that upgrade and then misbehave.
//!
//! - `no-pong`: reads frames but never answers a ping and never sends; the
//!   gateway should reap it (`pong_timeout`, close 1011).
//! - `no-read`: opened with a small `SO_RCVBUF`, never reads after the 101;
//!   optionally keeps sending messages so the echo piles up toward it (the
//!   gateway should stop reading it, then close it as `slow_reader`, or reap
//!   it by `pong_timeout` since its pongs never come either).
//!
//! Records how each ended (`close 1011`, `eof`, `reset`, `closed`,
//! `held_to_end`) and its lifetime, i.e. the time the gateway took to reap it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{interval, sleep_until, timeout, Instant, MissedTickBehavior};

use super::{connect, end_label, wait_stop, Ctx, Pacer, ZOMBIE_USER_BASE};
use crate::cli::{NoReadArgs, ZombieArgs, ZombieMode};
use crate::client::{self, Message, Outcome};
use crate::frame::{self, opcode};
use crate::stats::{names, Group};
use crate::token::TokenKind;

/// Default number of zombies.
pub const DEFAULT_COUNT: u64 = 100;

/// How often a never-reading zombie checks whether the peer has closed.
const CLOSED_CHECK: Duration = Duration::from_millis(200);

/// Runs the scenario.
pub async fn run(ctx: Arc<Ctx>, a: &ZombieArgs, g: Arc<Group>) {
    let n = ctx.share.part(a.common.count.unwrap_or(DEFAULT_COUNT));
    let sources = ctx.sources.clone();
    spawn_all(ctx, g, n, a.rate, a.mode, a.no_read.clone(), sources).await;
}

/// Opens `n` zombies at `rate` per second (run-wide; this worker's share of
/// the rate is taken here) and waits for them to end.
pub async fn spawn_all(
    ctx: Arc<Ctx>,
    g: Arc<Group>,
    n: u64,
    rate: f64,
    mode: ZombieMode,
    nr: NoReadArgs,
    sources: crate::target::SourcePool,
) {
    let pacer = Pacer::new(ctx.share.rate(rate));
    let mut stop = ctx.stop.clone();
    let mut set = JoinSet::new();
    let nr = Arc::new(nr);
    for i in 0..n {
        tokio::select! {
            _ = wait_stop(&mut stop) => break,
            _ = pacer.wait(i) => {}
        }
        let gi = ctx.share.global(i);
        let source = sources.pick(gi);
        let (ctx, g, nr) = (ctx.clone(), g.clone(), nr.clone());
        set.spawn(async move {
            match mode {
                ZombieMode::NoPong => no_pong(&ctx, &g, gi, source).await,
                ZombieMode::NoRead => no_read(&ctx, &g, gi, source, &nr).await,
            }
        });
    }
    while set.join_next().await.is_some() {}
}

async fn no_pong(ctx: &Ctx, g: &Group, gi: u64, source: Option<IpAddr>) {
    let Some(mut conn) = connect(ctx, g, TokenKind::Valid, ZOMBIE_USER_BASE + gi, source).await else {
        return;
    };
    conn.answer_pings = false;
    g.opened();
    let since = Instant::now();
    let mut stop = ctx.stop.clone();
    loop {
        tokio::select! {
            _ = wait_stop(&mut stop) => {
                // A zombie does not say goodbye: the socket is just dropped.
                g.record_end("held_to_end", None);
                break;
            }
            r = conn.recv() => {
                if let Ok(Message::Text(_) | Message::Binary(_)) = r {
                    g.add(names::MSGS_RECV, 1);
                    continue;
                }
                g.record_end(&end_label(&r), Some(since.elapsed()));
                break;
            }
        }
    }
    g.add("pings_ignored", conn.pings_seen as u64);
    g.closed();
}

/// True when the peer has closed (FIN or RST seen), without reading.
async fn peer_closed(stream: &TcpStream) -> bool {
    // A zero timeout polls `ready` once: it returns the cached readiness,
    // which includes READ_CLOSED / ERROR once the peer's FIN or RST arrived.
    match timeout(Duration::ZERO, stream.ready(Interest::READABLE)).await {
        Ok(Ok(r)) => r.is_read_closed() || r.is_error(),
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

async fn no_read(ctx: &Ctx, g: &Group, gi: u64, source: Option<IpAddr>, nr: &NoReadArgs) {
    let t0 = Instant::now();
    let rcvbuf = nr.rcvbuf.min(u32::MAX as usize) as u32;
    let stream =
        match client::tcp_connect(ctx.target.addr, source, Some(rcvbuf), ctx.client.connect_timeout).await {
            Ok(s) => s,
            Err(o) => {
                g.record_attempt(&o, t0.elapsed());
                return;
            }
        };
    let token = match super::token_for(ctx, g, TokenKind::Valid, ZOMBIE_USER_BASE + gi) {
        Ok(t) => t,
        Err(_) => return,
    };
    // Plain TCP only (the driver refuses no-read zombies over wss://): the
    // frames below are written raw.
    let mut wrapped = client::Stream::Plain(stream);
    if let Err(o) = client::handshake(&mut wrapped, &ctx.target, token.as_deref(), &ctx.client).await {
        g.record_attempt(&o, t0.elapsed());
        return;
    }
    let Some(stream) = wrapped.into_plain() else {
        return;
    };
    g.record_attempt(&Outcome::Upgraded, t0.elapsed());
    g.opened();
    let since = Instant::now();
    let sending = !nr.send_interval.is_zero() && nr.send_size > 0;
    // One frame reused for every send; `off` is how much of it went out, so
    // a send interrupted by another branch resumes where it stopped.
    let msg =
        if sending { frame::client_frame(opcode::BINARY, &vec![b'z'; nr.send_size]) } else { Vec::new() };
    let mut off = msg.len();
    let mut next_send = Instant::now();
    let mut check = interval(CLOSED_CHECK);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stop = ctx.stop.clone();
    let how = loop {
        let pending = off < msg.len();
        tokio::select! {
            _ = wait_stop(&mut stop) => break None,
            _ = sleep_until(next_send), if sending && !pending => {
                off = 0;
                next_send = Instant::now() + nr.send_interval;
            }
            r = stream.writable(), if pending => {
                if r.is_err() {
                    break Some("reset".to_string());
                }
                match stream.try_write(&msg[off..]) {
                    Ok(n) => {
                        off += n;
                        if off == msg.len() {
                            g.add(names::MSGS_SENT, 1);
                            g.add(names::BYTES_SENT, nr.send_size as u64);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => break Some(client::WsError::Io(e).label().to_string()),
                }
            }
            _ = check.tick() => {
                if peer_closed(&stream).await {
                    break Some("closed".to_string());
                }
            }
        }
    };
    match how {
        None => g.record_end("held_to_end", None),
        Some(label) => g.record_end(&label, Some(since.elapsed())),
    }
    if off < msg.len() {
        g.add("sends_blocked_at_end", 1);
    }
    g.closed();
}
