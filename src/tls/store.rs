//! The sidecar's current credentials (certificate chain, private key, trust bundle), swappable at run time.
//!
//! Why a store rather than configs rebuilt on every rotation: the rustls configs built in [`super::config`]
//! resolve the certificate and read the trust bundle through the store at each handshake, so one config lives
//! for the whole process and a rotation is a single pointer swap. Connections already established keep the
//! keys they negotiated; every NEW handshake uses the new certificate and bundle.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::ResolvesClientCert;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::sync::watch;

use super::config::provider;
use super::{SpiffeId, TlsError};

/// A certificate with its key, the identity it proves and the trust bundle peers are checked against.
pub struct Credentials {
    identity: SpiffeId,
    certified_key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Credentials {
    /// Checks that the key belongs to the leaf (the first certificate), reads the leaf's SPIFFE identity and
    /// validity, and prepares the trust bundle. The chain is NOT checked against the bundle here (a test may
    /// want to present an expired or foreign certificate); see [`Credentials::verify_chain`].
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        trust_bundle: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoCertificate {
            what: "certificate chain",
        })?;
        let identity = SpiffeId::from_certificate(leaf)?;
        let (not_before, not_after) = validity(leaf)?;
        let certified_key =
            CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Key {
                identity: identity.clone(),
                source,
            })?;

        if trust_bundle.is_empty() {
            return Err(TlsError::NoCertificate {
                what: "trust bundle",
            });
        }
        let mut roots = RootCertStore::empty();
        for anchor in trust_bundle {
            roots.add(anchor).map_err(TlsError::TrustAnchor)?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build()?;
        Ok(Credentials {
            identity,
            certified_key: Arc::new(certified_key),
            roots,
            client_verifier,
            not_before,
            not_after,
        })
    }

    /// Like [`Credentials::new`], from the PEM texts the issuance API returns.
    pub fn from_pem(
        chain_pem: &str,
        key: PrivateKeyDer<'static>,
        trust_bundle_pem: &str,
    ) -> Result<Self, TlsError> {
        Self::new(
            parse_certificates(chain_pem, "certificate chain")?,
            key,
            parse_certificates(trust_bundle_pem, "trust bundle")?,
        )
    }

    /// Verifies that the chain leads from the leaf to the trust bundle and is valid now: what peers will check.
    pub fn verify_chain(&self) -> Result<(), TlsError> {
        let chain = &self.certified_key.cert;
        let chain_error = |source| TlsError::Chain {
            identity: self.identity.clone(),
            source,
        };
        let leaf = chain.first().ok_or(TlsError::NoCertificate {
            what: "certificate chain",
        })?;
        let parsed = ParsedCertificate::try_from(leaf).map_err(chain_error)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            &chain[1..],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .map_err(chain_error)
    }

    /// The identity this certificate proves.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The trust anchors peers' chains must end in.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The chain and signing key handed to rustls.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// webpki's check of client chains against this bundle (client auth usage required).
    pub(crate) fn client_verifier(&self) -> &Arc<dyn ClientCertVerifier> {
        &self.client_verifier
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("trust_anchors", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// Every `CERTIFICATE` block of a PEM text, in order.
pub fn parse_certificates(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

/// The leaf's validity window, read from the certificate itself (the authority on when it expires).
fn validity(leaf: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        super::IdentityError::Certificate(format!("not a valid X.509 certificate: {e}"))
    })?;
    let to_system_time =
        |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    let validity = parsed.validity();
    Ok((
        to_system_time(validity.not_before.timestamp()),
        to_system_time(validity.not_after.timestamp()),
    ))
}

/// The current credentials, shared by every TLS config of the sidecar and replaced by the certificate manager.
///
/// Empty until the first certificate arrives: handshakes fail until then (the sidecar is not ready).
pub struct IdentityStore {
    current: watch::Sender<Option<Arc<Credentials>>>,
}

impl IdentityStore {
    /// A store with no credentials yet.
    pub fn new() -> Arc<Self> {
        Arc::new(IdentityStore {
            current: watch::Sender::new(None),
        })
    }

    /// A store holding these credentials from the start.
    pub fn with_credentials(credentials: Credentials) -> Arc<Self> {
        let store = Self::new();
        store.replace(credentials);
        store
    }

    /// The credentials new handshakes use, if any.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.borrow().clone()
    }

    /// Installs new credentials: every handshake from now on uses them.
    pub fn replace(&self, credentials: Credentials) {
        self.current.send_replace(Some(Arc::new(credentials)));
    }

    /// A receiver that sees every replacement (for readiness, logs or metrics).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Credentials>>> {
        self.current.subscribe()
    }

    /// Waits until the store holds credentials: the readiness hook of a sidecar with identity.
    pub async fn ready(&self) {
        let mut rx = self.subscribe();
        // The sender lives in `self`, which outlives this borrow, so the wait can only end with a value.
        let _ = rx.wait_for(Option::is_some).await;
    }
}

impl fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityStore")
            .field("current", &self.current())
            .finish()
    }
}

impl ResolvesServerCert for IdentityStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current().map(|c| c.certified_key.clone())
    }
}

impl ResolvesClientCert for IdentityStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current().map(|c| c.certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        self.current.borrow().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testing::TestCa;

    const HOUR: Duration = Duration::from_secs(3600);

    fn web() -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", "web").unwrap()
    }

    #[test]
    fn credentials_carry_identity_validity_and_a_verifiable_chain() {
        let ca = TestCa::new("mesh");
        let credentials = ca.credentials(&web(), HOUR);
        assert_eq!(credentials.identity(), &web());
        assert!(credentials.not_before() < SystemTime::now());
        assert!(credentials.not_after() > SystemTime::now() + HOUR - Duration::from_secs(60));
        assert_eq!(
            credentials.certified_key().cert.len(),
            2,
            "leaf and intermediate"
        );
        credentials.verify_chain().unwrap();
    }

    #[test]
    fn bad_inputs_are_refused_with_the_reason() {
        let ca = TestCa::new("mesh");
        let bundle = ca.trust_bundle_pem();
        let (a, b) = (ca.issue_for(&web(), HOUR), ca.issue_for(&web(), HOUR));

        let err = Credentials::from_pem(&a.chain_pem, b.key(), &bundle).unwrap_err();
        assert!(err.to_string().contains(web().as_str()), "{err}");

        let dns = ca.issue_dns("example.test");
        let err = Credentials::from_pem(&dns.chain_pem, dns.key(), &bundle).unwrap_err();
        assert!(
            err.to_string().contains("no URI subject alternative name"),
            "{err}"
        );

        let err = Credentials::from_pem(&a.chain_pem, a.key(), "").unwrap_err();
        assert!(err.to_string().contains("trust bundle"), "{err}");
        let err = Credentials::from_pem("garbage", a.key(), &bundle).unwrap_err();
        assert!(err.to_string().contains("certificate chain"), "{err}");
    }

    #[test]
    fn chains_that_peers_would_refuse_fail_verification() {
        let (ca, other) = (TestCa::new("mesh"), TestCa::new("other"));
        let foreign = other.issue_for(&web(), HOUR);
        let credentials =
            Credentials::from_pem(&foreign.chain_pem, foreign.key(), &ca.trust_bundle_pem())
                .unwrap();
        let err = credentials.verify_chain().unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");

        let now = SystemTime::now();
        let expired = ca.issue(&web(), now - 2 * HOUR, now - HOUR);
        let credentials =
            Credentials::from_pem(&expired.chain_pem, expired.key(), &ca.trust_bundle_pem())
                .unwrap();
        assert!(credentials.verify_chain().is_err());
    }

    #[tokio::test]
    async fn the_store_resolves_nothing_until_filled_then_the_latest() {
        let ca = TestCa::new("mesh");
        let store = IdentityStore::new();
        assert!(store.current().is_none());
        assert!(!ResolvesClientCert::has_certs(&*store));
        assert!(ResolvesClientCert::resolve(&*store, &[], &[]).is_none());

        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.ready().await }
        });
        let first = ca.credentials(&web(), HOUR);
        let first_leaf = first.certified_key().cert[0].clone();
        store.replace(first);
        waiter.await.unwrap();
        let resolved = ResolvesClientCert::resolve(&*store, &[], &[]).unwrap();
        assert_eq!(resolved.cert[0], first_leaf);

        store.replace(ca.credentials(&web(), HOUR));
        let resolved = ResolvesClientCert::resolve(&*store, &[], &[]).unwrap();
        assert_ne!(resolved.cert[0], first_leaf);
    }
}
