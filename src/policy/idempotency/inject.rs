//! Outbound key injection: a POST or PATCH without an `Idempotency-Key` gets a fresh UUIDv7 key (as an RFC
//! 8941 sf-string) before its first attempt, so every attempt carries the same key and the retry layer may
//! retry it, knowing the receiver de-duplicates.

use std::task::{Context, Poll};

use http::{HeaderValue, Method, Request};
use tower::Service;

use super::KEY_HEADER;
use crate::policy::{Body, SharedPolicy};

/// Adds an `Idempotency-Key` to unkeyed POST and PATCH requests when `idempotency.inject` is on.
#[derive(Clone, Debug)]
pub struct InjectKey<S> {
    pub(super) inner: S,
    pub(super) policy: SharedPolicy,
}

/// A fresh key: a UUIDv7 (time-ordered, so stores evicting oldest-first evict the right ones) as an
/// sf-string.
pub fn fresh_key() -> HeaderValue {
    let text = format!("\"{}\"", uuid::Uuid::now_v7());
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("\"meshlet\""))
}

impl<S> Service<Request<Body>> for InjectKey<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> S::Future {
        let inject = self
            .policy
            .read_for_request(&mut req, |p| p.idempotency.inject);
        if inject
            && matches!(*req.method(), Method::POST | Method::PATCH)
            && !req.headers().contains_key(KEY_HEADER)
        {
            req.headers_mut().insert(KEY_HEADER, fresh_key());
        }
        self.inner.call(req)
    }
}
