//! Memory stays bounded when a client stops reading: run in a test binary
//! of its own, so the process RSS it measures is not shared with other tests.

mod common;

use std::net::SocketAddr;

use common::*;
use futures_util::SinkExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A backend that sends `n` 16 KiB messages as fast as it may.
async fn flooding_backend(n: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                let payload = vec![b'f'; 16 * 1024];
                for _ in 0..n {
                    if ws.send(Message::binary(payload.clone())).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_client_that_never_reads_while_the_backend_floods_is_a_slow_reader() {
    let dir = tempfile::tempdir().unwrap();
    // 4,000 × 16 KiB = 64 MiB offered by the backend.
    let be = flooding_backend(4000).await;
    let mut cfg = config(dir.path());
    cfg.upstream.url = format!("ws://{be}/");
    cfg.limits.max_message_bytes = 32 * 1024;
    cfg.limits.max_outbound_bytes = 256 * 1024;
    cfg.limits.write_timeout_ms = 500;
    let gw = start(cfg).await;
    let before = rss_kib();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(gw.public).await.unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(upgrade_request("/", &[("Authorization", &format!("Bearer {}", token("nemo")))]).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s).await.status, 101);
    gw.wait_metric("portcullis_disconnects_total{reason=\"slow_reader\"}", 1.0).await;
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 32 * 1024, "RSS grew by {grown} KiB while 64 MiB were offered");
    drop(s);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}
