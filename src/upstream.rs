//! Stage 6, the upstream: connect to the backend **before** answering 101,
//! carrying the identity and the client's request across.
//!
//! Request-target upstream: the `upstream.url` path as a prefix, then the
//! client's path and query without `access_token` (`ws://b:9000/api` and a
//! client on `/chat?room=1` → `/api/chat?room=1`).

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::http::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

/// A parsed `ws://host:port/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `host:port` as dialled and sent in `Host`.
    pub authority: String,
    /// The path prefix, without a trailing `/`.
    pub prefix: String,
}

impl UpstreamUrl {
    pub fn parse(url: &str) -> Option<UpstreamUrl> {
        let rest = url.strip_prefix("ws://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || path.contains('?') || path.contains('#') {
            return None;
        }
        let has_port = match authority.rfind(']') {
            Some(b) => authority[b..].contains(':'),
            None => authority.contains(':'),
        };
        let authority = if has_port { authority.to_string() } else { format!("{authority}:80") };
        let port = authority.rsplit(':').next()?;
        port.parse::<u16>().ok()?;
        Some(UpstreamUrl { authority, prefix: path.trim_end_matches('/').to_string() })
    }

    /// The request-target upstream for a client target (already stripped of
    /// `access_token`).
    pub fn target_for(&self, client_target: &str) -> String {
        format!("{}{}", self.prefix, client_target)
    }
}

/// Client request headers never copied upstream: hop-by-hop, the
/// handshake's own, the credential, and what the gateway sets itself.
const NOT_FORWARDED: [&str; 13] = [
    "host",
    "connection",
    "upgrade",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
    "authorization",
    "x-forwarded-for",
    "x-real-ip",
];

/// May a client-sent header go upstream? `claim_headers` are the
/// configured claim header names, which only the gateway may set.
pub fn forwardable(name: &str, claim_headers: &[&str]) -> bool {
    let lower = name.to_ascii_lowercase();
    !(NOT_FORWARDED.contains(&lower.as_str())
        || lower.starts_with("sec-websocket-")
        || lower.starts_with("x-portcullis-")
        || claim_headers.iter().any(|c| c.eq_ignore_ascii_case(name)))
}

/// Opens the backend WebSocket within `timeout`. Returns the stream and
/// the subprotocol the backend chose, if any.
pub async fn connect(
    url: &UpstreamUrl,
    target: &str,
    headers: &[(String, String)],
    subprotocols: &[String],
    timeout: Duration,
    config: WebSocketConfig,
) -> Result<(WebSocketStream<TcpStream>, Option<String>), String> {
    let attempt = async {
        let tcp = TcpStream::connect(&url.authority).await.map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut req = Request::builder()
            .method("GET")
            .uri(format!("ws://{}{}", url.authority, target))
            .header("Host", &url.authority)
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", generate_key());
        if !subprotocols.is_empty() {
            req = req.header("Sec-WebSocket-Protocol", subprotocols.join(", "));
        }
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(()).map_err(|e| format!("request: {e}"))?;
        let (ws, resp) = tokio_tungstenite::client_async_with_config(req, tcp, Some(config))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let proto =
            resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok((ws, proto))
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| "connect timeout".to_string())?
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
