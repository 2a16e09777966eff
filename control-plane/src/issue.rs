//! Certificate issuance: from an authenticated request with a CSR to a signed workload certificate.
//!
//! The order matters. The body is parsed first (cheap), then the credential is checked (before any
//! cryptographic work for a stranger), then the identity asked for is compared with the one the credential
//! proves, and only then is the CSR's signature verified and its public key — the only thing taken from
//! it — signed into a certificate whose every other field the control plane chooses.
//!
//! The CSR is parsed with x509-parser rather than rcgen's `CertificateSigningRequestParams::from_pem`:
//! rcgen turns the CSR's requested extensions into certificate parameters (which would then have to be
//! thrown away) and refuses any extension it does not model (name constraints, private extensions, unknown
//! extended key usages), whereas here every requested extension is simply ignored, so a CSR that asks for
//! too much still gets a certificate with none of it.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use meshlet::tls::api::{IssueError, IssueRequest, IssueResponse};
use meshlet::tls::{IdentityError, SpiffeId};
use rcgen::PublicKeyData;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::ca::{Authority, CaError};
use crate::credential::{CredentialError, Credentials};
use crate::metrics::Metrics;

/// Largest request body accepted; a P-256 CSR in PEM is well under 1 KiB, RSA-4096 under 4 KiB.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why a request got no certificate. Each maps to an HTTP status and a reason on the wire.
#[derive(Debug, thiserror::Error)]
pub enum IssueFailure {
    #[error("the request body is not a JSON IssueRequest: {0}")]
    MalformedRequest(String),
    #[error("the requested identity is not valid: {0}")]
    MalformedIdentity(IdentityError),
    #[error("{0}")]
    Credential(CredentialError),
    #[error("the requested identity {requested} is not in trust domain {expected:?}")]
    WrongTrustDomain { requested: String, expected: String },
    #[error("the credential is for {proven}, not the requested {requested}")]
    IdentityMismatch { proven: String, requested: String },
    #[error("the CSR is not acceptable: {0}")]
    MalformedCsr(String),
    #[error("signing failed: {0}")]
    Sign(CaError),
}

impl IssueFailure {
    /// The HTTP status: 400 malformed, 401 bad credential, 403 not allowed, 503/500 our fault.
    pub fn status(&self) -> StatusCode {
        match self {
            IssueFailure::MalformedRequest(_)
            | IssueFailure::MalformedIdentity(_)
            | IssueFailure::MalformedCsr(_) => StatusCode::BAD_REQUEST,
            IssueFailure::Credential(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            IssueFailure::Credential(_) => StatusCode::UNAUTHORIZED,
            IssueFailure::WrongTrustDomain { .. } | IssueFailure::IdentityMismatch { .. } => {
                StatusCode::FORBIDDEN
            }
            IssueFailure::Sign(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Short machine-readable reason, used on the wire and as the metric label (a fixed, small set).
    pub fn reason(&self) -> &'static str {
        match self {
            IssueFailure::MalformedRequest(_) => "malformed-request",
            IssueFailure::MalformedIdentity(_) => "malformed-identity",
            IssueFailure::Credential(e) => e.reason(),
            IssueFailure::WrongTrustDomain { .. } => "wrong-trust-domain",
            IssueFailure::IdentityMismatch { .. } => "identity-mismatch",
            IssueFailure::MalformedCsr(_) => "malformed-csr",
            IssueFailure::Sign(_) => "internal",
        }
    }

    /// The wire form of the refusal. Our own failures get a generic message: their details (API server
    /// addresses, file paths) are for the log, not for callers.
    pub fn to_wire(&self) -> IssueError {
        let message = if self.status().is_server_error() {
            "the control plane could not complete the request; retry later".to_string()
        } else {
            self.to_string()
        };
        IssueError {
            reason: self.reason().to_string(),
            message,
        }
    }
}

/// Signs workload certificates for authenticated callers.
pub struct IssuanceService {
    authority: Arc<Authority>,
    credentials: Credentials,
    trust_domain: String,
    ttl: Duration,
    metrics: Arc<Metrics>,
}

impl IssuanceService {
    /// An issuance service minting identities in `trust_domain`, certificates valid for `ttl`.
    pub fn new(
        authority: Arc<Authority>,
        credentials: Credentials,
        trust_domain: String,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            authority,
            credentials,
            trust_domain,
            ttl,
            metrics,
        }
    }

    /// Handles one request body with its bearer credential; logs and counts the outcome.
    pub async fn issue(
        &self,
        bearer: Option<&str>,
        body: &[u8],
    ) -> Result<IssueResponse, IssueFailure> {
        match self.try_issue(bearer, body).await {
            Ok(response) => {
                self.metrics.certificates_issued.inc();
                Ok(response)
            }
            Err(failure) => Err(self.refuse(failure)),
        }
    }

    /// Logs and counts a refusal, including ones decided before the body reached [`Self::issue`].
    pub fn refuse(&self, failure: IssueFailure) -> IssueFailure {
        self.metrics
            .issuance_errors
            .with_label_values(&[failure.reason()])
            .inc();
        if failure.status().is_server_error() {
            tracing::error!(reason = failure.reason(), error = %failure, "certificate request failed");
        } else {
            tracing::warn!(reason = failure.reason(), error = %failure, "certificate request refused");
        }
        failure
    }

    async fn try_issue(
        &self,
        bearer: Option<&str>,
        body: &[u8],
    ) -> Result<IssueResponse, IssueFailure> {
        let request: IssueRequest = serde_json::from_slice(body)
            .map_err(|e| IssueFailure::MalformedRequest(e.to_string()))?;
        let proven = self
            .credentials
            .authenticate(bearer)
            .await
            .map_err(IssueFailure::Credential)?;
        let requested = request
            .identity
            .parse::<SpiffeId>()
            .map_err(IssueFailure::MalformedIdentity)?;
        if requested.trust_domain() != self.trust_domain {
            return Err(IssueFailure::WrongTrustDomain {
                requested: requested.to_string(),
                expected: self.trust_domain.clone(),
            });
        }
        if requested != proven {
            return Err(IssueFailure::IdentityMismatch {
                proven: proven.to_string(),
                requested: requested.to_string(),
            });
        }
        let public_key = csr_public_key(&request.csr_pem).map_err(IssueFailure::MalformedCsr)?;
        let leaf = self
            .authority
            .sign_workload(&public_key, &requested, self.ttl)
            .map_err(IssueFailure::Sign)?;
        tracing::info!(identity = %requested, not_after = leaf.not_after_unix, "certificate issued");
        Ok(IssueResponse {
            certificate_chain_pem: leaf.chain_pem,
            trust_bundle_pem: self.authority.trust_bundle_pem().to_string(),
            not_after_unix: leaf.not_after_unix,
            not_before_unix: leaf.not_before_unix,
        })
    }
}

/// Key types a sidecar may certify: what rustls with ring can use for TLS 1.3 (RSA is slow and needs large
/// keys to be safe; P-521 is not supported by ring), so no certificate is issued that the mesh cannot use.
const ACCEPTED_KEYS: [&rcgen::SignatureAlgorithm; 3] = [
    &rcgen::PKCS_ECDSA_P256_SHA256,
    &rcgen::PKCS_ECDSA_P384_SHA384,
    &rcgen::PKCS_ED25519,
];

/// Parses a PEM CSR, checks that it is signed by the key it carries (proof the caller holds that key) and
/// that the key is of an accepted type, and returns that public key. Nothing else in the CSR is looked at.
pub fn csr_public_key(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, String> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| format!("no PEM CERTIFICATE REQUEST found: {e}"))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| format!("not a PKCS#10 request: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the request", rest.len()));
    }
    csr.verify_signature()
        .map_err(|e| format!("its signature does not verify with its own public key: {e}"))?;
    let key = rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| format!("unsupported public key: {e}"))?;
    if !ACCEPTED_KEYS.contains(&key.algorithm()) {
        return Err(format!(
            "public key type {:?} is not accepted; use ECDSA P-256 or P-384, or Ed25519",
            key.algorithm()
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr_pem(params: CertificateParams, key: &KeyPair) -> String {
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn takes_the_public_key_of_a_well_signed_csr() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_pem(CertificateParams::default(), &key);
        let spki = csr_public_key(&pem).unwrap();
        assert_eq!(spki.der_bytes(), key.der_bytes());
    }

    #[test]
    fn accepts_only_key_types_the_mesh_can_use() {
        for alg in ACCEPTED_KEYS {
            let key = KeyPair::generate_for(alg).unwrap();
            assert!(
                csr_public_key(&csr_pem(CertificateParams::default(), &key)).is_ok(),
                "{alg:?}"
            );
        }
        // Made with `openssl req -new -newkey rsa:2048 -nodes`: well signed, but RSA.
        let rsa = include_str!("../tests/fixtures/rsa-2048.csr");
        let err = csr_public_key(rsa).unwrap_err();
        assert!(err.contains("not accepted"), "{err}");
    }

    #[test]
    fn refuses_garbage_and_tampered_csrs() {
        assert!(csr_public_key("").is_err());
        assert!(csr_public_key(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        )
        .is_err());

        let key = KeyPair::generate().unwrap();
        let request = CertificateParams::new(vec!["a.example".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        let mut der = request.der().to_vec();
        // Flip one byte of the name inside the signed part: the signature no longer matches.
        let at = der.windows(9).position(|w| w == b"a.example").unwrap();
        der[at] = b'b';
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let err = csr_public_key(&tampered).unwrap_err();
        assert!(err.contains("signature"), "{err}");
    }

    #[test]
    fn requested_extensions_rcgen_does_not_model_are_ignored_not_refused() {
        // Why the CSR is parsed here and not by rcgen: rcgen refuses extensions it does not model.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &[1, 3, 6, 1, 4, 1, 99999, 1],
                vec![0x05, 0x00],
            ));
        let pem = csr_pem(params, &key);
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&pem).is_err());
        assert!(csr_public_key(&pem).is_ok());
    }
}
