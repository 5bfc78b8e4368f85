//! The fleet on a standalone Redis over TLS (`rediss://`, certificates
//! made here with rcgen) with an ACL user: the fleet scenario of
//! `support/fleet.rs` (the failover being a crash and an empty restart),
//! and clear errors for a wrong CA and a wrong password, at start and in
//! `check-config`.

mod common;
#[path = "support/fleet.rs"]
mod fleet;

use std::path::{Path, PathBuf};

use fleet::*;
use portcullis::config::Config;

const USER: &str = "portcullis";
const PASSWORD: &str = "s3cret-acl";

struct Tls {
    server: Server,
    tls_port: u16,
    ca: PathBuf,
}

impl Tls {
    fn start(dir: &Path) -> Tls {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "portcullis test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(dir.join("redis.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("redis.key"), key.serialize_pem()).unwrap();
        let tls_port = free_port();
        let d = |f: &str| dir.join(f).display().to_string();
        let args: Vec<String> = [
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &d("redis.crt"),
            "--tls-key-file",
            &d("redis.key"),
            "--tls-ca-cert-file",
            &d("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--user",
            USER,
            "on",
            &format!(">{PASSWORD}"),
            "~portcullis:*",
            "&*",
            "+@all",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // The plain port is the test's own control channel (default user).
        let server = Server::start(&dir.join("redis"), free_port(), &args);
        Tls { server, tls_port, ca }
    }

    fn url(&self, password: &str) -> String {
        format!("rediss://{USER}:{password}@127.0.0.1:{}", self.tls_port)
    }
}

impl Deployment for Tls {
    fn apply(&self, cfg: &mut Config) {
        cfg.revocation.redis_url = self.url(PASSWORD);
        cfg.revocation.redis_ca_file = self.ca.clone();
    }

    fn toml(&self) -> String {
        format!("redis_url = \"{}\"\nredis_ca_file = \"{}\"\n", self.url(PASSWORD), self.ca.display())
    }

    /// A crash and a restart without persistence: every key is gone.
    fn failover(&mut self) {
        self.server.kill();
        std::thread::sleep(std::time::Duration::from_millis(300));
        self.server.restart();
    }

    fn settled(&self) -> bool {
        cmd(self.server.port, &["PING"]).starts_with("+PONG")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_tls_redis_with_an_acl_user() {
    let dir = tempfile::tempdir().unwrap();
    let mut tls = Tls::start(dir.path());

    // Wrong password, then a CA that did not sign the server's
    // certificate: each refuses to start with an error naming the cause.
    let mut bad = instance(dir.path(), "bad", &tls);
    bad.revocation.redis_url = tls.url("wrong");
    let e = portcullis::Gateway::bind(bad.clone()).await.err().expect("a wrong password must not start");
    assert!(e.to_string().contains("authentication refused"), "{e}");
    let other_ca = dir.path().join("other-ca.pem");
    let ck = rcgen::generate_simple_self_signed(vec!["elsewhere".to_string()]).unwrap();
    std::fs::write(&other_ca, ck.cert.pem()).unwrap();
    bad.revocation.redis_url = tls.url(PASSWORD);
    bad.revocation.redis_ca_file = other_ca.clone();
    let e = portcullis::Gateway::bind(bad).await.err().expect("a wrong CA must not start");
    assert!(e.to_string().contains("TLS failed") && e.to_string().contains("redis_ca_file"), "{e}");

    // check-config says the same, exit code 2.
    for (url, ca, want) in [
        (tls.url("wrong"), tls.ca.clone(), "authentication refused"),
        (tls.url(PASSWORD), other_ca, "TLS failed"),
    ] {
        let file = dir.path().join("check.toml");
        std::fs::write(
            &file,
            format!(
                "[auth]\nhmac_secret = \"x\"\n[revocation]\nbackend = \"redis\"\npath = \"{}\"\nredis_url = \"{url}\"\nredis_ca_file = \"{}\"\n",
                dir.path().join("check.log").display(),
                ca.display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["check-config"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want) && err.contains("revocation.redis_url"), "{err}");
        assert!(
            !err.contains("wrong") || want != "authentication refused" || !err.contains(":wrong@"),
            "{err}"
        );
    }

    fleet_scenario(dir.path(), &mut tls).await;
}
