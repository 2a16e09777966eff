//! Receiver-side de-duplication of POST and PATCH requests carrying an `Idempotency-Key`.
//!
//! The key is scoped by caller ([`Caller`]) so that two callers choosing the same key never see each other's
//! responses. Outcomes (`meshlet_dedup_total{outcome}`):
//!
//! * first request (`stored`): forwarded in its own task, bounded by `idempotency.processing_timeout`, so
//!   that it completes and its response is stored even when its caller goes away (a timed-out attempt whose
//!   retry is on its way). 5xx responses, failures and bodies over `max_body_bytes` are not stored: the key is
//!   released and a retry runs again.
//! * duplicate while the first is in flight: waits for it within its own [`Deadline`] and gets its response
//!   (`replayed`); `409 Conflict` problem+json when the deadline comes first (`conflict`).
//! * duplicate after completion: the stored response with `Idempotent-Replayed: true`, without touching the
//!   app (`replayed`).
//! * same key, different method, path or body: `422 Unprocessable Content` (`mismatch`).
//! * request body over `max_body_bytes`: forwarded without de-duplication (`bypassed`).
//!
//! At most once, not at least once: when the replica processing the first request dies, nobody knows whether
//! the app applied it, so its key stays claimed until the TTL and duplicates get 409. A caller sees an error
//! instead of a second charge.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::Service;

use super::error::StoreError;
use super::store::{Claim, ClaimToken, DedupStore, Entry, Fingerprint, StoredResponse};
use super::{parse_key, IDEMPOTENCY_KEY};
use crate::policy::body::{buffer_up_to, Buffered};
use crate::policy::{
    oneshot as call_once, proxy_response, Body, BoxError, Caller, Deadline, PolicyMetrics,
    ProxyReason, SharedPolicy,
};

/// De-duplicates keyed requests before they reach the app.
#[derive(Clone)]
pub struct Dedup<S> {
    pub(super) inner: S,
    pub(super) store: Arc<dyn DedupStore>,
    pub(super) policy: SharedPolicy,
    pub(super) metrics: PolicyMetrics,
    pub(super) destination: Arc<str>,
    pub(super) first_requests: FirstRequests,
}

/// The first requests of one service being processed in their own tasks, counted so that their number is
/// bounded (`idempotency.max_in_flight`). Cloned, it counts the same requests.
#[derive(Clone, Debug, Default)]
pub struct FirstRequests(Arc<AtomicUsize>);

impl FirstRequests {
    /// First requests running now.
    pub fn running(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// A place for one more first request, unless `max` are running.
    fn try_start(&self, max: usize) -> Option<FirstRequestSlot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| FirstRequestSlot(self.0.clone()))
    }
}

/// Held by a running first request; gives its place back when dropped.
struct FirstRequestSlot(Arc<AtomicUsize>);

impl Drop for FirstRequestSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> std::fmt::Debug for Dedup<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

/// The store key: a digest of (caller, key), so that any key text is safe in any store.
fn store_key(caller: &str, key: &str) -> String {
    let digest = Sha256::new()
        .chain_update(caller)
        .chain_update([0])
        .chain_update(key)
        .finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn fingerprint(method: &Method, path: &str, body: &[u8]) -> Fingerprint {
    Sha256::new()
        .chain_update(method.as_str())
        .chain_update([0])
        .chain_update(path)
        .chain_update([0])
        .chain_update(body)
        .finalize()
        .into()
}

impl<S, E> Service<Request<Body>> for Dedup<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = E> + Clone + Send + 'static,
    S::Future: Send,
    E: Send + 'static,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = crate::policy::ResponseFuture<E>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let policy = self.policy.for_request(&mut req);
        let applies = policy.idempotency.enforce
            && matches!(*req.method(), Method::POST | Method::PATCH)
            && req.headers().contains_key(IDEMPOTENCY_KEY);
        if !applies {
            return call_once(self.inner.clone(), req);
        }
        let this = self.clone();
        Box::pin(async move {
            let settings = policy.idempotency.clone();
            let Some(key) = req
                .headers()
                .get(IDEMPOTENCY_KEY)
                .and_then(|v| parse_key(v.as_bytes()))
            else {
                return Ok(proxy_response(ProxyReason::DedupBadKey));
            };
            let caller = req
                .extensions()
                .get::<Caller>()
                .map(|c| c.0.as_str())
                .unwrap_or("unknown");
            let key = store_key(caller, &key);
            let until = wait_until(
                req.extensions().get::<Deadline>(),
                settings.processing_timeout,
            );
            let (parts, body) = req.into_parts();
            let body = match buffer_up_to(body, settings.max_body_bytes).await {
                Ok(Buffered::Complete(body)) => body,
                Ok(Buffered::TooLarge(body)) => {
                    this.count("bypassed");
                    return call_once(this.inner, Request::from_parts(parts, body)).await;
                }
                Err(_) => return Ok(proxy_response(ProxyReason::BadRequestBody)),
            };
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let fp = fingerprint(&parts.method, path, &body.data);
            loop {
                let claim = match this.store.claim(&key, fp, settings.ttl).await {
                    Ok(claim) => claim,
                    Err(e) => {
                        tracing::warn!(error = %e, "idempotency store unavailable");
                        this.count("unavailable");
                        return Ok(proxy_response(ProxyReason::DedupUnavailable));
                    }
                };
                let entry = match claim {
                    Claim::Won(token) => {
                        let Some(slot) = this.first_requests.try_start(settings.max_in_flight)
                        else {
                            release(&*this.store, &key, &token).await;
                            this.count("overloaded");
                            return Ok(proxy_response(ProxyReason::Overloaded));
                        };
                        let req = Request::from_parts(parts, body.body());
                        return this
                            .forward_first(
                                req,
                                slot,
                                key,
                                token,
                                fp,
                                settings.processing_timeout,
                                settings.ttl,
                                settings.max_body_bytes,
                            )
                            .await;
                    }
                    Claim::Taken(entry) if entry.fingerprint() != &fp => {
                        this.count("mismatch");
                        return Ok(proxy_response(ProxyReason::DedupMismatch));
                    }
                    Claim::Taken(Entry::InFlight { .. }) => {
                        match this.store.wait(&key, until).await {
                            Ok(Some(entry)) => entry,
                            // Released (the first failed) or expired: claim again.
                            Ok(None) => continue,
                            Err(_) => {
                                this.count("unavailable");
                                return Ok(proxy_response(ProxyReason::DedupUnavailable));
                            }
                        }
                    }
                    Claim::Taken(entry) => entry,
                };
                return Ok(match entry {
                    Entry::Done { fingerprint, .. } if fingerprint != fp => {
                        this.count("mismatch");
                        proxy_response(ProxyReason::DedupMismatch)
                    }
                    Entry::Done { response, .. } => {
                        this.count("replayed");
                        response.to_response(true)
                    }
                    Entry::InFlight { .. } => {
                        this.count("conflict");
                        proxy_response(ProxyReason::DedupConflict)
                    }
                });
            }
        })
    }
}

impl<S, E> Dedup<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = E> + Clone + Send + 'static,
    S::Future: Send,
    E: Send + 'static,
{
    fn count(&self, outcome: &str) {
        self.metrics
            .dedup
            .with_label_values(&[&*self.destination, outcome])
            .inc();
    }

    /// Sends the first request of a key in its own task, stores what can be replayed, and hands the response
    /// to the caller if it is still there.
    #[allow(clippy::too_many_arguments)]
    async fn forward_first(
        self,
        req: Request<Body>,
        slot: FirstRequestSlot,
        key: String,
        token: ClaimToken,
        fp: Fingerprint,
        processing_timeout: Duration,
        ttl: Duration,
        max_body_bytes: usize,
    ) -> Result<Response<Body>, E> {
        let (tx, rx) = oneshot::channel();
        let Dedup {
            inner,
            store,
            metrics,
            destination,
            ..
        } = self;
        let count = move |outcome: &str| {
            metrics
                .dedup
                .with_label_values(&[&*destination, outcome])
                .inc()
        };
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(processing_timeout, call_once(inner, req)).await;
            let result = match outcome {
                Err(_) => {
                    release(&*store, &key, &token).await;
                    Ok(proxy_response(ProxyReason::RequestTimeout))
                }
                Ok(Err(e)) => {
                    release(&*store, &key, &token).await;
                    Err(e)
                }
                Ok(Ok(resp)) if resp.status().is_server_error() => {
                    release(&*store, &key, &token).await;
                    Ok(resp)
                }
                Ok(Ok(resp)) => {
                    let (parts, body) = resp.into_parts();
                    match buffer_up_to(body, max_body_bytes).await {
                        Ok(Buffered::Complete(body)) => {
                            let stored = StoredResponse::capture(
                                parts.status,
                                &parts.headers,
                                body.data.clone(),
                            );
                            match store.complete(&key, &token, fp, stored, ttl).await {
                                Ok(()) => count("stored"),
                                // The store released the key itself.
                                Err(StoreError::TooLarge { .. }) => count("too-large"),
                                Err(e) => {
                                    tracing::warn!(error = %e, "could not store an idempotent response")
                                }
                            }
                            Ok(Response::from_parts(parts, body.body()))
                        }
                        Ok(Buffered::TooLarge(body)) => {
                            release(&*store, &key, &token).await;
                            count("too-large");
                            Ok(Response::from_parts(parts, body))
                        }
                        Err(e) => {
                            release(&*store, &key, &token).await;
                            Ok(Response::from_parts(parts, failed_body(e)))
                        }
                    }
                }
            };
            let _ = tx.send(result);
            drop(slot);
        });
        match rx.await {
            Ok(result) => result,
            // The task panicked; the key stays claimed until its TTL, like a crashed replica's.
            Err(_) => Ok(proxy_response(ProxyReason::DedupUnavailable)),
        }
    }
}

async fn release(store: &dyn DedupStore, key: &str, token: &ClaimToken) {
    if let Err(e) = store.release(key, token).await {
        tracing::warn!(error = %e, "could not release an idempotency key");
    }
}

/// How long a duplicate may wait for the first request: until shortly before its own deadline, leaving time
/// to answer 409 before the caller gives up.
fn wait_until(deadline: Option<&Deadline>, processing_timeout: Duration) -> Instant {
    let now = Instant::now();
    let deadline = deadline.map(|d| d.0).unwrap_or(now + processing_timeout);
    let margin = (deadline.saturating_duration_since(now) / 10).min(Duration::from_millis(50));
    deadline - margin
}

/// A body that fails with `error`: the upstream's body broke while it was being read for storage.
fn failed_body(error: BoxError) -> Body {
    let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = vec![Err(error)];
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}
