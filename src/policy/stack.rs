//! The policy stacks, assembled in their one correct order, for the data path to wrap its clients with.
//!
//! A [`DestinationPolicy`] is built once per destination service and kept while the service exists: it
//! owns what must be shared by every request to it (the retry budget, the concurrency slots, the
//! endpoints' circuit and latency state). Its policy and endpoints can be replaced while requests flow.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder};

use crate::balance::{BalanceLayer, Endpoints};
use crate::policy::breaker::{BreakerTable, CircuitBreakerLayer};
use crate::policy::idempotency::{DedupLayer, DedupStore, InjectKeyLayer};
use crate::policy::limit::ConcurrencyLimitLayer;
use crate::policy::retry::RetryLayer;
use crate::policy::timeout::{TimeoutKind, TimeoutLayer};
use crate::policy::{Body, Classify, PolicyMetrics, ServicePolicy, SharedPolicy};

/// A boxed, cloneable policy stack.
pub type PolicyService<E> = BoxCloneSyncService<Request<Body>, Response<Body>, E>;

/// Everything the policies keep about one destination service.
#[derive(Clone, Debug)]
pub struct DestinationPolicy {
    /// The service's policy; `replace` it to apply an edit.
    pub policy: SharedPolicy,
    /// The service's endpoints; `update` them when discovery changes.
    pub endpoints: Endpoints,
    destination: Arc<str>,
    metrics: PolicyMetrics,
    limit: ConcurrencyLimitLayer,
    retry: RetryLayer,
    breakers: Arc<BreakerTable>,
}

impl DestinationPolicy {
    /// The policy state of `destination` (its metric label, e.g. `payment.shop:8080`).
    pub fn new(
        destination: &str,
        policy: ServicePolicy,
        endpoints: &[SocketAddr],
        metrics: &PolicyMetrics,
    ) -> DestinationPolicy {
        let policy = SharedPolicy::new(policy);
        let breakers = Arc::new(BreakerTable::new(destination, metrics.clone()));
        DestinationPolicy {
            endpoints: Endpoints::new(endpoints, breakers.clone()),
            limit: ConcurrencyLimitLayer::new(destination, policy.clone(), metrics.clone()),
            retry: RetryLayer::new(destination, policy.clone(), metrics.clone()),
            destination: Arc::from(destination),
            metrics: metrics.clone(),
            policy,
            breakers,
        }
    }

    /// The client-side stack over `client`, which sends one request to the endpoint in the request's URI:
    ///
    /// `limit → timeout(request) → inject key → retry → timeout(per-try) → balance → breaker → client`
    pub fn outbound<S, E>(&self, client: S) -> PolicyService<E>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = E>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send,
        E: Classify + Send + 'static,
    {
        let timeout = |kind| {
            TimeoutLayer::new(
                kind,
                &self.destination,
                self.policy.clone(),
                self.metrics.clone(),
            )
        };
        let stack = ServiceBuilder::new()
            .layer(self.limit.clone())
            .layer(timeout(TimeoutKind::Request))
            .layer(InjectKeyLayer::new(self.policy.clone()))
            .layer(self.retry.clone())
            .layer(timeout(TimeoutKind::PerTry))
            .layer(BalanceLayer::new(self.endpoints.clone()))
            .layer(CircuitBreakerLayer::new(
                self.breakers.clone(),
                self.policy.clone(),
            ))
            .service(client);
        BoxCloneSyncService::new(stack)
    }

    /// The server-side stack in front of the app: the caller's deadline (`x-meshlet-deadline-ms` or
    /// `grpc-timeout`) bounds the request, and keyed requests are de-duplicated through `store`.
    pub fn inbound<S, E>(&self, app: S, store: Arc<dyn DedupStore>) -> PolicyService<E>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = E>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send,
        E: Send + 'static,
    {
        let timeout = TimeoutLayer::new(
            TimeoutKind::Request,
            &self.destination,
            self.policy.clone(),
            self.metrics.clone(),
        );
        let dedup = DedupLayer::new(
            &self.destination,
            store,
            self.policy.clone(),
            self.metrics.clone(),
        );
        BoxCloneSyncService::new(timeout.layer(dedup.layer(app)))
    }
}

/// Sends `req` through a policy stack. Prefer this to `ServiceExt::oneshot` inside `async` blocks that must
/// be `Send` (spawned tasks): the returned future is already boxed as `dyn Future + Send`, which spares the
/// caller a rustc limitation ("implementation of `Send` is not general enough") with the boxed error type
/// inside `Body`.
pub fn send<E: Send + 'static>(
    stack: &PolicyService<E>,
    req: Request<Body>,
) -> crate::policy::ResponseFuture<E> {
    crate::policy::oneshot(stack.clone(), req)
}
