//! Stage 6, the upstream: connect to a backend **before** answering 101,
//! carrying the identity and the client's request across.
//!
//! Request-target upstream: outside any route, the backend URL's path as a
//! prefix, then the client's path and query without `access_token`
//! (`ws://b:9000/api` and a client on `/chat?room=1` → `/api/chat?room=1`);
//! within a route, the matched prefix replaced by the URL's path.
//!
//! This file is one backend connection (the request, the handshake, the
//! transport); the rooms beside it:
//! - [`pool`]: the backends of each route, their choice (balance), retries
//!   and connection accounting, drain;
//! - [`health`]: active checks and the hysteresis;
//! - [`route`]: which pool a request path goes to;
//! - [`tls`]: `wss://` toward backends (roots, SNI, client certificates).

pub mod health;
pub mod pool;
pub mod route;
pub mod tls;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::Request;

use crate::auth::{carrier, Identity};
use crate::client_addr::is_trusted;
pub use crate::config::UpstreamUrl;
use crate::config::{Carrier, Config};
use crate::handshake::RequestHead;
pub use crate::header::reserved_header;
use crate::header::NOT_FORWARDED;

/// Largest response head accepted from the backend.
const MAX_RESPONSE_HEAD_BYTES: usize = 8192;

/// May a client-sent header go upstream? `reserved` are header names only
/// the gateway may set (claim headers, the authenticator's identity
/// headers); the client's own `Connection` names are checked by
/// [`request_headers`].
pub fn forwardable(name: &str, reserved: &[&str]) -> bool {
    let lower = name.to_ascii_lowercase();
    !(NOT_FORWARDED.contains(&lower.as_str())
        || lower.starts_with("sec-websocket-")
        || lower.starts_with("x-portcullis-")
        || reserved.iter().any(|c| c.eq_ignore_ascii_case(name)))
}

/// Header names the client lists in its `Connection` header: hop-by-hop by
/// its own declaration (RFC 9110 §7.6.1), so never forwarded.
fn connection_named(head: &RequestHead) -> Vec<String> {
    head.headers_named("connection")
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Every header sent upstream besides the handshake's own (stage 6):
/// the client's forwardable headers (with the cookie carrier's cookie
/// removed from `Cookie`), then `X-Portcullis-Sub`, the identity's headers,
/// and `X-Forwarded-For` with the client appended. `peer` is the TCP peer
/// (its `X-Forwarded-For` is kept only when it is a trusted proxy);
/// `client` the client as resolved.
///
/// `claims` are the claim headers of the chosen pool: the identity's other
/// forwarded claims (another route's) are not sent, yet every pool's claim
/// header names are stripped from what the client sent.
pub fn request_headers(
    head: &RequestHead,
    identity: &Identity,
    claims: &BTreeMap<String, String>,
    cfg: &Config,
    peer: SocketAddr,
    client: SocketAddr,
) -> Vec<(String, String)> {
    let every = cfg.upstream.every_claim_header();
    let mut reserved: Vec<&str> = every.clone().collect();
    reserved.extend(identity.forward.iter().map(|(n, _)| n.as_str()));
    let hop = connection_named(head);
    let strip_cookie = cfg.auth.carriers.contains(&Carrier::Cookie);
    let mut headers: Vec<(String, String)> = Vec::with_capacity(head.headers.len() + 4);
    for (name, value) in &head.headers {
        if !forwardable(name, &reserved) || hop.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            continue;
        }
        if strip_cookie && name.eq_ignore_ascii_case("cookie") {
            if let Some(rest) = carrier::without_cookie(value, &cfg.auth.cookie_name) {
                headers.push((name.clone(), rest));
            }
            continue;
        }
        headers.push((name.clone(), value.clone()));
    }
    headers.push(("X-Portcullis-Sub".into(), identity.sub.clone()));
    // A claim header is the pool's when it names it; an authenticator's
    // own identity headers (not claim headers at all) always go.
    let claim_named = |n: &str| every.clone().any(|h| h.eq_ignore_ascii_case(n));
    let ours = |n: &str| claims.values().any(|h| h.eq_ignore_ascii_case(n));
    headers.extend(identity.forward.iter().filter(|(n, _)| !claim_named(n) || ours(n)).cloned());
    let mut xff: Vec<String> = if is_trusted(&cfg.listen.trusted_proxies, peer.ip()) {
        head.headers_named("x-forwarded-for").map(str::to_string).collect()
    } else {
        Vec::new()
    };
    let client_ip = client.ip().to_string();
    let last_hop = xff.last().and_then(|v| v.rsplit(',').next()).map(str::trim);
    if last_hop != Some(client_ip.as_str()) {
        xff.push(client_ip);
    }
    headers.push(("X-Forwarded-For".into(), xff.join(", ")));
    headers
}

/// An upgraded backend connection, as the session relays it.
///
/// Boxed slices rather than `Vec`s and `String`s: the connection task
/// reserves room for this struct (twice) for the whole life of the
/// session, so every word here is paid per connection.
#[derive(Debug)]
pub struct Backend {
    pub io: BackendIo,
    /// Bytes the backend sent right behind its 101 (frames already).
    pub rest: Box<[u8]>,
    /// The subprotocol the backend chose, if any.
    pub protocol: Option<Box<str>>,
    /// The backend's `Sec-WebSocket-Extensions` answer, for the client's 101.
    pub extensions: Option<Box<str>>,
    /// `permessage-deflate` was agreed: RSV1 may be set on messages.
    pub deflate: bool,
    /// Counts this connection against its backend (`/admin/backends`, the
    /// `least_connections` choice, drain) until the session drops it.
    pub lease: Option<pool::Lease>,
}

/// A backend transport: TCP, or TLS over it (`wss://`). The TLS state is
/// boxed: plain backends do not carry its room.
#[derive(Debug)]
pub enum BackendIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BackendIo {
    /// The socket, when nothing but the kernel holds the connection's
    /// state (a TLS session's is in this process: it cannot be handed over).
    pub fn plain_fd(&self) -> Option<std::os::fd::RawFd> {
        match self {
            BackendIo::Plain(t) => Some(std::os::fd::AsRawFd::as_raw_fd(t)),
            BackendIo::Tls(_) => None,
        }
    }
}

impl AsyncRead for BackendIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(t) => Pin::new(t).poll_read(cx, buf),
            BackendIo::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(t) => Pin::new(t).poll_write(cx, buf),
            BackendIo::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            BackendIo::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendIo::Plain(t) => t.is_write_vectored(),
            BackendIo::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(t) => Pin::new(t).poll_flush(cx),
            BackendIo::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(t) => Pin::new(t).poll_shutdown(cx),
            BackendIo::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The upgrade request for one backend connection, built and checked
/// before the connection opens: while a busy backend is slow to answer,
/// the handshake holds these bytes and what the answer is checked against,
/// not the client's head and the header map it was built from.
pub struct Offer {
    head: Vec<u8>,
    key: String,
    subprotocols: Vec<String>,
    extensions: Option<String>,
}

impl Offer {
    /// Offers the client's subprotocols and extensions
    /// (`Sec-WebSocket-Extensions`, passed as the client wrote it: the
    /// frames pass through verbatim, so whatever the two ends agree on is
    /// theirs).
    pub fn new(
        url: &UpstreamUrl,
        target: &str,
        headers: &[(String, String)],
        subprotocols: Vec<String>,
        extensions: Option<String>,
    ) -> Result<Offer, String> {
        let key = generate_key();
        // Built with `http` so every name and value is validated (a claim
        // forwarded as a header cannot smuggle CR/LF), then written by hand.
        let mut req = Request::builder()
            .method("GET")
            .uri(target)
            .header("Host", &url.authority)
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", &key);
        if !subprotocols.is_empty() {
            req = req.header("Sec-WebSocket-Protocol", subprotocols.join(", "));
        }
        if let Some(e) = &extensions {
            req = req.header("Sec-WebSocket-Extensions", e);
        }
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(()).map_err(|e| format!("request: {e}"))?;
        // The handshake is done here rather than by tokio-tungstenite's
        // client: the session relays raw frames and keeps no read buffer
        // of its own per connection.
        let mut head = Vec::with_capacity(512);
        head.extend_from_slice(b"GET ");
        head.extend_from_slice(req.uri().to_string().as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in req.headers() {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        Ok(Offer { head, key, subprotocols, extensions })
    }
}

/// Opens the backend WebSocket within `timeout` and makes `offer`; a
/// `wss://` URL through `tls` (its verification name given by
/// [`tls::Tls::connector`]).
pub async fn connect(
    url: &UpstreamUrl,
    tls: Option<(&TlsConnector, rustls::pki_types::ServerName<'static>)>,
    offer: Offer,
    timeout: Duration,
) -> Result<Backend, String> {
    let attempt = async {
        let Offer { head, key, subprotocols, extensions } = offer;
        // Boxed: the connect is short, the wait for the answer can be
        // long, and this future keeps the room of its largest state.
        let tcp = Box::pin(TcpStream::connect(&url.authority)).await.map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut io = match (url.tls, tls) {
            (false, _) => BackendIo::Plain(tcp),
            (true, Some((connector, name))) => BackendIo::Tls(Box::new(
                Box::pin(connector.connect(name, tcp)).await.map_err(|e| format!("tls: {e}"))?,
            )),
            (true, None) => return Err("tls: no TLS configuration for a wss:// backend".into()),
        };
        io.write_all(&head).await.map_err(|e| format!("handshake: {e}"))?;
        io.flush().await.map_err(|e| format!("handshake: {e}"))?;
        drop(head);
        let answer = read_upgrade_answer(&mut io, &key, &subprotocols, extensions.as_deref()).await?;
        Ok(Backend {
            io,
            rest: answer.rest.into_boxed_slice(),
            protocol: answer.protocol.map(String::into_boxed_str),
            deflate: answer.extensions.as_deref().is_some_and(agrees_deflate),
            extensions: answer.extensions.map(String::into_boxed_str),
            lease: None,
        })
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| "connect timeout".to_string())?
}

/// Reads the backend's answer to the upgrade and checks it (RFC 6455
/// §4.1): 101, `Upgrade: websocket`, `Connection: upgrade`, the accept key,
/// a subprotocol only among those offered, extensions only among those
/// offered.
async fn read_upgrade_answer<S: AsyncRead + Unpin>(
    tcp: &mut S,
    key: &str,
    offered: &[String],
    offered_extensions: Option<&str>,
) -> Result<Answer, String> {
    // Read straight into `buf`: a buffer on the stack would sit in this
    // future, which waits as long as the backend takes to answer.
    let mut buf = Vec::with_capacity(512);
    let end = loop {
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(512);
        }
        let from = buf.len().saturating_sub(3);
        let n = tcp.read_buf(&mut buf).await.map_err(|e| format!("handshake: {e}"))?;
        if n == 0 {
            return Err("handshake: the backend closed before answering".into());
        }
        if let Some(end) = crate::handshake::find_head_end(&buf, from) {
            break end;
        }
        if buf.len() > MAX_RESPONSE_HEAD_BYTES {
            return Err("handshake: response head too large".into());
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("handshake: malformed response".into()),
    }
    if resp.code != Some(101) {
        return Err(format!("handshake: status {}", resp.code.unwrap_or(0)));
    }
    let value = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        value(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err("handshake: not an upgrade".into());
    }
    if value("sec-websocket-accept") != Some(derive_accept_key(key.as_bytes()).as_str()) {
        return Err("handshake: bad Sec-WebSocket-Accept".into());
    }
    let proto = value("sec-websocket-protocol").map(str::to_string);
    if let Some(p) = &proto {
        if !offered.iter().any(|o| o == p) {
            return Err(format!("handshake: subprotocol {p:?} was not offered"));
        }
    }
    let extensions = {
        let all: Vec<&str> = resp
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        (!all.is_empty()).then(|| all.join(", "))
    };
    if let Some(e) = &extensions {
        let names = |list: &str| -> Vec<String> {
            list.split(',')
                .filter_map(|x| x.split(';').next())
                .map(|n| n.trim().to_ascii_lowercase())
                .collect()
        };
        let offered = names(offered_extensions.unwrap_or(""));
        if let Some(n) = names(e).into_iter().find(|n| !offered.contains(n)) {
            return Err(format!("handshake: extension {n:?} was not offered"));
        }
    }
    Ok(Answer { protocol: proto, extensions, rest: buf[end..].to_vec() })
}

/// What the backend's 101 said, and what it sent behind it.
struct Answer {
    protocol: Option<String>,
    extensions: Option<String>,
    rest: Vec<u8>,
}

/// Does an extensions answer agree on `permessage-deflate` (RFC 7692)?
pub fn agrees_deflate(extensions: &str) -> bool {
    extensions
        .split(',')
        .filter_map(|e| e.split(';').next())
        .any(|n| n.trim().eq_ignore_ascii_case("permessage-deflate"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = UpstreamUrl::parse("ws://127.0.0.1:9000/api/").unwrap();
        assert_eq!(u.authority, "127.0.0.1:9000");
        assert_eq!(u.target_for("/chat?x=1"), "/api/chat?x=1");
        assert_eq!(UpstreamUrl::parse("ws://backend").unwrap().authority, "backend:80");
        assert_eq!(UpstreamUrl::parse("ws://[::1]:9/").unwrap().authority, "[::1]:9");
        assert!(UpstreamUrl::parse("http://x").is_none());
        assert!(UpstreamUrl::parse("ws://x:notaport/").is_none());
    }

    #[test]
    fn refuses_bad_urls() {
        for bad in [
            "",
            "ws://",
            "ws:///path",
            "WS-ish://backend/",
            "ws://backend:65536/",
            "ws://backend:-1/",
            "ws://user:pw@backend:9000/",
            "ws://backend:9000/api?x=1",
            "ws://backend:9000/api#frag",
            "ws://back end:9000/",
            "ws://backend:9000/a b",
            "ws://[::1/",
            "ws://backend:9000/\r\nHost: evil",
            "backend:9000",
        ] {
            assert_eq!(UpstreamUrl::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keeps_the_prefix_and_defaults_the_port() {
        let u = UpstreamUrl::parse("ws://backend").unwrap();
        assert_eq!((u.authority.as_str(), u.prefix.as_str()), ("backend:80", ""));
        assert_eq!(u.target_for("/chat"), "/chat");
        let u = UpstreamUrl::parse("ws://10.0.0.7:9000/a/b/").unwrap();
        assert_eq!((u.authority.as_str(), u.prefix.as_str()), ("10.0.0.7:9000", "/a/b"));
        assert_eq!(UpstreamUrl::parse("ws://[2001:db8::1]/").unwrap().authority, "[2001:db8::1]:80");
    }

    #[test]
    fn deflate_agreement_is_read_from_the_answer() {
        assert!(agrees_deflate("permessage-deflate; client_max_window_bits=15"));
        assert!(agrees_deflate("x-other, Permessage-Deflate"));
        assert!(!agrees_deflate("x-webkit-deflate-frame"));
    }

    #[test]
    fn strips_what_only_the_gateway_may_set() {
        let claims = ["X-User-Role"];
        assert!(forwardable("Cookie", &claims));
        assert!(forwardable("User-Agent", &claims));
        for h in ["X-Portcullis-Sub", "x-user-role", "Authorization", "Sec-WebSocket-Key", "X-Forwarded-For"]
        {
            assert!(!forwardable(h, &claims), "{h}");
        }
    }
}
