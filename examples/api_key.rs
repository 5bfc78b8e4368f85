//! A second `Authenticator`: API keys looked up in a table, instead of JWTs.
//! The gateway's stages 1–3 and 5–8 are unchanged; only stage 4 differs.
//!
//! Run with `cargo run --example api_key`, then connect with
//! `websocat -H 'X-Api-Key: k-alice' ws://127.0.0.1:8080/`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use portcullis::auth::{AuthRefusal, Authenticator, Identity};
use portcullis::handshake::RequestHead;
use portcullis::{Config, Gateway, Reject};
use subtle::ConstantTimeEq;

/// API key → subject. A real deployment would look keys up in a database.
struct ApiKeys {
    keys: HashMap<String, String>,
}

#[async_trait::async_trait]
impl Authenticator for ApiKeys {
    async fn authenticate(&self, head: &RequestHead, client: SocketAddr) -> Result<Identity, AuthRefusal> {
        let Some(given) = head.header("x-api-key") else {
            return Err(Reject::MissingToken.into());
        };
        // Compare every key in constant time, so timing tells nothing.
        let sub = self.keys.iter().fold(None, |found, (k, sub)| {
            if bool::from(k.as_bytes().ct_eq(given.as_bytes())) {
                Some(sub)
            } else {
                found
            }
        });
        match sub {
            Some(sub) => Ok(Identity {
                sub: sub.clone(),
                forward: vec![("X-Client-Ip".into(), client.ip().to_string())],
                ..Identity::default()
            }),
            None if given.starts_with("blocked-") => {
                Err(AuthRefusal::Custom { status: 403, body: "this key is blocked\n".into() })
            }
            None => Err(Reject::InvalidToken.into()),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = Config::default();
    // The JWT settings are unused with a custom authenticator, but the
    // configuration is still validated as a whole.
    cfg.auth.hmac_secret = "unused".into();
    cfg.revocation.path = std::env::temp_dir().join("portcullis-api-key-example.log");
    let keys = HashMap::from([("k-alice".to_string(), "alice".to_string()), ("k-bob".into(), "bob".into())]);
    let gateway = Gateway::bind_with(cfg, Some(Arc::new(ApiKeys { keys }))).await?;
    eprintln!("listening public={} admin={}", gateway.public_addr(), gateway.admin_addr());
    eprintln!("try: websocat -H 'X-Api-Key: k-alice' ws://{}/", gateway.public_addr());
    gateway
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    Ok(())
}
