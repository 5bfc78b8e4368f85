//! TLS termination (`wss://`): the acceptor built from `listen.tls_cert_file`
//! and `listen.tls_key_file`, rebuilt on SIGHUP.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, Listen};

/// The acceptor for `listen`, or `None` when TLS is not configured.
pub fn acceptor(listen: &Listen) -> Result<Option<TlsAcceptor>, ConfigError> {
    if listen.tls_cert_file.as_os_str().is_empty() {
        return Ok(None);
    }
    let certs_pem = std::fs::read(&listen.tls_cert_file).map_err(|e| ConfigError::Invalid {
        key: "listen.tls_cert_file",
        msg: format!("{}: {e}", listen.tls_cert_file.display()),
    })?;
    let key_pem = std::fs::read(&listen.tls_key_file).map_err(|e| ConfigError::Invalid {
        key: "listen.tls_key_file",
        msg: format!("{}: {e}", listen.tls_key_file.display()),
    })?;
    let certs = rustls_pemfile::certs(&mut certs_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::Invalid { key: "listen.tls_cert_file", msg: e.to_string() })?;
    if certs.is_empty() {
        return Err(ConfigError::Invalid {
            key: "listen.tls_cert_file",
            msg: "no certificate in the file".into(),
        });
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| ConfigError::Invalid { key: "listen.tls_key_file", msg: e.to_string() })?
        .ok_or_else(|| ConfigError::Invalid {
            key: "listen.tls_key_file",
            msg: "no private key in the file".into(),
        })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid { key: "listen.tls_cert_file", msg: e.to_string() })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ConfigError::Invalid { key: "listen.tls_key_file", msg: e.to_string() })?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}
