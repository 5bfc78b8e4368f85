//! `rediss://`: the roots a Redis server's certificate is checked
//! against. `revocation.redis_ca_file` names a PEM bundle (a managed
//! Redis's private CA); without it the system's roots apply. The file is
//! read and parsed at start and by `check-config`, so a wrong path or a
//! file with no certificate is an error naming the key, not a handshake
//! failure later.

use std::path::Path;

use ::redis::TlsCertificates;

/// The certificates for a TLS link, or an error naming the key.
pub fn certificates(ca_file: &Path) -> Result<TlsCertificates, String> {
    if ca_file.as_os_str().is_empty() {
        return Ok(TlsCertificates { client_tls: None, root_cert: None });
    }
    let pem = std::fs::read(ca_file)
        .map_err(|e| format!("revocation.redis_ca_file: cannot read {}: {e}", ca_file.display()))?;
    let mut reader = std::io::BufReader::new(pem.as_slice());
    let mut n = 0;
    for cert in rustls_pemfile::certs(&mut reader) {
        cert.map_err(|e| format!("revocation.redis_ca_file: {}: {e}", ca_file.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!("revocation.redis_ca_file: {} holds no PEM certificate", ca_file.display()));
    }
    Ok(TlsCertificates { client_tls: None, root_cert: Some(pem) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_bundle_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let e = certificates(&dir.path().join("nope.pem")).unwrap_err();
        assert!(e.starts_with("revocation.redis_ca_file: cannot read"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = certificates(&empty).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        assert!(certificates(Path::new("")).unwrap().root_cert.is_none());
    }
}
