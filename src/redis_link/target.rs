//! What to dial, from `[revocation]`: the URL's settings (scheme, ACL user
//! and password, database, TLS roots) applied to whichever server the mode
//! names, and the errors that must stop a start rather than be retried.
//!
//! # Errors that are not retried silently
//!
//! A wrong password, an ACL user without the rights Portcullis needs, or a
//! TLS certificate that does not verify will not fix itself by retrying.
//! [`classify`] tells these apart from an unreachable server: at start and
//! in `check-config` they are an error naming `revocation.redis_url` (or
//! `redis_ca_file`); while running they are logged at `error` every time
//! they recur (never only retried), and the link stays down.

use ::redis::aio::MultiplexedConnection;
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::io::tcp::TcpSettings;
use ::redis::{
    Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, TlsCertificates,
};

use super::{cluster, sentinel};
use crate::config::{redis::host_port, RedisMode, Revocation};

/// Bound on opening one connection.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a connection could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// Authentication, authorization or TLS verification: retrying the
    /// same settings cannot succeed.
    Fatal(String),
    /// Unreachable, timed out, not (yet) a master: worth retrying.
    Retry(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Fatal(m) | LinkError::Retry(m) => f.write_str(m),
        }
    }
}

/// Sorts a Redis error into [`LinkError`], its text prefixed by what was
/// being done.
pub fn classify(doing: &str, e: &RedisError) -> LinkError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let auth = e.kind() == ErrorKind::AuthenticationFailed
        || ["WRONGPASS", "NOAUTH", "NOPERM"].iter().any(|c| e.code() == Some(c) || text.contains(c));
    let tls = ["certificate", "unknownissuer", "tls", "corrupt message", "handshake"]
        .iter()
        .any(|w| lower.contains(w));
    if auth {
        LinkError::Fatal(format!(
            "revocation.redis_url: {doing}: authentication refused ({text}): check the user and password"
        ))
    } else if tls {
        LinkError::Fatal(format!(
            "revocation.redis_url: {doing}: TLS failed ({text}): check rediss:// and revocation.redis_ca_file"
        ))
    } else {
        LinkError::Retry(format!("{doing}: {text}"))
    }
}

/// The deployment to connect to.
pub struct Target {
    pub mode: RedisMode,
    /// The URL's settings (address used as is in standalone mode only).
    info: ConnectionInfo,
    /// Roots for `rediss://`; `None` for plain connections.
    tls: Option<TlsCertificates>,
    pub sentinels: Vec<(String, u16)>,
    pub master_name: String,
    seeds: Vec<(String, u16)>,
    /// The URL without credentials, for logs.
    pub redacted: String,
}

impl Target {
    /// Parses and loads everything a connection will need; errors name the key.
    pub fn from_config(rc: &Revocation) -> Result<Target, String> {
        let bad_url = |e: RedisError| format!("revocation.redis_url: {e}");
        // TCP_NODELAY: a lease claim is one small request a handshake waits
        // for; Nagle would hold it back behind the previous one's ACK.
        let info = rc
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(bad_url)?
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let tls_url = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        let tls = if tls_url { Some(super::tls::certificates(&rc.redis_ca_file)?) } else { None };
        let nodes = |list: &[String]| list.iter().filter_map(|n| host_port(n)).collect::<Vec<_>>();
        let t = Target {
            mode: rc.redis_mode,
            info,
            tls,
            sentinels: nodes(&rc.redis_sentinels),
            master_name: rc.redis_master_name.clone(),
            seeds: nodes(&rc.redis_cluster_nodes),
            redacted: redact(&rc.redis_url),
        };
        // A client for the URL as given: refuses what the crate cannot use.
        t.client_of(t.info.clone()).map_err(bad_url)?;
        Ok(t)
    }

    fn client_of(&self, info: ConnectionInfo) -> Result<Client, RedisError> {
        match &self.tls {
            Some(certs) => Client::build_with_tls(info, clone_certs(certs)),
            None => Client::open(info),
        }
    }

    /// The URL's settings aimed at `host:port`.
    fn info_at(&self, host: &str, port: u16) -> ConnectionInfo {
        let addr = if self.tls.is_some() {
            ConnectionAddr::TcpTls { host: host.to_string(), port, insecure: false, tls_params: None }
        } else {
            ConnectionAddr::Tcp(host.to_string(), port)
        };
        self.info.clone().set_addr(addr)
    }

    /// A client for a sentinel: the URL's scheme and roots, no credentials.
    pub fn sentinel_client(&self, host: &str, port: u16) -> Result<Client, RedisError> {
        let info = self.info_at(host, port).set_redis_settings(Default::default());
        self.client_of(info)
    }

    /// Where the primary is now: the URL's server, the sentinels' master,
    /// or the master of the revocations' slot. Returns its client and its
    /// address for logs.
    pub async fn primary(&self) -> Result<(Client, String), LinkError> {
        match self.mode {
            RedisMode::Standalone => {
                let c = self.client_of(self.info.clone()).map_err(|e| classify("client", &e))?;
                Ok((c, self.redacted.clone()))
            }
            RedisMode::Sentinel => {
                let (host, port) = sentinel::master(self).await.map_err(LinkError::Retry)?;
                let c = self.client_of(self.info_at(&host, port)).map_err(|e| classify("client", &e))?;
                Ok((c, format!("{host}:{port}")))
            }
            RedisMode::Cluster => {
                let slot = cluster::slot(super::REVOCATIONS_KEY);
                let mut errors = Vec::new();
                for (host, port) in &self.seeds {
                    let asked = async {
                        let client =
                            self.client_of(self.info_at(host, *port)).map_err(|e| classify("client", &e))?;
                        let mut c = connect(&client, "seed").await?;
                        cluster::slot_owner(&mut c, slot).await.map_err(LinkError::Retry)
                    };
                    match tokio::time::timeout(CONNECT_TIMEOUT * 2, asked).await {
                        Ok(Ok((h, p))) => {
                            let h = if h.is_empty() { host.clone() } else { h };
                            let c =
                                self.client_of(self.info_at(&h, p)).map_err(|e| classify("client", &e))?;
                            return Ok((c, format!("{h}:{p}")));
                        }
                        Ok(Err(LinkError::Fatal(e))) => return Err(LinkError::Fatal(e)),
                        Ok(Err(LinkError::Retry(e))) => errors.push(format!("{host}:{port}: {e}")),
                        Err(_) => errors.push(format!("{host}:{port}: timed out")),
                    }
                }
                Err(LinkError::Retry(format!("no cluster seed answered ({})", errors.join("; "))))
            }
        }
    }

    /// The slot-aware connection the leases use on a cluster.
    pub async fn cluster_connection(&self) -> Result<ClusterConnection, LinkError> {
        let nodes: Vec<ConnectionInfo> = self.seeds.iter().map(|(h, p)| self.info_at(h, *p)).collect();
        let mut b = ClusterClientBuilder::new(nodes)
            .tcp_settings(TcpSettings::default().set_nodelay(true))
            .connection_timeout(CONNECT_TIMEOUT)
            .retries(2)
            .min_retry_wait(20)
            .max_retry_wait(200);
        if let Some(certs) = &self.tls {
            b = b.certs(clone_certs(certs));
        }
        let client = b.build().map_err(|e| classify("cluster client", &e))?;
        match tokio::time::timeout(CONNECT_TIMEOUT * 3, client.get_async_connection()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(classify("cluster connection", &e)),
            Err(_) => Err(LinkError::Retry("cluster connection: timed out".into())),
        }
    }
}

/// Opens a multiplexed connection, bounded, its error classified.
pub async fn connect(client: &Client, doing: &str) -> Result<MultiplexedConnection, LinkError> {
    let config = ::redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None)
        .set_pipeline_buffer_size(PIPELINE_BUFFER);
    match tokio::time::timeout(
        CONNECT_TIMEOUT * 2,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(classify(doing, &e)),
        Err(_) => Err(LinkError::Retry(format!("{doing}: connect timed out"))),
    }
}

/// Commands the multiplexed connection may queue (a handshake burst claims
/// leases concurrently; the default of 50 would make them queue).
pub const PIPELINE_BUFFER: usize = 4096;

fn clone_certs(c: &TlsCertificates) -> TlsCertificates {
    TlsCertificates { client_tls: None, root_cert: c.root_cert.clone() }
}

/// `redis://user:password@host` → `redis://host` for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// `check-config`: one connection to the primary (and on a cluster, the
/// cluster connection), bounded. `Ok(None)`: connected and authenticated;
/// `Ok(Some(why))`: unreachable now (a warning: Redis may be started
/// later); `Err`: settings that cannot work.
pub async fn probe(rc: &Revocation) -> Result<Option<String>, String> {
    let t = Target::from_config(rc)?;
    let tried = async {
        let (client, addr) = t.primary().await?;
        let mut c = connect(&client, &format!("connecting to {addr}")).await?;
        ::redis::cmd("PING").query_async::<()>(&mut c).await.map_err(|e| classify("PING", &e))?;
        if t.mode == RedisMode::Cluster {
            t.cluster_connection().await?;
        }
        Ok::<(), LinkError>(())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT * 5, tried).await {
        Ok(Ok(())) => Ok(None),
        Ok(Err(LinkError::Fatal(e))) => Err(e),
        Ok(Err(LinkError::Retry(e))) => Ok(Some(e)),
        Err(_) => Ok(Some("timed out".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_for_logs() {
        assert_eq!(redact("redis://u:secret@h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact("unix:///tmp/r.sock"), "unix:///tmp/r.sock");
    }

    #[test]
    fn auth_and_tls_errors_are_fatal_others_retried() {
        let e =
            RedisError::from((ErrorKind::AuthenticationFailed, "WRONGPASS invalid username-password pair"));
        assert!(matches!(classify("x", &e), LinkError::Fatal(m) if m.contains("authentication refused")));
        let e = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        ));
        assert!(matches!(classify("x", &e), LinkError::Fatal(m) if m.contains("redis_ca_file")));
        let e = RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert!(matches!(classify("x", &e), LinkError::Retry(_)));
    }
}
