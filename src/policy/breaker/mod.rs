//! Circuit breaking per endpoint (failure accrual, see [`health`]).
//!
//! Why per endpoint? One bad instance among ten should be taken out of rotation, not the whole service. The
//! endpoint of a request is the [`Endpoint`] extension set by the balancer, or else the request's authority
//! when it is an IP address and port. A request to an ejected endpoint is answered at once with 503
//! `x-meshlet-error: circuit-open`, without touching the network. Failures are transport errors, 502, 503,
//! 504 and gRPC UNAVAILABLE, and attempts abandoned before their response headers (a per-try timeout).

pub mod health;
mod layer;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::Service;

pub use health::{Admission, BreakerTable};
pub use layer::CircuitBreakerLayer;

use crate::policy::config::Breaker as BreakerConfig;
use crate::policy::{proxy_response, Body, ProxyReason, SharedPolicy};

/// Request extension: the endpoint chosen for this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint(pub SocketAddr);

impl Endpoint {
    /// The request's endpoint: the extension, else an `ip:port` authority.
    pub fn of<B>(req: &Request<B>) -> Option<SocketAddr> {
        if let Some(Endpoint(addr)) = req.extensions().get::<Endpoint>() {
            return Some(*addr);
        }
        let authority = req.uri().authority()?;
        let port = authority.port_u16().unwrap_or(80);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        Some(SocketAddr::new(host.parse().ok()?, port))
    }
}

/// Refuses requests to ejected endpoints and records every outcome.
#[derive(Clone, Debug)]
pub struct CircuitBreaker<S> {
    inner: S,
    table: Arc<BreakerTable>,
    policy: SharedPolicy,
}

/// An admitted attempt's record; a failure if the attempt is dropped before its outcome is known.
pub struct Outcome {
    table: Arc<BreakerTable>,
    addr: SocketAddr,
    admission: Admission,
    config: BreakerConfig,
    recorded: bool,
}

impl Outcome {
    fn record(mut self, success: bool) {
        self.recorded = true;
        self.table
            .record(&self.addr, self.admission, success, &self.config);
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.recorded {
            self.table
                .record(&self.addr, self.admission, false, &self.config);
        }
    }
}

/// True for responses that say the endpoint is unwell (as opposed to the request being wrong).
fn is_failure(resp: &Response<Body>) -> bool {
    matches!(
        resp.status(),
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    ) || resp
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"14")
}

impl<S, E> Service<Request<Body>> for CircuitBreaker<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = E>,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let Some(addr) = Endpoint::of(&req) else {
            return ResponseFuture::Called {
                inner: self.inner.call(req),
                outcome: None,
            };
        };
        let config = self
            .policy
            .read_for_request(&mut req, |p| p.breaker.clone());
        let Some(admission) = self.table.admit(&addr) else {
            return ResponseFuture::Open;
        };
        let outcome = Outcome {
            table: self.table.clone(),
            addr,
            admission,
            config,
            recorded: false,
        };
        ResponseFuture::Called {
            inner: self.inner.call(req),
            outcome: Some(outcome),
        }
    }
}

pin_project! {
    /// The inner response, its outcome recorded; or 503 `circuit-open` at once.
    #[project = ResponseFutureProj]
    pub enum ResponseFuture<F> {
        /// Sent on; the outcome is recorded when it is known (a drop counts as a failure).
        Called { #[pin] inner: F, outcome: Option<Outcome> },
        /// The endpoint is ejected.
        Open,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Called { inner, outcome } => {
                let result = ready!(inner.poll(cx));
                if let Some(outcome) = outcome.take() {
                    outcome.record(matches!(&result, Ok(resp) if !is_failure(resp)));
                }
                Poll::Ready(result)
            }
            ResponseFutureProj::Open => Poll::Ready(Ok(proxy_response(ProxyReason::CircuitOpen))),
        }
    }
}
