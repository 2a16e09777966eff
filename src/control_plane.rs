//! The sidecar's channel to the control plane after it has its certificate: one HTTP/2 connection over
//! mutual TLS (the sidecar's own certificate, the control plane verified against `--trust-anchors` and
//! `--control-plane-name`), shared by the discovery watch stream and the telemetry reports.
//!
//! Why one shared connection: a mesh of N sidecars then costs the control plane N connections, not 2N,
//! and the watch stream and the reports fail and recover together. The connection is opened on first use
//! and re-opened by the next request after it breaks; callers own their retry policy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls::{provider, IdentitySettings, IdentityStore, TlsError};

/// Why a request to the control plane failed; messages name the address.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The TCP connection could not be made.
    #[error("cannot connect to the control plane at {addr}: {source}")]
    Connect {
        /// The control plane's address.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Connecting, the handshake or the request took too long.
    #[error("the control plane at {addr} did not answer within {after:?}")]
    Timeout {
        /// The control plane's address.
        addr: String,
        /// The limit.
        after: Duration,
    },
    /// The TLS handshake failed (wrong name, unknown CA, or our certificate refused).
    #[error("TLS with the control plane at {addr} failed: {source}")]
    Tls {
        /// The control plane's address.
        addr: String,
        /// What rustls said.
        source: std::io::Error,
    },
    /// The HTTP/2 connection or the request failed.
    #[error("HTTP/2 with the control plane at {addr} failed: {source}")]
    Http {
        /// The control plane's address.
        addr: String,
        /// What hyper said.
        source: hyper::Error,
    },
    /// The request could not be built (a bad path).
    #[error("invalid control plane request {path:?}: {reason}")]
    Request {
        /// The path asked for.
        path: String,
        /// Why it is invalid.
        reason: String,
    },
}

/// A lazily connected, self-healing HTTP/2 mTLS channel to the control plane.
pub struct ControlPlaneClient {
    addr: String,
    name: ServerName<'static>,
    connector: TlsConnector,
    timeout: Duration,
    sender: tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for ControlPlaneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ControlPlaneClient {
    /// A channel that presents the certificate in `store` (fill it first: see
    /// [`crate::tls::CertManager`]) and trusts the control plane named in `settings`.
    pub fn new(
        settings: &IdentitySettings,
        store: Arc<IdentityStore>,
    ) -> Result<Arc<Self>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(settings.trust_anchors.clone())
            .with_client_cert_resolver(store);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(ControlPlaneClient {
            addr: settings.control_plane_addr.clone(),
            name: settings.control_plane_name.clone(),
            connector: TlsConnector::from(Arc::new(config)),
            timeout: settings.request_timeout,
            sender: tokio::sync::Mutex::new(None),
        }))
    }

    /// The control plane's address, for logs.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `GET path`; the response body may be a long-lived stream (the caller reads it with its own
    /// deadlines). Only the response head is awaited within the request timeout.
    pub async fn get(&self, path: &str) -> Result<Response<Incoming>, ControlPlaneError> {
        self.send(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(
        &self,
        path: &str,
        json: Bytes,
    ) -> Result<Response<Incoming>, ControlPlaneError> {
        self.send(Method::POST, path, Some(json)).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        json: Option<Bytes>,
    ) -> Result<Response<Incoming>, ControlPlaneError> {
        let bad_request = |reason: String| ControlPlaneError::Request {
            path: path.to_string(),
            reason,
        };
        let uri: Uri = format!("https://{}{path}", self.name.to_str())
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad_request(e.to_string()))?;
        let mut request = Request::builder().method(method).uri(uri);
        if json.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(json.unwrap_or_default()))
            .map_err(|e| bad_request(e.to_string()))?;
        let exchange = async {
            let mut sender = self.sender().await?;
            sender
                .send_request(request)
                .await
                .map_err(|source| ControlPlaneError::Http {
                    addr: self.addr.clone(),
                    source,
                })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ControlPlaneError::Timeout {
                addr: self.addr.clone(),
                after: self.timeout,
            }),
        }
    }

    /// The open connection's sender, or a new connection's when there is none or it broke.
    async fn sender(&self) -> Result<http2::SendRequest<Full<Bytes>>, ControlPlaneError> {
        let mut current = self.sender.lock().await;
        if let Some(sender) = current.as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let addr = &self.addr;
        let tcp = TcpStream::connect(addr.as_str()).await.map_err(|source| {
            ControlPlaneError::Connect {
                addr: addr.clone(),
                source,
            }
        })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|source| ControlPlaneError::Tls {
                addr: addr.clone(),
                source,
            })?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| ControlPlaneError::Http {
                addr: addr.clone(),
                source,
            })?;
        let logged = addr.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(addr = %logged, %error, "control plane connection ended");
            }
        });
        *current = Some(sender.clone());
        Ok(sender)
    }
}
