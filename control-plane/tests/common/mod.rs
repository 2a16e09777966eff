//! Helpers shared by the control plane's end-to-end tests: a real HTTPS client for the issuance API,
//! CSR making, and checks of issued certificates with rustls-webpki and x509-parser.

#![allow(dead_code)]

pub mod fake_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshlet::tls::api::{IssueError, IssueRequest, IssueResponse, ISSUE_PATH};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

/// What the issuance API answered.
pub enum Answer {
    Issued(IssueResponse),
    Refused(u16, IssueError),
}

impl Answer {
    pub fn issued(self) -> IssueResponse {
        match self {
            Answer::Issued(r) => r,
            Answer::Refused(status, e) => panic!("refused with {status}: {e:?}"),
        }
    }

    pub fn refused(self) -> (u16, IssueError) {
        match self {
            Answer::Refused(status, e) => (status, e),
            Answer::Issued(_) => panic!("issued, but a refusal was expected"),
        }
    }
}

/// A rustls client config trusting `bundle_pem`, TLS 1.3 only, ring provider.
pub fn client_config(bundle_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Sends raw `body` to the API over a fresh TLS connection, verifying the server as `server_name`.
pub async fn post_raw(
    addr: SocketAddr,
    server_name: &str,
    bundle_pem: &str,
    bearer: Option<&str>,
    body: Vec<u8>,
) -> (u16, Bytes) {
    post_raw_to(addr, server_name, bundle_pem, bearer, ISSUE_PATH, body).await
}

/// Like [`post_raw`], to any path of the API.
pub async fn post_raw_to(
    addr: SocketAddr,
    server_name: &str,
    bundle_pem: &str,
    bearer: Option<&str>,
    path: &str,
    body: Vec<u8>,
) -> (u16, Bytes) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(bundle_pem)));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the control plane");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::post(path)
        .header(http::header::HOST, server_name)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(token) = bearer {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// One control plane's API as a client sees it: where, under which name, trusting what.
pub struct Api {
    pub addr: SocketAddr,
    pub server_name: &'static str,
    pub bundle_pem: String,
}

impl Api {
    /// A local control plane's API, verified as `localhost` with the control plane's own bundle.
    pub fn of(control: &meshlet_control::ControlPlane) -> Self {
        Api {
            addr: control.api_addr(),
            server_name: "localhost",
            bundle_pem: control.trust_bundle_pem().to_string(),
        }
    }

    /// Asks for a certificate with `bearer` as the credential.
    pub async fn issue(&self, bearer: Option<&str>, request: &IssueRequest) -> Answer {
        issue_as(
            self.addr,
            self.server_name,
            &self.bundle_pem,
            bearer,
            request,
        )
        .await
    }

    /// Asks for a certificate and asserts the refusal's status and reason; returns the refusal.
    pub async fn expect_refusal(
        &self,
        bearer: Option<&str>,
        request: &IssueRequest,
        status: u16,
        reason: &str,
    ) -> IssueError {
        let (got_status, error) = self.issue(bearer, request).await.refused();
        assert_eq!(
            (got_status, error.reason.as_str()),
            (status, reason),
            "{error:?}"
        );
        error
    }
}

/// Asks the API for a certificate, verifying the server as `localhost`.
pub async fn issue(
    addr: SocketAddr,
    bundle_pem: &str,
    bearer: Option<&str>,
    request: &IssueRequest,
) -> Answer {
    issue_as(addr, "localhost", bundle_pem, bearer, request).await
}

/// Asks the API for a certificate, verifying the server as `server_name`.
pub async fn issue_as(
    addr: SocketAddr,
    server_name: &str,
    bundle_pem: &str,
    bearer: Option<&str>,
    request: &IssueRequest,
) -> Answer {
    let (status, body) = post_raw(
        addr,
        server_name,
        bundle_pem,
        bearer,
        serde_json::to_vec(request).unwrap(),
    )
    .await;
    if status == 200 {
        Answer::Issued(serde_json::from_slice(&body).unwrap())
    } else {
        let error: IssueError = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "status {status}, body {:?} is not an IssueError: {e}",
                String::from_utf8_lossy(&body)
            )
        });
        Answer::Refused(status, error)
    }
}

/// A fresh P-256 key and a CSR for it with default (ignored) contents.
pub fn request_for(identity: &str) -> (KeyPair, IssueRequest) {
    let key = KeyPair::generate().unwrap();
    let csr_pem = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (
        key,
        IssueRequest {
            identity: identity.to_string(),
            csr_pem,
        },
    )
}

/// Writes a join-token file into `dir` and returns its path.
pub fn write_join_tokens(dir: &std::path::Path, yaml: &str) -> std::path::PathBuf {
    let path = dir.join("join-tokens.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Checks an issued chain the way a peer will: the leaf chains to the bundle for both client and server
/// use, carries exactly one SAN (the URI `identity`), is not a CA, holds `public_key`, lives `ttl`.
pub fn check_leaf(response: &IssueResponse, identity: &str, key: &KeyPair, ttl: Duration) {
    let chain = certs(&response.certificate_chain_pem);
    assert!(
        chain.len() >= 2,
        "leaf and intermediate expected, got {} certificates",
        chain.len()
    );
    let anchors_der = certs(&response.trust_bundle_pem);
    let anchors: Vec<_> = anchors_der
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).unwrap())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    let algs: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm] = &[
        webpki::ring::ECDSA_P256_SHA256,
        webpki::ring::ECDSA_P384_SHA384,
        webpki::ring::ED25519,
    ];
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        leaf.verify_for_usage(
            algs,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .expect("the leaf verifies against the trust bundle");
    }

    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let sans = cert
        .subject_alternative_name()
        .unwrap()
        .expect("a SAN extension");
    assert!(sans.critical, "SAN must be critical with an empty subject");
    assert_eq!(
        sans.value.general_names,
        vec![GeneralName::URI(identity)],
        "exactly the one URI SAN"
    );
    let basic = cert
        .basic_constraints()
        .unwrap()
        .expect("basic constraints present");
    assert!(!basic.value.ca, "the leaf must not be a CA");
    assert!(!cert.is_ca());
    assert!(cert.subject().iter().next().is_none(), "empty subject");
    let usage = cert.key_usage().unwrap().expect("key usage present");
    assert!(
        usage.value.digital_signature() && !usage.value.key_cert_sign() && !usage.value.crl_sign()
    );
    let eku = cert
        .extended_key_usage()
        .unwrap()
        .expect("extended key usage present");
    assert!(
        eku.value.server_auth
            && eku.value.client_auth
            && !eku.value.any
            && eku.value.other.is_empty()
    );
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(key).as_slice()
    );

    let not_before = cert.validity().not_before.timestamp() as u64;
    let not_after = cert.validity().not_after.timestamp() as u64;
    assert_eq!(not_before, response.not_before_unix);
    assert_eq!(not_after, response.not_after_unix);
    assert_eq!(
        not_after - not_before,
        ttl.as_secs() + 60,
        "valid from a minute ago for the TTL"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(not_before <= now && now < not_after);
}

/// GETs `path` from the plain HTTP admin endpoint.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The settings of a sidecar with `identity` that asks `control` for its certificate with `join_token`.
pub fn sidecar_settings(
    control: &meshlet_control::ControlPlane,
    identity: &str,
    join_token: &str,
) -> meshlet::tls::IdentitySettings {
    let mut anchors = rustls::RootCertStore::empty();
    for cert in certs(control.trust_bundle_pem()) {
        anchors.add(cert).unwrap();
    }
    meshlet::tls::IdentitySettings {
        control_plane_addr: control.api_addr().to_string(),
        // The sidecar's default --control-plane-name, which the generated serving certificate carries.
        control_plane_name: ServerName::try_from("meshlet-control.meshlet.svc").unwrap(),
        trust_anchors: Arc::new(anchors),
        identity: identity.parse::<meshlet::tls::SpiffeId>().unwrap(),
        credential: meshlet::tls::client::Credential::JoinToken(
            join_token.parse::<meshlet::tls::client::Secret>().unwrap(),
        ),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        request_timeout: Duration::from_secs(10),
    }
}

/// The sidecar's channel to the control plane, presenting a certificate issued for `settings` first.
pub async fn certified_channel(
    settings: &meshlet::tls::IdentitySettings,
) -> Arc<meshlet::control_plane::ControlPlaneClient> {
    let store = meshlet::tls::IdentityStore::new();
    let manager = meshlet::tls::CertManager::new(settings.clone()).unwrap();
    store.replace(manager.request().await.unwrap());
    meshlet::control_plane::ControlPlaneClient::new(settings, store).unwrap()
}

/// A TLS listener on loopback whose certificate (for `127.0.0.1`) comes from a CA of its own, for the fake
/// Kubernetes API servers: clients trust `ca_der`.
pub struct LoopbackTls {
    pub listener: tokio::net::TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub ca_der: CertificateDer<'static>,
}

/// Binds a [`LoopbackTls`] on a free port.
pub async fn loopback_tls() -> LoopbackTls {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )),
    )
    .unwrap();
    LoopbackTls {
        listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        ca_der: ca_cert.der().clone(),
    }
}
