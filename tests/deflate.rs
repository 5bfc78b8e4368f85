//! `permessage-deflate` in echo mode, against the binary: the offer is
//! answered, compressed messages come back inflated, and a compression
//! bomb (a small frame inflating far past `limits.max_message_bytes`)
//! closes 1009 with the gateway's peak memory (VmHWM) barely moved.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const MAX_MESSAGE: usize = 8 << 20;

/// A masked client frame of any length; `rsv1` marks it compressed.
fn frame(opcode: u8, rsv1: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut f = vec![0x80 | if rsv1 { 0x40 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// `data` as a permessage-deflate payload (a final block: allowed, and
/// what a one-shot compressor writes).
fn deflated(data: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec(data, 6)
}

/// Server frames read until a close (its code) or EOF: (opcode, rsv, payload) each.
async fn read_frames(s: &mut TcpStream, within: Duration) -> (Vec<(u8, u8, usize)>, Option<u16>) {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Whole frames at the front of `buf`.
        loop {
            if buf.len() < 2 {
                break;
            }
            let (len, hdr) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
                n if n < 126 => (n as usize, 2),
                _ => break,
            };
            if buf.len() < hdr + len {
                break;
            }
            let (op, rsv) = (buf[0] & 0x0f, (buf[0] >> 4) & 0x7);
            if op == 0x8 {
                let code = (len >= 2).then(|| u16::from_be_bytes([buf[hdr], buf[hdr + 1]]));
                return (frames, code);
            }
            frames.push((op, rsv, len));
            buf.drain(..hdr + len);
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return (frames, None),
        }
    }
}

fn status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

/// The binary with `limits.max_message_bytes` = 8 MiB; its public address.
fn gateway(dir: &std::path::Path) -> (ChildProc, SocketAddr) {
    let path = dir.join("g.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\npublic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[limits]\nmax_message_bytes = {MAX_MESSAGE}\nmax_outbound_bytes = {}\n\
             [auth]\nhmac_secret = \"{SECRET}\"\n[revocation]\npath = \"{}\"\n",
            2 * MAX_MESSAGE,
            dir.join("r.log").display()
        ),
    )
    .unwrap();
    let proc = ChildProc::spawn(Command::new(BIN).args(["serve", "--config", path.to_str().unwrap()]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Ok(line) = proc.lines.recv_timeout(Duration::from_millis(200)) else { continue };
        seen.push(line.clone());
        if let Some(rest) = line.strip_prefix("listening public=") {
            let public = rest.split_whitespace().next().unwrap().parse().unwrap();
            return (proc, public);
        }
    }
    panic!("the gateway did not start: {seen:?}");
}

/// An upgrade offering compression; the 101's extensions answer.
async fn upgrade(public: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(public).await.unwrap();
    let auth = format!("Bearer {}", token("zip"));
    let req = upgrade_request(
        "/",
        &[
            ("Authorization", &auth),
            ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ],
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let a = read_answer(&mut s).await;
    assert_eq!(a.status, 101, "{}", a.text);
    (s, a.header("sec-websocket-extensions").unwrap_or_default())
}

#[tokio::test]
async fn a_compression_bomb_closes_1009_without_the_memory_growing() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, public) = gateway(dir.path());
    let pid = proc.child.id();

    // The offer is answered; a compressed message comes back inflated
    // (uncompressed: RSV1 clear), and the per-thread buffers now exist.
    let (mut s, ext) = upgrade(public).await;
    assert_eq!(ext, "permessage-deflate; client_no_context_takeover");
    let text = "compressible ".repeat(10_000);
    s.write_all(&frame(0x1, true, &deflated(text.as_bytes()))).await.unwrap();
    s.write_all(&frame(0x8, false, &1000u16.to_be_bytes())).await.unwrap();
    let (frames, code) = read_frames(&mut s, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1000));
    assert!(frames.iter().all(|&(op, rsv, _)| rsv == 0 && (op == 0x1 || op == 0x0)), "{frames:?}");
    assert_eq!(frames.iter().map(|f| f.2).sum::<usize>(), text.len());

    // 256 MiB of zeros in about a quarter of a MiB on the wire, against an
    // 8 MiB limit.
    let bomb = deflated(&vec![0u8; 256 << 20]);
    assert!(bomb.len() < 300 << 10, "{}", bomb.len());
    let before = status_kb(pid, "VmHWM:");
    let (mut s, _) = upgrade(public).await;
    s.write_all(&frame(0x2, true, &bomb)).await.unwrap();
    let (frames, code) = read_frames(&mut s, Duration::from_secs(10)).await;
    assert_eq!(code, Some(1009), "message_too_big");
    let echoed: usize = frames.iter().map(|f| f.2).sum();
    assert!(echoed <= MAX_MESSAGE, "echoed {echoed} bytes, no more than the limit");
    let after = status_kb(pid, "VmHWM:");
    eprintln!(
        "gateway peak RSS: {before} kB before the bomb, {after} kB after (limit {} kB)",
        MAX_MESSAGE >> 10
    );
    // Inflated into fixed buffers: the peak moves by what a worker thread
    // touches the first time it serves such a connection (its buffers and
    // allocator pages: 0.5 to 1 MB here), far from the 8 MiB that holding
    // the message up to the limit would cost.
    assert!(after - before < 2048, "peak RSS grew by {} kB", after - before);
    drop(proc);
}
