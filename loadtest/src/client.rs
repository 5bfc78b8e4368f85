//! The lean WebSocket client: raw TCP (or TLS over it for `wss://`), a
//! hand-written upgrade request, a parsed status line, then RFC 6455
//! framing from `frame.rs`.
//!
//! Per-connection memory is the point. An idle [`WsConn`] is a `TcpStream`,
//! an empty `Vec` (no heap until bytes arrive) and a few words: reads go
//! through a stack buffer and only a partial frame is ever kept on the heap,
//! released as soon as it is consumed. That is what lets one process hold
//! tens of thousands of idle connections.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::client::TlsStream;

use crate::frame::{self, opcode};
use crate::target::Target;

/// RFC 6455 §1.3: appended to the key before hashing into the accept value.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The longest response head we read before calling it malformed.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// How a token travels in the upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Carrier {
    /// `Authorization: Bearer T`.
    #[default]
    Header,
    /// `Sec-WebSocket-Protocol: bearer, T` (what browsers can send).
    Subprotocol,
    /// `?access_token=T` on the path.
    Query,
    /// `Cookie: <name>=T`.
    Cookie,
}

/// Client-side knobs shared by every scenario.
#[derive(Debug, Clone)]
pub struct ClientOpts {
    /// Bound on TCP connect.
    pub connect_timeout: Duration,
    /// Bound from sending the request to a complete response head.
    pub response_timeout: Duration,
    /// Where the token goes.
    pub carrier: Carrier,
    /// Cookie name for [`Carrier::Cookie`].
    pub cookie_name: String,
    /// An `Origin` header to send, if any.
    pub origin: Option<String>,
    /// Largest message accepted from the server (memory bound).
    pub max_message: usize,
    /// TLS configuration for `wss://` targets.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
            carrier: Carrier::Header,
            cookie_name: "portcullis_token".into(),
            origin: None,
            max_message: 16 << 20,
            tls: None,
        }
    }
}

/// How one connection attempt ended, before any WebSocket traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 101 with a correct `Sec-WebSocket-Accept`.
    Upgraded,
    /// An HTTP answer other than 101; `detail` is the `WWW-Authenticate`
    /// error (or `missing_token`) for a 401, empty otherwise.
    Rejected {
        /// HTTP status code.
        status: u16,
        /// Short reason parsed from the answer.
        detail: String,
    },
    /// The server closed without answering (cap refusals).
    NoAnswer,
    /// The connection was reset (RST), before or during the handshake.
    Reset,
    /// No complete answer within the response timeout.
    Timeout,
    /// TCP connect failed; the label says how.
    ConnectFailed(&'static str),
    /// Something answered that is not a valid upgrade response.
    BadResponse(&'static str),
    /// The TLS handshake failed; the label says how.
    TlsFailed(&'static str),
}

impl Outcome {
    /// Coarse key: the HTTP status or the failure kind (`101`, `401`,
    /// `closed`, `reset`, `timeout`, `connect_refused`, …).
    pub fn status_key(&self) -> String {
        match self {
            Outcome::Upgraded => "101".into(),
            Outcome::Rejected { status, .. } => status.to_string(),
            Outcome::NoAnswer => "closed".into(),
            Outcome::Reset => "reset".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::ConnectFailed(k) => (*k).into(),
            Outcome::BadResponse(_) => "bad_response".into(),
            Outcome::TlsFailed(_) => "tls_error".into(),
        }
    }

    /// Fine key: the status with its reason (`401 missing_token`,
    /// `401 invalid_token: token expired`, `bad_response: bad_accept`).
    pub fn reason_key(&self) -> String {
        match self {
            Outcome::Rejected { status, detail } if !detail.is_empty() => {
                format!("{status} {detail}")
            }
            Outcome::BadResponse(why) => format!("bad_response: {why}"),
            Outcome::TlsFailed(why) => format!("tls_error: {why}"),
            other => other.status_key(),
        }
    }

    /// True when the server sent an HTTP answer (its latency is meaningful).
    pub fn answered(&self) -> bool {
        matches!(self, Outcome::Upgraded | Outcome::Rejected { .. })
    }
}

/// Maps an I/O error during the exchange to an outcome.
fn io_outcome(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
            Outcome::Reset
        }
        io::ErrorKind::UnexpectedEof => Outcome::NoAnswer,
        _ => Outcome::BadResponse("io_error"),
    }
}

/// Maps a connect error to a bounded label.
fn connect_label(e: &io::Error) -> &'static str {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::ConnectionRefused, _) => "connect_refused",
        (io::ErrorKind::AddrNotAvailable, _) | (_, Some(99)) => "connect_no_port",
        (_, Some(24)) | (_, Some(23)) => "connect_emfile",
        (io::ErrorKind::TimedOut, _) => "connect_timeout",
        (io::ErrorKind::ConnectionReset, _) => "connect_reset",
        _ => "connect_error",
    }
}

/// Opens a TCP connection, bound to `source` first when given, with a small
/// receive buffer when `recv_buf` is given (never-read zombies).
pub async fn tcp_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    recv_buf: Option<u32>,
    limit: Duration,
) -> Result<TcpStream, Outcome> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(|e| Outcome::ConnectFailed(connect_label(&e)))?;
    if let Some(n) = recv_buf {
        // Must be set before connect: the window scale is negotiated in SYN.
        sock.set_recv_buffer_size(n).map_err(|e| Outcome::ConnectFailed(connect_label(&e)))?;
    }
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0)).map_err(|e| Outcome::ConnectFailed(connect_label(&e)))?;
    }
    let stream = match timeout(limit, sock.connect(addr)).await {
        Err(_) => return Err(Outcome::ConnectFailed("connect_timeout")),
        Ok(Err(e)) => return Err(Outcome::ConnectFailed(connect_label(&e))),
        Ok(Ok(s)) => s,
    };
    // Small frames (pongs, echo messages) must not wait for Nagle; a failure
    // here only costs latency, so it is ignored.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A connection to the gateway: plain TCP or TLS over it.
pub enum Stream {
    /// `ws://`.
    Plain(TcpStream),
    /// `wss://` (boxed: the TLS state is large and only some runs use it).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    /// The plain socket, when there is no TLS layer.
    pub fn into_plain(self) -> Option<TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(_) => None,
        }
    }

    /// Reads what is available into `into` (0 = EOF). The 16 KiB buffer
    /// lives only inside one poll, never across an await, so an idle
    /// connection's task stays small.
    pub async fn read_some(&mut self, into: &mut Vec<u8>) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut *self).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    into.extend_from_slice(rb.filled());
                    Poll::Ready(Ok(rb.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Writes all of `buf` and flushes any TLS record.
    pub async fn send_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_all(buf).await?;
        self.flush().await
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Maps a TLS handshake error to a bounded label.
fn tls_label(e: &io::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("certificate") || text.contains("Certificate") {
        "bad_certificate"
    } else if io_outcome(e) == Outcome::Reset {
        "reset"
    } else if e.kind() == io::ErrorKind::UnexpectedEof {
        "closed"
    } else {
        "handshake_failed"
    }
}

/// Wraps a connected socket in TLS when the target is `wss://`; the
/// handshake is bounded by the response timeout.
pub async fn secure(tcp: TcpStream, target: &Target, opts: &ClientOpts) -> Result<Stream, Outcome> {
    if !target.tls {
        return Ok(Stream::Plain(tcp));
    }
    let Some(config) = opts.tls.clone() else {
        return Err(Outcome::TlsFailed("no_tls_config"));
    };
    let name = crate::tls::server_name(&target.host).map_err(|_| Outcome::TlsFailed("bad_server_name"))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match timeout(opts.response_timeout, connector.connect(name, tcp)).await {
        Err(_) => Err(Outcome::TlsFailed("timeout")),
        Ok(Err(e)) => Err(Outcome::TlsFailed(tls_label(&e))),
        Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
    }
}

/// A fresh random `Sec-WebSocket-Key` (16 random bytes, base64).
pub fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
}

/// The `Sec-WebSocket-Accept` value the server must answer for `key`.
pub fn accept_for(key: &str) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.digest().bytes())
}

/// The upgrade request head, with the token in the chosen carrier.
pub fn request_head(target: &Target, key: &str, token: Option<&str>, opts: &ClientOpts) -> String {
    let mut path = target.path.clone();
    if let (Some(t), Carrier::Query) = (token, opts.carrier) {
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str("access_token=");
        path.push_str(t);
    }
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        target.host_header
    );
    if let Some(o) = &opts.origin {
        head.push_str(&format!("Origin: {o}\r\n"));
    }
    if let Some(t) = token {
        match opts.carrier {
            Carrier::Header => head.push_str(&format!("Authorization: Bearer {t}\r\n")),
            Carrier::Subprotocol => head.push_str(&format!("Sec-WebSocket-Protocol: bearer, {t}\r\n")),
            Carrier::Cookie => head.push_str(&format!("Cookie: {}={t}\r\n", opts.cookie_name)),
            Carrier::Query => {}
        }
    }
    head.push_str("\r\n");
    head
}

/// A parsed HTTP response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Parses a response head at the start of `buf`: `Ok(None)` if the blank
/// line has not arrived yet, else the response and the bytes it took.
pub fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>, &'static str> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err("head_too_large");
        }
        // Something that cannot be HTTP is refused early.
        let probe = &buf[..buf.len().min(5)];
        if !b"HTTP/".starts_with(probe) {
            return Err("not_http");
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "not_utf8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err("not_http");
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or("bad_status")?;
    let mut headers = Vec::new();
    for line in lines {
        let (n, v) = line.split_once(':').ok_or("bad_header")?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some((Response { status, headers }, end + 4)))
}

/// Reads `key="value"` (or `key=value`) out of a `WWW-Authenticate` value.
fn auth_param(header: &str, key: &str) -> Option<String> {
    let mut rest = header;
    while let Some(i) = rest.find(key) {
        let before = rest[..i].chars().last();
        let after = &rest[i + key.len()..];
        let boundary = matches!(before, None | Some(' ') | Some(','));
        if let (true, Some(v)) = (boundary, after.trim_start().strip_prefix('=')) {
            let v = v.trim_start();
            return Some(if let Some(q) = v.strip_prefix('"') {
                q.split('"').next().unwrap_or_default().to_string()
            } else {
                v.split([',', ' ']).next().unwrap_or_default().to_string()
            });
        }
        rest = after;
    }
    None
}

/// The short reason of a refusal: for a 401, the Bearer error (RFC 6750),
/// or `missing_token` when the challenge has none.
pub fn refusal_detail(resp: &Response) -> String {
    if resp.status != 401 {
        return String::new();
    }
    let Some(h) = resp.header("www-authenticate") else {
        return "no_www_authenticate".into();
    };
    match auth_param(h, "error") {
        None => "missing_token".into(),
        Some(e) => match auth_param(h, "error_description") {
            Some(d) if !d.is_empty() => {
                let d: String = d.chars().take(48).collect();
                format!("{e}: {d}")
            }
            _ => e,
        },
    }
}

/// Sends the upgrade request on `stream` and reads the answer. On 101 the
/// returned bytes are whatever followed the head (early frames).
pub async fn handshake(
    stream: &mut Stream,
    target: &Target,
    token: Option<&str>,
    opts: &ClientOpts,
) -> Result<Vec<u8>, Outcome> {
    let key = new_key();
    let head = request_head(target, &key, token, opts);
    let deadline = Instant::now() + opts.response_timeout;
    match timeout_at(deadline, stream.send_all(head.as_bytes())).await {
        Err(_) => return Err(Outcome::Timeout),
        // A peer that closed at once may still have answered: read on.
        Ok(Err(e)) if io_outcome(&e) != Outcome::Reset => return Err(io_outcome(&e)),
        _ => {}
    }
    let mut buf = Vec::with_capacity(256);
    loop {
        match timeout_at(deadline, stream.read_some(&mut buf)).await {
            Err(_) => return Err(Outcome::Timeout),
            Ok(Err(e)) => return Err(io_outcome(&e)),
            Ok(Ok(0)) => {
                return Err(if buf.is_empty() {
                    Outcome::NoAnswer
                } else {
                    Outcome::BadResponse("truncated")
                })
            }
            Ok(Ok(_)) => {}
        }
        let (resp, used) = match parse_response(&buf) {
            Err(why) => return Err(Outcome::BadResponse(why)),
            Ok(None) => continue,
            Ok(Some(r)) => r,
        };
        if resp.status != 101 {
            return Err(Outcome::Rejected { detail: refusal_detail(&resp), status: resp.status });
        }
        if resp.header("sec-websocket-accept") != Some(accept_for(&key).as_str()) {
            return Err(Outcome::BadResponse("bad_accept"));
        }
        let upgrade_ok = resp.header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
        if !upgrade_ok {
            return Err(Outcome::BadResponse("no_upgrade_header"));
        }
        if opts.carrier == Carrier::Subprotocol && token.is_some() {
            // The gateway's 101 names `bearer` only, never echoes the token.
            if resp.header("sec-websocket-protocol") != Some("bearer") {
                return Err(Outcome::BadResponse("bad_subprotocol"));
            }
        }
        return Ok(buf.split_off(used));
    }
}

/// How long an attempt took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// From before the TCP connect to the parsed answer (or the failure).
    pub total: Duration,
    /// The TLS handshake alone (`wss://` only, when it completed).
    pub tls: Option<Duration>,
}

/// Connects (TCP, then TLS for `wss://`), upgrades, and wraps the stream.
pub async fn open(
    target: &Target,
    source: Option<IpAddr>,
    token: Option<&str>,
    opts: &ClientOpts,
) -> (Result<WsConn, Outcome>, Timing) {
    let t0 = Instant::now();
    let tcp = match tcp_connect(target.addr, source, None, opts.connect_timeout).await {
        Ok(s) => s,
        Err(o) => return (Err(o), Timing { total: t0.elapsed(), tls: None }),
    };
    let t1 = Instant::now();
    let mut stream = match secure(tcp, target, opts).await {
        Ok(s) => s,
        Err(o) => return (Err(o), Timing { total: t0.elapsed(), tls: None }),
    };
    let tls = target.tls.then(|| t1.elapsed());
    let res = handshake(&mut stream, target, token, opts).await;
    let timing = Timing { total: t0.elapsed(), tls };
    (res.map(|early| WsConn::new(stream, early, opts.max_message)), timing)
}

/// A data message or the server's close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (bytes as received).
    Text(Vec<u8>),
    /// A binary message.
    Binary(Vec<u8>),
    /// The server closed with this code (if any) and reason.
    Close(Option<u16>, String),
}

/// Why a WebSocket connection ended without a close frame.
#[derive(Debug)]
pub enum WsError {
    /// TCP closed without a close frame.
    Eof,
    /// Reset or another I/O error.
    Io(io::Error),
    /// The server broke RFC 6455.
    Protocol(String),
}

impl WsError {
    /// A bounded label for reports (`eof`, `reset`, `io_error`, `protocol_error`).
    pub fn label(&self) -> &'static str {
        match self {
            WsError::Eof => "eof",
            WsError::Io(e) if io_outcome(e) == Outcome::Reset => "reset",
            WsError::Io(_) => "io_error",
            WsError::Protocol(_) => "protocol_error",
        }
    }
}

impl From<io::Error> for WsError {
    fn from(e: io::Error) -> Self {
        WsError::Io(e)
    }
}

/// An upgraded connection.
pub struct WsConn {
    /// The socket.
    stream: Stream,
    /// Bytes of an incomplete frame; empty (and unallocated) between frames.
    rbuf: Vec<u8>,
    /// A fragmented message being assembled: its opcode and bytes so far.
    partial: Option<(u8, Vec<u8>)>,
    /// Largest message accepted, so a server cannot make us allocate freely.
    max_message: usize,
    /// False for zombies that never answer pings.
    pub answer_pings: bool,
    /// Pings seen from the server (zombie reports show they were sent).
    pub pings_seen: u32,
    /// True once we sent a close frame (so we do not send two).
    close_sent: bool,
}

impl WsConn {
    /// Wraps an upgraded stream with any bytes that followed the 101 head.
    pub fn new(stream: Stream, early: Vec<u8>, max_message: usize) -> Self {
        WsConn {
            stream,
            rbuf: early,
            partial: None,
            max_message,
            answer_pings: true,
            pings_seen: 0,
            close_sent: false,
        }
    }

    /// The stream (for connections dropped with RST).
    pub fn into_stream(self) -> Stream {
        self.stream
    }

    /// Sends one masked frame.
    pub async fn send(&mut self, op: u8, payload: &[u8]) -> io::Result<()> {
        if op == opcode::CLOSE {
            self.close_sent = true;
        }
        let f = frame::client_frame(op, payload);
        self.stream.send_all(&f).await
    }

    /// Reads more bytes into `rbuf`; 0 means EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        self.stream.read_some(&mut self.rbuf).await
    }

    /// Takes one complete frame out of `rbuf`, if there is one.
    fn next_frame(&mut self) -> Result<Option<frame::Frame>, WsError> {
        let decoded = frame::decode(&self.rbuf, self.max_message as u64)
            .map_err(|e| WsError::Protocol(e.to_string()))?;
        let Some((f, used)) = decoded else {
            return Ok(None);
        };
        if used == self.rbuf.len() {
            // Release the buffer: idle connections hold no heap.
            self.rbuf = Vec::new();
        } else {
            self.rbuf.drain(..used);
        }
        Ok(Some(f))
    }

    /// The next data message or close, answering pings on the way (unless
    /// `answer_pings` is off) and assembling fragments.
    pub async fn recv(&mut self) -> Result<Message, WsError> {
        loop {
            while let Some(f) = self.next_frame()? {
                if f.masked {
                    return Err(WsError::Protocol("masked server frame".into()));
                }
                match f.opcode {
                    opcode::PING => {
                        self.pings_seen = self.pings_seen.saturating_add(1);
                        if self.answer_pings {
                            self.send(opcode::PONG, &f.payload).await?;
                        }
                    }
                    opcode::PONG => {}
                    opcode::CLOSE => {
                        let (code, reason) = frame::parse_close(&f.payload);
                        if !self.close_sent {
                            // Echo the code, as RFC 6455 §5.5.1 asks; best-effort.
                            let _ = self.send(opcode::CLOSE, &f.payload[..f.payload.len().min(2)]).await;
                        }
                        return Ok(Message::Close(code, reason));
                    }
                    opcode::CONTINUATION => {
                        let Some((op, mut buf)) = self.partial.take() else {
                            return Err(WsError::Protocol("continuation without start".into()));
                        };
                        if buf.len() + f.payload.len() > self.max_message {
                            return Err(WsError::Protocol("message too large".into()));
                        }
                        buf.extend_from_slice(&f.payload);
                        if f.fin {
                            return Ok(data_message(op, buf));
                        }
                        self.partial = Some((op, buf));
                    }
                    op => {
                        if self.partial.is_some() {
                            return Err(WsError::Protocol("new message inside a fragmented one".into()));
                        }
                        if f.fin {
                            return Ok(data_message(op, f.payload));
                        }
                        self.partial = Some((op, f.payload));
                    }
                }
            }
            if self.fill().await? == 0 {
                return Err(WsError::Eof);
            }
        }
    }

    /// Sends a close frame and waits (bounded) for the server's close or EOF.
    pub async fn close(&mut self, code: u16, wait: Duration) {
        if !self.close_sent && self.send(opcode::CLOSE, &frame::close_payload(code, "")).await.is_err() {
            return;
        }
        let _ = timeout(wait, async {
            loop {
                match self.recv().await {
                    Ok(Message::Close(..)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

fn data_message(op: u8, payload: Vec<u8>) -> Message {
    if op == opcode::TEXT {
        Message::Text(payload)
    } else {
        Message::Binary(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(accept_for("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(new_key()).unwrap().len(), 16);
    }

    #[test]
    fn request_carries_token_in_each_carrier() {
        let t = crate::target::parse_ws_url("ws://127.0.0.1:8080/ws?a=1").unwrap();
        let mut o = ClientOpts::default();
        let h = request_head(&t, "k", Some("T"), &o);
        assert!(h.starts_with("GET /ws?a=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(h.contains("\r\nAuthorization: Bearer T\r\n"));
        assert!(h.ends_with("\r\n\r\n"));
        o.carrier = Carrier::Subprotocol;
        assert!(request_head(&t, "k", Some("T"), &o).contains("Sec-WebSocket-Protocol: bearer, T\r\n"));
        o.carrier = Carrier::Query;
        assert!(request_head(&t, "k", Some("T"), &o).starts_with("GET /ws?a=1&access_token=T "));
        o.carrier = Carrier::Cookie;
        o.origin = Some("http://x".into());
        let h = request_head(&t, "k", Some("T"), &o);
        assert!(h.contains("Cookie: portcullis_token=T\r\n") && h.contains("Origin: http://x\r\n"));
        assert!(!request_head(&t, "k", None, &o).contains("Cookie"));
    }

    #[test]
    fn parses_responses() {
        assert_eq!(parse_response(b"HTTP/1.1 101 Swi"), Ok(None));
        assert_eq!(parse_response(b"HT"), Ok(None));
        assert_eq!(parse_response(b"SSH-2.0"), Err("not_http"));
        let (r, n) =
            parse_response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00")
                .unwrap()
                .unwrap();
        assert_eq!((r.status, n), (101, 56));
        assert_eq!(r.header("UPGRADE"), Some("websocket"));
        assert_eq!(parse_response(b"HTTP/1.1 abc\r\n\r\n"), Err("bad_status"));
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n"), Err("bad_header"));
    }

    #[test]
    fn refusal_details() {
        let r = |status, h: Option<&str>| Response {
            status,
            headers: h.map(|v| vec![("WWW-Authenticate".to_string(), v.to_string())]).unwrap_or_default(),
        };
        assert_eq!(refusal_detail(&r(401, Some("Bearer realm=\"portcullis\""))), "missing_token");
        assert_eq!(
            refusal_detail(&r(
                401,
                Some("Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"token expired\"")
            )),
            "invalid_token: token expired"
        );
        assert_eq!(refusal_detail(&r(401, Some("Bearer error=invalid_token"))), "invalid_token");
        assert_eq!(refusal_detail(&r(401, None)), "no_www_authenticate");
        assert_eq!(refusal_detail(&r(429, None)), "");
        let o = Outcome::Rejected { status: 401, detail: "missing_token".into() };
        assert_eq!((o.status_key(), o.reason_key()), ("401".into(), "401 missing_token".into()));
        assert_eq!(Outcome::NoAnswer.reason_key(), "closed");
    }
}
