//! The sidecar's certificate manager: obtains its certificate from the control plane and keeps it fresh.
//!
//! The private key is generated here (ECDSA P-256) and never leaves the process; the control plane gets a
//! CSR and a credential (the projected ServiceAccount token, re-read from its file at every request because
//! the kubelet rotates it, or a join token locally). At start the manager retries with backoff until it has a
//! certificate; the sidecar is ready once [`IdentityStore::ready`] returns. It renews at half of the remaining
//! lifetime; a failed renewal keeps the still-valid certificate and retries with backoff. Each response's
//! trust bundle replaces the previous one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use clap::Args;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{PrivatePkcs8KeyDer, ServerName};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::api::{IssueError, IssueRequest, IssueResponse, ISSUE_PATH};
use super::config::provider;
use super::store::{parse_certificates, Credentials, IdentityStore};
use super::{SpiffeId, TlsError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest token file read (projected tokens are a few KiB).
const MAX_TOKEN_BYTES: u64 = 64 * 1024;
/// Largest issuance response read (a chain and a bundle are a few KiB).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Identity flags of `meshlet proxy` (flattened into the proxy's settings).
#[derive(Debug, Clone, Args, Serialize)]
pub struct IdentityArgs {
    /// Control plane issuing the sidecar's certificate, host:port. Absent: the sidecar runs without
    /// identity and speaks plaintext only.
    #[arg(long, env = "MESHLET_CONTROL_PLANE_ADDR", value_name = "HOST:PORT")]
    pub control_plane_addr: Option<String>,

    /// DNS name in the control plane's serving certificate.
    #[arg(
        long,
        env = "MESHLET_CONTROL_PLANE_NAME",
        default_value = "meshlet-control.meshlet.svc",
        value_name = "NAME"
    )]
    pub control_plane_name: String,

    /// PEM file of the trust anchors the control plane's certificate must chain to.
    #[arg(long, env = "MESHLET_TRUST_ANCHORS", value_name = "PEM_FILE")]
    pub trust_anchors: Option<PathBuf>,

    /// Trust domain of the mesh: the host part of every SPIFFE identity.
    #[arg(
        long,
        env = "MESHLET_TRUST_DOMAIN",
        default_value = "cluster.local",
        value_name = "DOMAIN"
    )]
    pub trust_domain: String,

    /// Namespace of this pod (from the downward API).
    #[arg(long, env = "MESHLET_POD_NAMESPACE", value_name = "NAMESPACE")]
    pub namespace: Option<String>,

    /// Service account of this pod (from the downward API).
    #[arg(long, env = "MESHLET_POD_SERVICE_ACCOUNT", value_name = "NAME")]
    pub service_account: Option<String>,

    /// Projected ServiceAccount token (audience `meshlet`) sent as the credential; re-read at every request.
    #[arg(
        long,
        env = "MESHLET_TOKEN_FILE",
        default_value = "/var/run/secrets/meshlet.io/token",
        value_name = "PATH"
    )]
    pub token_file: PathBuf,

    /// Join token from the local control plane's config, used instead of the token file.
    #[arg(
        long,
        env = "MESHLET_JOIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub join_token: Option<Secret>,
}

/// A credential given on the command line: shown as `<redacted>` in logs, `Debug` and `/config`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// What the sidecar presents to the control plane as proof of who it is.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A file read at every request (the kubelet rotates projected tokens).
    TokenFile(PathBuf),
    /// A fixed join token.
    JoinToken(Secret),
}

impl Credential {
    async fn read(&self) -> Result<String, ClientError> {
        let (token, origin) = match self {
            Credential::JoinToken(token) => (token.expose().to_owned(), "--join-token".to_owned()),
            Credential::TokenFile(path) => {
                let origin = path.display().to_string();
                let io_error = |e| ClientError::Token {
                    origin: origin.clone(),
                    reason: format!("cannot read: {e}"),
                };
                let len = tokio::fs::metadata(path).await.map_err(io_error)?.len();
                if len > MAX_TOKEN_BYTES {
                    return Err(ClientError::Token {
                        origin,
                        reason: format!("{len} bytes, more than {MAX_TOKEN_BYTES}"),
                    });
                }
                (
                    tokio::fs::read_to_string(path).await.map_err(io_error)?,
                    origin,
                )
            }
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(ClientError::Token {
                origin,
                reason: "empty".into(),
            });
        }
        Ok(token.to_owned())
    }
}

/// Validated identity settings: what the certificate manager needs.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// Control plane address, host:port.
    pub control_plane_addr: String,
    /// Name the control plane's certificate must carry.
    pub control_plane_name: ServerName<'static>,
    /// Anchors of the control plane's certificate.
    pub trust_anchors: Arc<RootCertStore>,
    /// The identity this sidecar asks for.
    pub identity: SpiffeId,
    /// The proof sent with each request.
    pub credential: Credential,
    /// First retry delay after a failed request; doubles up to `retry_max`.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Time allowed for one request (connect, TLS, HTTP), so a stuck control plane cannot stall renewal.
    pub request_timeout: Duration,
}

impl IdentityArgs {
    /// The validated settings, or `None` when no control plane is configured (the sidecar runs plain).
    /// Reads the trust anchors file; errors name the flag and the value.
    pub fn settings(&self) -> Result<Option<IdentitySettings>, ClientError> {
        let Some(addr) = &self.control_plane_addr else {
            return Ok(None);
        };
        let required = |value: &Option<String>, flag| {
            value.clone().ok_or(ClientError::MissingSetting { flag })
        };
        let namespace = required(&self.namespace, "--namespace")?;
        let service_account = required(&self.service_account, "--service-account")?;
        let anchors_path = self
            .trust_anchors
            .clone()
            .ok_or(ClientError::MissingSetting {
                flag: "--trust-anchors",
            })?;

        let identity =
            SpiffeId::new(&self.trust_domain, &namespace, &service_account).map_err(|e| {
                ClientError::Setting {
                    flag: "--trust-domain/--namespace/--service-account",
                    value: format!("{}/{namespace}/{service_account}", self.trust_domain),
                    reason: e.to_string(),
                }
            })?;
        let control_plane_name =
            ServerName::try_from(self.control_plane_name.clone()).map_err(|e| {
                ClientError::Setting {
                    flag: "--control-plane-name",
                    value: self.control_plane_name.clone(),
                    reason: e.to_string(),
                }
            })?;
        let anchors_error = |reason: String| ClientError::Setting {
            flag: "--trust-anchors",
            value: anchors_path.display().to_string(),
            reason,
        };
        let pem =
            std::fs::read_to_string(&anchors_path).map_err(|e| anchors_error(e.to_string()))?;
        let mut trust_anchors = RootCertStore::empty();
        for anchor in
            parse_certificates(&pem, "trust anchors").map_err(|e| anchors_error(e.to_string()))?
        {
            trust_anchors
                .add(anchor)
                .map_err(|e| anchors_error(e.to_string()))?;
        }
        let credential = match &self.join_token {
            Some(token) => Credential::JoinToken(token.clone()),
            None => Credential::TokenFile(self.token_file.clone()),
        };
        Ok(Some(IdentitySettings {
            control_plane_addr: addr.clone(),
            control_plane_name,
            trust_anchors: Arc::new(trust_anchors),
            identity,
            credential,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
        }))
    }
}

/// Why identity settings are unusable or a certificate request failed; messages name the value.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A flag needed with `--control-plane-addr` is missing.
    #[error("{flag} is required with --control-plane-addr")]
    MissingSetting {
        /// The missing flag.
        flag: &'static str,
    },
    /// A flag has an unusable value.
    #[error("invalid {flag} {value:?}: {reason}")]
    Setting {
        /// The flag.
        flag: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The credential could not be read or is unusable.
    #[error("credential {origin}: {reason}")]
    Token {
        /// The token file's path or `--join-token`.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The key or the CSR could not be generated.
    #[error("generating the key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    /// No TCP connection to the control plane.
    #[error("connecting to the control plane at {addr}: {source}")]
    Connect {
        /// The control plane's address.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The TLS handshake with the control plane failed (e.g. its certificate does not chain to the anchors).
    #[error("TLS with the control plane at {addr}: {source}")]
    Tls {
        /// The control plane's address.
        addr: String,
        /// The handshake error.
        source: std::io::Error,
    },
    /// HTTP with the control plane failed.
    #[error("HTTP with the control plane at {addr}: {reason}")]
    Http {
        /// The control plane's address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The request did not complete in time.
    #[error("certificate request to {addr} timed out after {after:?}")]
    Timeout {
        /// The control plane's address.
        addr: String,
        /// The time allowed.
        after: Duration,
    },
    /// The control plane refused the request.
    #[error("control plane refused the certificate for {identity}: {status} {reason}: {message}")]
    Refused {
        /// The identity asked for.
        identity: SpiffeId,
        /// HTTP status.
        status: StatusCode,
        /// The machine-readable reason (`bad-credential`, …), or empty.
        reason: String,
        /// The control plane's explanation, or the raw body.
        message: String,
    },
    /// The control plane's answer is not an [`IssueResponse`].
    #[error("unreadable issuance response from {addr}: {reason}")]
    BadResponse {
        /// The control plane's address.
        addr: String,
        /// What is wrong.
        reason: String,
    },
    /// The issued chain, key or bundle do not form usable credentials.
    #[error("issued credentials: {0}")]
    Credentials(#[from] TlsError),
    /// The control plane issued a certificate for another identity.
    #[error("control plane issued a certificate for {issued}, asked for {expected}")]
    WrongIdentity {
        /// The identity asked for.
        expected: SpiffeId,
        /// The identity in the certificate.
        issued: SpiffeId,
    },
}

/// Obtains and renews the sidecar's certificate; the store it fills is what the mesh TLS configs read.
///
/// Typical wiring: `let manager = CertManager::new(settings)?; let store = manager.store().clone();
/// tokio::spawn(manager.run());` then mark the proxy ready after `store.ready().await`.
pub struct CertManager {
    settings: IdentitySettings,
    connector: TlsConnector,
    store: Arc<IdentityStore>,
}

impl CertManager {
    /// A manager with an empty store.
    pub fn new(settings: IdentitySettings) -> Result<Self, ClientError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::from)?
            .with_root_certificates(settings.trust_anchors.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(CertManager {
            settings,
            connector: TlsConnector::from(Arc::new(config)),
            store: IdentityStore::new(),
        })
    }

    /// The store this manager fills; hand it to [`super::server_config`] and [`super::client_config`].
    pub fn store(&self) -> &Arc<IdentityStore> {
        &self.store
    }

    /// Keeps the store filled for as long as the task lives: obtains the first certificate (retrying with
    /// backoff), then renews at half of the remaining lifetime, retrying with backoff on failure while the
    /// current certificate stays in use. Never returns; abort the task to stop it.
    pub async fn run(self) {
        let mut retry = self.settings.retry_initial;
        loop {
            match self.request().await {
                Ok(credentials) => {
                    retry = self.settings.retry_initial;
                    let received = SystemTime::now();
                    let remaining = credentials
                        .not_after()
                        .duration_since(received)
                        .unwrap_or_default();
                    tracing::info!(
                        identity = %credentials.identity(),
                        expires_in = ?remaining,
                        "obtained mesh certificate"
                    );
                    self.store.replace(credentials);
                    // A floor, so a certificate that arrives nearly expired cannot make this loop spin.
                    tokio::time::sleep((remaining / 2).max(self.settings.retry_initial)).await;
                }
                Err(error) => {
                    let delay = jittered(retry);
                    match self.store.current() {
                        Some(current) => tracing::warn!(
                            %error,
                            retry_in = ?delay,
                            current_expires_in = ?current.not_after().duration_since(SystemTime::now()).unwrap_or_default(),
                            "certificate renewal failed; keeping the current certificate"
                        ),
                        None => {
                            tracing::warn!(%error, retry_in = ?delay, "no mesh certificate yet")
                        }
                    }
                    tokio::time::sleep(delay).await;
                    retry = (retry * 2).min(self.settings.retry_max);
                }
            }
        }
    }

    /// One issuance round trip with a fresh key: the credentials it yields are checked (identity, key,
    /// chain against the returned bundle) but not installed.
    pub async fn request(&self) -> Result<Credentials, ClientError> {
        let identity = &self.settings.identity;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        let csr_pem = params.serialize_request(&key)?.pem()?;
        let token = self.settings.credential.read().await?;
        let body = IssueRequest {
            identity: identity.to_string(),
            csr_pem,
        };

        let addr = &self.settings.control_plane_addr;
        let after = self.settings.request_timeout;
        let response = tokio::time::timeout(after, self.post(&body, &token))
            .await
            .map_err(|_| ClientError::Timeout {
                addr: addr.clone(),
                after,
            })??;

        let key = PrivatePkcs8KeyDer::from(key.serialize_der()).into();
        let credentials = Credentials::from_pem(
            &response.certificate_chain_pem,
            key,
            &response.trust_bundle_pem,
        )?;
        if credentials.identity() != identity {
            return Err(ClientError::WrongIdentity {
                expected: identity.clone(),
                issued: credentials.identity().clone(),
            });
        }
        credentials.verify_chain()?;
        Ok(credentials)
    }

    async fn post(&self, body: &IssueRequest, token: &str) -> Result<IssueResponse, ClientError> {
        let addr = &self.settings.control_plane_addr;
        let http_error = |e: &dyn std::fmt::Display| ClientError::Http {
            addr: addr.clone(),
            reason: e.to_string(),
        };

        let tcp =
            TcpStream::connect(addr.as_str())
                .await
                .map_err(|source| ClientError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
        let tls = self
            .connector
            .connect(self.settings.control_plane_name.clone(), tcp)
            .await
            .map_err(|source| ClientError::Tls {
                addr: addr.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http_error(&e))?;

        let authorization =
            HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| ClientError::Token {
                origin: "credential".into(),
                reason: "contains characters not allowed in an HTTP header".into(),
            })?;
        let json = serde_json::to_vec(body).map_err(|e| http_error(&e))?;
        let request = Request::post(ISSUE_PATH)
            .header(HOST, self.settings.control_plane_name.to_str().as_ref())
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, authorization)
            .body(Full::new(Bytes::from(json)))
            .map_err(|e| http_error(&e))?;
        let exchange = async {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await?;
            Ok::<_, BoxError>((status, body.to_bytes()))
        };
        // The connection is driven here rather than spawned, so the request timeout ends it too. If it
        // ends cleanly first (the server closed after answering), the answer is already buffered.
        tokio::pin!(exchange, connection);
        let exchanged = tokio::select! {
            exchanged = &mut exchange => exchanged,
            closed = &mut connection => match closed {
                Ok(()) => exchange.await,
                Err(e) => Err(e.into()),
            },
        };
        let (status, bytes) = exchanged.map_err(|e| http_error(&e))?;

        if status == StatusCode::OK {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse {
                addr: addr.clone(),
                reason: e.to_string(),
            });
        }
        let (reason, message) = match serde_json::from_slice::<IssueError>(&bytes) {
            Ok(refusal) => (refusal.reason, refusal.message),
            Err(_) => (
                String::new(),
                String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned(),
            ),
        };
        Err(ClientError::Refused {
            identity: self.settings.identity.clone(),
            status,
            reason,
            message,
        })
    }
}

/// A delay between half and all of `base`, so that sidecars that failed together do not retry together.
fn jittered(base: Duration) -> Duration {
    let mut random = [0u8; 2];
    let fraction = match provider().secure_random.fill(&mut random) {
        Ok(()) => f64::from(u16::from_le_bytes(random)) / f64::from(u16::MAX),
        Err(_) => 1.0,
    };
    base.mul_f64(0.5 + fraction / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        identity: IdentityArgs,
    }

    fn parse(args: &[&str]) -> IdentityArgs {
        Cli::try_parse_from(std::iter::once("meshlet").chain(args.iter().copied()))
            .unwrap()
            .identity
    }

    /// These flags are flattened into `meshlet proxy`: no flag or env name may clash.
    #[test]
    fn flags_fit_beside_the_proxy_flags() {
        use clap::CommandFactory;

        #[derive(Parser)]
        struct Proxy {
            #[command(flatten)]
            proxy: crate::config::ProxyArgs,
        }
        Proxy::command().debug_assert();
    }

    #[test]
    fn without_control_plane_there_is_no_identity() {
        assert!(parse(&[]).settings().unwrap().is_none());
    }

    #[test]
    fn missing_and_bad_settings_are_named() {
        let err = parse(&["--control-plane-addr", "cp:8443", "--namespace", "shop"])
            .settings()
            .unwrap_err();
        assert!(err.to_string().contains("--service-account"), "{err}");

        let err = parse(&[
            "--control-plane-addr",
            "cp:8443",
            "--namespace",
            "shop",
            "--service-account",
            "web",
        ])
        .settings()
        .unwrap_err();
        assert!(err.to_string().contains("--trust-anchors"), "{err}");

        let err = parse(&[
            "--control-plane-addr",
            "cp:8443",
            "--namespace",
            "Shop Floor",
            "--service-account",
            "web",
            "--trust-anchors",
            "/nonexistent",
        ])
        .settings()
        .unwrap_err();
        assert!(err.to_string().contains("Shop Floor"), "{err}");

        let err = parse(&[
            "--control-plane-addr",
            "cp:8443",
            "--namespace",
            "shop",
            "--service-account",
            "web",
            "--trust-anchors",
            "/nonexistent/anchors.pem",
        ])
        .settings()
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/anchors.pem"),
            "{err}"
        );
    }

    #[test]
    fn join_token_is_never_shown() {
        let args = parse(&["--join-token", "s3cret"]);
        assert_eq!(args.join_token.as_ref().map(Secret::expose), Some("s3cret"));
        assert!(!serde_json::to_string(&args).unwrap().contains("s3cret"));
        assert!(!format!("{args:?}").contains("s3cret"));
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }
}
