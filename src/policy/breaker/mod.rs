//! Circuit breaking per endpoint (failure accrual, see [`health`]).
//!
//! Why per endpoint? One bad instance among ten should be taken out of rotation, not the whole service. The
//! endpoint of a request is the [`Endpoint`] extension set by the balancer, or else the request's authority
//! when it is an IP address and port. A request to an ejected endpoint is answered at once with 503
//! `x-meshlet-error: circuit-open`, without touching the network. Failures are transport errors, 502, 503,
//! 504 and gRPC UNAVAILABLE, and attempts abandoned before their response headers once their deadline has
//! passed (a per-try or request timeout). An attempt abandoned earlier was cancelled by its caller (the
//! client went away): that says nothing about the endpoint, so it is not counted, and a cancelled half-open
//! probe frees the probe slot for the next request. Counting cancellations would let a burst of client
//! disconnects eject healthy endpoints.

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
use crate::policy::{proxy_response, Body, Deadline, ProxyReason, SharedPolicy};

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

/// An admitted attempt's record. Dropped before its outcome is known, it is a failure if the attempt's
/// deadline had passed (it timed out) and no verdict otherwise (its caller went away).
pub struct Outcome {
    table: Arc<BreakerTable>,
    addr: SocketAddr,
    admission: Admission,
    config: BreakerConfig,
    deadline: Option<tokio::time::Instant>,
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
        if self.recorded {
            return;
        }
        let timed_out = self
            .deadline
            .is_some_and(|deadline| tokio::time::Instant::now() >= deadline);
        if timed_out {
            self.table
                .record(&self.addr, self.admission, false, &self.config);
        } else {
            self.table.cancel(&self.addr, self.admission);
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
        // The attempt's deadline: the per-try layer above narrows the request's to its own.
        let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        let outcome = Outcome {
            table: self.table.clone(),
            addr,
            admission,
            config,
            deadline,
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
        /// Sent on; the outcome is recorded when it is known (a drop after the deadline counts as a failure).
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tower::Layer;

    use super::*;
    use crate::policy::{full_body, PolicyFile, PolicyMetrics};

    /// A last hop that never answers, so that every attempt ends by being dropped.
    #[derive(Clone)]
    struct Hangs;

    impl Service<Request<Body>> for Hangs {
        type Response = Response<Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Pending<Result<Response<Body>, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            std::future::pending()
        }
    }

    const ADDR: &str = "127.0.0.1:8080";

    fn breaker() -> (CircuitBreaker<Hangs>, Arc<BreakerTable>) {
        let file =
            PolicyFile::from_yaml("services:\n  svc:\n    breaker: {consecutive_failures: 2}\n")
                .unwrap();
        let table = Arc::new(BreakerTable::new("svc", PolicyMetrics::unregistered()));
        table.set_endpoints(&[ADDR.parse().unwrap()]);
        let policy = SharedPolicy::new(file.resolve("svc"));
        (
            CircuitBreakerLayer::new(table.clone(), policy).layer(Hangs),
            table,
        )
    }

    /// A request to the endpoint whose attempt has `deadline`, if any.
    fn attempt(deadline: Option<tokio::time::Instant>) -> Request<Body> {
        let mut req = Request::get(format!("http://{ADDR}/"))
            .body(full_body(Bytes::new()))
            .unwrap();
        if let Some(deadline) = deadline {
            req.extensions_mut().insert(Deadline(deadline));
        }
        req
    }

    /// Starts the attempt (so that it is admitted) and drops it unanswered.
    fn start_and_drop(service: &mut CircuitBreaker<Hangs>, req: Request<Body>) {
        let future = service.call(req);
        assert!(matches!(future, ResponseFuture::Called { .. }), "admitted");
        drop(future);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_cancelled_by_the_caller_do_not_eject_the_endpoint() {
        let (mut service, table) = breaker();
        let later = tokio::time::Instant::now() + Duration::from_secs(1);
        for _ in 0..10 {
            start_and_drop(&mut service, attempt(Some(later)));
            start_and_drop(&mut service, attempt(None));
        }
        assert!(table.is_available(&ADDR.parse().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_dropped_after_their_deadline_eject_it() {
        let (mut service, table) = breaker();
        let now = tokio::time::Instant::now();
        start_and_drop(&mut service, attempt(Some(now)));
        start_and_drop(&mut service, attempt(Some(now)));
        let addr = ADDR.parse().unwrap();
        assert!(!table.is_available(&addr), "two timeouts in a row eject");

        // Half-open: the probe is cancelled by its caller, so the next request may probe instead.
        tokio::time::advance(Duration::from_secs(60)).await;
        let later = tokio::time::Instant::now() + Duration::from_secs(1);
        start_and_drop(&mut service, attempt(Some(later)));
        assert!(table.is_available(&addr), "the probe slot is free again");
        assert_eq!(table.admit(&addr), Some(Admission::Probe));
    }
}
