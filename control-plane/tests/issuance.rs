//! Local mode end to end: a real control plane on loopback, real TLS 1.3 handshakes, join tokens.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use meshlet::tls::api::IssueRequest;
use meshlet_control::{ca, Config};
use rcgen::{CertificateParams, CustomExtension, KeyPair, SanType};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
const TOKENS: &str = "\
- token: web-join-token
  identity: spiffe://cluster.local/ns/shop/sa/web
- token: expired-join-token
  identity: spiffe://cluster.local/ns/shop/sa/db
  expires: 2021-06-01T00:00:00Z
";

fn local_config(dir: &std::path::Path) -> Config {
    let tokens = write_join_tokens(dir, TOKENS);
    Config::local_loopback(dir.join("ca"), tokens)
}

/// A local-mode control plane on loopback; keep the directory alive as long as the control plane.
async fn start_local() -> (tempfile::TempDir, meshlet_control::ControlPlane) {
    let dir = tempfile::tempdir().unwrap();
    let control = meshlet_control::start(local_config(dir.path()))
        .await
        .unwrap();
    (dir, control)
}

#[tokio::test]
async fn issues_a_spiffe_leaf_for_a_good_join_token_and_keeps_its_ca_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = local_config(dir.path());
    config.cert_ttl = Duration::from_secs(3600);
    let control = meshlet_control::start(config.clone()).await.unwrap();

    let (key, request) = request_for(WEB);
    let issued = Api::of(&control)
        .issue(Some("web-join-token"), &request)
        .await
        .issued();
    check_leaf(&issued, WEB, &key, Duration::from_secs(3600));
    assert_eq!(issued.trust_bundle_pem, control.trust_bundle_pem());

    for key_file in [ca::ROOT_KEY_FILE, ca::ISSUER_KEY_FILE] {
        let mode = std::fs::metadata(dir.path().join("ca").join(key_file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key_file} is mode {mode:o}");
    }

    let (status, metrics) = admin_get(control.admin_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("meshlet_control_certificates_issued_total 1"),
        "{metrics}"
    );
    let root_before = control.trust_bundle_pem().to_string();
    control.shutdown().await;

    // Same data directory: same root, so sidecars holding the old bundle still trust new certificates.
    let restarted = meshlet_control::start(config).await.unwrap();
    assert_eq!(restarted.trust_bundle_pem(), root_before);
    let (key, request) = request_for(WEB);
    let issued = issue(
        restarted.api_addr(),
        &root_before,
        Some("web-join-token"),
        &request,
    )
    .await
    .issued();
    check_leaf(&issued, WEB, &key, Duration::from_secs(3600));
    restarted.shutdown().await;
}

#[tokio::test]
async fn a_csr_asking_for_ca_rights_and_extra_names_gets_none_of_them() {
    let (_dir, control) = start_local().await;

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap(),
    ));
    // rcgen does not put basic constraints in CSRs; ask for CA:TRUE explicitly (2.5.29.19, critical).
    let mut ca_request =
        CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    ca_request.set_criticality(true);
    params.custom_extensions.push(ca_request);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let csr_pem = params.serialize_request(&key).unwrap().pem().unwrap();
    // The CSR really asks for all of it.
    let csr_der = pem::parse(&csr_pem).unwrap().into_contents();
    let (_, csr) = X509CertificationRequest::from_der(&csr_der).unwrap();
    assert_eq!(
        csr.requested_extensions().unwrap().count(),
        3,
        "SAN, key usage and basic constraints requested"
    );

    let request = IssueRequest {
        identity: WEB.to_string(),
        csr_pem,
    };
    let issued = Api::of(&control)
        .issue(Some("web-join-token"), &request)
        .await
        .issued();
    check_leaf(&issued, WEB, &key, Duration::from_secs(24 * 3600));
    control.shutdown().await;
}

#[tokio::test]
async fn refusals_carry_status_and_reason_and_are_counted() {
    let (_dir, control) = start_local().await;
    let (addr, bundle) = (control.api_addr(), control.trust_bundle_pem().to_string());
    let api = Api::of(&control);

    // Malformed CSR: 400.
    let request = IssueRequest {
        identity: WEB.to_string(),
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
            .into(),
    };
    api.expect_refusal(Some("web-join-token"), &request, 400, "malformed-csr")
        .await;

    // A CSR altered after signing (its signature no longer matches its contents): 400.
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::new(vec!["a.example".to_string()])
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let mut der = csr.der().to_vec();
    let at = der.windows(9).position(|w| w == b"a.example").unwrap();
    der[at] = b'b';
    let request = IssueRequest {
        identity: WEB.to_string(),
        csr_pem: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der)),
    };
    let error = api
        .expect_refusal(Some("web-join-token"), &request, 400, "malformed-csr")
        .await;
    assert!(error.message.contains("signature"), "{error:?}");

    // Not JSON: 400.
    let (status, body) = post_raw(
        addr,
        "localhost",
        &bundle,
        Some("web-join-token"),
        b"{".to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{body:?}");

    // Unknown join token, no token: 401.
    let (_, request) = request_for(WEB);
    api.expect_refusal(Some("guessed-token"), &request, 401, "bad-credential")
        .await;
    api.expect_refusal(None, &request, 401, "bad-credential")
        .await;

    // Expired join token: 401.
    let (_, request) = request_for(DB);
    api.expect_refusal(
        Some("expired-join-token"),
        &request,
        401,
        "expired-credential",
    )
    .await;

    // Good token, someone else's identity: 403.
    let (_, request) = request_for(DB);
    let error = api
        .expect_refusal(Some("web-join-token"), &request, 403, "identity-mismatch")
        .await;
    assert!(
        error.message.contains(WEB) && error.message.contains(DB),
        "{error:?}"
    );

    // Another trust domain: 403.
    let (_, request) = request_for("spiffe://other.example/ns/shop/sa/web");
    api.expect_refusal(Some("web-join-token"), &request, 403, "wrong-trust-domain")
        .await;

    // Not an identity at all: 400.
    let (_, request) = request_for("web");
    api.expect_refusal(Some("web-join-token"), &request, 400, "malformed-identity")
        .await;

    let (_, metrics) = admin_get(control.admin_addr(), "/metrics").await;
    for (reason, count) in [
        ("malformed-csr", 2),
        ("malformed-request", 1),
        ("bad-credential", 2),
        ("expired-credential", 1),
        ("identity-mismatch", 1),
        ("wrong-trust-domain", 1),
        ("malformed-identity", 1),
    ] {
        let line = format!("meshlet_control_issuance_errors_total{{reason=\"{reason}\"}} {count}");
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
    }
    assert!(
        !metrics.contains("meshlet_control_certificates_issued_total 1"),
        "{metrics}"
    );
    control.shutdown().await;
}

#[tokio::test]
async fn admin_reports_live_and_ready_and_the_api_rejects_other_paths() {
    let (_dir, control) = start_local().await;
    assert_eq!(admin_get(control.admin_addr(), "/live").await.0, 200);
    assert_eq!(admin_get(control.admin_addr(), "/ready").await.0, 200);
    assert_eq!(admin_get(control.admin_addr(), "/nothing").await.0, 404);
    control.shutdown().await;
}

#[tokio::test]
async fn a_taken_port_fails_start_up_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = local_config(dir.path());
    config.admin_addr = taken.local_addr().unwrap();
    let err = meshlet_control::start(config)
        .await
        .err()
        .expect("start-up must fail");
    let message = err.to_string();
    assert!(
        message.contains("--admin-addr")
            && message.contains(&taken.local_addr().unwrap().to_string()),
        "{message}"
    );
}
