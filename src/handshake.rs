//! Stage 3, the handshake: read the request head under a total deadline and
//! a size limit, validate it as an RFC 6455 upgrade, and write the answers
//! (the 101, and every refusal status).
//!
//! The head is read and parsed here (`httparse`) rather than inside
//! tungstenite, so that the deadline is total (slowloris), the 431 is ours,
//! authentication can be async, and the per-connection buffers stay small.

use std::fmt::Display;
use std::io::Write;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::admit::slots::{Attempt, Verdict};
use crate::reject::Reject;

/// Headers beyond this count answer 431, like an oversized head.
const MAX_HEADERS: usize = 64;
/// How long a refusal may take to write before the socket is just dropped.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What every check of a request head reads. Two heads implement it: the
/// owned [`RequestHead`] the pipeline carries (authenticators, upstream)
/// and the borrowed [`HeadView`] of the refusal fast path, which must not
/// allocate; each check is written once, against this trait.
pub trait Request {
    fn method(&self) -> &str;
    /// The request-target as sent: `/path?query`.
    fn target(&self) -> &str;
    /// Every header line in order: name as sent, value trimmed.
    fn headers(&self) -> impl Iterator<Item = (&str, &str)>;

    fn path(&self) -> &str {
        let t = self.target();
        t.split_once('?').map_or(t, |(p, _)| p)
    }

    fn query(&self) -> Option<&str> {
        self.target().split_once('?').map(|(_, q)| q)
    }

    /// The first header of that name (case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v)
    }

    fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v)
    }

    /// Does any header of that name hold `token` in its comma list?
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers_named(name).any(|v| crate::header::list_has_token(v, token))
    }
}

/// A parsed request head, as authenticators and the upstream see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request-target as sent: `/path?query`.
    pub target: String,
    /// Every header line in order, names as sent.
    pub headers: Vec<(String, String)>,
}

/// The [`Request`] accessors without importing the trait: authenticators
/// (an extension point) read the head this way.
impl RequestHead {
    pub fn path(&self) -> &str {
        Request::path(self)
    }

    pub fn query(&self) -> Option<&str> {
        Request::query(self)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        Request::header(self, name)
    }

    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        Request::headers_named(self, name)
    }

    pub fn has_token(&self, name: &str, token: &str) -> bool {
        Request::has_token(self, name, token)
    }
}

impl Request for RequestHead {
    fn method(&self) -> &str {
        &self.method
    }

    fn target(&self) -> &str {
        &self.target
    }

    fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

/// A request head borrowed from the bytes it was parsed from, on the
/// stack: what the refusal fast path judges without allocating.
pub struct HeadView<'a> {
    method: &'a str,
    target: &'a str,
    headers: [(&'a str, &'a str); MAX_HEADERS],
    len: usize,
}

impl Request for HeadView<'_> {
    fn method(&self) -> &str {
        self.method
    }

    fn target(&self) -> &str {
        self.target
    }

    fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers[..self.len].iter().copied()
    }
}

impl HeadView<'_> {
    /// The owned head, for the stages after a fast-path verdict.
    pub fn to_owned(&self) -> RequestHead {
        RequestHead {
            method: self.method.to_string(),
            target: self.target.to_string(),
            headers: self.headers().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        }
    }
}

/// Why reading a head failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The deadline passed; `started` tells whether any byte had arrived
    /// (408) or none (silent close).
    Timeout {
        started: bool,
    },
    /// The slot was taken by an arrival from a fairer address (408).
    Shed,
    TooLarge,
    Malformed,
    /// The peer closed or the socket failed before a complete head.
    Closed,
}

impl ReadError {
    pub fn reject(&self) -> Reject {
        match self {
            ReadError::Timeout { .. } | ReadError::Closed => Reject::HandshakeTimeout,
            ReadError::Shed => Reject::HandshakeShed,
            ReadError::TooLarge => Reject::HeaderTooLarge,
            ReadError::Malformed => Reject::BadRequest,
        }
    }
}

/// A complete head and the bytes that followed it in the same reads
/// (a request body, or frames a client sent before the 101).
#[derive(Debug)]
pub struct Head {
    pub head: RequestHead,
    pub rest: Vec<u8>,
}

/// Bytes read per call, through a buffer on the stack of one poll: a
/// socket waiting for more keeps only what it has received.
const READ_CHUNK: usize = 2048;

/// Reads a request head until the slot table ends `attempt` (deadline or
/// shed) and at most `max_bytes`, after the bytes already read into `buf`
/// (the accept loop's speculative read).
///
/// Parsing runs only when the blank line has arrived, so a byte-at-a-time
/// client costs a scan of the new bytes, not a re-parse per byte; the
/// request line is checked as it arrives ([`LineCheck`]), so bytes that
/// cannot begin an HTTP request are refused at once, not at the deadline.
pub async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    attempt: &Attempt,
    max_bytes: usize,
    mut buf: Vec<u8>,
) -> Result<Head, ReadError> {
    let mut line = LineCheck::default();
    if !line.feed(&buf) {
        return Err(ReadError::Malformed);
    }
    let mut scanned = 0;
    loop {
        attempt.progress(buf.len());
        if let Some(end) = find_head_end(&buf, scanned) {
            let head = parse(&buf[..end])?;
            let rest = buf.split_off(end);
            attempt.head_done();
            return Ok(Head { head, rest });
        }
        if buf.len() >= max_bytes {
            return Err(ReadError::TooLarge);
        }
        // Back up 3 bytes so a "\r\n\r\n" split across reads is found.
        scanned = buf.len().saturating_sub(3);
        let room = max_bytes - buf.len();
        let got = tokio::select! {
            biased;
            r = read_some(io, &mut buf, room) => Ok(r),
            v = attempt.ended() => Err(v),
        };
        match got {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadError::Closed),
            Ok(Ok(n)) => {
                if !line.feed(&buf[buf.len() - n..]) {
                    return Err(ReadError::Malformed);
                }
            }
            Err(Verdict::Shed) => return Err(ReadError::Shed),
            Err(_) => return Err(ReadError::Timeout { started: !buf.is_empty() }),
        }
    }
}

/// One read of at most `room` bytes, appended to `buf`.
async fn read_some<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    room: usize,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let room = room.min(READ_CHUNK);
        let mut rb = ReadBuf::uninit(&mut chunk[..room]);
        std::task::ready!(std::pin::Pin::new(&mut *io).poll_read(cx, &mut rb))?;
        buf.extend_from_slice(rb.filled());
        std::task::Poll::Ready(Ok(rb.filled().len()))
    })
    .await
}

/// Checks the request line as its bytes arrive: `token SP target SP
/// HTTP/1.1 CRLF`, leading blank lines allowed (RFC 9112 §2.2). Once the
/// line is through it checks nothing more (`httparse` takes the rest), so
/// each byte is looked at once.
#[derive(Default)]
struct LineCheck {
    part: LinePart,
    /// Bytes of the current part so far.
    len: usize,
}

#[derive(Default, PartialEq, Eq)]
enum LinePart {
    #[default]
    Method,
    Target,
    Version,
    Done,
}

/// Longest method accepted (the registered ones are far shorter).
const MAX_METHOD: usize = 24;
const VERSION: &[u8] = b"HTTP/1.1\r\n";

impl LineCheck {
    /// Feeds new bytes; false once they cannot be an HTTP/1.1 request line.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            match self.part {
                LinePart::Done => return true,
                LinePart::Method => match b {
                    b'\r' | b'\n' if self.len == 0 => {}
                    b' ' if self.len > 0 => (self.part, self.len) = (LinePart::Target, 0),
                    _ if is_tchar(b) && self.len < MAX_METHOD => self.len += 1,
                    _ => return false,
                },
                LinePart::Target => match b {
                    b' ' if self.len > 0 => (self.part, self.len) = (LinePart::Version, 0),
                    0x21..=0x7e | 0x80..=0xff => self.len += 1,
                    _ => return false,
                },
                LinePart::Version => {
                    if VERSION.get(self.len) != Some(&b) {
                        return false;
                    }
                    self.len += 1;
                    if self.len == VERSION.len() {
                        self.part = LinePart::Done;
                    }
                }
            }
        }
        true
    }
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The index just past the first blank line at or after `from`: the end
/// of an HTTP head (requests here, the backend's answer in `upstream`).
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(4).position(|w| w == b"\r\n\r\n").map(|i| from + i + 4)
}

/// Parses a complete head. Exposed for the parser bench and fuzzing.
pub fn parse(bytes: &[u8]) -> Result<RequestHead, ReadError> {
    parse_view(bytes).map(|v| v.to_owned())
}

/// Parses a complete head without allocating: the one parser, under both
/// [`parse`] and the refusal fast path.
pub fn parse_view(bytes: &[u8]) -> Result<HeadView<'_>, ReadError> {
    // The request line's own rule, which `read_head` applies as bytes
    // arrive (stricter than `httparse`: CRLF, HTTP/1.1 only), so that a head
    // judged whole on arrival meets exactly the same rule.
    if !LineCheck::default().feed(bytes) {
        return Err(ReadError::Malformed);
    }
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(ReadError::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(ReadError::TooLarge),
        Err(_) => return Err(ReadError::Malformed),
    }
    if req.version != Some(1) {
        return Err(ReadError::Malformed);
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(ReadError::Malformed);
    };
    let mut view = HeadView { method, target, headers: [("", ""); MAX_HEADERS], len: 0 };
    for (slot, h) in view.headers.iter_mut().zip(req.headers.iter()) {
        let value = std::str::from_utf8(h.value).map_err(|_| ReadError::Malformed)?;
        *slot = (h.name, value.trim());
        view.len += 1;
    }
    Ok(view)
}

/// Checks a head as an RFC 6455 upgrade (the path was checked before).
/// Returns the `Sec-WebSocket-Key` on success.
pub fn validate_upgrade<R: Request>(head: &R) -> Result<&str, Reject> {
    refuse_duplicates(head)?;
    if head.method() != "GET" || head.header("host").is_none() {
        return Err(Reject::BadRequest);
    }
    if !head.has_token("upgrade", "websocket") || !head.has_token("connection", "upgrade") {
        return Err(Reject::BadRequest);
    }
    match head.header("sec-websocket-version") {
        Some("13") => {}
        _ => return Err(Reject::BadVersion),
    }
    let key = head.header("sec-websocket-key").ok_or(Reject::BadRequest)?;
    // A 16-byte nonce is 24 base64 characters, at most 18 bytes decoded:
    // a stack buffer, no allocation.
    let mut raw = [0u8; 18];
    match base64::engine::general_purpose::STANDARD.decode_slice(key, &mut raw) {
        Ok(16) => Ok(key),
        _ => Err(Reject::BadRequest),
    }
}

/// Headers that must appear at most once: the gateway reads the first, a
/// backend or an intermediary might believe another (request smuggling
/// between what was checked and what is acted on).
pub const SINGLE_HEADERS: [&str; 5] =
    ["host", "origin", "sec-websocket-key", "sec-websocket-version", "authorization"];

/// Refuses (400) a head repeating any of [`SINGLE_HEADERS`].
fn refuse_duplicates<R: Request>(head: &R) -> Result<(), Reject> {
    if SINGLE_HEADERS.iter().any(|name| head.headers_named(name).nth(1).is_some()) {
        return Err(Reject::BadRequest);
    }
    Ok(())
}

/// Is the request's `Origin` acceptable? An absent `Origin` is a
/// non-browser client and passes; an empty allow-list allows any.
pub fn origin_allowed<R: Request>(head: &R, allowed: &[String]) -> bool {
    match head.header("origin") {
        None => true,
        Some(_) if allowed.is_empty() => true,
        Some(o) => allowed.iter().any(|a| a.eq_ignore_ascii_case(o)),
    }
}

/// The 101 answer. `protocol` is the one subprotocol named back, if any.
/// `extensions`: the backend's `Sec-WebSocket-Extensions` answer, passed
/// through in proxy mode.
pub fn switching_protocols(key: &str, protocol: Option<&str>, extensions: Option<&str>) -> Vec<u8> {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = protocol {
        r.push_str("Sec-WebSocket-Protocol: ");
        r.push_str(p);
        r.push_str("\r\n");
    }
    if let Some(e) = extensions {
        r.push_str("Sec-WebSocket-Extensions: ");
        r.push_str(e);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A complete `Connection: close` response.
pub fn response(status: u16, extra_headers: &[(&str, String)], content_type: &str, body: &str) -> Vec<u8> {
    let extra: Vec<(&str, &dyn Display)> =
        extra_headers.iter().map(|(k, v)| (*k, v as &dyn Display)).collect();
    let mut out = Vec::with_capacity(256 + body.len());
    // Writing into a Vec cannot fail.
    let _ = write_response(&mut out, status, &extra, content_type, &[body]);
    out
}

/// [`response`] into any writer, the body given in parts: the refusal
/// fast path writes it into a stack buffer.
fn write_response(
    out: &mut impl Write,
    status: u16,
    extra_headers: &[(&str, &dyn Display)],
    content_type: &str,
    body: &[&str],
) -> std::io::Result<()> {
    let len: usize = body.iter().map(|b| b.len()).sum();
    write!(
        out,
        "HTTP/1.1 {status} {}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nCache-Control: no-store\r\n",
        reason_phrase(status),
    )?;
    for (k, v) in extra_headers {
        write!(out, "{k}: {v}\r\n")?;
    }
    out.write_all(b"\r\n")?;
    for b in body {
        out.write_all(b.as_bytes())?;
    }
    Ok(())
}

/// The answer to a refusal: status, the headers tied to it, and the
/// reason as a short plain-text body.
pub fn refusal(reason: Reject, status: u16, retry_after_s: Option<u64>) -> Vec<u8> {
    refusal_described(reason, status, retry_after_s, None)
}

/// [`refusal`] with a token reason's `error_description` told instead of
/// the reason's generic one (a fixed text without quotes).
pub fn refusal_described(
    reason: Reject,
    status: u16,
    retry_after_s: Option<u64>,
    description: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(384);
    // Writing into a Vec cannot fail.
    let _ = write_refusal(&mut out, reason, status, retry_after_s, description);
    out
}

/// A refusal answer written in place, without allocating.
pub fn write_refusal(
    out: &mut impl Write,
    reason: Reject,
    status: u16,
    retry_after_s: Option<u64>,
    description: Option<&str>,
) -> std::io::Result<()> {
    /// The `WWW-Authenticate` challenge of a token refusal.
    struct Challenge<'a>(&'a str);
    impl Display for Challenge<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"{}\"",
                self.0
            )
        }
    }
    const REALM: &str = "Bearer realm=\"portcullis\"";
    const VERSION_13: &str = "13";
    let challenge;
    let mut extra: [(&str, &dyn Display); 2] = [("", &""), ("", &"")];
    let mut n = 0;
    match reason {
        Reject::MissingToken => {
            extra[n] = ("WWW-Authenticate", &REALM);
            n += 1;
        }
        Reject::InvalidToken | Reject::ExpiredToken | Reject::RevokedToken => {
            challenge = Challenge(description.or(reason.token_error()).unwrap_or("the token is invalid"));
            extra[n] = ("WWW-Authenticate", &challenge);
            n += 1;
        }
        Reject::BadVersion => {
            extra[n] = ("Sec-WebSocket-Version", &VERSION_13);
            n += 1;
        }
        _ => {}
    }
    let retry;
    if let Some(s) = retry_after_s {
        retry = s;
        extra[n] = ("Retry-After", &retry);
        n += 1;
    }
    write_response(out, status, &extra[..n], "text/plain; charset=utf-8", &[reason.label(), "\n"])
}

/// Writes a final answer and closes our side, bounded in time: a peer that
/// does not read cannot hold the task.
pub async fn answer_and_close<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) {
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        io.write_all(bytes).await?;
        io.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"GET /chat?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn parses_and_validates_a_firefox_style_upgrade() {
        let h = parse(GOOD).unwrap();
        assert_eq!(h.path(), "/chat");
        assert_eq!(h.query(), Some("x=1"));
        assert_eq!(validate_upgrade(&h), Ok("dGhlIHNhbXBsZSBub25jZQ=="));
    }

    #[test]
    fn refuses_bad_upgrades_with_the_right_reason() {
        let text = std::str::from_utf8(GOOD).unwrap();
        let cases = [
            (text.replace("GET", "POST"), Reject::BadRequest),
            (text.replace("Upgrade: websocket", "Upgrade: h2c"), Reject::BadRequest),
            (text.replace("keep-alive, Upgrade", "keep-alive"), Reject::BadRequest),
            (text.replace("Version: 13", "Version: 8"), Reject::BadVersion),
            (text.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="), Reject::BadRequest),
            (text.replace("Host: h\r\n", ""), Reject::BadRequest),
            (text.replace("Host: h\r\n", "Host: h\r\nhost: evil\r\n"), Reject::BadRequest),
            (text.replace("Host: h\r\n", "Host: h\r\nOrigin: a\r\nOrigin: b\r\n"), Reject::BadRequest),
            (text.replace("Host: h\r\n", "Host: h\r\nSec-WebSocket-Version: 13\r\n"), Reject::BadRequest),
            (
                text.replace("Host: h\r\n", "Host: h\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
                Reject::BadRequest,
            ),
            (
                text.replace(
                    "Host: h\r\n",
                    "Host: h\r\nAuthorization: Bearer a\r\nauthorization: Bearer b\r\n",
                ),
                Reject::BadRequest,
            ),
        ];
        for (req, want) in cases {
            let h = parse(req.as_bytes()).unwrap();
            assert_eq!(validate_upgrade(&h), Err(want), "{req}");
        }
    }

    #[test]
    fn http10_and_garbage_are_malformed() {
        assert_eq!(parse(b"GET / HTTP/1.0\r\n\r\n"), Err(ReadError::Malformed));
        assert_eq!(parse(b"\x16\x03\x01garbage\r\n\r\n"), Err(ReadError::Malformed));
    }

    fn attempt() -> Attempt {
        Attempt::new(tokio::time::Instant::now())
    }

    #[tokio::test]
    async fn head_split_across_reads_and_rest_kept() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let w = tokio::spawn(async move {
            for chunk in GOOD.chunks(7) {
                b.write_all(chunk).await.unwrap();
            }
            b.write_all(b"extra").await.unwrap();
            b
        });
        let got = read_head(&mut a, &attempt(), 8192, Vec::new()).await.unwrap();
        assert_eq!(got.head.path(), "/chat");
        let _b = w.await.unwrap();
        assert!(b"extra".starts_with(&got.rest));
    }

    #[tokio::test]
    async fn oversized_head_is_too_large() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        b.write_all(b"GET /").await.unwrap();
        b.write_all(&[b'a'; 600]).await.unwrap();
        assert_eq!(read_head(&mut a, &attempt(), 512, Vec::new()).await.unwrap_err(), ReadError::TooLarge);
    }

    #[tokio::test]
    async fn garbage_is_refused_at_once_not_at_the_deadline() {
        for garbage in
            [&b"\x16\x03\x01\x02\x00\x01"[..], b"GET / HTTP/1.0\r\n", b"PRI * HTTP/2.0\r\n", b"GET\x00"]
        {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            b.write_all(garbage).await.unwrap();
            // The writer stays open: only the bytes can end the read.
            let got =
                tokio::time::timeout(Duration::from_secs(2), read_head(&mut a, &attempt(), 8192, Vec::new()))
                    .await;
            assert_eq!(
                got.expect("answered without waiting").unwrap_err(),
                ReadError::Malformed,
                "{garbage:?}"
            );
            drop(b);
        }
    }

    #[test]
    fn request_line_check_accepts_real_requests_byte_by_byte() {
        for good in [GOOD, b"\r\nGET http://h/x?y HTTP/1.1\r\nHost: h\r\n\r\n", b"POST /login HTTP/1.1\r\n"] {
            let mut c = LineCheck::default();
            assert!(good.iter().all(|b| c.feed(std::slice::from_ref(b))), "{good:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_is_total_not_per_read() {
        use crate::admit::slots::{SlotLimits, Slots, SWEEP_EVERY};
        let slots = Slots::new(None);
        let limits = SlotLimits {
            max: 10,
            per_ip: 10,
            timeout: Duration::from_millis(500),
            timeout_min: Duration::from_millis(100),
        };
        let start = tokio::time::Instant::now();
        let permit = slots.admit(None, start, limits).unwrap();
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            loop {
                if b.write_all(b"G").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let sweeper = slots.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                sweeper.sweep(tokio::time::Instant::now(), limits);
            }
        });
        let err = read_head(&mut a, permit.attempt(), 8192, Vec::new()).await.unwrap_err();
        assert_eq!(err, ReadError::Timeout { started: true });
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took <= Duration::from_millis(500) + SWEEP_EVERY,
            "{took:?}"
        );
    }

    #[test]
    fn origin_rules() {
        let mut h = parse(GOOD).unwrap();
        let allowed = vec!["https://app.example".to_string()];
        assert!(origin_allowed(&h, &allowed));
        h.headers.push(("Origin".into(), "https://evil.example".into()));
        assert!(!origin_allowed(&h, &allowed));
        assert!(origin_allowed(&h, &[]));
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let r =
            String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", Some("bearer"), None)).unwrap();
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(r.contains("Sec-WebSocket-Protocol: bearer\r\n"));
    }
}
