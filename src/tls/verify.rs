//! Peer verification for mesh mTLS: webpki's chain checks against the current trust bundle, then meshlet's
//! own check of the SPIFFE identity in the peer's URI SAN.
//!
//! Why not rustls's stock server verifier: it matches DNS names or IP addresses, and mesh leaves carry only a
//! `spiffe://` URI SAN. The client side therefore validates the chain itself (the same webpki call the stock
//! verifier makes) and compares the URI SAN with the identity expected for the destination; the server name
//! given to rustls is ignored. Both verifiers read the bundle from the [`IdentityStore`] at each handshake, so
//! a new bundle applies to new connections at once.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::config::provider;
use super::store::{Credentials, IdentityStore};
use super::{SpiffeId, TlsError};

/// The SPIFFE identity the peer proved in this (completed) handshake; `None` before the handshake or when the
/// peer sent no certificate. Works for both ends: pass `tls_stream.get_ref().1` of a tokio-rustls stream.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    SpiffeId::from_certificate(leaf).ok()
}

fn current(store: &IdentityStore) -> Result<Arc<Credentials>, rustls::Error> {
    store
        .current()
        .ok_or_else(|| rustls::Error::General("no mesh certificate and trust bundle yet".into()))
}

fn rejected(error: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// Client side: the server must chain to the bundle and prove exactly the expected identity.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    store: Arc<IdentityStore>,
    expected: SpiffeId,
}

impl SpiffeServerVerifier {
    /// Accepts only servers whose certificate proves `expected` and chains to the store's current bundle.
    pub fn new(store: Arc<IdentityStore>, expected: SpiffeId) -> Self {
        SpiffeServerVerifier { store, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let credentials = current(&self.store)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            credentials.roots(),
            intermediates,
            now,
            algorithms().all,
        )?;
        let presented = SpiffeId::from_certificate(end_entity).map_err(|e| rejected(e.into()))?;
        if presented != self.expected {
            return Err(rejected(TlsError::WrongIdentity {
                expected: self.expected.clone(),
                presented,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server side: a client certificate is required, must chain to the bundle (client-auth usage) and must
/// carry a valid SPIFFE identity. Whether that identity may call a service is decided later, per service,
/// with an [`super::AllowList`] on [`peer_identity`].
///
/// No CA names are sent in the certificate request: each sidecar has exactly one certificate, so hints
/// would not change its choice, and they would have to be borrowed from a bundle that can change.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    store: Arc<IdentityStore>,
}

impl SpiffeClientVerifier {
    /// Verifies clients against the store's current bundle.
    pub fn new(store: Arc<IdentityStore>) -> Self {
        SpiffeClientVerifier { store }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let credentials = current(&self.store)?;
        credentials
            .client_verifier()
            .verify_client_cert(end_entity, intermediates, now)?;
        SpiffeId::from_certificate(end_entity).map_err(|e| rejected(e.into()))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
