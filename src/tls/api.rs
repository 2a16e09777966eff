//! Wire types of the control plane's certificate issuance API, shared by the sidecar (client) and the
//! control plane (server) so that the two can never disagree on a field.
//!
//! `POST /v1/certificates` over HTTPS, `Authorization: Bearer <credential>` (a projected ServiceAccount token
//! with audience `meshlet` in a cluster, a join token locally), JSON body [`IssueRequest`]. Success is 200 with
//! [`IssueResponse`]; a refusal is a 4xx with [`IssueError`] naming the reason.

use serde::{Deserialize, Serialize};

/// Path of the issuance endpoint.
pub const ISSUE_PATH: &str = "/v1/certificates";

/// A sidecar asks for a certificate for the identity it claims; the private key never leaves the sidecar.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssueRequest {
    /// The SPIFFE identity asked for: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub identity: String,
    /// PKCS#10 certificate signing request, PEM. Only its public key is used, after its signature is checked.
    pub csr_pem: String,
}

/// The signed leaf and what the sidecar needs to verify its peers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssueResponse {
    /// Leaf certificate followed by the intermediate issuer, PEM.
    pub certificate_chain_pem: String,
    /// Trust anchors (roots) that peers' chains must end in, PEM.
    pub trust_bundle_pem: String,
    /// Leaf expiry, seconds since the Unix epoch; the sidecar renews at half of the lifetime.
    pub not_after_unix: u64,
    /// Leaf start of validity, seconds since the Unix epoch.
    pub not_before_unix: u64,
}

/// Why a request was refused; the HTTP status says which kind (400 malformed, 401 bad credential,
/// 403 identity mismatch).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssueError {
    /// A short machine-readable reason, e.g. `malformed-csr`, `bad-credential`, `identity-mismatch`.
    pub reason: String,
    /// A sentence for people, naming the offending value where there is one.
    pub message: String,
}
