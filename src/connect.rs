//! `portcullis connect`: a minimal WebSocket client, for the demo's first
//! minutes and for an operator checking a deployment by hand.
//!
//! Lines read from stdin are sent as text messages, in order; messages
//! received are printed to stdout as they come, one per line. At the end
//! of stdin the client closes with 1000 and waits (briefly) for the
//! server's close. How the connection ended is printed to stderr and
//! becomes the exit status ([`exit_code`]): a close code cannot be an exit
//! status as such (it needs 16 bits), so the mapping is a small table.
//! A refused handshake names its HTTP status and the gateway's reason
//! (`refused: 401 Unauthorized (missing_token)`).
//!
//! `ws://` and `wss://` (rustls; the system's CA bundle, or `--ca FILE`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// How long the TCP connection, TLS and the upgrade may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server's close is awaited after ours.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest message accepted from the server.
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// CA bundles tried for `wss://` when neither `--ca` nor `SSL_CERT_FILE`
/// names one: Debian, Ubuntu and Alpine; Fedora and RHEL.
const SYSTEM_BUNDLES: [&str; 2] = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

/// What `connect` was asked to do.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `ws://…` or `wss://…`.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Extra request headers, each `Name: value`.
    pub headers: Vec<String>,
    /// CA certificates (PEM) for `wss://`, instead of the system's.
    pub ca: Option<PathBuf>,
}

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A close frame came: its code (`None`: it carried none, 1005) and reason.
    Closed { code: Option<u16>, reason: String },
    /// The connection ended without a close frame (1006).
    Dropped,
    /// The server answered the upgrade with this HTTP status.
    Refused { status: u16, phrase: String, body: String },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Closed { code: Some(c), reason } if reason.is_empty() => write!(f, "closed: {c}"),
            Outcome::Closed { code: Some(c), reason } => write!(f, "closed: {c} {reason}"),
            Outcome::Closed { code: None, .. } => write!(f, "closed: 1005 (no code)"),
            Outcome::Dropped => write!(f, "closed: 1006 (connection lost without a close frame)"),
            Outcome::Refused { status, phrase, body } => {
                write!(f, "refused: {status} {phrase}")?;
                if !body.is_empty() {
                    write!(f, " ({body})")?;
                }
                Ok(())
            }
        }
    }
}

/// What stopped the client before there was a connection to end.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

/// The exit status for an outcome:
///
/// | status | meaning |
/// |---|---|
/// | 0 | closed with 1000 |
/// | 1 | could not connect (address, TLS, timeout) or an I/O error |
/// | 2 | bad arguments (`--header`, the URL) |
/// | 3 | refused at the handshake with an HTTP status |
/// | 11–25 | closed with 1001–1015: the code minus 990 (1005: no code, 1006: no close frame) |
/// | 100–199 | closed with 4000–4099: the code minus 3900 |
/// | 9 | closed with any other code |
pub fn exit_code(o: &Outcome) -> u8 {
    let code = match o {
        Outcome::Refused { .. } => return 3,
        Outcome::Dropped => 1006,
        Outcome::Closed { code, .. } => code.unwrap_or(1005),
    };
    match code {
        1000 => 0,
        1001..=1015 => (code - 990) as u8,
        4000..=4099 => (code - 3900) as u8,
        _ => 9,
    }
}

/// The exit status for an error before any connection.
pub fn error_exit_code(e: &ConnectError) -> u8 {
    match e {
        ConnectError::Usage(_) => 2,
        ConnectError::Failed(_) => 1,
    }
}

/// The upgrade request: the URL, the token, the extra headers.
pub fn request(opts: &Options) -> Result<Request, ConnectError> {
    let mut req = opts
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Usage(format!("URL {:?}: {e}", opts.url)))?;
    let headers = req.headers_mut();
    if let Some(t) = &opts.token {
        let v = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| ConnectError::Usage("--token: not a valid header value".into()))?;
        headers.insert("authorization", v);
    }
    for h in &opts.headers {
        let bad = || ConnectError::Usage(format!("--header {h:?}: expected 'Name: value'"));
        let (k, v) = h.split_once(':').ok_or_else(bad)?;
        let name = HeaderName::from_bytes(k.trim().as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_str(v.trim()).map_err(|_| bad())?;
        headers.append(name, value);
    }
    Ok(req)
}

/// Connects, relays stdin and the messages received, and returns how the
/// connection ended. Messages go to `out`; nothing else is written there.
pub async fn run<I, O>(opts: &Options, input: I, out: O) -> Result<Outcome, ConnectError>
where
    I: AsyncBufRead + Unpin,
    O: AsyncWrite + Unpin,
{
    let req = request(opts)?;
    let uri = req.uri().clone();
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(ConnectError::Usage(format!("URL {:?}: expected ws:// or wss://", opts.url))),
    };
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let failed = |what: &str, e: &dyn std::fmt::Display| ConnectError::Failed(format!("{what}: {e}"));
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| ConnectError::Failed(format!("connecting to {host}:{port}: timed out")))?
        .map_err(|e| failed(&format!("connecting to {host}:{port}"), &e))?;
    let _ = tcp.set_nodelay(true);
    if tls {
        let connector = tls_connector(opts.ca.as_ref())?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| failed(&format!("server name {host:?}"), &e))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| ConnectError::Failed("TLS handshake: timed out".into()))?
            .map_err(|e| failed("TLS handshake", &e))?;
        upgrade_and_relay(req, stream, input, out).await
    } else {
        upgrade_and_relay(req, tcp, input, out).await
    }
}

fn tls_connector(ca: Option<&PathBuf>) -> Result<tokio_rustls::TlsConnector, ConnectError> {
    let env = std::env::var("SSL_CERT_FILE").ok().map(PathBuf::from);
    let path = match ca {
        Some(p) => p.clone(),
        None => {
            env.into_iter().chain(SYSTEM_BUNDLES.iter().map(PathBuf::from)).find(|p| p.exists()).ok_or_else(
                || ConnectError::Failed("no CA bundle found for wss:// (give --ca FILE)".into()),
            )?
        }
    };
    let pem =
        std::fs::read(&path).map_err(|e| ConnectError::Failed(format!("--ca {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| ConnectError::Failed(format!("--ca {}: {e}", path.display())))?;
        // A bundle may hold certificates rustls cannot use; the rest serve.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(ConnectError::Failed(format!("--ca {}: no certificate in it", path.display())));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Failed(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn upgrade_and_relay<S, I, O>(
    req: Request,
    stream: S,
    input: I,
    out: O,
) -> Result<Outcome, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: AsyncBufRead + Unpin,
    O: AsyncWrite + Unpin,
{
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_MESSAGE_BYTES);
    config.max_frame_size = Some(MAX_MESSAGE_BYTES);
    let upgraded = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::client_async_with_config(req, stream, Some(config)),
    )
    .await
    .map_err(|_| ConnectError::Failed("the upgrade timed out".into()))?;
    match upgraded {
        Ok((ws, _)) => relay(ws, input, out).await,
        Err(WsError::Http(resp)) => {
            let status = resp.status();
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            // The gateway's refusal body is its reason: one short line.
            let body = body.lines().next().unwrap_or("").trim().chars().take(200).collect();
            Ok(Outcome::Refused {
                status: status.as_u16(),
                phrase: status.canonical_reason().unwrap_or("").to_string(),
                body,
            })
        }
        Err(e) => Err(ConnectError::Failed(format!("the upgrade failed: {e}"))),
    }
}

/// Sends stdin's lines and prints what arrives until the connection ends.
/// Reading and writing run side by side: a server that echoes a long
/// input back must be read while we still send, or both would stall.
async fn relay<S, I, O>(ws: WebSocketStream<S>, input: I, mut out: O) -> Result<Outcome, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: AsyncBufRead + Unpin,
    O: AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let closed: std::cell::RefCell<Option<Outcome>> = std::cell::RefCell::new(None);
    let writer = async {
        let mut lines = input.lines();
        // To the end of input (or unreadable input), or until a send fails
        // (the server closed).
        while let Ok(Some(l)) = lines.next_line().await {
            if tx.send(Message::text(l)).await.is_err() {
                return std::future::pending().await;
            }
        }
        let bye = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        let _ = tx.send(Message::Close(Some(bye))).await;
        // The server's close is awaited this long.
        tokio::time::sleep(CLOSE_TIMEOUT).await;
    };
    let reader = async {
        loop {
            match rx.next().await {
                Some(Ok(Message::Text(t))) => print(&mut out, t.as_bytes()).await?,
                Some(Ok(Message::Binary(b))) => print(&mut out, &b).await?,
                Some(Ok(Message::Close(frame))) => {
                    // tungstenite answers it; the stream then ends.
                    *closed.borrow_mut() = Some(match frame {
                        Some(f) => {
                            Outcome::Closed { code: Some(u16::from(f.code)), reason: f.reason.to_string() }
                        }
                        None => Outcome::Closed { code: None, reason: String::new() },
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Ok::<(), ConnectError>(()),
            }
        }
    };
    tokio::select! {
        r = reader => r?,
        _ = writer => {}
    }
    Ok(closed.into_inner().unwrap_or(Outcome::Dropped))
}

async fn print<O: AsyncWrite + Unpin>(out: &mut O, msg: &[u8]) -> Result<(), ConnectError> {
    let w = async {
        out.write_all(msg).await?;
        out.write_all(b"\n").await?;
        out.flush().await
    };
    w.await.map_err(|e| ConnectError::Failed(format!("writing stdout: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_map_to_documented_exit_statuses() {
        let closed = |c| Outcome::Closed { code: Some(c), reason: String::new() };
        for (o, want) in [
            (closed(1000), 0),
            (closed(1001), 11),
            (closed(1008), 18),
            (closed(1009), 19),
            (closed(1011), 21),
            (closed(1014), 24),
            (Outcome::Closed { code: None, reason: String::new() }, 15),
            (Outcome::Dropped, 16),
            (closed(4000), 100),
            (closed(4099), 199),
            (closed(4100), 9),
            (closed(3000), 9),
            (Outcome::Refused { status: 401, phrase: "Unauthorized".into(), body: String::new() }, 3),
        ] {
            assert_eq!(exit_code(&o), want, "{o:?}");
        }
    }

    #[test]
    fn headers_and_the_token_go_into_the_request_and_bad_ones_name_the_flag() {
        let opts = Options {
            url: "ws://127.0.0.1:1/chat".into(),
            token: Some("t0k".into()),
            headers: vec!["X-Trace: abc".into(), "Origin:  http://x".into()],
            ca: None,
        };
        let req = request(&opts).unwrap();
        assert_eq!(req.headers()["authorization"], "Bearer t0k");
        assert_eq!(req.headers()["x-trace"], "abc");
        assert_eq!(req.headers()["origin"], "http://x");
        for bad in ["no colon", "bad name: v", ": empty"] {
            let e = request(&Options { headers: vec![bad.into()], ..opts.clone() }).unwrap_err();
            assert!(e.to_string().starts_with("--header"), "{e}");
        }
        let e = request(&Options { url: "not a url".into(), ..Options::default() }).unwrap_err();
        assert!(matches!(e, ConnectError::Usage(_)), "{e}");
    }
}
