//! Workload identity and mutual TLS between sidecars.
//!
//! - [`identity`]: SPIFFE identities and allow-list patterns.
//! - [`store`]: the sidecar's current certificate, key and trust bundle, swapped at run time on rotation.
//! - [`verify`]: rustls verifiers that check the chain against the current bundle and the peer's SPIFFE id.
//! - [`config`]: the rustls server and client configurations of the mesh (TLS 1.3, ring, ALPN).
//! - [`client`]: the certificate manager that obtains and renews the certificate from the control plane.
//! - [`api`]: the issuance API's wire types, shared with the control plane.
//!
//! Wiring in the proxy:
//! - Start: `args.settings()?` on [`IdentityArgs`]; `None` means no control plane, so the sidecar runs plain.
//!   Otherwise `let manager = CertManager::new(settings)?; let store = manager.store().clone();
//!   tokio::spawn(manager.run());` and hold readiness until `store.ready().await`.
//! - Inbound: build [`server_config`] once. On a permissive port, read the ClientHello with
//!   `tokio_rustls::LazyConfigAcceptor`; if [`offers_mesh_alpn`] says it is a peer sidecar, finish with
//!   `start.into_stream(server_config)`, then [`peer_identity`] and `alpn_protocol()` tell who is calling and
//!   whether HTTP/2 or opaque TCP follows; [`AllowList::allows`] decides whether it may.
//! - Outbound: one [`client_config`] per (expected identity, ALPN), cached; connect with
//!   `TlsConnector::from(config).connect(ServerName::IpAddress(ip.into()), tcp)`.

pub mod api;
pub mod client;
pub mod config;
pub mod identity;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod verify;

pub use client::{CertManager, ClientError, IdentityArgs, IdentitySettings};
pub use config::{
    client_config, offers_mesh_alpn, provider, server_config, ALPN_MESH_H2, ALPN_MESH_TCP,
};
pub use identity::{AllowList, IdentityError, IdentityPattern, SpiffeId};
pub use store::{Credentials, IdentityStore};
pub use verify::peer_identity;

/// Why credentials or a TLS configuration could not be built, or a peer was refused; messages name the value.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM text held no certificate.
    #[error("{what}: no PEM certificate found")]
    NoCertificate {
        /// Which input: `certificate chain` or `trust bundle`.
        what: &'static str,
    },
    /// A PEM text could not be decoded.
    #[error("{what}: invalid PEM: {source}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// The decoder's complaint.
        source: rustls_pki_types::pem::Error,
    },
    /// The private key is unreadable, or is not the key of the leaf certificate.
    #[error("private key for {identity}: {source}")]
    Key {
        /// Identity of the leaf the key belongs with.
        identity: SpiffeId,
        /// What rustls found wrong.
        source: rustls::Error,
    },
    /// A trust anchor could not be added to the root store.
    #[error("trust bundle: certificate rejected: {0}")]
    TrustAnchor(rustls::Error),
    /// The leaf's identity is missing or malformed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The chain does not lead from the leaf to the trust bundle (or is not valid now).
    #[error("certificate chain of {identity} does not verify against the trust bundle: {source}")]
    Chain {
        /// Identity of the leaf.
        identity: SpiffeId,
        /// What webpki found wrong.
        source: rustls::Error,
    },
    /// The peer proved an identity other than the one expected for the destination.
    #[error("peer presented identity {presented}, expected {expected}")]
    WrongIdentity {
        /// The identity the destination should have.
        expected: SpiffeId,
        /// The identity in the peer's certificate.
        presented: SpiffeId,
    },
    /// rustls refused a configuration (e.g. a protocol version the provider lacks).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client certificate verifier could not be built from the trust bundle.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}
