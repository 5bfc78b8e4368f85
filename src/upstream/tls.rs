//! `wss://` toward the backends: the roots a backend's certificate is
//! verified against (`upstream.ca_file`, or the system's), the name it is
//! verified for and sent as SNI (`upstream.server_name`, or the URL's
//! host), and the client certificate of mutual TLS
//! (`upstream.client_cert_file` / `client_key_file`). Built at start and
//! rebuilt from the same files on SIGHUP (certificates rotate; the pools do
//! not change).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::TlsConnector;

use crate::config::{ConfigError, Upstream, UpstreamUrl};

/// The TLS side of every `wss://` backend of the gateway.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    /// `upstream.server_name`, parsed once.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl Tls {
    /// The client configuration for `u`, or `None` when no backend is
    /// `wss://` (nothing is read then). Reads the CA, certificate and key
    /// files; an error names the key whose file is at fault.
    pub fn load(u: &Upstream, urls: &[&UpstreamUrl]) -> Result<Option<Tls>, ConfigError> {
        if !urls.iter().any(|url| url.tls) {
            return Ok(None);
        }
        let mut roots = rustls::RootCertStore::empty();
        if u.ca_file.as_os_str().is_empty() {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "upstream: a system root certificate could not be read");
            }
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(invalid(
                    "upstream.ca_file",
                    "no system root certificates found; set upstream.ca_file for wss:// backends".into(),
                ));
            }
        } else {
            for cert in certs("upstream.ca_file", &u.ca_file)? {
                roots
                    .add(cert)
                    .map_err(|e| invalid("upstream.ca_file", format!("{}: {e}", u.ca_file.display())))?;
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("upstream.ca_file", e.to_string()))?
            .with_root_certificates(roots);
        let config = if u.client_cert_file.as_os_str().is_empty() {
            builder.with_no_client_auth()
        } else {
            let chain = certs("upstream.client_cert_file", &u.client_cert_file)?;
            let key = key("upstream.client_key_file", &u.client_key_file)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid("upstream.client_key_file", e.to_string()))?
        };
        let server_name = match u.server_name.as_str() {
            "" => None,
            n => Some(ServerName::try_from(n.to_string()).map_err(|_| {
                invalid("upstream.server_name", format!("{n:?} is not a DNS name or IP address"))
            })?),
        };
        Ok(Some(Tls { connector: TlsConnector::from(Arc::new(config)), server_name }))
    }

    /// The connector and the name `url`'s certificate must carry.
    pub fn connector(&self, url: &UpstreamUrl) -> Result<(&TlsConnector, ServerName<'static>), String> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(url.host.clone())
                .map_err(|_| format!("tls: {:?} is not a name a certificate can carry", url.host))?,
        };
        Ok((&self.connector, name))
    }
}

fn invalid(key: &'static str, msg: String) -> ConfigError {
    ConfigError::Invalid { key, msg }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))
}

/// Every certificate of a PEM file (at least one).
fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read(key, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(key, format!("{}: no certificate in the file", path.display())));
    }
    Ok(certs)
}

fn key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = read(key, path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?
        .ok_or_else(|| invalid(key, format!("{}: no private key in the file", path.display())))
}
