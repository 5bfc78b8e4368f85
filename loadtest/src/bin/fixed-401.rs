//! The refusal floor for the comparison runs (`loadtest/peers/compare.sh`):
//! a trivial server that reads a request head, answers the same fixed
//! `401` as a gateway refusing a missing token, and closes. Nothing is
//! parsed, verified or counted, so its CPU per refusal is what the kernel
//! and one async task cost: the lower bound for any real gateway.
//!
//! Run with `cargo run --release -p portcullis-loadtest --bin fixed-401 -- 127.0.0.1:18083`
//! (loopback addresses only); it prints `listening <addr>` to stderr.

#![forbid(unsafe_code)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The same size and shape as Portcullis's `missing_token` answer.
const ANSWER: &[u8] = b"HTTP/1.1 401 Unauthorized\r\n\
WWW-Authenticate: Bearer realm=\"portcullis\"\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Length: 14\r\n\
Connection: close\r\n\r\n\
missing_token\n";

/// A head must arrive within this long (and fit the buffer), as at a gateway.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

async fn refuse(mut tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let mut buf = [0u8; 4096];
    let mut len = 0;
    let read = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            let n = tcp.read(&mut buf[len..]).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            // The end of the head may straddle two reads: look a little back.
            let from = len.saturating_sub(3);
            len += n;
            if buf[from..len].windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if len == buf.len() {
                return Ok(true);
            }
        }
    })
    .await;
    if matches!(read, Ok(Ok(true))) {
        let _ = tokio::time::timeout(HEAD_TIMEOUT, async {
            tcp.write_all(ANSWER).await?;
            tcp.shutdown().await
        })
        .await;
    }
}

fn main() {
    portcullis_loadtest::peer::serve("fixed-401", "127.0.0.1:18083", refuse);
}
