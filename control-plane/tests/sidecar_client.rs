//! The sidecar's own certificate client (`meshlet::tls::CertManager`) against this control plane: the two
//! halves of the issuance contract meet over a real TLS connection on loopback.

mod common;

use std::time::Duration;

use common::sidecar_settings as settings;
use meshlet::tls::{CertManager, ClientError};

#[tokio::test]
async fn the_sidecar_client_obtains_and_accepts_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = common::write_join_tokens(
        dir.path(),
        "- token: web-token\n  identity: spiffe://cluster.local/ns/shop/sa/web\n",
    );
    let mut config = meshlet_control::Config::local_loopback(dir.path().join("ca"), tokens);
    config.cert_ttl = Duration::from_secs(120);
    let control = meshlet_control::start(config).await.unwrap();

    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let manager = CertManager::new(settings(&control, web, "web-token")).unwrap();
    let credentials = manager
        .request()
        .await
        .expect("the sidecar accepts what it is issued");
    assert_eq!(credentials.identity().as_str(), web);
    let lifetime = credentials
        .not_after()
        .duration_since(credentials.not_before())
        .unwrap();
    assert_eq!(lifetime, Duration::from_secs(120 + 60));

    let manager = CertManager::new(settings(&control, web, "wrong-token")).unwrap();
    match manager.request().await {
        Err(ClientError::Refused { status, reason, .. }) => {
            assert_eq!((status.as_u16(), reason.as_str()), (401, "bad-credential"));
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("issued with a wrong token"),
    }
    control.shutdown().await;
}

#[tokio::test]
async fn the_sidecar_channel_is_mutual_tls_with_its_own_certificate() {
    use http_body_util::BodyExt;
    let dir = tempfile::tempdir().unwrap();
    let tokens = common::write_join_tokens(
        dir.path(),
        "- token: web-token\n  identity: spiffe://cluster.local/ns/shop/sa/web\n",
    );
    let config = meshlet_control::Config::local_loopback(dir.path().join("ca"), tokens);
    let control = meshlet_control::start(config).await.unwrap();
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let settings = settings(&control, web, "web-token");

    // Before the sidecar has a certificate the channel connects but proves nobody.
    let store = meshlet::tls::IdentityStore::new();
    let channel =
        meshlet::control_plane::ControlPlaneClient::new(&settings, store.clone()).unwrap();
    let anonymous = channel.get("/v1/whoami").await.unwrap();
    assert_eq!(anonymous.status(), 401);

    // A channel with a certificate presents it, and the control plane sees the SPIFFE identity.
    let channel = common::certified_channel(&settings).await;
    let answer = channel.get("/v1/whoami").await.unwrap();
    assert_eq!(answer.status(), 200);
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["identity"], web);
    control.shutdown().await;
}
