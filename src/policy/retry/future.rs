//! The attempts of one request as one state machine: no box per attempt and none for the whole request,
//! since this future nests inside the layers around it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::request::Parts;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower::Service;

use tower::retry::budget::TpsBudget;

use super::budget;
use super::{backoff, finish, retry_after, retry_reason, Retry, MAX_RETRY_AFTER_WITHOUT_DEADLINE};
use crate::policy::body::{Buffered, Replayable};
use crate::policy::config::Policy;
use crate::policy::{proxy_response, Attempts, Body, BoxError, Classify, ProxyReason};

/// Reading a request body into memory; boxed because only requests with a body need it.
pub(super) type Buffering = Pin<Box<dyn Future<Output = Result<Buffered, BoxError>> + Send>>;

pin_project! {
    #[project = StateProj]
    pub(super) enum State<S: Service<Request<Body>>> {
        /// The body is being read for replay; the head waits here.
        Buffering { buffering: Buffering, parts: Option<Parts> },
        /// An attempt is under way.
        Attempt { #[pin] call: Oneshot<S, Request<Body>> },
        /// Waiting before the next attempt.
        Backoff { #[pin] sleep: Sleep },
    }
}

pin_project! {
    /// The response of the last attempt made, with `x-meshlet-attempts`. `replay` holds the head and body
    /// to send again; it is `None` when the request is sent once only.
    #[project = ResponseFutureProj]
    pub struct ResponseFuture<S: Service<Request<Body>>> {
        #[pin]
        pub(super) state: State<S>,
        pub(super) retry: Retry<S>,
        pub(super) policy: Arc<Policy>,
        pub(super) budget: Arc<TpsBudget>,
        pub(super) attempts: Attempts,
        pub(super) deadline: Option<Instant>,
        pub(super) safe: bool,
        pub(super) attempt: u32,
        pub(super) replay: Option<(Parts, Replayable)>,
    }
}

impl<S, E> Future for ResponseFuture<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = E> + Clone,
    E: Classify,
{
    type Output = Result<Response<Body>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Buffering { buffering, parts } => {
                    let buffered = ready!(buffering.as_mut().poll(cx));
                    let Some(parts) = parts.take() else {
                        return Poll::Ready(Ok(proxy_response(ProxyReason::BadRequestBody)));
                    };
                    let req = match buffered {
                        Ok(Buffered::Complete(replay)) => {
                            let req = Request::from_parts(parts.clone(), replay.body());
                            *this.replay = Some((parts, replay));
                            req
                        }
                        Ok(Buffered::TooLarge(body)) => {
                            this.retry
                                .shared
                                .metrics
                                .body_too_large
                                .with_label_values(&[&*this.retry.shared.destination])
                                .inc();
                            Request::from_parts(parts, body)
                        }
                        Err(_) => {
                            return Poll::Ready(Ok(proxy_response(ProxyReason::BadRequestBody)))
                        }
                    };
                    this.attempts.set(1);
                    let call = Oneshot::new(this.retry.inner.clone(), req);
                    this.state.set(State::Attempt { call });
                }
                StateProj::Attempt { call } => {
                    let outcome = ready!(call.poll(cx));
                    let attempt = *this.attempt;
                    let Some(delay) = next_delay(&this, &outcome) else {
                        return Poll::Ready(finish(outcome, attempt));
                    };
                    drop(outcome);
                    this.state.set(State::Backoff {
                        sleep: tokio::time::sleep(delay),
                    });
                }
                StateProj::Backoff { sleep } => {
                    ready!(sleep.poll(cx));
                    *this.attempt += 1;
                    this.attempts.set(*this.attempt);
                    let Some((parts, replay)) = this.replay.as_ref() else {
                        return Poll::Ready(Ok(proxy_response(ProxyReason::BadRequestBody)));
                    };
                    let req = Request::from_parts(parts.clone(), replay.body());
                    let call = Oneshot::new(this.retry.inner.clone(), req);
                    this.state.set(State::Attempt { call });
                }
            }
        }
    }
}

/// How long to wait before sending again, or `None` when `outcome` is final: not retryable, attempts or
/// budget used up, or the wait would not fit the deadline.
fn next_delay<S, E>(
    this: &ResponseFutureProj<'_, S>,
    outcome: &Result<Response<Body>, E>,
) -> Option<std::time::Duration>
where
    S: Service<Request<Body>>,
    E: Classify,
{
    let retries = &this.policy.retries;
    this.replay.as_ref()?;
    let reason = retry_reason(outcome, *this.safe, &retries.conditions)?;
    if *this.attempt >= retries.max_attempts {
        return None;
    }
    let delay = match outcome.as_ref().ok().and_then(|r| retry_after(r.headers())) {
        Some(wait) if this.deadline.is_none() && wait > MAX_RETRY_AFTER_WITHOUT_DEADLINE => {
            return None
        }
        Some(wait) => wait,
        None => backoff(*this.attempt, retries.backoff_base, retries.backoff_max),
    };
    if this.deadline.is_some_and(|d| Instant::now() + delay >= d) {
        return None;
    }
    let metrics = &this.retry.shared.metrics;
    let destination = &*this.retry.shared.destination;
    if !budget::withdraw(this.budget) {
        metrics
            .budget_exhausted
            .with_label_values(&[destination])
            .inc();
        return None;
    }
    metrics
        .retries
        .with_label_values(&[destination, reason.as_str()])
        .inc();
    Some(delay)
}
