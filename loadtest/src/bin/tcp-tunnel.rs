//! The relay floor for the comparison runs (`loadtest/peers/compare.sh`):
//! a TCP tunnel that connects every accepted socket to the backend and
//! copies bytes both ways, the upgrade included. Nothing is parsed,
//! checked or counted, so its CPU per relayed message is what the kernel
//! and one async task cost: the lower bound for any relaying gateway on
//! this machine.
//!
//! Run with `cargo run --release -p portcullis-loadtest --bin tcp-tunnel -- 127.0.0.1:18084 127.0.0.1:18081`
//! (loopback addresses only); it prints `listening <addr>` to stderr.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Per direction, as the gateway's read buffer: a 64 KiB message crosses in
/// as few reads as through Portcullis (tokio's default is 8 KiB).
const BUF: usize = 64 * 1024;

async fn tunnel(mut client: TcpStream, backend: SocketAddr) {
    let _ = client.set_nodelay(true);
    let Ok(mut upstream) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await;
}

fn main() {
    let backend: SocketAddr =
        match std::env::args().nth(2).unwrap_or_else(|| "127.0.0.1:18081".into()).parse() {
            Ok(a) if SocketAddr::ip(&a).is_loopback() => a,
            _ => {
                eprintln!("tcp-tunnel: error: the backend must be a loopback address");
                std::process::exit(2)
            }
        };
    portcullis_loadtest::peer::serve("tcp-tunnel", "127.0.0.1:18084", move |tcp| tunnel(tcp, backend));
}
