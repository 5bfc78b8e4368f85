//! A small WebSocket echo backend for the comparison runs
//! (`loadtest/peers/compare.sh`): the upstream of Portcullis in proxy mode
//! **and** of HAProxy, so both gateways front the very same thing.
//!
//! Every text or binary message is sent back as it came; pings are answered
//! by tungstenite; a close ends the connection. Buffers are small (1 KiB read
//! chunk, no write buffering) so the backend's own memory per connection
//! stays small; the comparison script reports it apart from the gateway's.
//! One thread: the script pins it to a core beside the gateway.
//!
//! Run with `cargo run --release -p portcullis-loadtest --bin echo-backend -- 127.0.0.1:18081`
//! (loopback addresses only); it prints `listening <addr>` to stderr.

#![forbid(unsafe_code)]

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Largest message echoed; the load tests send at most a few KiB.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_MESSAGE_BYTES + 64 * 1024)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

async fn echo(tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config())).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        // tungstenite queued the reply to a close; flushing sends it.
        if msg.is_close() {
            let _ = ws.flush().await;
            return;
        }
        // Pings are answered by tungstenite on the next read or write.
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

fn main() {
    portcullis_loadtest::peer::serve("echo-backend", "127.0.0.1:18081", echo);
}
