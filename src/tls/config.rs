//! rustls configurations of mesh mTLS: TLS 1.3 only, the ring provider passed explicitly, a client
//! certificate always required, and the mesh ALPN ids that tell sidecar traffic apart from the application's
//! own TLS on a permissive inbound port.
//!
//! Session resumption is off on both ends: a resumed session skips certificate verification, so the
//! per-destination identity check and a rotated trust bundle would not apply to it. Mesh connections are
//! few and long-lived (HTTP/2 multiplexes the application's connections), so full handshakes are rare.

use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoServerSessionStorage};
use rustls::{CipherSuite, ClientConfig, ServerConfig};

use super::store::IdentityStore;
use super::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use super::{SpiffeId, TlsError};

/// ALPN id of HTTP between sidecars (always HTTP/2 inside the mesh, whatever the application speaks).
pub const ALPN_MESH_H2: &[u8] = b"meshlet/h2";
/// ALPN id of opaque TCP between sidecars (a transport header states the target, then raw bytes).
pub const ALPN_MESH_TCP: &[u8] = b"meshlet/tcp";

/// Whether a ClientHello offers a mesh ALPN id: how a permissive inbound port tells a peer sidecar (finish
/// the handshake with [`server_config`]) from the application's own TLS (pass it through untouched). Read the
/// ClientHello with `tokio_rustls::LazyConfigAcceptor` before choosing.
pub fn offers_mesh_alpn(hello: &ClientHello<'_>) -> bool {
    hello
        .alpn()
        .into_iter()
        .flatten()
        .any(|p| p == ALPN_MESH_H2 || p == ALPN_MESH_TCP)
}

/// The one crypto provider of the process (ring), passed explicitly to every rustls builder so that no
/// process-wide default is needed and no second provider can be picked up.
///
/// ring's default suites with `TLS13_AES_128_GCM_SHA256` moved first. A rustls server follows the client's
/// order, so two sidecars settle on AES-128-GCM (as Envoy, HAProxy, nginx and Go's TLS do with AES-NI)
/// instead of AES-256-GCM: 128-bit keys already match the X25519 and P-256 keys of the handshake, and each
/// record costs fewer AES rounds. The other suites stay offered, in ring's order.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::ring::default_provider();
            provider
                .cipher_suites
                .sort_by_key(|suite| suite.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
            Arc::new(provider)
        })
        .clone()
}

/// The inbound side of mesh mTLS: presents the store's current certificate, requires and verifies a client
/// certificate against the current bundle, and negotiates `meshlet/h2` or `meshlet/tcp`. Build it once; a
/// rotation in the store applies to new handshakes. The caller reads the peer with [`super::peer_identity`]
/// and the protocol with `alpn_protocol()`; a client that offered no ALPN at all completes with `None`
/// there and should be refused, since only sidecars are meant to reach this config.
pub fn server_config(store: &Arc<IdentityStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(store.clone())))
        .with_cert_resolver(store.clone());
    config.alpn_protocols = vec![ALPN_MESH_H2.to_vec(), ALPN_MESH_TCP.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The outbound side of mesh mTLS towards a destination that must prove `expected`, offering one ALPN id
/// ([`ALPN_MESH_H2`] or [`ALPN_MESH_TCP`]). Build one per (identity, protocol) and reuse it. The server
/// name passed to `TlsConnector::connect` is not checked (the identity is) and not sent: use the
/// destination's address, e.g. `ServerName::IpAddress(addr.ip().into())`.
pub fn client_config(
    store: &Arc<IdentityStore>,
    expected: SpiffeId,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            store.clone(),
            expected,
        )))
        .with_client_cert_resolver(store.clone());
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}
