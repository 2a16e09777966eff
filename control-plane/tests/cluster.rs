//! Cluster mode end to end: the issuer comes from cert-manager-style files, and ServiceAccount tokens are
//! checked with TokenReview through the real `kube::Client` against a fake API server over HTTPS on loopback
//! that answers with recorded TokenReview JSON.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshlet_control::Config;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
const SERVICE_NAME: &str = "meshlet-control.meshlet.svc";

const AUTHENTICATED: &str = include_str!("fixtures/tokenreview-authenticated.json");
const WRONG_AUDIENCE: &str = include_str!("fixtures/tokenreview-wrong-audience.json");
const UNAUTHENTICATED: &str = include_str!("fixtures/tokenreview-unauthenticated.json");

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn server_params(names: Vec<String>) -> CertificateParams {
    let mut params = CertificateParams::new(names).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params
}

/// What cert-manager leaves in two Secrets: a CA issuer (root → intermediate) for workload certificates and
/// a serving certificate for the control plane's Service name, issued by that intermediate.
struct CertManagerFiles {
    root_pem: String,
    issuer_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn write_cert_manager_files(issuer_dir: &Path, serving_dir: &Path) -> CertManagerFiles {
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("test cluster root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);

    let issuer_key = KeyPair::generate().unwrap();
    let mut issuer_params = ca_params("meshlet identity issuer");
    issuer_params.use_authority_key_identifier_extension = true;
    let issuer_cert = issuer_params.signed_by(&issuer_key, &root_issuer).unwrap();

    std::fs::create_dir_all(issuer_dir).unwrap();
    std::fs::write(issuer_dir.join("tls.crt"), issuer_cert.pem()).unwrap();
    std::fs::write(issuer_dir.join("tls.key"), issuer_key.serialize_pem()).unwrap();
    std::fs::write(issuer_dir.join("ca.crt"), root.pem()).unwrap();
    assert!(
        issuer_key
            .serialize_pem()
            .starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8, as cert-manager writes"
    );

    let issuer_pem = issuer_cert.pem();
    let issuer = Issuer::new(issuer_params, issuer_key);
    let serving_key = KeyPair::generate().unwrap();
    let serving = server_params(vec![SERVICE_NAME.to_string()])
        .signed_by(&serving_key, &issuer)
        .unwrap();
    std::fs::create_dir_all(serving_dir).unwrap();
    std::fs::write(
        serving_dir.join("tls.crt"),
        format!("{}{}", serving.pem(), issuer_cert.pem()),
    )
    .unwrap();
    std::fs::write(serving_dir.join("tls.key"), serving_key.serialize_pem()).unwrap();
    CertManagerFiles {
        root_pem: root.pem(),
        issuer_pem,
        issuer,
    }
}

/// A stand-in for the Kubernetes API server: HTTPS with its own CA, answering TokenReview creations with
/// recorded responses chosen by token, and keeping every review it was sent.
struct FakeApiServer {
    addr: SocketAddr,
    ca_der: CertificateDer<'static>,
    reviews: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn start_fake_api_server() -> FakeApiServer {
    let LoopbackTls {
        listener,
        acceptor,
        ca_der,
    } = loopback_tls().await;
    let addr = listener.local_addr().unwrap();
    let reviews = Arc::new(Mutex::new(Vec::new()));
    let seen = reviews.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(move |request| answer(request, seen.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    FakeApiServer {
        addr,
        ca_der,
        reviews,
    }
}

async fn answer(
    request: http::Request<Incoming>,
    seen: Arc<Mutex<Vec<serde_json::Value>>>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if method != http::Method::POST || path != "/apis/authentication.k8s.io/v1/tokenreviews" {
        let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
        return Ok(json(404, status));
    }
    let review: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let recorded = match review["spec"]["token"].as_str() {
        Some("sa-token-web") => AUTHENTICATED,
        Some("sa-token-for-the-api-server") => WRONG_AUDIENCE,
        _ => UNAUTHENTICATED,
    };
    seen.lock().unwrap().push(review);
    Ok(json(201, recorded))
}

fn json(status: u16, body: &'static str) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn kube_client(api_server: SocketAddr, ca_der: &CertificateDer<'_>) -> kube::Client {
    let mut config = kube::Config::new(format!("https://{api_server}").parse().unwrap());
    config.root_cert = Some(vec![ca_der.to_vec()]);
    config.read_timeout = Some(Duration::from_secs(10));
    kube::Client::try_from(config).unwrap()
}

#[tokio::test]
async fn service_account_tokens_are_checked_with_token_review() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_cert_manager_files(&dir.path().join("issuer"), &dir.path().join("serving"));
    let api_server = start_fake_api_server().await;
    let mut config = Config::cluster_loopback(dir.path().join("issuer"));
    config.api_cert_dir = Some(dir.path().join("serving"));
    config.cert_ttl = Duration::from_secs(600);
    let control = meshlet_control::start_with_kube_client(
        config,
        kube_client(api_server.addr, &api_server.ca_der),
    )
    .await
    .unwrap();
    assert_eq!(
        control.trust_bundle_pem(),
        files.root_pem,
        "the bundle is ca.crt"
    );
    let api = Api {
        addr: control.api_addr(),
        server_name: SERVICE_NAME,
        bundle_pem: files.root_pem.clone(),
    };

    // Authenticated, right audience, own identity: issued under the cert-manager issuer.
    let (key, request) = request_for(WEB);
    let issued = api.issue(Some("sa-token-web"), &request).await.issued();
    check_leaf(&issued, WEB, &key, Duration::from_secs(600));

    // Authenticated, but for another audience (a token meant for the API server): 401.
    let (_, request) = request_for(WEB);
    let error = api
        .expect_refusal(
            Some("sa-token-for-the-api-server"),
            &request,
            401,
            "bad-credential",
        )
        .await;
    assert!(error.message.contains("audience"), "{error:?}");

    // Not authenticated: 401.
    let (_, request) = request_for(WEB);
    let error = api
        .expect_refusal(Some("sa-token-revoked"), &request, 401, "bad-credential")
        .await;
    assert!(error.message.contains("invalid bearer token"), "{error:?}");

    // Authenticated as shop/web but asking for shop/db: 403.
    let (_, request) = request_for(DB);
    api.expect_refusal(Some("sa-token-web"), &request, 403, "identity-mismatch")
        .await;

    // Every review named the audience and carried the caller's token.
    let reviews = api_server.reviews.lock().unwrap().clone();
    let tokens: Vec<_> = reviews
        .iter()
        .map(|r| r["spec"]["token"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        tokens,
        [
            "sa-token-web",
            "sa-token-for-the-api-server",
            "sa-token-revoked",
            "sa-token-web"
        ]
    );
    for review in &reviews {
        assert_eq!(review["kind"], "TokenReview");
        assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(
            review["spec"]["audiences"],
            serde_json::json!(["meshlet"]),
            "{review}"
        );
    }
    control.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_api_server_is_our_failure_not_the_callers() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_cert_manager_files(&dir.path().join("issuer"), &dir.path().join("serving"));
    let api_server = start_fake_api_server().await;
    // A port with nothing listening: bind, note, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = Config::cluster_loopback(dir.path().join("issuer"));
    let control =
        meshlet_control::start_with_kube_client(config, kube_client(closed, &api_server.ca_der))
            .await
            .unwrap();
    let (_, request) = request_for(WEB);
    // No --api-cert-dir: the serving certificate is made from the issuer, for the same Service name.
    let api = Api {
        addr: control.api_addr(),
        server_name: SERVICE_NAME,
        bundle_pem: files.root_pem.clone(),
    };
    let error = api
        .expect_refusal(
            Some("sa-token-web"),
            &request,
            503,
            "credential-check-unavailable",
        )
        .await;
    assert!(
        !error.message.contains("127.0.0.1"),
        "internal details stay in the log: {error:?}"
    );
    control.shutdown().await;
}

/// Cluster mode end to end: what the Kubernetes watchers see is what a sidecar's discovery watch receives.
#[tokio::test]
async fn the_discovery_watch_streams_what_the_cluster_says() {
    use common::fake_api::FakeApiServer;
    use meshlet::discovery::protocol::{WatchMessage, WATCH_PATH};
    use meshlet::discovery::watch::LineBuffer;

    let dir = tempfile::tempdir().unwrap();
    let files = write_cert_manager_files(&dir.path().join("issuer"), &dir.path().join("serving"));
    let api = FakeApiServer::start(&[
        (
            "/api/v1/services",
            include_str!("fixtures/k8s/services-list.json"),
        ),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            include_str!("fixtures/k8s/endpointslices-list.json"),
        ),
        ("/api/v1/pods", include_str!("fixtures/k8s/pods-list.json")),
    ])
    .await;
    let mut config = Config::cluster_loopback(dir.path().join("issuer"));
    config.api_cert_dir = Some(dir.path().join("serving"));
    config.discovery_sync_timeout = Duration::from_secs(10);
    let control = meshlet_control::start_with_kube_client(config, api.client())
        .await
        .unwrap();

    // A sidecar certificate from the cluster's issuer (what TokenReview-backed issuance would give).
    let key = KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(WEB.try_into().unwrap())];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let leaf = params.signed_by(&key, &files.issuer).unwrap();
    let credentials = meshlet::tls::Credentials::from_pem(
        &format!("{}{}", leaf.pem(), files.issuer_pem),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        &files.root_pem,
    )
    .unwrap();
    let mut anchors = rustls::RootCertStore::empty();
    for cert in common::certs(&files.root_pem) {
        anchors.add(cert).unwrap();
    }
    let settings = meshlet::tls::IdentitySettings {
        control_plane_addr: control.api_addr().to_string(),
        control_plane_name: rustls::pki_types::ServerName::try_from(SERVICE_NAME).unwrap(),
        trust_anchors: Arc::new(anchors),
        identity: WEB.parse().unwrap(),
        credential: meshlet::tls::client::Credential::JoinToken("unused".parse().unwrap()),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        request_timeout: Duration::from_secs(10),
    };
    let store = meshlet::tls::IdentityStore::with_credentials(credentials);
    let channel = meshlet::control_plane::ControlPlaneClient::new(&settings, store).unwrap();
    let response = channel.get(WATCH_PATH).await.unwrap();
    assert_eq!(response.status(), 200);

    let mut body = response.into_body();
    let mut lines = LineBuffer::new(1 << 20);
    let snapshot = 'read: loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the snapshot arrives")
            .expect("the stream is open")
            .unwrap();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for line in lines.push(&data).unwrap() {
            if let WatchMessage::Snapshot { mesh, .. } = serde_json::from_slice(&line).unwrap() {
                break 'read mesh;
            }
        }
    };
    let payment = snapshot
        .services
        .iter()
        .find(|s| s.name == "payment.shop")
        .expect("the cluster's payment Service is in the first snapshot, not an empty mesh");
    assert_eq!(
        payment.addresses,
        ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        payment.identity.as_str(),
        "spiffe://cluster.local/ns/shop/sa/payment"
    );
    assert!(!payment.endpoints.is_empty());
    control.shutdown().await;
}
