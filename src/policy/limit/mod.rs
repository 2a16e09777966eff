//! A per-service concurrency limit with a bounded queue.
//!
//! Why fail fast? A request that waits behind thousands of others will time out anyway, after having held
//! memory and a connection all along; answering 503 `x-meshlet-error: overloaded` at once lets the caller
//! (or its own retry budget) decide. Up to `limits.max_concurrent` requests run, up to `limits.max_pending`
//! wait for a slot, the rest are refused. A slot is held until the response body is finished, since that is
//! what occupies the upstream.

mod layer;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::Service;

pub use layer::ConcurrencyLimitLayer;

use crate::policy::body::with_guard;
use crate::policy::{oneshot, proxy_response, Body, PolicyMetrics, ProxyReason, SharedPolicy};

/// Slots shared by every request to one service.
#[derive(Debug)]
pub struct LimitState {
    slots: Arc<Semaphore>,
    /// Slots the semaphore was sized for, to resize it when the policy changes.
    sized_for: Mutex<usize>,
    /// The same, read without the lock by every request to see whether the policy changed.
    sized: AtomicUsize,
    pending: AtomicUsize,
    policy: SharedPolicy,
    metrics: PolicyMetrics,
    destination: Arc<str>,
}

impl LimitState {
    fn new(destination: &str, policy: SharedPolicy, metrics: PolicyMetrics) -> LimitState {
        let max = policy.current().default.limits.max_concurrent;
        LimitState {
            slots: Arc::new(Semaphore::new(max)),
            sized_for: Mutex::new(max),
            sized: AtomicUsize::new(max),
            pending: AtomicUsize::new(0),
            policy,
            metrics,
            destination: Arc::from(destination),
        }
    }

    /// Grows or shrinks the semaphore to the current policy's `max_concurrent`.
    fn resize(&self, want: usize) {
        if self.sized.load(Ordering::Relaxed) == want {
            return;
        }
        let mut have = crate::policy::lock(&self.sized_for);
        if want > *have {
            self.slots.add_permits(want - *have);
        } else if want < *have {
            // Slots in use now are taken away as they come back.
            let forgotten = self.slots.forget_permits(*have - want);
            let owed = *have - want - forgotten;
            if owed > 0 {
                let slots = self.slots.clone();
                tokio::spawn(async move {
                    if let Ok(permits) = slots.acquire_many(owed as u32).await {
                        permits.forget();
                    }
                });
            }
        }
        *have = want;
        self.sized.store(want, Ordering::Relaxed);
    }

    fn reject(&self) {
        self.metrics
            .limit_rejections
            .with_label_values(&[&*self.destination, "overloaded"])
            .inc();
    }
}

/// Runs at most `max_concurrent` requests at once, queues `max_pending`, refuses the rest with 503.
#[derive(Clone, Debug)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    state: Arc<LimitState>,
}

struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, E> Service<Request<Body>> for ConcurrencyLimit<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = E> + Clone + Send + 'static,
    S::Future: Send,
    E: Send + 'static,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = ResponseFuture<S::Future, E>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        // Readiness is a slot, taken in `call` so that a full limit answers 503 instead of stalling.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let max_pending = self
            .state
            .policy
            .read_for_request(&mut req, |p| p.limits.max_pending);
        let state = &self.state;
        state.resize(
            state
                .policy
                .read_current(|p| p.default.limits.max_concurrent),
        );
        match state.slots.clone().try_acquire_owned() {
            // The common case: a slot at once, and the inner call without a box of its own.
            Ok(permit) => ResponseFuture::Running {
                inner: self.inner.call(req),
                permit: Some(permit),
            },
            Err(tokio::sync::TryAcquireError::Closed) => ResponseFuture::Overloaded,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                if state.pending.fetch_add(1, Ordering::Relaxed) >= max_pending {
                    state.pending.fetch_sub(1, Ordering::Relaxed);
                    state.reject();
                    return ResponseFuture::Overloaded;
                }
                let state = state.clone();
                let inner = self.inner.clone();
                ResponseFuture::Queued {
                    future: Box::pin(async move {
                        let permit = {
                            let _pending = PendingGuard(&state.pending);
                            match state.slots.clone().acquire_owned().await {
                                Ok(permit) => permit,
                                Err(_) => return Ok(proxy_response(ProxyReason::Overloaded)),
                            }
                        };
                        let resp = oneshot(inner, req).await?;
                        Ok(resp.map(|body| with_guard(body, permit)))
                    }),
                }
            }
        }
    }
}

pin_project! {
    /// The response of a request that got a slot at once, or of one that queued; or 503 `overloaded`.
    #[project = ResponseFutureProj]
    pub enum ResponseFuture<F, E> {
        /// Holding a slot; the slot moves into the response body.
        Running { #[pin] inner: F, permit: Option<OwnedSemaphorePermit> },
        /// Waiting for a slot, then sent.
        Queued { future: crate::policy::ResponseFuture<E> },
        /// Refused: the pending queue is full.
        Overloaded,
    }
}

impl<F, E> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Running { inner, permit } => {
                let resp = ready!(inner.poll(cx))?;
                Poll::Ready(Ok(match permit.take() {
                    Some(permit) => resp.map(|body| with_guard(body, permit)),
                    None => resp,
                }))
            }
            ResponseFutureProj::Queued { future } => future.as_mut().poll(cx),
            ResponseFutureProj::Overloaded => {
                Poll::Ready(Ok(proxy_response(ProxyReason::Overloaded)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{full_body, Policy, ServicePolicy, ERROR_HEADER};
    use std::convert::Infallible;
    use tokio::sync::oneshot;
    use tower::{service_fn, Layer, ServiceExt};

    #[tokio::test]
    async fn beyond_running_and_pending_requests_are_refused_at_once() {
        let mut p = Policy::default();
        p.limits.max_concurrent = 1;
        p.limits.max_pending = 1;
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let release = Arc::new(Mutex::new(Some(release_rx)));
        let inner = service_fn(move |_req: Request<Body>| {
            let release = release.clone();
            async move {
                let rx = release.lock().unwrap().take();
                if let Some(rx) = rx {
                    let _ = rx.await;
                }
                Ok::<_, Infallible>(Response::new(full_body("ok".into())))
            }
        });
        let svc = ConcurrencyLimitLayer::new(
            "svc",
            SharedPolicy::new(ServicePolicy::uniform(p)),
            PolicyMetrics::unregistered(),
        )
        .layer(inner);
        let first = tokio::spawn(svc.clone().oneshot(Request::new(full_body("".into()))));
        tokio::task::yield_now().await;
        let second = tokio::spawn(svc.clone().oneshot(Request::new(full_body("".into()))));
        tokio::task::yield_now().await;
        let third = svc
            .clone()
            .oneshot(Request::new(full_body("".into())))
            .await
            .unwrap();
        assert_eq!(third.status(), 503);
        assert_eq!(third.headers()[ERROR_HEADER], "overloaded");
        release_tx.send(()).unwrap();
        let first = first.await.unwrap().unwrap();
        drop(first);
        assert_eq!(
            second.await.unwrap().unwrap().status(),
            200,
            "the queued request ran once a slot was free"
        );
    }
}
