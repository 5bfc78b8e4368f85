//! Proxy mode's frame relay over real sockets: frames pass byte for byte
//! both ways, compression is negotiated end to end, the gateway keeps its
//! heartbeat and its limits, and a stalled backend is told from a silent
//! client.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::Message;

/// A backend socket after its handshake, with the request head it got and
/// any bytes read past it.
struct Accepted {
    tcp: TcpStream,
    head: String,
    rest: Vec<u8>,
}

/// Reads an HTTP head; returns it and the bytes read past it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the head ended: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
    }
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A backend that answers each upgrade by hand (with `extensions` in its
/// 101, if given) and hands the raw socket to the test. `rcvbuf` shrinks
/// its receive buffer, for a backend that will stop reading.
async fn raw_backend(
    extensions: Option<&'static str>,
    rcvbuf: Option<u32>,
) -> (SocketAddr, mpsc::Receiver<Accepted>) {
    let sock = TcpSocket::new_v4().unwrap();
    if let Some(b) = rcvbuf {
        sock.set_recv_buffer_size(b).unwrap();
    }
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (head, rest) = read_head(&mut tcp).await;
            let key = header_value(&head, "sec-websocket-key").unwrap().to_string();
            let mut answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
                derive_accept_key(key.as_bytes())
            );
            if let Some(e) = extensions {
                answer.push_str(&format!("Sec-WebSocket-Extensions: {e}\r\n"));
            }
            answer.push_str("\r\n");
            tcp.write_all(answer.as_bytes()).await.unwrap();
            if tx.send(Accepted { tcp, head, rest }).await.is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// A raw client upgraded through the gateway: the socket, the 101 head,
/// and any frame bytes read past it.
async fn raw_client(gw: SocketAddr, extra: &[(&str, &str)]) -> (TcpStream, String, Vec<u8>) {
    let mut s = TcpStream::connect(gw).await.unwrap();
    let auth = format!("Bearer {}", token("relay"));
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    s.write_all(upgrade_request("/", &headers).as_bytes()).await.unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head, rest)
}

fn proxy_config(dir: &std::path::Path, backend: SocketAddr) -> portcullis::Config {
    let mut cfg = config(dir);
    cfg.upstream.url = format!("ws://{backend}/");
    // No gateway pings unless a test asks: the streams are compared exactly.
    cfg.heartbeat.ping_interval_ms = 600_000;
    cfg
}

/// xorshift: reproducible streams without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }
}

fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xFFFF => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// `n` messages as one side would write them: sizes 0 to 70,000 bytes
/// (above the gateway's 64 KiB read buffer), every 7th in three fragments
/// with a ping and a pong between them.
fn stream(seed: u64, n: usize, masked: bool) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut out = Vec::new();
    for i in 0..n {
        let len = if i % 100 == 0 { 70_000 } else { r.below(300) };
        let payload: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
        let mut mask = || masked.then(|| (r.next() as u32).to_be_bytes());
        let opcode = if i % 2 == 0 { 0x2 } else { 0x1 };
        let payload = if opcode == 0x1 { payload.iter().map(|b| b'a' + b % 26).collect() } else { payload };
        if i % 7 == 3 && len >= 3 {
            let (a, rest) = payload.split_at(len / 3);
            let (b, c) = rest.split_at(rest.len() / 2);
            out.extend(frame(false, opcode, a, mask()));
            out.extend(frame(true, 0x9, b"mid-message ping", mask()));
            out.extend(frame(false, 0x0, b, mask()));
            out.extend(frame(true, 0xA, b"unsolicited pong", mask()));
            out.extend(frame(true, 0x0, c, mask()));
        } else {
            out.extend(frame(true, opcode, &payload, mask()));
        }
    }
    out
}

/// Writes `bytes` in pieces of random sizes.
async fn write_in_pieces(s: &mut tokio::net::tcp::OwnedWriteHalf, bytes: &[u8], seed: u64) {
    let mut r = Rng(seed);
    let mut at = 0;
    while at < bytes.len() {
        let n = (1 + r.below(20_000)).min(bytes.len() - at);
        s.write_all(&bytes[at..at + n]).await.unwrap();
        at += n;
    }
}

/// Reads exactly `want.len()` bytes (after `already`) and compares.
async fn read_exactly(s: &mut tokio::net::tcp::OwnedReadHalf, mut got: Vec<u8>, want: &[u8], what: &str) {
    let mut chunk = vec![0u8; 65536];
    while got.len() < want.len() {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{what}: stalled at {} of {}", got.len(), want.len()))
            .unwrap();
        assert!(n > 0, "{what}: closed at {} of {}", got.len(), want.len());
        got.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(got.len(), want.len(), "{what}: more bytes than sent");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

#[tokio::test]
async fn ten_thousand_messages_and_fragments_pass_byte_for_byte_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (be, mut accepted) = raw_backend(None, None).await;
    let mut cfg = proxy_config(dir.path(), be);
    cfg.limits.max_message_bytes = 128 * 1024;
    let gw = start(cfg).await;
    let (client, _, client_rest) = raw_client(gw.public, &[]).await;
    let backend = accepted.recv().await.unwrap();
    assert!(backend.rest.is_empty());

    const N: usize = 10_000;
    let up = stream(1, N, true);
    let down = stream(2, N, false);
    let (mut crx, mut ctx) = client.into_split();
    let (mut brx, mut btx) = backend.tcp.into_split();
    let (up2, down2) = (up.clone(), down.clone());
    let writers = tokio::spawn(async move {
        tokio::join!(write_in_pieces(&mut ctx, &up2, 3), write_in_pieces(&mut btx, &down2, 4));
        (ctx, btx)
    });
    tokio::join!(
        read_exactly(&mut brx, backend.rest, &up, "client to backend"),
        read_exactly(&mut crx, client_rest, &down, "backend to client"),
    );
    let _keep = writers.await.unwrap();
    assert_eq!(gw.metric("portcullis_messages_total{direction=\"client_to_upstream\"}").await, N as f64);
    assert_eq!(gw.metric("portcullis_messages_total{direction=\"upstream_to_client\"}").await, N as f64);
    drop((crx, brx, _keep));
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn the_clients_extension_offer_reaches_the_backend_and_its_answer_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (be, mut accepted) = raw_backend(Some("permessage-deflate; server_no_context_takeover"), None).await;
    let gw = start(proxy_config(dir.path(), be)).await;
    let offer = "permessage-deflate; client_max_window_bits";
    let (mut c, head, _) = raw_client(gw.public, &[("Sec-WebSocket-Extensions", offer)]).await;
    let mut b = accepted.recv().await.unwrap();
    assert_eq!(header_value(&b.head, "sec-websocket-extensions"), Some(offer));
    assert_eq!(
        header_value(&head, "sec-websocket-extensions"),
        Some("permessage-deflate; server_no_context_takeover")
    );
    // RSV1 passes both ways once deflate is agreed (payloads are opaque here).
    let mut compressed = frame(true, 0x1, b"\xf2\x48\xcd\xc9\xc9\x07\x00", Some([1, 2, 3, 4]));
    compressed[0] |= 0x40;
    c.write_all(&compressed).await.unwrap();
    let mut got = vec![0u8; compressed.len()];
    b.tcp.read_exact(&mut got).await.unwrap();
    assert_eq!(got, compressed);
    let mut down = frame(true, 0x2, b"\x02\x00", None);
    down[0] |= 0x40;
    b.tcp.write_all(&down).await.unwrap();
    let mut got = vec![0u8; down.len()];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(got, down);
    drop((c, b));
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn rsv1_without_an_agreed_extension_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let (be, mut accepted) = raw_backend(None, None).await;
    let gw = start(proxy_config(dir.path(), be)).await;
    let (mut c, head, _) = raw_client(gw.public, &[("Sec-WebSocket-Extensions", "permessage-deflate")]).await;
    assert_eq!(header_value(&head, "sec-websocket-extensions"), None, "the backend declined");
    let mut b = accepted.recv().await.unwrap();
    let mut f = frame(true, 0x1, b"x", Some([1, 2, 3, 4]));
    f[0] |= 0x40;
    c.write_all(&f).await.unwrap();
    assert_eq!(raw_close_code(&mut c, Duration::from_secs(3)).await, Some(1002));
    // The backend got a close, never the frame.
    let mut got = [0u8; 2];
    b.tcp.read_exact(&mut got).await.unwrap();
    assert_eq!(got[0], 0x88);
    gw.wait_metric("portcullis_disconnects_total{reason=\"error\"}", 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn backend_pings_are_answered_by_the_client_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let (be, mut accepted) = raw_backend(None, None).await;
    let gw = start(proxy_config(dir.path(), be)).await;
    let mut c = ws(gw.public, &token("pinged")).await;
    let mut b = accepted.recv().await.unwrap();
    b.tcp.write_all(&frame(true, 0x9, b"backend-ping", None)).await.unwrap();
    // tungstenite answers the ping while the client reads.
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = c.next().await {
            if let Message::Ping(p) = m {
                assert_eq!(&p[..], b"backend-ping");
            }
            let _ = c.flush().await;
        }
    });
    let mut head = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(3), b.tcp.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!(head[0], 0x8A, "a pong");
    assert_eq!(head[1], 0x80 | 12, "masked, the ping's payload length");
    let mut p = [0u8; 12];
    b.tcp.read_exact(&mut p).await.unwrap();
    for (i, x) in p.iter_mut().enumerate() {
        *x ^= head[2 + i % 4];
    }
    assert_eq!(&p, b"backend-ping");
    drop(b);
    let _ = reader.await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn the_gateways_own_pings_are_consumed_and_a_silent_client_is_still_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let (be, mut accepted) = raw_backend(None, None).await;
    let mut cfg = proxy_config(dir.path(), be);
    cfg.heartbeat.ping_interval_ms = 200;
    cfg.heartbeat.pong_timeout_ms = 300;
    let gw = start(cfg).await;

    // A client that answers: the pongs stay at the gateway.
    let mut c = ws(gw.public, &token("alive")).await;
    let mut b = accepted.recv().await.unwrap();
    let answered =
        tokio::time::timeout(Duration::from_millis(900), async { while let Some(Ok(_)) = c.next().await {} })
            .await;
    assert!(answered.is_err(), "the answering client was closed");
    c.send(Message::text("data")).await.unwrap();
    let mut got = [0u8; 2];
    b.tcp.read_exact(&mut got).await.unwrap();
    assert_eq!(got, [0x81, 0x84], "the first thing the backend sees is the data, no pong");
    drop((c, b));

    // A client that never answers.
    let (mut s, _, _) = raw_client(gw.public, &[]).await;
    let _b = accepted.recv().await.unwrap();
    let t = Instant::now();
    assert_eq!(raw_close_code(&mut s, Duration::from_secs(3)).await, Some(1011));
    assert!(t.elapsed() >= Duration::from_millis(450), "{:?}", t.elapsed());
    gw.wait_metric("portcullis_disconnects_total{reason=\"pong_timeout\"}", 1.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_stalled_backend_is_upstream_stalled_not_the_clients_pong_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (be, mut accepted) = raw_backend(None, Some(4096)).await;
    let mut cfg = proxy_config(dir.path(), be);
    cfg.heartbeat.ping_interval_ms = 100;
    cfg.heartbeat.pong_timeout_ms = 200;
    cfg.limits.write_timeout_ms = 800;
    cfg.limits.max_message_bytes = 16 * 1024;
    cfg.limits.max_outbound_bytes = 64 * 1024;
    let gw = start(cfg).await;
    let (s, _, _) = raw_client(gw.public, &[]).await;
    // The backend never reads.
    let _b = accepted.recv().await.unwrap();
    let (mut rx, mut tx) = s.into_split();
    let started = Instant::now();
    // The client writes as long as it can and answers every ping it sees.
    let (pings_tx, mut pings_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return all,
                Ok(n) => {
                    all.extend_from_slice(&chunk[..n]);
                    // Pings are 10 bytes here (8-byte payload); answer each.
                    while let Some(i) = all.windows(2).position(|w| w == [0x89, 0x08]) {
                        let payload = all[i + 2..(i + 10).min(all.len())].to_vec();
                        if payload.len() < 8 {
                            break;
                        }
                        let _ = pings_tx.send(payload);
                        all[i] = 0;
                    }
                }
            }
        }
    });
    let data = frame(true, 0x2, &[7u8; 8000], Some([9, 9, 9, 9]));
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                p = pings_rx.recv() => match p {
                    Some(p) => if tx.write_all(&frame(true, 0xA, &p, Some([1, 1, 1, 1]))).await.is_err() { return },
                    None => return,
                },
                r = tx.write_all(&data) => if r.is_err() { return },
            }
        }
    });
    let seen = tokio::time::timeout(Duration::from_secs(6), reader).await.expect("closed in time").unwrap();
    writer.abort();
    // 0x12: the code and "upstream_stalled".
    let close = seen.windows(2).rposition(|w| w == [0x88, 0x12]).expect("a close frame");
    assert_eq!(seen[close + 2..close + 4], 1011u16.to_be_bytes());
    assert!(started.elapsed() >= Duration::from_millis(800), "not before write_timeout_ms");
    gw.wait_metric("portcullis_disconnects_total{reason=\"upstream_stalled\"}", 1.0).await;
    assert_eq!(gw.disconnects("pong_timeout").await, 0.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

/// Python's `websockets` (PyPI) as a deflate-capable backend and client.
const PY: &str = r#"
import asyncio, sys, websockets
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    if sys.argv[1] == "server":
        async with websockets.serve(echo, "127.0.0.1", 0, max_size=None, compression="deflate") as srv:
            print(srv.sockets[0].getsockname()[1], flush=True)
            await asyncio.Future()
    async with websockets.connect(sys.argv[2], compression="deflate", max_size=None) as ws:
        print("extensions:", ws.response.headers.get("Sec-WebSocket-Extensions"), flush=True)
        for i in range(200):
            msg = ("hello %d " % i) * (i * 10 + 1)
            await ws.send(msg)
            assert await ws.recv() == msg, i
        # 4 MiB inflated, a few KiB on the wire: under the gateway's 1 MiB.
        big = b"x" * (4 << 20)
        await ws.send(big)
        assert await ws.recv() == big
        print("ok", flush=True)
asyncio.run(main())
"#;

fn python() -> std::process::Command {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import websockets"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "this test needs python3 with `websockets` (pip install websockets)");
    std::process::Command::new("python3")
}

#[tokio::test]
async fn permessage_deflate_is_negotiated_end_to_end_and_limits_count_wire_bytes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("ws.py");
    std::fs::write(&script, PY).unwrap();
    let mut server =
        python().arg(&script).arg("server").stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut port = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut port).unwrap();
    let be: SocketAddr = format!("127.0.0.1:{}", port.trim()).parse().unwrap();
    let mut cfg = proxy_config(dir.path(), be);
    cfg.auth.carriers = vec![portcullis::config::Carrier::Query];
    let gw = start(cfg).await;
    let url = format!("ws://{}/?access_token={}", gw.public, token("zip"));
    // Blocking, so off the test's runtime thread (the gateway runs there).
    let client = tokio::task::spawn_blocking(move || python().arg(&script).arg("client").arg(url).output())
        .await
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let out = client.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("extensions: permessage-deflate"), "{stdout}");
    assert!(stdout.contains("ok"), "{stdout}");
    gw.wait_metric("portcullis_messages_total{direction=\"upstream_to_client\"}", 201.0).await;
    gw.assert_gauges_zero().await;
    gw.stop().await;
}
