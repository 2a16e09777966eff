//! Timeouts: one for the whole request (all attempts and backoff included), one per attempt.
//!
//! Why two? A per-try timeout turns one slow endpoint into a retry on another, while the request timeout is
//! the promise made to the caller. The request timeout is shortened by the caller's own deadline
//! (`grpc-timeout`, or [`DEADLINE_HEADER`] from another meshlet), and the remaining time is propagated on
//! every attempt (`grpc-timeout` for gRPC, [`DEADLINE_HEADER`] otherwise), so a nested call never outlives
//! its caller. When a timer fires first the caller gets a 504 with `x-meshlet-error: timeout` and
//! `x-meshlet-timeout: request|per-try`. A per-try timer that is cut short by the request deadline reports
//! `request`, since retrying cannot help then.

mod future;
mod layer;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tokio::time::Instant;
use tower::Service;

pub use future::ResponseFuture;
pub use layer::TimeoutLayer;

use crate::policy::{
    Attempts, Body, Deadline, PolicyMetrics, ProxyReason, SharedPolicy, DEADLINE_HEADER,
};

/// Which timeout a [`Timeout`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// `timeouts.request`: outermost, covers every attempt; sets the request's [`Deadline`].
    Request,
    /// `timeouts.per_try`: around each attempt, inside the retry layer.
    PerTry,
}

/// Answers 504 when the inner service takes longer than the policy allows.
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    shared: Arc<TimeoutShared>,
}

/// What every copy of one [`Timeout`] shares, behind one reference count: tower clones a stack's layers
/// for every request.
#[derive(Debug)]
pub(crate) struct TimeoutShared {
    kind: TimeoutKind,
    policy: SharedPolicy,
    metrics: PolicyMetrics,
    destination: Arc<str>,
}

impl<S, E> Service<Request<Body>> for Timeout<S>
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
        let (request_timeout, per_try_timeout) = self
            .shared
            .policy
            .read_for_request(&mut req, |p| (p.timeouts.request, p.timeouts.per_try));
        let now = Instant::now();
        let outer = req.extensions().get::<Deadline>().map(|d| d.0);
        // `timer`: when this layer answers 504 itself. A per-try layer without `per_try` only propagates the
        // request deadline; the request layer's own timer enforces it.
        let (deadline, timer, reason) = match self.shared.kind {
            TimeoutKind::Request => {
                let mut deadline = now + request_timeout;
                if let Some(callers) = caller_deadline(req.headers()) {
                    deadline = deadline.min(now + callers);
                }
                if let Some(outer) = outer {
                    deadline = deadline.min(outer);
                }
                req.extensions_mut().insert(Deadline(deadline));
                (Some(deadline), true, ProxyReason::RequestTimeout)
            }
            TimeoutKind::PerTry => match (per_try_timeout.map(|d| now + d), outer) {
                (Some(per_try), Some(outer)) if per_try < outer => {
                    (Some(per_try), true, ProxyReason::PerTryTimeout)
                }
                (Some(per_try), None) => (Some(per_try), true, ProxyReason::PerTryTimeout),
                (Some(_), outer) => (outer, true, ProxyReason::RequestTimeout),
                (None, outer) => (outer, false, ProxyReason::RequestTimeout),
            },
        };
        // The request timeout may fire between attempts (during a backoff): its 504 still says how many
        // attempts were made, read from the handle the retry layer updates.
        let attempts = match self.shared.kind {
            TimeoutKind::Request => Some(attempts_handle(&mut req)),
            TimeoutKind::PerTry => None,
        };
        // The request layer wrote the remaining time for the first attempt; a per-try layer rewrites it
        // when its own deadline is the nearer one, and on every retry, when less time is left.
        let rewrite = match self.shared.kind {
            TimeoutKind::Request => true,
            TimeoutKind::PerTry => {
                reason == ProxyReason::PerTryTimeout
                    || req
                        .extensions()
                        .get::<Attempts>()
                        .is_none_or(|a| a.get() > 1)
            }
        };
        if let Some(per_try) = deadline.filter(|_| reason == ProxyReason::PerTryTimeout) {
            // The attempt's own copy of the extensions: the replay copy above keeps the request's deadline.
            match req.extensions_mut().get_mut::<Deadline>() {
                Some(outer) => outer.0 = per_try,
                None => {
                    req.extensions_mut().insert(Deadline(per_try));
                }
            }
        }
        if let Some(deadline) = deadline.filter(|_| rewrite) {
            propagate_deadline(req.headers_mut(), deadline.saturating_duration_since(now));
        }
        ResponseFuture {
            inner: self.inner.call(req),
            sleep: deadline.filter(|_| timer).map(tokio::time::sleep_until),
            reason,
            counter: timer.then(|| self.shared.clone()),
            attempts,
        }
    }
}

/// The request's [`Attempts`] handle, inserted if the caller did not provide one.
fn attempts_handle(req: &mut Request<Body>) -> Attempts {
    if let Some(attempts) = req.extensions().get::<Attempts>() {
        return attempts.clone();
    }
    let attempts = Attempts::default();
    req.extensions_mut().insert(attempts.clone());
    attempts
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The caller's own deadline, from `grpc-timeout` or [`DEADLINE_HEADER`]. Malformed values are ignored.
fn caller_deadline(headers: &HeaderMap) -> Option<Duration> {
    let grpc = headers
        .get(GRPC_TIMEOUT)
        .and_then(|v| parse_grpc_timeout(v.to_str().ok()?));
    let meshlet = headers
        .get(DEADLINE)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    match (grpc, meshlet) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    let split = value.len().checked_sub(1)?;
    if !value.is_char_boundary(split) {
        return None;
    }
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a `grpc-timeout` value in the finest unit whose number fits in 8 digits.
pub fn format_grpc_timeout(d: Duration) -> String {
    let millis = d.as_millis();
    if millis < 100_000_000 {
        format!("{millis}m")
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    }
}

/// Writes the remaining time on the upstream request, replacing what the caller sent.
fn propagate_deadline(headers: &mut HeaderMap, remaining: Duration) {
    if is_grpc(headers) {
        if let Ok(v) = HeaderValue::from_str(&format_grpc_timeout(remaining)) {
            headers.insert(GRPC_TIMEOUT, v);
        }
    } else {
        headers.insert(
            DEADLINE,
            HeaderValue::from(remaining.as_millis().min(u64::MAX as u128) as u64),
        );
    }
}

/// The deadline headers as names, since every attempt writes one.
const DEADLINE: HeaderName = HeaderName::from_static(DEADLINE_HEADER);
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{full_body, Policy, ServicePolicy, ERROR_HEADER, TIMEOUT_HEADER};
    use tower::{service_fn, Layer, ServiceExt};

    #[test]
    fn grpc_timeout_round_trips() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("1é"), None);
        assert_eq!(format_grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(
            parse_grpc_timeout(&format_grpc_timeout(Duration::from_secs(200_000))),
            Some(Duration::from_secs(200_000))
        );
    }

    fn layer(kind: TimeoutKind, request: u64, per_try: Option<u64>) -> TimeoutLayer {
        let mut p = Policy::default();
        p.timeouts.request = Duration::from_millis(request);
        p.timeouts.per_try = per_try.map(Duration::from_millis);
        TimeoutLayer::new(
            kind,
            "svc",
            SharedPolicy::new(ServicePolicy::uniform(p)),
            PolicyMetrics::unregistered(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn slow_inner_gets_a_504_naming_the_timeout() {
        let slow = service_fn(|_req: Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::convert::Infallible>(Response::new(full_body("late".into())))
        });
        let per_try = layer(TimeoutKind::PerTry, 1000, Some(100)).layer(slow);
        let stack = layer(TimeoutKind::Request, 1000, Some(100)).layer(per_try);
        let resp = stack
            .oneshot(Request::new(full_body("".into())))
            .await
            .unwrap();
        assert_eq!(resp.status(), 504);
        assert_eq!(resp.headers()[ERROR_HEADER], "timeout");
        assert_eq!(resp.headers()[TIMEOUT_HEADER], "per-try");
    }

    #[tokio::test(start_paused = true)]
    async fn request_timeout_reports_the_attempts_made() {
        let retrying = service_fn(|req: Request<Body>| async move {
            req.extensions().get::<Attempts>().unwrap().set(2);
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::convert::Infallible>(Response::new(full_body("late".into())))
        });
        let stack = layer(TimeoutKind::Request, 1000, None).layer(retrying);
        let resp = stack
            .oneshot(Request::new(full_body("".into())))
            .await
            .unwrap();
        assert_eq!(resp.headers()[TIMEOUT_HEADER], "request");
        assert_eq!(resp.headers()[crate::policy::ATTEMPTS_HEADER], "2");
    }

    #[tokio::test(start_paused = true)]
    async fn caller_deadline_shortens_and_is_propagated() {
        let seen = service_fn(|req: Request<Body>| async move {
            let propagated = req.headers()["grpc-timeout"].to_str().unwrap().to_string();
            Ok::<_, std::convert::Infallible>(Response::new(full_body(propagated.into())))
        });
        let stack = layer(TimeoutKind::Request, 10_000, None).layer(seen);
        let mut req = Request::new(full_body("".into()));
        req.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        req.headers_mut()
            .insert("grpc-timeout", HeaderValue::from_static("300m"));
        let resp = stack.oneshot(req).await.unwrap();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, "300m");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_attempt_carries_the_time_left_not_the_first_attempts() {
        let seen = service_fn(|req: Request<Body>| async move {
            let left = req.headers()[DEADLINE_HEADER].to_str().unwrap().to_string();
            Ok::<_, std::convert::Infallible>(Response::new(full_body(left.into())))
        });
        let per_try = layer(TimeoutKind::PerTry, 1000, None).layer(seen);
        let deadline_left = |attempt: u32| {
            let mut per_try = per_try.clone();
            async move {
                let mut req = Request::new(full_body("".into()));
                // What the request layer wrote before the first attempt, 600 ms ago.
                req.headers_mut()
                    .insert(DEADLINE_HEADER, HeaderValue::from_static("1000"));
                req.extensions_mut()
                    .insert(Deadline(Instant::now() + Duration::from_millis(400)));
                let attempts = Attempts::default();
                attempts.set(attempt);
                req.extensions_mut().insert(attempts);
                let resp = tower::Service::call(&mut per_try, req).await.unwrap();
                http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap()
                    .to_bytes()
            }
        };
        assert_eq!(
            deadline_left(1).await,
            "1000",
            "first attempt: already written"
        );
        assert_eq!(deadline_left(2).await, "400", "a retry: rewritten");
    }
}
