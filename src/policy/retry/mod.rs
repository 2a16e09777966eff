//! Retries that are safe and bounded.
//!
//! * **Safe**: GET, HEAD, OPTIONS, TRACE, PUT and DELETE are idempotent and may be sent again; POST and PATCH
//!   only when they carry an `Idempotency-Key` (the receiver de-duplicates them). A failure that provably
//!   never reached the upstream (connection refused or timed out, HTTP/2 `REFUSED_STREAM`) may be retried
//!   whatever the method.
//! * **Final once passed on**: the decision is made on the response head alone. A response handed to the
//!   caller is never retried, so a streaming response is never cut and replayed after its first byte.
//! * **Bounded**: `max_attempts`, a retry budget shared by the destination ([`budget`]), exponential backoff
//!   with full jitter, `Retry-After` honoured only while it fits the request's [`Deadline`], and request
//!   bodies buffered for replay only up to [`MAX_REPLAY_BODY_BYTES`]; larger ones are streamed once and not
//!   retried (`meshlet_retry_body_too_large_total`).
//!
//! Every response that went through this layer carries `x-meshlet-attempts: N`; a caller that inserted an
//! [`Attempts`] extension also learns N when the stack ends in an error.

pub mod budget;
mod future;
mod layer;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, Request, Response, StatusCode};
use rand::Rng;
use tower::Service;

pub use future::ResponseFuture;
pub use layer::RetryLayer;

use self::future::State;

use self::budget::BudgetSlot;
use bytes::Bytes;
use tower::util::Oneshot;

use crate::policy::body::{buffer_up_to, Replayable};
use crate::policy::config::{RetryOn, MAX_REPLAY_BODY_BYTES};
use crate::policy::{
    attempts_value, full_body, Attempts, Body, Classify, Deadline, FailureKind, PolicyMetrics,
    ProxyReason, SharedPolicy, ATTEMPTS, ERROR_HEADER,
};

/// A `Retry-After` longer than this is not waited for when the request has no deadline.
const MAX_RETRY_AFTER_WITHOUT_DEADLINE: Duration = Duration::from_secs(30);

/// Sends a request again when an attempt fails in a retryable way.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<RetryShared>,
}

/// What every copy of one [`Retry`] shares, behind one reference count: tower clones a stack's layers for
/// every request, and the retry future keeps a copy for its attempts.
#[derive(Debug)]
pub(crate) struct RetryShared {
    policy: SharedPolicy,
    metrics: PolicyMetrics,
    destination: Arc<str>,
    budget: BudgetSlot,
}

impl<S, E> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = E> + Clone,
    E: Classify,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        // Each attempt waits for the inner service's readiness itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let shared = &self.shared;
        let policy = shared.policy.for_request(&mut req);
        let budget = shared
            .policy
            .read_current(|p| shared.budget.get(&p.default.retries.budget));
        budget::deposit(&budget);
        let attempts = req
            .extensions()
            .get::<Attempts>()
            .cloned()
            .unwrap_or_default();
        let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        let safe = is_retry_safe(req.method(), req.headers());
        let (parts, body) = req.into_parts();
        let (state, replay) = if policy.retries.max_attempts <= 1 {
            attempts.set(1);
            let call = Oneshot::new(self.inner.clone(), Request::from_parts(parts, body));
            (State::Attempt { call }, None)
        } else if http_body::Body::is_end_stream(&body) {
            // Nothing to read: the replay copy is the head alone.
            attempts.set(1);
            let first = Request::from_parts(parts.clone(), full_body(Bytes::new()));
            let call = Oneshot::new(self.inner.clone(), first);
            (
                State::Attempt { call },
                Some((parts, Replayable::default())),
            )
        } else {
            let buffering = Box::pin(buffer_up_to(body, MAX_REPLAY_BODY_BYTES));
            let state = State::Buffering {
                buffering,
                parts: Some(parts),
            };
            (state, None)
        };
        ResponseFuture {
            state,
            replay,
            retry: self.clone(),
            policy,
            budget,
            attempts,
            deadline,
            safe,
            attempt: 1,
        }
    }
}

fn finish<E>(outcome: Result<Response<Body>, E>, attempts: u32) -> Result<Response<Body>, E> {
    outcome.map(|mut resp| {
        resp.headers_mut()
            .insert(ATTEMPTS, attempts_value(attempts));
        resp
    })
}

/// True when sending the request twice cannot cause a second effect by itself.
pub fn is_retry_safe(method: &Method, headers: &HeaderMap) -> bool {
    match *method {
        Method::GET
        | Method::HEAD
        | Method::OPTIONS
        | Method::TRACE
        | Method::PUT
        | Method::DELETE => true,
        _ => headers.contains_key(crate::policy::idempotency::KEY_HEADER),
    }
}

/// Why this outcome should be retried, if it should.
fn retry_reason<E: Classify>(
    outcome: &Result<Response<Body>, E>,
    safe: bool,
    conditions: &[RetryOn],
) -> Option<RetryOn> {
    let (condition, needs_safe) = match outcome {
        Err(e) => match e.failure_kind() {
            FailureKind::ConnectRefused | FailureKind::ConnectTimeout => {
                (RetryOn::ConnectFailure, false)
            }
            FailureKind::RefusedStream => (RetryOn::RefusedStream, false),
            FailureKind::ResetBeforeResponse => (RetryOn::Reset, true),
            FailureKind::ResponseTimeout => (RetryOn::PerTryTimeout, true),
            FailureKind::ResetAfterResponseStarted | FailureKind::Other => return None,
        },
        Ok(resp) => match resp.extensions().get::<ProxyReason>() {
            Some(ProxyReason::PerTryTimeout) => (RetryOn::PerTryTimeout, true),
            Some(_) => return None,
            None => match resp.status() {
                StatusCode::BAD_GATEWAY => (RetryOn::Status502, true),
                StatusCode::SERVICE_UNAVAILABLE => (RetryOn::Status503, true),
                StatusCode::GATEWAY_TIMEOUT => (RetryOn::Status504, true),
                StatusCode::CONFLICT
                    if resp.headers().get(ERROR_HEADER).is_some_and(|v| {
                        v.as_bytes() == ProxyReason::DedupConflict.as_str().as_bytes()
                    }) =>
                {
                    (RetryOn::IdempotencyConflict, true)
                }
                _ if resp
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|v| v.as_bytes() == b"14") =>
                {
                    (RetryOn::GrpcUnavailable, true)
                }
                _ => return None,
            },
        },
    };
    (conditions.contains(&condition) && (safe || !needs_safe)).then_some(condition)
}

/// Full jitter: a uniformly random wait between zero and `base × 2^(retry - 1)`, capped at `max`, so that
/// clients that failed together do not retry together.
pub fn backoff(retry: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
        .min(max);
    let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::proxy_response;
    use http::HeaderValue;

    #[derive(Debug)]
    struct Failure(FailureKind);
    impl Classify for Failure {
        fn failure_kind(&self) -> FailureKind {
            self.0
        }
    }

    fn status(code: u16) -> Result<Response<Body>, Failure> {
        let mut r = Response::new(crate::policy::full_body("".into()));
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        Ok(r)
    }

    #[test]
    fn only_safe_requests_retry_after_reaching_the_upstream() {
        let all = RetryOn::ALL;
        assert_eq!(
            retry_reason(&status(503), true, &all),
            Some(RetryOn::Status503)
        );
        assert_eq!(retry_reason(&status(503), false, &all), None);
        assert_eq!(retry_reason(&status(500), true, &all), None);
        assert_eq!(
            retry_reason(&status(503), true, &[RetryOn::Status502]),
            None
        );
        let refused: Result<Response<Body>, _> = Err(Failure(FailureKind::ConnectRefused));
        assert_eq!(
            retry_reason(&refused, false, &all),
            Some(RetryOn::ConnectFailure)
        );
        let reset: Result<Response<Body>, _> = Err(Failure(FailureKind::ResetBeforeResponse));
        assert_eq!(retry_reason(&reset, false, &all), None);
        assert_eq!(retry_reason(&reset, true, &all), Some(RetryOn::Reset));
        let late: Result<Response<Body>, _> = Err(Failure(FailureKind::ResetAfterResponseStarted));
        assert_eq!(retry_reason(&late, true, &all), None);
        let circuit: Result<Response<Body>, Failure> = Ok(proxy_response(ProxyReason::CircuitOpen));
        assert_eq!(
            retry_reason(&circuit, true, &all),
            None,
            "proxy answers other than per-try timeouts are final"
        );
        let per_try: Result<Response<Body>, Failure> =
            Ok(proxy_response(ProxyReason::PerTryTimeout));
        assert_eq!(
            retry_reason(&per_try, true, &all),
            Some(RetryOn::PerTryTimeout)
        );
        let mut grpc = status(200);
        grpc.as_mut()
            .unwrap()
            .headers_mut()
            .insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(
            retry_reason(&grpc, true, &all),
            Some(RetryOn::GrpcUnavailable)
        );
    }

    #[test]
    fn method_safety() {
        let none = HeaderMap::new();
        assert!(is_retry_safe(&Method::GET, &none));
        assert!(is_retry_safe(&Method::DELETE, &none));
        assert!(!is_retry_safe(&Method::POST, &none));
        assert!(!is_retry_safe(&Method::PATCH, &none));
        let mut keyed = HeaderMap::new();
        keyed.insert("idempotency-key", HeaderValue::from_static("\"k\""));
        assert!(is_retry_safe(&Method::POST, &keyed));
    }

    #[test]
    fn backoff_is_jittered_under_a_doubling_cap() {
        let base = Duration::from_millis(10);
        let max = Duration::from_millis(50);
        for retry in 1..8 {
            let cap = (base * 2u32.pow(retry - 1)).min(max);
            for _ in 0..50 {
                assert!(backoff(retry, base, max) <= cap);
            }
        }
        assert_eq!(backoff(100, Duration::ZERO, max), Duration::ZERO);
    }

    #[test]
    fn retry_after_in_seconds_or_date() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
