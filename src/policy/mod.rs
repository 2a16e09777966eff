//! Resilience policies, each a tower layer in its own folder.
//!
//! The client-side (outbound) stack, outermost first:
//!
//! ```text
//! limit → timeout(request) → idempotency::inject → retry → timeout(per-try) → balance → breaker → client
//! ```
//!
//! The server-side (inbound) stack puts [`idempotency::Dedup`] in front of the app.
//!
//! Every failure a policy decides on is answered by a response the proxy makes itself
//! ([`proxy_response`]): `x-meshlet-error: <reason>` says why, and responses that went through the retry layer
//! say how many attempts were made (`x-meshlet-attempts`). Errors of the inner client pass through unchanged;
//! the layers only need to know what kind of failure each is ([`Classify`]).
//!
//! Each layer reads its settings from the request's [`config::Policy`] (resolved once per request by
//! [`config::SharedPolicy::for_request`]), so a policy edit applies to the next request without rebuilding
//! the stack or dropping connections.

pub mod body;
pub mod breaker;

pub mod config;
pub mod idempotency;
pub mod limit;

pub mod metrics;
pub mod retry;
pub mod stack;
pub mod timeout;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

pub use config::{Policy, PolicyFile, ServicePolicy, SharedPolicy};
pub use metrics::PolicyMetrics;
pub use stack::{send, DestinationPolicy, PolicyService};

pub use crate::proxy::error::ERROR_HEADER;
pub use crate::proxy::{Body, BoxError};

/// With `x-meshlet-error: timeout`: which timeout ran out (`request` or `per-try`).
pub const TIMEOUT_HEADER: &str = "x-meshlet-timeout";
/// Attempts made for this request by the retry layer.
pub const ATTEMPTS_HEADER: &str = "x-meshlet-attempts";
/// Remaining deadline in milliseconds, propagated upstream on plain HTTP requests so that a nested call never
/// outlives its caller. An inbound request carrying it has its request timeout shortened to it.
pub const DEADLINE_HEADER: &str = "x-meshlet-deadline-ms";

/// [`ATTEMPTS_HEADER`] as a header name: written on every response, so not parsed every time.
pub(crate) const ATTEMPTS: HeaderName = HeaderName::from_static(ATTEMPTS_HEADER);

/// The value of [`ATTEMPTS_HEADER`]; the counts a policy allows (at most 10) need no allocation.
pub(crate) fn attempts_value(n: u32) -> HeaderValue {
    const COUNTS: [&str; 11] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];
    match COUNTS.get(n as usize) {
        Some(count) => HeaderValue::from_static(count),
        None => HeaderValue::from(n),
    }
}

/// What went wrong with an attempt, as far as retrying and circuit breaking care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The endpoint refused the TCP connection.
    ConnectRefused,
    /// The TCP connection was not established in time.
    ConnectTimeout,
    /// HTTP/2 `REFUSED_STREAM`: the upstream did not process the request.
    RefusedStream,
    /// The connection broke before any response byte arrived.
    ResetBeforeResponse,
    /// The connection broke after the response had started.
    ResetAfterResponseStarted,
    /// The upstream did not answer in time.
    ResponseTimeout,
    /// Anything else.
    Other,
}

impl FailureKind {
    /// True when the request provably never reached the upstream application, so that sending it again is
    /// safe whatever its method.
    pub fn never_reached_upstream(self) -> bool {
        matches!(
            self,
            FailureKind::ConnectRefused | FailureKind::ConnectTimeout | FailureKind::RefusedStream
        )
    }
}

/// Implemented by the upstream client's error type, so that the policies know what kind of failure it is.
pub trait Classify {
    /// The kind of failure.
    fn failure_kind(&self) -> FailureKind;
}

/// Why the proxy answered itself; carried as a response extension so inner layers' answers can be told
/// from the upstream's without parsing headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyReason {
    /// The whole request's deadline ran out.
    RequestTimeout,
    /// One attempt ran out of time.
    PerTryTimeout,
    /// The concurrency or pending limit was reached.
    Overloaded,
    /// Every endpoint of the service is ejected.
    CircuitOpen,
    /// A request with the same Idempotency-Key is still being processed.
    DedupConflict,
    /// The Idempotency-Key was used before with a different request.
    DedupMismatch,
    /// The Idempotency-Key header is malformed or too long.
    DedupBadKey,
    /// The de-duplication store could not be reached.
    DedupUnavailable,
    /// The caller's request body failed while it was being read.
    BadRequestBody,
    /// The destination service has no endpoints.
    NoEndpoints,
}

impl ProxyReason {
    /// The value of `x-meshlet-error`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyReason::RequestTimeout | ProxyReason::PerTryTimeout => "timeout",
            ProxyReason::Overloaded => "overloaded",
            ProxyReason::CircuitOpen => "circuit-open",
            ProxyReason::DedupConflict => "idempotency-conflict",
            ProxyReason::DedupMismatch => "idempotency-key-reused",
            ProxyReason::DedupBadKey => "idempotency-key-invalid",
            ProxyReason::DedupUnavailable => "idempotency-store-unavailable",
            ProxyReason::BadRequestBody => "request-body-error",
            ProxyReason::NoEndpoints => "no-endpoints",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            ProxyReason::RequestTimeout | ProxyReason::PerTryTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyReason::Overloaded
            | ProxyReason::CircuitOpen
            | ProxyReason::DedupUnavailable
            | ProxyReason::NoEndpoints => StatusCode::SERVICE_UNAVAILABLE,
            ProxyReason::DedupConflict => StatusCode::CONFLICT,
            ProxyReason::DedupMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ProxyReason::DedupBadKey | ProxyReason::BadRequestBody => StatusCode::BAD_REQUEST,
        }
    }
}

/// A response made by the proxy: status from the reason, `x-meshlet-error`, and for timeouts
/// `x-meshlet-timeout`. De-duplication answers are `application/problem+json` (RFC 9457), as the
/// Idempotency-Key draft asks.
pub fn proxy_response(reason: ProxyReason) -> Response<Body> {
    let (content_type, body) = match reason {
        ProxyReason::DedupConflict
        | ProxyReason::DedupMismatch
        | ProxyReason::DedupBadKey
        | ProxyReason::DedupUnavailable => {
            let (title, detail) = match reason {
                ProxyReason::DedupConflict => (
                    "A request with this Idempotency-Key is being processed",
                    "Retry later.",
                ),
                ProxyReason::DedupMismatch => (
                    "Idempotency-Key is already used",
                    "The key was used with a different request.",
                ),
                ProxyReason::DedupBadKey => (
                    "Idempotency-Key is invalid",
                    "Send an sf-string of at most 255 bytes.",
                ),
                _ => ("Idempotency store unavailable", "Retry later."),
            };
            let json = serde_json::json!({
                "type": "about:blank",
                "title": title,
                "status": reason.status().as_u16(),
                "detail": detail,
            });
            ("application/problem+json", json.to_string())
        }
        _ => ("text/plain", format!("meshlet: {}\n", reason.as_str())),
    };
    let mut resp = Response::new(full_body(Bytes::from(body)));
    *resp.status_mut() = reason.status();
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    headers.insert(ERROR_HEADER, HeaderValue::from_static(reason.as_str()));
    match reason {
        ProxyReason::RequestTimeout => {
            headers.insert(TIMEOUT_HEADER, HeaderValue::from_static("request"));
        }
        ProxyReason::PerTryTimeout => {
            headers.insert(TIMEOUT_HEADER, HeaderValue::from_static("per-try"));
        }
        _ => {}
    }
    resp.extensions_mut().insert(reason);
    resp
}

/// A complete body from bytes.
pub fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// The absolute time by which a request must be answered; set by the request timeout layer and read by the
/// layers inside it (per-try timeouts, retry backoff, de-duplication waits). A per-try timeout nearer than
/// it narrows it for that attempt, so that the circuit breaker below can tell an attempt abandoned for being
/// slow (a failure of the endpoint) from one abandoned because its caller went away (no verdict).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub tokio::time::Instant);

/// Request extension through which the caller of the stack learns how many attempts were made, also when
/// the stack ends with an error rather than a response (the caller renders that error itself).
#[derive(Debug, Clone, Default)]
pub struct Attempts(Arc<AtomicU32>);

impl Attempts {
    /// Attempts made so far.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, n: u32) {
        self.0.store(n, Ordering::Relaxed)
    }
}

/// Request extension: who is calling (the peer's mTLS identity, else its address). De-duplication keys on
/// it so that two callers can never read each other's responses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller(pub String);

/// A boxed future of a policy layer.
pub type ResponseFuture<E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, E>> + Send>>;

/// Calls `inner` once, boxed. Layers whose future is an `async` block call their inner service through this:
/// it keeps the inner future's `Send` bound out of the block's own future, where rustc cannot prove it for
/// every lifetime of the boxed error type.
pub(crate) fn oneshot<S, E>(inner: S, req: http::Request<Body>) -> ResponseFuture<E>
where
    S: tower::Service<http::Request<Body>, Response = Response<Body>, Error = E> + Send + 'static,
    S::Future: Send,
    E: Send + 'static,
{
    Box::pin(tower::ServiceExt::oneshot(inner, req))
}

/// Locks `mutex`, also after a panic elsewhere poisoned it: the policies' shared state (counters, estimates,
/// tables) stays consistent at every step, so it is safe to keep using.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads `lock`, also when poisoned (see [`lock`]).
pub(crate) fn read<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `lock`, also when poisoned (see [`lock`]).
pub(crate) fn write<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
