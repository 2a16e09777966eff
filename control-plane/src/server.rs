//! The control plane's two listeners: the HTTPS API (issuance, telemetry reports) and the plain HTTP admin
//! endpoint (`/live`, `/ready`, `/metrics`, `/api/v1/stat`).
//!
//! Both share one accept loop: connections are bounded, TLS handshakes and request headers have deadlines,
//! and on shutdown the listener closes first and open connections get a bounded time to finish.
//!
//! On the API a sidecar that already has its certificate presents it (mutual TLS); the verified SPIFFE
//! identity reaches the router as a [`PeerIdentity`] request extension, so endpoints meant for sidecars
//! (the discovery watch, telemetry reports) can require it while issuance stays open to callers that have
//! no certificate yet. Responses are boxed bodies so an endpoint can stream.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use meshlet::tls::api::{IssueError, ISSUE_PATH};
use meshlet::tls::SpiffeId;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::issue::{IssuanceService, IssueFailure, MAX_REQUEST_BYTES};
use crate::metrics::Metrics;

/// Most connections served at once per listener; more are closed on accept.
const MAX_CONNECTIONS: usize = 4096;
/// Deadline for a client to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a client to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may take to finish once shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {name} address {addr}: {source}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds a listener, naming the flag in the error so a taken port fails start-up clearly.
pub async fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { name, addr, source })
}

/// A response body: whole (most answers) or streamed (the discovery watch).
pub type ApiBody = UnsyncBoxBody<Bytes, Infallible>;

/// The SPIFFE identity a client proved with its certificate in the TLS handshake of the connection a request
/// came on; absent on plaintext connections and when the client sent no certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub SpiffeId);

/// Routes one request of a listener to its response.
pub trait Router: Send + Sync + 'static {
    /// Answers `request`; never fails (errors are responses).
    fn route(&self, request: Request<Incoming>) -> impl Future<Output = Response<ApiBody>> + Send;
}

/// Serves `router` on `listener` (over TLS when `tls` is set) until `shutdown` turns true, then drains.
pub async fn serve<R: Router>(
    name: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Arc<R>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);

    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop_requested(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically EMFILE; pause rather than spin.
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(listener = name, %peer, "connection limit {MAX_CONNECTIONS} reached; closing");
            continue;
        };
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let serve_as = |peer: Option<SpiffeId>| {
                service_fn(move |mut request: Request<Incoming>| {
                    let router = router.clone();
                    if let Some(id) = &peer {
                        request.extensions_mut().insert(PeerIdentity(id.clone()));
                    }
                    async move { Ok::<_, Infallible>(router.route(request).await) }
                })
            };
            let served = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let service = serve_as(meshlet::tls::peer_identity(stream.get_ref().1));
                            watcher
                                .watch(builder.serve_connection(TokioIo::new(stream), service))
                                .await
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(listener = name, %peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(tcp), serve_as(None)))
                        .await
                }
            };
            if let Err(error) = served {
                tracing::debug!(listener = name, %peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "connections still open after {DRAIN_TIMEOUT:?}; closing them"
        );
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The HTTPS API: `POST /v1/certificates` (issuance) and `POST /inject` (the mutating admission webhook).
pub struct ApiRouter {
    /// Signs certificates for authenticated callers.
    pub issuance: IssuanceService,
    /// What injected sidecars look like.
    pub inject: Arc<meshlet::inject::InjectConfig>,
    /// The discovery watch streams (`GET /v1/mesh/watch`).
    pub watch: Arc<crate::mesh_watch::WatchService>,
    /// Where sidecar telemetry reports go.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
}

/// Largest AdmissionReview accepted (a pod spec with many containers is well under this).
const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;

impl ApiRouter {
    /// The admission webhook: the kube-apiserver posts an AdmissionReview, gets one back with a JSONPatch.
    async fn inject(&self, request: Request<Incoming>) -> Response<ApiBody> {
        if request.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n");
        }
        match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
            .collect()
            .await
        {
            Ok(body) => {
                let review = crate::webhook::review(&body.to_bytes(), &self.inject);
                response(StatusCode::OK, "application/json", review)
            }
            Err(error) => text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the AdmissionReview: {error}\n"),
            ),
        }
    }
}

impl Router for ApiRouter {
    async fn route(&self, request: Request<Incoming>) -> Response<ApiBody> {
        if request.uri().path() == "/inject" {
            return self.inject(request).await;
        }
        if request.uri().path() == WHOAMI_PATH {
            return whoami(&request);
        }
        if request.uri().path() == meshlet::discovery::protocol::WATCH_PATH {
            return self.watch.serve(&request);
        }
        if request.uri().path() == meshlet::telemetry::report::TELEMETRY_PATH {
            return crate::telemetry::http::receive(&self.telemetry, request).await;
        }
        if request.uri().path() != ISSUE_PATH {
            return json_error(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no such path {:?}", request.uri().path()),
            );
        }
        if request.method() != Method::POST {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                format!("{ISSUE_PATH} takes POST, not {}", request.method()),
            );
        }
        let bearer = bearer_token(request.headers()).map(str::to_owned);
        let body = match Limited::new(request.into_body(), MAX_REQUEST_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(error) => {
                let failure = self.issuance.refuse(IssueFailure::MalformedRequest(format!(
                    "cannot read a body of at most {MAX_REQUEST_BYTES} bytes: {error}"
                )));
                return json_response(failure.status(), &failure.to_wire());
            }
        };
        match self.issuance.issue(bearer.as_deref(), &body).await {
            Ok(issued) => json_response(StatusCode::OK, &issued),
            Err(failure) => json_response(failure.status(), &failure.to_wire()),
        }
    }
}

/// Tells a caller which identity its client certificate proved (for operators debugging mTLS to the
/// control plane, and for tests of the sidecar's channel).
pub const WHOAMI_PATH: &str = "/v1/whoami";

fn whoami(request: &Request<Incoming>) -> Response<ApiBody> {
    match request.extensions().get::<PeerIdentity>() {
        Some(PeerIdentity(id)) => json_response(
            StatusCode::OK,
            &serde_json::json!({ "identity": id.as_str() }),
        ),
        None => json_error(
            StatusCode::UNAUTHORIZED,
            "no-client-certificate",
            "this connection presented no mesh certificate".into(),
        ),
    }
}

/// The admin endpoint: liveness, readiness and metrics.
pub struct AdminRouter {
    /// True from the end of start-up until shutdown begins.
    pub ready: Arc<AtomicBool>,
    /// What `/metrics` shows.
    pub metrics: Arc<Metrics>,
    /// The mesh's golden signals (`GET /api/v1/stat`).
    pub telemetry: Arc<crate::telemetry::Telemetry>,
}

impl Router for AdminRouter {
    async fn route(&self, request: Request<Incoming>) -> Response<ApiBody> {
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match request.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" if self.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            meshlet::telemetry::api::STAT_PATH => {
                crate::telemetry::http::stat_response(&self.telemetry, &request)
            }
            "/metrics" => match self.metrics.encode() {
                Ok(body) => response(StatusCode::OK, "text/plain; version=0.0.4", body),
                Err(error) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode metrics: {error}\n"),
                ),
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, as RFC 7235 says).
fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A JSON error answer `{"reason", "message"}`, the shape every API refusal has.
pub fn json_error(status: StatusCode, reason: &str, message: String) -> Response<ApiBody> {
    json_response(
        status,
        &IssueError {
            reason: reason.to_string(),
            message,
        },
    )
}

/// A JSON answer.
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<ApiBody> {
    match serde_json::to_vec(body) {
        Ok(body) => response(status, "application/json", body),
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode response: {error}\n"),
        ),
    }
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<ApiBody> {
    response(
        status,
        "text/plain; charset=utf-8",
        body.into().into_bytes(),
    )
}

/// A whole-body answer with its content type.
pub fn response(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<ApiBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_taken_from_the_authorization_header() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
    }
}
