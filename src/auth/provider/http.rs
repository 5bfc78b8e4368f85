//! The one HTTP(S) request the key fetcher makes: `GET` a small JSON
//! document, with `If-None-Match`, under a deadline from connect to last
//! byte, the body bounded.
//!
//! Built from what the gateway already links (hyper's HTTP/1 client
//! connection, tokio-rustls with aws-lc-rs) rather than a full client
//! crate: a key set is one request every few minutes to one host, so
//! pooling, HTTP/2, proxies, cookies and redirects buy nothing here, and
//! `reqwest` would add its own stack (tower, url, idna, hyper-util's pool)
//! to every build. Redirects are not followed: a provider's endpoints are
//! published URLs, and following one would move trust to wherever it points.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HeaderValue, ACCEPT, CACHE_CONTROL, ETAG, HOST, IF_NONE_MATCH, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{jwks, ConfigError};

/// A JWKS or discovery document larger than this is refused: real ones are
/// a few KiB, and the bound caps what a hostile endpoint can make us hold.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Why a fetch failed, in words for the log line (never a token or secret:
/// the URL is configuration, the rest is the provider's answer).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Url(String),
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("tls: {0}")]
    Tls(std::io::Error),
    #[error("http: {0}")]
    Http(String),
    #[error("status {0}")]
    Status(u16),
    #[error("body over {MAX_BODY_BYTES} bytes or unreadable: {0}")]
    Body(String),
    #[error("{0}")]
    Document(String),
}

/// What the provider answered, as far as caching goes.
#[derive(Debug)]
pub enum Answer {
    /// 200, with its validator and freshness.
    Fresh { body: Bytes, etag: Option<String>, max_age: Option<u64> },
    /// 304 to our `If-None-Match`.
    NotModified { max_age: Option<u64> },
}

/// Fetches documents for one set of trust roots and one deadline.
#[derive(Clone)]
pub struct Client {
    tls: TlsConnector,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// The system's roots, read once per process (a few hundred files).
fn system_roots() -> &'static Result<Arc<rustls::RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<rustls::RootCertStore>, String>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut store = rustls::RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
            return Err(format!("no system root certificates found{why}; give auth.jwks_ca_file"));
        }
        Ok(Arc::new(store))
    })
}

fn ca_roots(path: &std::path::Path) -> Result<Arc<rustls::RootCertStore>, ConfigError> {
    let key = "auth.jwks_ca_file";
    let bad = |msg: String| ConfigError::Invalid { key, msg: format!("{}: {msg}", path.display()) };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad("no usable certificate in the PEM bundle".into()));
    }
    Ok(Arc::new(store))
}

impl Client {
    /// A client trusting `ca_file` (PEM bundle) or, when empty, the system
    /// roots. The system roots are only read if `https` will be used.
    pub fn new(ca_file: &std::path::Path, timeout: Duration, https: bool) -> Result<Client, ConfigError> {
        let roots = if !ca_file.as_os_str().is_empty() {
            ca_roots(ca_file)?
        } else if https {
            system_roots().clone().map_err(|msg| ConfigError::Invalid { key: "auth.jwks_ca_file", msg })?
        } else {
            Arc::new(rustls::RootCertStore::empty())
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::Invalid { key: "auth.jwks_ca_file", msg: e.to_string() })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Client { tls: TlsConnector::from(Arc::new(config)), timeout })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET url`, conditional on `etag`, within the client's deadline.
    pub async fn get(&self, url: &str, etag: Option<&str>) -> Result<Answer, FetchError> {
        let ms = self.timeout.as_millis() as u64;
        tokio::time::timeout(self.timeout, self.get_unbounded(url, etag))
            .await
            .unwrap_or(Err(FetchError::Timeout(ms)))
    }

    async fn get_unbounded(&self, url: &str, etag: Option<&str>) -> Result<Answer, FetchError> {
        if let Some(p) = jwks::url_problem(url) {
            return Err(FetchError::Url(p));
        }
        let uri: Uri = url.parse().map_err(|e| FetchError::Url(format!("{url:?}: {e}")))?;
        let https = uri.scheme_str() == Some("https");
        let authority = uri.authority().ok_or_else(|| FetchError::Url(format!("{url:?} has no host")))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();

        let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(FetchError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let mut req = Request::get(path)
            .header(HOST, authority.as_str())
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("portcullis/", env!("CARGO_PKG_VERSION")));
        if let Some(tag) = etag.and_then(|t| HeaderValue::from_str(t).ok()) {
            req = req.header(IF_NONE_MATCH, tag);
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| FetchError::Http(e.to_string()))?;
        if https {
            let name =
                ServerName::try_from(host.clone()).map_err(|e| FetchError::Url(format!("{host:?}: {e}")))?;
            let tls = self.tls.connect(name, tcp).await.map_err(FetchError::Tls)?;
            send(tls, req).await
        } else {
            send(tcp, req).await
        }
    }
}

/// One request on a fresh connection, which is dropped afterwards.
async fn send<S>(io: S, req: Request<Empty<Bytes>>) -> Result<Answer, FetchError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    // The connection is driven beside the request; both end with this call
    // (the caller's deadline drops them together).
    let exchange = async {
        let resp = sender.send_request(req).await.map_err(|e| FetchError::Http(e.to_string()))?;
        let status = resp.status();
        let header =
            |name| resp.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_owned);
        let max_age = header(CACHE_CONTROL).and_then(|v| max_age(&v));
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Answer::NotModified { max_age });
        }
        if status != StatusCode::OK {
            return Err(FetchError::Status(status.as_u16()));
        }
        let etag = header(ETAG);
        let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| FetchError::Body(e.to_string()))?
            .to_bytes();
        Ok(Answer::Fresh { body, etag, max_age })
    };
    tokio::pin!(conn);
    tokio::pin!(exchange);
    tokio::select! {
        r = &mut exchange => r,
        c = &mut conn => match c {
            // The connection ended first: an error, or a clean end with
            // the exchange still to finish reading what it has.
            Err(e) => Err(FetchError::Http(e.to_string())),
            Ok(()) => exchange.await,
        },
    }
}

/// `max-age` from a `Cache-Control` value; `no-cache` / `no-store` count as
/// 0 (the caller raises it to its floor). `None`: no freshness given.
pub fn max_age(cache_control: &str) -> Option<u64> {
    let mut found = None;
    for directive in cache_control.split(',') {
        let d = directive.trim();
        let (name, value) = d.split_once('=').map_or((d, ""), |(n, v)| (n.trim(), v.trim()));
        if name.eq_ignore_ascii_case("no-cache") || name.eq_ignore_ascii_case("no-store") {
            return Some(0);
        }
        if name.eq_ignore_ascii_case("max-age") {
            found = value.trim_matches('"').parse::<u64>().ok().or(found);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::max_age;

    #[test]
    fn cache_control() {
        assert_eq!(max_age("public, max-age=3600"), Some(3600));
        assert_eq!(max_age("max-age=\"60\", must-revalidate"), Some(60));
        assert_eq!(max_age("no-cache"), Some(0));
        assert_eq!(max_age("private, no-store, max-age=99"), Some(0));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=abc"), None);
    }
}
