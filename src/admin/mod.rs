//! The admin server: metrics, liveness, readiness, effective configuration and shutdown.
//!
//! It runs on its own thread and runtime so that a saturated data plane cannot starve `/ready` and
//! `/metrics` (the kubelet would otherwise restart a proxy that is merely busy).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{debug, info};

use crate::metrics::Metrics;

pub mod probes;

/// What the admin endpoints read and trigger.
pub struct AdminState {
    /// The registry every metric is registered on.
    pub registry: Registry,
    /// Refreshed at scrape time.
    pub metrics: Metrics,
    /// True once every listener is bound (and, with identity, a certificate is held); false while draining.
    pub ready: AtomicBool,
    /// The effective configuration, as JSON.
    pub config_json: String,
    /// Notified by `POST /shutdown`.
    pub shutdown: Notify,
    /// The application's rewritten HTTP probes (`/app-health/...`).
    pub app_probes: probes::AppProbes,
}

/// Serves admin requests until the process exits.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(state.clone(), peer, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "admin connection failed");
            }
        });
    }
}

async fn handle(
    state: Arc<AdminState>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let rsp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => metrics(&state),
        (&Method::GET, path) if path.starts_with("/app-health/") => {
            match probes::check(&state.app_probes, path).await {
                Some((status, body)) => text(status, &body),
                None => text(StatusCode::NOT_FOUND, "no such application probe\n"),
            }
        }
        (&Method::GET, "/config") => {
            let mut rsp = Response::new(Full::new(Bytes::from(state.config_json.clone())));
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            rsp
        }
        (&Method::POST, "/shutdown") => {
            if peer.ip().is_loopback() {
                info!(%peer, "shutdown requested through the admin server");
                state.shutdown.notify_one();
                text(StatusCode::OK, "shutting down\n")
            } else {
                text(
                    StatusCode::FORBIDDEN,
                    "shutdown is only accepted from loopback\n",
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /live, /ready, /config or POST /shutdown\n",
        ),
    };
    Ok(rsp)
}

fn metrics(state: &AdminState) -> Response<Full<Bytes>> {
    state.metrics.refresh();
    let encoder = TextEncoder::new();
    let mut buf = Vec::with_capacity(16 * 1024);
    if let Err(e) = encoder.encode(&state.registry.gather(), &mut buf) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding metrics failed: {e}\n"),
        );
    }
    let mut rsp = Response::new(Full::new(Bytes::from(buf)));
    if let Ok(value) = header::HeaderValue::from_str(encoder.format_type()) {
        rsp.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    rsp
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// Polls `GET /ready` on a proxy's admin address until it answers 200, or fails after `timeout`.
pub fn wait_ready(admin: SocketAddr, timeout: std::time::Duration) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let ready = std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(1))
            .and_then(|mut s| {
                s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
                s.write_all(
                    format!("GET /ready HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )?;
                let mut head = [0u8; 12];
                s.read_exact(&mut head)?;
                Ok(head.starts_with(b"HTTP/1.1 200"))
            });
        if ready.unwrap_or(false) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("the proxy at http://{admin}/ready was not ready within {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
