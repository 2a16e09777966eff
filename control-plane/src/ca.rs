//! The certificate authority: the issuer key that signs workload certificates and the trust anchors peers
//! verify them against.
//!
//! Two sources, one shape. Locally the control plane makes its own root (the trust anchor) and an intermediate
//! issuer on first start and keeps them in the data directory, so sidecars keep trusting it across restarts.
//! In a cluster the issuer comes from files mounted from a Secret in cert-manager's layout (`tls.crt`,
//! `tls.key` in PKCS#8, `ca.crt`), so the root key never has to live in the cluster. The local data directory
//! uses the same file names (plus `ca.key`, the root key), so it can be handed to cluster mode unchanged.
//!
//! Every certificate is built by rcgen from parameters chosen here; certificates read from files are parsed
//! with x509-parser only to check them.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use meshlet::tls::SpiffeId;

/// Issuer certificate (with any chain above it up to, not necessarily including, the root), PEM.
pub const ISSUER_CERT_FILE: &str = "tls.crt";
/// Issuer private key, PKCS#8 PEM.
pub const ISSUER_KEY_FILE: &str = "tls.key";
/// Trust anchors, PEM.
pub const TRUST_ANCHOR_FILE: &str = "ca.crt";
/// Root private key, PKCS#8 PEM; local mode only.
pub const ROOT_KEY_FILE: &str = "ca.key";

/// How long a locally generated root is valid.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a locally generated intermediate is valid.
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// A persisted intermediate closer than this to its expiry is replaced at start-up (signed by the same root).
const INTERMEDIATE_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long the generated API serving certificate is valid; it is made afresh at every start.
const SERVING_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Certificates start this long before "now" so that peers whose clocks lag a little accept them.
const BACKDATE: Duration = Duration::from_secs(60);

/// DNS names and addresses in the generated API serving certificate: the in-cluster Service names (the
/// sidecar's default `--control-plane-name` is the first) and loopback for local runs.
pub const SERVING_DNS_NAMES: &[&str] = &[
    "meshlet-control.meshlet.svc",
    "meshlet-control.meshlet.svc.cluster.local",
    "meshlet-control",
    "localhost",
];

/// Why the CA could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{0} is not a valid PEM certificate file: {1}")]
    BadCertificatePem(PathBuf, String),
    #[error("{0} is not a parsable X.509 certificate: {1}")]
    BadCertificate(PathBuf, String),
    #[error("{0} is not a PKCS#8 PEM private key rcgen can sign with: {1}")]
    BadKey(PathBuf, rcgen::Error),
    #[error("the issuer certificate in {0} is not a CA certificate")]
    NotCa(PathBuf),
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "{present} exists but {missing} does not; remove the directory's CA files to start afresh"
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("cannot generate a key: {0}")]
    KeyGeneration(rcgen::Error),
    #[error("cannot sign a certificate for {what}: {source}")]
    Sign { what: String, source: rcgen::Error },
    #[error("the system random source failed")]
    Random,
    #[error("time {0:?} is outside the range X.509 can express")]
    Time(SystemTime),
}

/// The loaded issuer and trust bundle; signs workload and serving certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// The issuer's certificate and anything above it, sent after each leaf.
    issuer_chain: Vec<CertificateDer<'static>>,
    issuer_chain_pem: String,
    /// End of the issuer's validity: no certificate it signs is given a later one.
    issuer_not_after: OffsetDateTime,
    trust_anchors: Vec<CertificateDer<'static>>,
    trust_bundle_pem: String,
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    /// Leaf first, then the issuer chain, PEM.
    pub chain_pem: String,
    /// Start of validity, seconds since the Unix epoch (exactly what the certificate says).
    pub not_before_unix: u64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after_unix: u64,
}

/// A certificate chain and key to serve TLS with.
pub struct ServingCert {
    /// Leaf first, then the issuer chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Authority {
    /// Local mode: loads the root and intermediate from `data_dir`, creating whichever is missing (and
    /// replacing an intermediate near expiry), with private keys written mode 0600.
    pub fn load_or_create_local(data_dir: &Path) -> Result<Self, CaError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| CaError::Write(data_dir.to_path_buf(), e))?;
        let root_cert_path = data_dir.join(TRUST_ANCHOR_FILE);
        let root_key_path = data_dir.join(ROOT_KEY_FILE);
        let issuer_cert_path = data_dir.join(ISSUER_CERT_FILE);
        let issuer_key_path = data_dir.join(ISSUER_KEY_FILE);

        let (root_pem, root_key) = if both_or_neither(&root_cert_path, &root_key_path)? {
            (read(&root_cert_path)?, load_key(&root_key_path)?)
        } else {
            let params = root_params()?;
            create_and_write("local root CA", &root_cert_path, &root_key_path, |key| {
                params.self_signed(key)
            })?
        };
        let root = Issuer::from_ca_cert_pem(&root_pem, root_key)
            .map_err(|e| CaError::BadCertificate(root_cert_path.clone(), e.to_string()))?;

        let keep_intermediate = both_or_neither(&issuer_cert_path, &issuer_key_path)?
            && !expires_within(&issuer_cert_path, INTERMEDIATE_RENEW_BEFORE)?;
        if !keep_intermediate {
            let params = intermediate_params()?;
            create_and_write(
                "local intermediate issuer",
                &issuer_cert_path,
                &issuer_key_path,
                |key| params.signed_by(key, &root),
            )?;
        }
        Self::load_dir(data_dir)
    }

    /// Cluster mode: loads `tls.crt`, `tls.key` and `ca.crt` from `issuer_dir` (cert-manager's Secret layout).
    pub fn load_dir(issuer_dir: &Path) -> Result<Self, CaError> {
        let cert_path = issuer_dir.join(ISSUER_CERT_FILE);
        let key_path = issuer_dir.join(ISSUER_KEY_FILE);
        let anchors_path = issuer_dir.join(TRUST_ANCHOR_FILE);

        let issuer_chain = read_certs(&cert_path)?;
        let trust_anchors = read_certs(&anchors_path)?;
        let key = load_key(&key_path)?;

        let (_, issuer_cert) = x509_parser::parse_x509_certificate(&issuer_chain[0])
            .map_err(|e| CaError::BadCertificate(cert_path.clone(), e.to_string()))?;
        if !issuer_cert.is_ca() {
            return Err(CaError::NotCa(cert_path));
        }
        if issuer_cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        let issuer_not_after =
            OffsetDateTime::from_unix_timestamp(issuer_cert.validity().not_after.timestamp())
                .map_err(|e| CaError::BadCertificate(cert_path.clone(), e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&issuer_chain[0], key)
            .map_err(|e| CaError::BadCertificate(cert_path.clone(), e.to_string()))?;
        Ok(Self {
            issuer,
            issuer_not_after,
            issuer_chain_pem: to_pem(&issuer_chain),
            issuer_chain,
            trust_bundle_pem: to_pem(&trust_anchors),
            trust_anchors,
        })
    }

    /// The trust anchors peers verify chains against, PEM (what sidecars get as `--trust-anchors`).
    pub fn trust_bundle_pem(&self) -> &str {
        &self.trust_bundle_pem
    }

    /// The trust anchors, DER.
    pub fn trust_anchors(&self) -> &[CertificateDer<'static>] {
        &self.trust_anchors
    }

    /// Signs a workload certificate for `identity` over `public_key`, valid from a minute ago for `ttl`.
    ///
    /// Every field is decided here: the one URI SAN, not a CA, digital signature, TLS client and server use.
    pub fn sign_workload(
        &self,
        public_key: &impl PublicKeyData,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<SignedLeaf, CaError> {
        let uri = identity.to_string();
        let sign_error = |source| CaError::Sign {
            what: uri.clone(),
            source,
        };
        let mut params = self.end_entity_params(ttl)?;
        let not_before_unix = unix_seconds(params.not_before);
        let not_after_unix = unix_seconds(params.not_after);
        params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().map_err(sign_error)?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(sign_error)?;
        Ok(SignedLeaf {
            chain_pem: format!("{}{}", leaf.pem(), self.issuer_chain_pem),
            not_before_unix,
            not_after_unix,
        })
    }

    /// Makes a fresh key and a server certificate for the control plane's own HTTPS API, for the names in
    /// [`SERVING_DNS_NAMES`] and loopback, so sidecars can verify it with the same trust anchors.
    pub fn sign_serving(&self) -> Result<ServingCert, CaError> {
        let sign_error = |source| CaError::Sign {
            what: "the API serving certificate".into(),
            source,
        };
        let key = new_key()?;
        let mut params = self.end_entity_params(SERVING_LIFETIME)?;
        params
            .distinguished_name
            .push(DnType::CommonName, SERVING_DNS_NAMES[0]);
        params.subject_alt_names = SERVING_DNS_NAMES
            .iter()
            .map(|name| Ok(SanType::DnsName((*name).try_into()?)))
            .collect::<Result<_, rcgen::Error>>()
            .map_err(sign_error)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(&key, &self.issuer).map_err(sign_error)?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.issuer_chain.iter().cloned());
        Ok(ServingCert {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }
}

impl Authority {
    /// Parameters shared by every end-entity certificate: random serial, empty subject, not a CA, digital
    /// signature only, authority key identifier, validity from [`BACKDATE`] ago for `lifetime` but never past
    /// the issuer's own expiry (so the sidecar's half-life renewal is timed by the real end of the chain).
    fn end_entity_params(&self, lifetime: Duration) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, lifetime)?;
        if params.not_after > self.issuer_not_after {
            tracing::warn!(issuer_not_after = %self.issuer_not_after, "issuer expires before the requested lifetime; certificate shortened");
            params.not_after = self.issuer_not_after;
        }
        Ok(params)
    }
}

/// Loads a serving certificate chain and key (`tls.crt`, `tls.key`) from `dir`, as mounted from a Secret.
pub fn load_serving_dir(dir: &Path) -> Result<ServingCert, CaError> {
    let cert_path = dir.join(ISSUER_CERT_FILE);
    let key_path = dir.join(ISSUER_KEY_FILE);
    let chain = read_certs(&cert_path)?;
    let key_pem = read(&key_path)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CaError::BadCertificatePem(key_path.clone(), e.to_string()))?;
    Ok(ServingCert { chain, key })
}

fn root_params() -> Result<CertificateParams, CaError> {
    ca_params(
        "meshlet root CA",
        BasicConstraints::Unconstrained,
        ROOT_LIFETIME,
    )
}

/// The intermediate may sign only end-entity certificates (path length 0).
fn intermediate_params() -> Result<CertificateParams, CaError> {
    let mut params = ca_params(
        "meshlet issuer",
        BasicConstraints::Constrained(0),
        INTERMEDIATE_LIFETIME,
    )?;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn ca_params(
    common_name: &str,
    constraints: BasicConstraints,
    lifetime: Duration,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "meshlet");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, lifetime)?;
    Ok(params)
}

/// Whole seconds (X.509 has no finer grain), so the times reported in the API equal the certificate's.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) -> Result<(), CaError> {
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let now = UNIX_EPOCH + Duration::from_secs(now_secs);
    params.not_before = to_offset(now - BACKDATE)?;
    params.not_after = to_offset(now + lifetime)?;
    params.serial_number = Some(random_serial()?);
    Ok(())
}

fn to_offset(time: SystemTime) -> Result<OffsetDateTime, CaError> {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::Time(time))?
        .as_secs();
    i64::try_from(secs)
        .ok()
        .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
        .filter(|t| t.year() <= 9999)
        .ok_or(CaError::Time(time))
}

fn unix_seconds(time: OffsetDateTime) -> u64 {
    u64::try_from(time.unix_timestamp()).unwrap_or(0)
}

/// 16 random bytes, high bit cleared so the DER INTEGER stays positive (RFC 5280 allows up to 20 octets).
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Generates a key, makes its certificate with `sign`, and writes both (the key mode 0600).
fn create_and_write(
    what: &str,
    cert_path: &Path,
    key_path: &Path,
    sign: impl FnOnce(&KeyPair) -> Result<rcgen::Certificate, rcgen::Error>,
) -> Result<(String, KeyPair), CaError> {
    tracing::info!(file = %cert_path.display(), "generating a new {what}");
    let key = new_key()?;
    let pem = sign(&key)
        .map_err(|source| CaError::Sign {
            what: what.to_string(),
            source,
        })?
        .pem();
    write_private(key_path, &key.serialize_pem())?;
    write_public(cert_path, &pem)?;
    Ok((pem, key))
}

fn new_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::KeyGeneration)
}

fn load_key(path: &Path) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(&read(path)?).map_err(|e| CaError::BadKey(path.to_path_buf(), e))
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|e| CaError::Read(path.to_path_buf(), e))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::BadCertificatePem(path.to_path_buf(), e.to_string()))?;
    if certs.is_empty() {
        return Err(CaError::NoCertificate(path.to_path_buf()));
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert)
            .map_err(|e| CaError::BadCertificate(path.to_path_buf(), e.to_string()))?;
    }
    Ok(certs)
}

fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = certs
        .iter()
        .map(|der| pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()))
        .collect();
    pem::encode_many_config(
        &blocks,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// True when both files exist, false when neither does; one without the other is an error, since
/// regenerating then would silently change the CA under existing sidecars.
fn both_or_neither(cert: &Path, key: &Path) -> Result<bool, CaError> {
    match (cert.exists(), key.exists()) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(CaError::Incomplete {
            present: cert.to_path_buf(),
            missing: key.to_path_buf(),
        }),
        (false, true) => Err(CaError::Incomplete {
            present: key.to_path_buf(),
            missing: cert.to_path_buf(),
        }),
    }
}

fn expires_within(cert_path: &Path, margin: Duration) -> Result<bool, CaError> {
    let certs = read_certs(cert_path)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&certs[0])
        .map_err(|e| CaError::BadCertificate(cert_path.to_path_buf(), e.to_string()))?;
    let deadline = SystemTime::now() + margin;
    let deadline_secs = deadline
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Ok(cert.validity().not_after.timestamp() <= i64::try_from(deadline_secs).unwrap_or(i64::MAX))
}

/// Writes a private key readable by the owner only; the file never exists with wider permissions.
fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    write_atomically(path, contents, 0o600)
}

fn write_public(path: &Path, contents: &str) -> Result<(), CaError> {
    write_atomically(path, contents, 0o644)
}

/// Writes to a temporary file next to `path` and renames it into place, so a crash never leaves half a key.
fn write_atomically(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    let error = |e| CaError::Write(path.to_path_buf(), e);
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(error)?;
    file.write_all(contents.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)?;
    fs::rename(&tmp, path).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn local_ca_is_persisted_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Authority::load_or_create_local(dir.path()).unwrap();
        for key in [ROOT_KEY_FILE, ISSUER_KEY_FILE] {
            let mode = fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key} has mode {mode:o}");
        }
        let issuer_pem = fs::read_to_string(dir.path().join(ISSUER_CERT_FILE)).unwrap();
        let second = Authority::load_or_create_local(dir.path()).unwrap();
        assert_eq!(first.trust_bundle_pem(), second.trust_bundle_pem());
        assert_eq!(
            issuer_pem,
            fs::read_to_string(dir.path().join(ISSUER_CERT_FILE)).unwrap()
        );
    }

    #[test]
    fn leaves_never_outlive_their_issuer() {
        let dir = tempfile::tempdir().unwrap();
        Authority::load_or_create_local(dir.path()).unwrap();
        // Replace the intermediate by one that expires in an hour, signed by the same root.
        let root = Issuer::from_ca_cert_pem(
            &fs::read_to_string(dir.path().join(TRUST_ANCHOR_FILE)).unwrap(),
            load_key(&dir.path().join(ROOT_KEY_FILE)).unwrap(),
        )
        .unwrap();
        let key = new_key().unwrap();
        let mut params = intermediate_params().unwrap();
        set_validity(&mut params, Duration::from_secs(3600)).unwrap();
        let short_lived = params.signed_by(&key, &root).unwrap();
        fs::write(dir.path().join(ISSUER_CERT_FILE), short_lived.pem()).unwrap();
        fs::write(dir.path().join(ISSUER_KEY_FILE), key.serialize_pem()).unwrap();

        let authority = Authority::load_dir(dir.path()).unwrap();
        let leaf_key = new_key().unwrap();
        let id = "spiffe://cluster.local/ns/a/sa/b"
            .parse::<SpiffeId>()
            .unwrap();
        let leaf = authority
            .sign_workload(&leaf_key, &id, Duration::from_secs(86400))
            .unwrap();
        assert_eq!(leaf.not_after_unix, unix_seconds(params.not_after));
    }

    #[test]
    fn half_written_ca_is_an_error_not_a_new_root() {
        let dir = tempfile::tempdir().unwrap();
        Authority::load_or_create_local(dir.path()).unwrap();
        fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let err = Authority::load_or_create_local(dir.path()).err().unwrap();
        assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
        assert!(err.to_string().contains(ROOT_KEY_FILE), "{err}");
    }

    #[test]
    fn issuer_key_must_match_issuer_certificate() {
        let dir = tempfile::tempdir().unwrap();
        Authority::load_or_create_local(dir.path()).unwrap();
        fs::copy(
            dir.path().join(ROOT_KEY_FILE),
            dir.path().join(ISSUER_KEY_FILE),
        )
        .unwrap();
        let err = Authority::load_dir(dir.path()).err().unwrap();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn garbage_certificate_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        Authority::load_or_create_local(dir.path()).unwrap();
        fs::write(dir.path().join(TRUST_ANCHOR_FILE), "not a certificate").unwrap();
        let err = Authority::load_dir(dir.path()).err().unwrap();
        assert!(err.to_string().contains(TRUST_ANCHOR_FILE), "{err}");
    }
}
