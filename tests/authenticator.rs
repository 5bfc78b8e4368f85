//! The library's extension point: a custom `Authenticator` sees
//! the head and the client address before the upgrade, and its identity and
//! refusals flow through the same pipeline.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use portcullis::auth::{AuthRefusal, Authenticator, Identity};
use portcullis::handshake::RequestHead;
use portcullis::{Gateway, Reject};

struct HeaderKey;

#[async_trait::async_trait]
impl Authenticator for HeaderKey {
    async fn authenticate(&self, head: &RequestHead, client: SocketAddr) -> Result<Identity, AuthRefusal> {
        assert!(client.ip().is_loopback());
        match head.header("x-api-key") {
            None => Err(Reject::MissingToken.into()),
            Some("good") => Ok(Identity { sub: format!("key-user@{}", head.path()), ..Identity::default() }),
            Some("teapot") => Err(AuthRefusal::Custom { status: 418, body: "short and stout\n".into() }),
            Some(_) => Err(Reject::InvalidToken.into()),
        }
    }
}

#[tokio::test]
async fn a_custom_authenticator_decides_before_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::bind_with(config(dir.path()), Some(Arc::new(HeaderKey))).await.unwrap();
    let (public, admin) = (gw.public_addr(), gw.admin_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gw.run(async move {
        let _ = rx.await;
    }));

    assert_eq!(raw(public, upgrade_request("/", &[]).as_bytes()).await.status, 401);
    assert_eq!(raw(public, upgrade_request("/", &[("X-Api-Key", "bad")]).as_bytes()).await.status, 401);
    let teapot = raw(public, upgrade_request("/", &[("X-Api-Key", "teapot")]).as_bytes()).await;
    assert_eq!(teapot.status, 418);
    assert!(teapot.text.ends_with("short and stout\n"));

    let mut c = ws_connect(public, "/", &[("X-Api-Key", "good")]).await.unwrap();
    echo(&mut c, "custom").await;
    let list = body(&http(admin, "GET", "/admin/connections", &[], "").await).to_string();
    assert!(list.contains("\"sub\":\"key-user@/\""), "{list}");
    drop(c);

    let m = body(&http(admin, "GET", "/metrics", &[], "").await).to_string();
    assert_eq!(
        value_of(&m, "portcullis_handshakes_total{outcome=\"rejected\",reason=\"missing_token\"}"),
        1.0
    );
    // A custom status is counted under invalid_token: label values stay a closed set.
    assert_eq!(
        value_of(&m, "portcullis_handshakes_total{outcome=\"rejected\",reason=\"invalid_token\"}"),
        2.0
    );
    let _ = tx.send(());
    task.await.unwrap();
}
