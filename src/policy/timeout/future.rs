use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use std::sync::Arc;

use tokio::time::Sleep;

use super::TimeoutShared;
use crate::policy::{attempts_value, proxy_response, Attempts, Body, ProxyReason, ATTEMPTS};

pin_project! {
    /// The inner response, or a 504 once the timer fires first.
    pub struct ResponseFuture<F> {
        #[pin]
        pub(super) inner: F,
        #[pin]
        pub(super) sleep: Option<Sleep>,
        pub(super) reason: ProxyReason,
        pub(super) counter: Option<Arc<TimeoutShared>>,
        pub(super) attempts: Option<Attempts>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out);
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            if sleep.poll(cx).is_ready() {
                if let Some(shared) = this.counter.take() {
                    let kind = match this.reason {
                        ProxyReason::PerTryTimeout => "per-try",
                        _ => "request",
                    };
                    shared
                        .metrics
                        .timeouts
                        .with_label_values(&[&*shared.destination, kind])
                        .inc();
                }
                let mut resp = proxy_response(*this.reason);
                if let Some(n) = this.attempts.as_ref().map(Attempts::get).filter(|n| *n > 0) {
                    resp.headers_mut().insert(ATTEMPTS, attempts_value(n));
                }
                return Poll::Ready(Ok(resp));
            }
        }
        Poll::Pending
    }
}
