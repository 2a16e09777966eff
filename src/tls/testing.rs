//! A test certificate authority: a root (the trust anchor) and an intermediate issuer, generated with rcgen,
//! issuing mesh leaves for given SPIFFE identities with given validity, the way the control plane does;
//! and a mesh mTLS echo server and client to exercise handshakes over real loopback sockets.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{client, TlsAcceptor, TlsConnector};

use super::{peer_identity, Credentials, SpiffeId};

/// A root and an intermediate; leaves are signed by the intermediate, so chains are leaf + intermediate.
pub struct TestCa {
    root: CertifiedIssuer<'static, KeyPair>,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate chain (PEM, leaf first) and its private key.
pub struct TestLeaf {
    /// Leaf followed by the intermediate, PEM.
    pub chain_pem: String,
    /// The leaf's private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The same key, PKCS#8 PEM.
    pub key_pem: String,
}

impl TestLeaf {
    /// The private key as rustls takes it.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key_der.clone()).into()
    }
}

fn offset_time(t: SystemTime) -> time::OffsetDateTime {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_secs() as i64,
        Err(before) => -(before.duration().as_secs() as i64),
    };
    time::OffsetDateTime::from_unix_timestamp(secs)
        .expect("test time within the representable range")
}

fn ca_params(common_name: &str, path_len: u8) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = offset_time(SystemTime::now() - Duration::from_secs(3600));
    params.not_after = offset_time(SystemTime::now() + Duration::from_secs(10 * 24 * 3600));
    params
}

/// Parameters of a mesh leaf: the SPIFFE URI SAN only, not a CA, TLS client and server usages.
fn leaf_params(san: SanType, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![san];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = offset_time(not_before);
    params.not_after = offset_time(not_after);
    params
}

fn spiffe_san(id: &SpiffeId) -> SanType {
    SanType::URI(id.to_string().try_into().expect("a SPIFFE id is ASCII"))
}

impl TestCa {
    /// A fresh root and intermediate; `name` goes into their common names to tell CAs apart in errors.
    pub fn new(name: &str) -> Self {
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} root"), 1),
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate root key"),
        )
        .expect("self-sign root");
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(&format!("{name} intermediate"), 0),
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate intermediate key"),
            &root,
        )
        .expect("sign intermediate");
        TestCa { root, intermediate }
    }

    /// The trust anchor (root), PEM: what peers verify chains against.
    pub fn trust_bundle_pem(&self) -> String {
        self.root.pem()
    }

    /// A leaf for `id` valid from `not_before` to `not_after` (either may be in the past).
    pub fn issue(&self, id: &SpiffeId, not_before: SystemTime, not_after: SystemTime) -> TestLeaf {
        self.issue_with_san(spiffe_san(id), not_before, not_after)
    }

    /// A leaf for `id` valid from a minute ago for `ttl`.
    pub fn issue_for(&self, id: &SpiffeId, ttl: Duration) -> TestLeaf {
        let now = SystemTime::now();
        self.issue(id, now - Duration::from_secs(60), now + ttl)
    }

    /// A server certificate for a DNS name (valid for a day), e.g. for a fake control plane's HTTPS API.
    pub fn issue_dns(&self, dns_name: &str) -> TestLeaf {
        let now = SystemTime::now();
        let san = SanType::DnsName(dns_name.try_into().expect("a DNS name"));
        self.issue_with_san(
            san,
            now - Duration::from_secs(60),
            now + Duration::from_secs(24 * 3600),
        )
    }

    fn issue_with_san(
        &self,
        san: SanType,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> TestLeaf {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate leaf key");
        let cert = leaf_params(san, not_before, not_after)
            .signed_by(&key, &self.intermediate)
            .expect("sign leaf");
        TestLeaf {
            chain_pem: format!("{}{}", cert.pem(), self.intermediate.pem()),
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Signs a CSR for `id` like the control plane: checks the CSR's signature, takes only its public key,
    /// and issues fresh leaf parameters valid from `not_before` to `not_after`. Returns the chain, PEM.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, rcgen::Error> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let cert = leaf_params(spiffe_san(id), not_before, not_after)
            .signed_by(&csr.public_key, &self.intermediate)?;
        Ok(format!("{}{}", cert.pem(), self.intermediate.pem()))
    }

    /// Ready-made credentials for `id`, valid from a minute ago for `ttl`, trusting this CA.
    pub fn credentials(&self, id: &SpiffeId, ttl: Duration) -> Credentials {
        let leaf = self.issue_for(id, ttl);
        Credentials::from_pem(&leaf.chain_pem, leaf.key(), &self.trust_bundle_pem())
            .expect("test credentials")
    }
}

/// Outcome of one handshake on a [`spawn_echo_server`]: the client's identity and ALPN, or the error.
pub type Handshake = Result<(Option<SpiffeId>, Option<Vec<u8>>), String>;

/// A mesh mTLS server on 127.0.0.1: after each handshake it writes one line
/// `<client identity or -> <alpn or ->\n`, then echoes what it reads. Every handshake's outcome is reported on
/// the returned channel. Runs until the runtime stops.
pub async fn spawn_echo_server(
    config: Arc<ServerConfig>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Handshake>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let (outcomes, rx) = mpsc::unbounded_channel();
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, outcomes) = (acceptor.clone(), outcomes.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = outcomes.send(Err(e.to_string()));
                        return;
                    }
                };
                let peer = peer_identity(tls.get_ref().1);
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                let greeting = format!(
                    "{} {}\n",
                    peer.as_ref().map_or("-".to_owned(), SpiffeId::to_string),
                    alpn.as_deref().map_or("-".into(), String::from_utf8_lossy)
                );
                let _ = outcomes.send(Ok((peer, alpn)));
                let (reader, mut writer) = tokio::io::split(tls);
                if writer.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut BufReader::new(reader), &mut writer).await;
            });
        }
    });
    (addr, rx)
}

/// A mesh client connection to a [`spawn_echo_server`], with the greeting line it sent.
pub struct EchoClient {
    /// The TLS stream, for `get_ref().1.peer_certificates()` and friends.
    pub stream: BufReader<client::TlsStream<TcpStream>>,
    /// The server's greeting: `<client identity> <alpn>`.
    pub greeting: String,
}

impl EchoClient {
    /// Connects with `config` and reads the greeting. In TLS 1.3 the server checks the client's certificate
    /// after the client has finished, so a rejected client sees the alert here, on its first read.
    pub async fn connect(config: Arc<ClientConfig>, addr: SocketAddr) -> io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::IpAddress(IpAddr::from(Ipv4Addr::LOCALHOST).into());
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        let mut stream = BufReader::new(tls);
        let mut greeting = String::new();
        if stream.read_line(&mut greeting).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed before its greeting",
            ));
        }
        Ok(EchoClient {
            stream,
            greeting: greeting.trim_end().to_owned(),
        })
    }

    /// Sends a line and reads the echo: proves the connection still carries data.
    pub async fn echo(&mut self, line: &str) -> io::Result<String> {
        self.stream
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await?;
        let mut echoed = String::new();
        self.stream.read_line(&mut echoed).await?;
        Ok(echoed.trim_end().to_owned())
    }

    /// The leaf certificate the server presented.
    pub fn server_leaf(&self) -> Option<Vec<u8>> {
        let certs = self.stream.get_ref().get_ref().1.peer_certificates()?;
        certs.first().map(|c| c.to_vec())
    }
}
