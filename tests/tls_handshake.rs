//! Mesh mTLS handshakes over real loopback sockets: identities, ALPN, rejections and rotation.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshlet::tls::offers_mesh_alpn;
use meshlet::tls::store::parse_certificates;
use meshlet::tls::testing::{spawn_echo_server, EchoClient, Handshake, TestCa};
use meshlet::tls::{
    client_config, peer_identity, provider, server_config, Credentials, IdentityStore, SpiffeId,
    ALPN_MESH_H2, ALPN_MESH_TCP,
};
use rustls::server::Acceptor;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

const HOUR: Duration = Duration::from_secs(3600);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).unwrap()
}

/// Credentials for `sa` issued by `issuer`, trusting `bundle_pem`.
fn creds(issuer: &TestCa, sa: &str, bundle_pem: &str) -> Credentials {
    let leaf = issuer.issue_for(&id(sa), HOUR);
    Credentials::from_pem(&leaf.chain_pem, leaf.key(), bundle_pem).unwrap()
}

async fn next_outcome(outcomes: &mut UnboundedReceiver<Handshake>) -> Handshake {
    tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn mutual_tls_proves_both_identities_and_negotiates_alpn() {
    let ca = TestCa::new("mesh");
    let server = IdentityStore::with_credentials(ca.credentials(&id("server"), HOUR));
    let client = IdentityStore::with_credentials(ca.credentials(&id("client"), HOUR));
    let (addr, mut outcomes) = spawn_echo_server(server_config(&server).unwrap()).await;

    for alpn in [ALPN_MESH_H2, ALPN_MESH_TCP] {
        let mut conn =
            EchoClient::connect(client_config(&client, id("server"), alpn).unwrap(), addr)
                .await
                .unwrap();
        let alpn_text = String::from_utf8_lossy(alpn);
        assert_eq!(conn.greeting, format!("{} {alpn_text}", id("client")));
        let (_, tls) = conn.stream.get_ref().get_ref();
        assert_eq!(peer_identity(tls), Some(id("server")));
        assert_eq!(tls.alpn_protocol(), Some(alpn));
        assert_eq!(
            tls.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        // The suite and group Envoy, HAProxy and nginx negotiate too (the benchmark compares like with like).
        assert_eq!(
            tls.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert_eq!(
            tls.negotiated_key_exchange_group().map(|g| g.name()),
            Some(rustls::NamedGroup::X25519)
        );
        assert_eq!(conn.echo("ping").await.unwrap(), "ping");

        let (peer, negotiated) = next_outcome(&mut outcomes).await.unwrap();
        assert_eq!(peer, Some(id("client")));
        assert_eq!(negotiated.as_deref(), Some(alpn));
    }
}

/// One handshake between a server and a client holding these credentials, the client expecting the server
/// to be `shop/server`: the client's error (if any) and the server's view of the handshake.
async fn attempt(server: Credentials, client: Credentials) -> (Option<String>, Handshake) {
    let server = IdentityStore::with_credentials(server);
    let client = IdentityStore::with_credentials(client);
    let (addr, mut outcomes) = spawn_echo_server(server_config(&server).unwrap()).await;
    let config = client_config(&client, id("server"), ALPN_MESH_H2).unwrap();
    let client_error = EchoClient::connect(config, addr)
        .await
        .err()
        .map(|e| e.to_string());
    (client_error, next_outcome(&mut outcomes).await)
}

#[tokio::test]
async fn peers_from_another_ca_are_rejected_on_both_sides() {
    let (ca, other) = (TestCa::new("mesh"), TestCa::new("other"));
    let bundle = ca.trust_bundle_pem();

    // The server's chain ends in another CA: the client refuses it.
    let (client_error, _) = attempt(
        creds(&other, "server", &bundle),
        creds(&ca, "client", &bundle),
    )
    .await;
    let client_error = client_error.expect("the client refuses the server");
    assert!(client_error.contains("UnknownIssuer"), "{client_error}");

    // The client's chain ends in another CA: the server refuses it; the client sees the alert on its first
    // read (in TLS 1.3 the server checks the client's certificate after the client has finished).
    let (client_error, server_view) = attempt(
        creds(&ca, "server", &bundle),
        creds(&other, "client", &bundle),
    )
    .await;
    assert!(client_error.is_some());
    let refused = server_view.unwrap_err();
    assert!(refused.contains("UnknownIssuer"), "{refused}");
}

#[tokio::test]
async fn expired_certificates_are_rejected_on_both_sides() {
    let ca = TestCa::new("mesh");
    let now = SystemTime::now();
    let expired = |sa: &str| {
        let leaf = ca.issue(&id(sa), now - 2 * HOUR, now - HOUR);
        Credentials::from_pem(&leaf.chain_pem, leaf.key(), &ca.trust_bundle_pem()).unwrap()
    };

    let (client_error, _) = attempt(expired("server"), ca.credentials(&id("client"), HOUR)).await;
    let client_error = client_error.expect("the client refuses the server");
    assert!(
        client_error.contains("certificate expired"),
        "{client_error}"
    );

    let (client_error, server_view) =
        attempt(ca.credentials(&id("server"), HOUR), expired("client")).await;
    assert!(client_error.is_some());
    let refused = server_view.unwrap_err();
    assert!(refused.contains("certificate expired"), "{refused}");
}

#[tokio::test]
async fn client_rejects_a_server_proving_another_identity() {
    let ca = TestCa::new("mesh");
    let impostor = ca.credentials(&id("impostor"), HOUR);
    let (client_error, _) = attempt(impostor, ca.credentials(&id("client"), HOUR)).await;
    let text = client_error.expect("the client refuses the server");
    assert!(
        text.contains(id("impostor").as_str()) && text.contains(id("server").as_str()),
        "{text}"
    );
}

#[tokio::test]
async fn server_requires_a_client_certificate() {
    let ca = TestCa::new("mesh");
    let server = IdentityStore::with_credentials(ca.credentials(&id("server"), HOUR));
    let client = IdentityStore::new(); // no certificate: the client can only answer with an empty one
    let (addr, mut outcomes) = spawn_echo_server(server_config(&server).unwrap()).await;

    // A client without credentials cannot even check the server (no trust bundle yet) and aborts.
    let err = EchoClient::connect(
        client_config(&client, id("server"), ALPN_MESH_H2).unwrap(),
        addr,
    )
    .await
    .err()
    .unwrap();
    assert!(err.to_string().contains("no mesh certificate"), "{err}");
    assert!(next_outcome(&mut outcomes).await.is_err());

    // A plain rustls client that trusts the server but has no certificate is refused by the server.
    let verifier_only = IdentityStore::with_credentials(ca.credentials(&id("client"), HOUR));
    let no_cert = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            meshlet::tls::verify::SpiffeServerVerifier::new(verifier_only.clone(), id("server")),
        ))
        .with_no_client_auth();
    assert!(EchoClient::connect(Arc::new(no_cert), addr).await.is_err());
    let refused = next_outcome(&mut outcomes).await.unwrap_err();
    assert!(
        refused.contains("NoCertificatesPresented") || refused.contains("no certificates"),
        "{refused}"
    );
}

/// Rotation: a new certificate (and a new bundle) in the store applies to new connections at once, while
/// connections made before keep working.
#[tokio::test]
async fn rotation_applies_to_new_connections_and_spares_old_ones() {
    let ca = TestCa::new("mesh");
    let server = IdentityStore::with_credentials(ca.credentials(&id("server"), HOUR));
    let client = IdentityStore::with_credentials(ca.credentials(&id("client"), HOUR));
    let (addr, _outcomes) = spawn_echo_server(server_config(&server).unwrap()).await;
    let config = client_config(&client, id("server"), ALPN_MESH_TCP).unwrap();

    let mut before = EchoClient::connect(config.clone(), addr).await.unwrap();
    let first_leaf = before.server_leaf().unwrap();

    server.replace(ca.credentials(&id("server"), HOUR));
    let mut after = EchoClient::connect(config.clone(), addr).await.unwrap();
    let second_leaf = after.server_leaf().unwrap();
    assert_ne!(
        first_leaf, second_leaf,
        "the new connection must present the new certificate"
    );
    assert_eq!(before.echo("still here").await.unwrap(), "still here");
    assert_eq!(after.echo("new").await.unwrap(), "new");

    // The server moves to a new CA: clients that only trust the old one refuse it ...
    let next_ca = TestCa::new("next");
    let both = format!("{}{}", ca.trust_bundle_pem(), next_ca.trust_bundle_pem());
    server.replace(creds(&next_ca, "server", &both));
    let err = EchoClient::connect(config.clone(), addr)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // ... until their store gets a bundle with the new anchor; the same config then connects.
    client.replace(creds(&ca, "client", &both));
    let mut rotated = EchoClient::connect(config, addr).await.unwrap();
    assert_eq!(rotated.greeting, format!("{} meshlet/tcp", id("client")));
    assert_eq!(rotated.echo("ok").await.unwrap(), "ok");
    assert_eq!(
        before.echo("old connection").await.unwrap(),
        "old connection"
    );
}

/// A permissive inbound port reads the ClientHello first: mesh ALPN gets the mesh config (client
/// certificate required), anything else is the application's own TLS and gets the application's config.
#[tokio::test]
async fn a_permissive_port_tells_mesh_peers_from_application_tls_by_alpn() {
    let ca = TestCa::new("mesh");
    let server = IdentityStore::with_credentials(ca.credentials(&id("server"), HOUR));
    let mesh_config = server_config(&server).unwrap();
    let app_ca = TestCa::new("app");
    let app_leaf = app_ca.issue_dns("app.test");
    let app_config = Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                parse_certificates(&app_leaf.chain_pem, "app").unwrap(),
                app_leaf.key(),
            )
            .unwrap(),
    );

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (mesh_config, app_config) = (mesh_config.clone(), app_config.clone());
            tokio::spawn(async move {
                let start = LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
                let mesh = offers_mesh_alpn(&start.client_hello());
                let mut tls = start
                    .into_stream(if mesh { mesh_config } else { app_config })
                    .await?;
                let greeting = match peer_identity(tls.get_ref().1) {
                    Some(peer) if mesh => format!("mesh {peer}\n"),
                    _ => "app\n".to_owned(),
                };
                tls.write_all(greeting.as_bytes()).await
            });
        }
    });

    let client = IdentityStore::with_credentials(ca.credentials(&id("client"), HOUR));
    let mesh = EchoClient::connect(
        client_config(&client, id("server"), ALPN_MESH_H2).unwrap(),
        addr,
    )
    .await
    .unwrap();
    assert_eq!(mesh.greeting, format!("mesh {}", id("client")));

    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(parse_certificates(&app_ca.trust_bundle_pem(), "app").unwrap());
    let mut app_client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    app_client.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("app.test").unwrap();
    let tls = TlsConnector::from(Arc::new(app_client))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut greeting = String::new();
    BufReader::new(tls).read_line(&mut greeting).await.unwrap();
    assert_eq!(greeting, "app\n");
}
