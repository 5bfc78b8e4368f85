//! The demo page: in `serve --demo` only, `GET /` without an upgrade on
//! the public listener answers a small self-contained page (no external
//! assets) that opens a WebSocket through the subprotocol carrier and
//! echoes what is typed: the browser path, the one a newcomer can touch.
//!
//! Each load mints a fresh demo token (one hour, `sub = "demo"`) with the
//! demo's ephemeral key, so a page opened late, or reloaded after its
//! token expired, still connects. Anyone who can reach the listener gets
//! a token this way: that is the demo's point, and why it is a flag of
//! the demo ([`crate::Gateway::serve_demo_page`]), never a configuration
//! key. Outside the demo, `GET /` without an upgrade is refused as
//! before, on the allocation-free fast path.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWrite;

use crate::config::Config;
use crate::handshake::{self, answer_and_close, Request};
use crate::shared::Shared;

/// The page, with `{{TOKEN}}` and `{{PATH}}` to fill in.
const PAGE: &str = include_str!("demo.html");

/// How long a page's token lives (the demo banner's token lives as long).
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The token's subject.
pub const SUB: &str = "demo";

/// Is this the demo page's request: the demo is on, `GET /`, no upgrade?
/// Reads the head only: the refusal fast path asks it too.
pub fn is_page_request<R: Request>(shared: &Shared, head: &R) -> bool {
    shared.demo_page.load(Ordering::Relaxed)
        && head.method() == "GET"
        && head.path() == "/"
        && !head.has_token("upgrade", "websocket")
}

/// Answers the page (or a 500 if no token can be minted) and closes.
pub async fn serve<S: AsyncWrite + Unpin>(cfg: &Config, io: &mut S) {
    answer_and_close(io, &answer(cfg)).await;
}

/// The whole HTTP answer.
pub fn answer(cfg: &Config) -> Vec<u8> {
    let token = match crate::auth::sign::mint(&cfg.auth, SUB, TOKEN_TTL, None) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "the demo page cannot mint a token");
            return handshake::response(500, &[], "text/plain; charset=utf-8", "cannot mint a demo token\n");
        }
    };
    let path = cfg.listen.paths.first().map_or("/", String::as_str);
    let html = PAGE.replace("{{TOKEN}}", &js_string(&token)).replace("{{PATH}}", &js_string(path));
    let headers = [
        // Inline script and style only; the WebSocket to this origin only.
        (
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
                .to_string(),
        ),
        ("X-Content-Type-Options", "nosniff".to_string()),
        ("Referrer-Policy", "no-referrer".to_string()),
    ];
    handshake::response(200, &headers, "text/html; charset=utf-8", &html)
}

/// A JavaScript string literal that cannot end the `<script>` element.
fn js_string(s: &str) -> String {
    serde_json::Value::from(s).to_string().replace('<', "\\u003c")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_a_fresh_token_and_no_external_asset() {
        let mut cfg = Config::default();
        cfg.auth.hmac_secret = "demo-test-secret-0123456789abcdef".into();
        let a = String::from_utf8(answer(&cfg)).unwrap();
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.contains("Cache-Control: no-store"), "a token is never cached");
        let body = &a[a.find("\r\n\r\n").unwrap() + 4..];
        assert!(!body.contains("{{"), "every placeholder filled");
        assert!(body.contains("new WebSocket(url, [\"bearer\", token])"));
        for external in ["src=", "href=", "http://", "https://", "@import"] {
            assert!(!body.contains(external), "{external}");
        }
        let token = body.split("const token = \"").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(token.split('.').count(), 3, "a JWT");
        assert_eq!(js_string("</script>"), "\"\\u003c/script>\"");
    }
}
