//! The policy stacks, assembled in their one correct order, for the data path to wrap its clients with.
//!
//! A [`DestinationPolicy`] is built once per destination service and kept while the service exists: it
//! owns what must be shared by every request to it (the retry budget, the concurrency slots, the
//! endpoints' circuit and latency state). Its policy and endpoints can be replaced while requests flow.
//!
//! The data path sends through [`DestinationPolicy::send_outbound`] and [`DestinationPolicy::send_inbound`]:
//! each stack is built on the destination's first request and kept, so a request pays for a clone of the
//! stack (reference counts and one box), not for assembling seven layers. A kept stack is shared by every
//! connection, so its last hop must not belong to one: it is a stateless service (`S: Default`) that finds
//! what it needs in the request, such as the data path's client in an extension.

use std::any::Any;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http::{Request, Response};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder};

use crate::balance::{Balance, BalanceLayer, Endpoints};
use crate::policy::breaker::{BreakerTable, CircuitBreaker, CircuitBreakerLayer};
use crate::policy::idempotency::{
    DedupLayer, DedupStore, FirstRequests, InjectKey, InjectKeyLayer,
};
use crate::policy::limit::{ConcurrencyLimit, ConcurrencyLimitLayer};
use crate::policy::retry::{Retry, RetryLayer};
use crate::policy::timeout::{Timeout, TimeoutKind, TimeoutLayer};
use crate::policy::{Body, Classify, PolicyMetrics, ResponseFuture, ServicePolicy, SharedPolicy};

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
    first_requests: FirstRequests,
    kept: Arc<KeptStacks>,
}

/// The stacks built by the first `send_*` call, each with its last hop's type erased (see [`Kept`]).
#[derive(Default)]
struct KeptStacks {
    outbound: OnceLock<Box<dyn Any + Send + Sync>>,
    /// With the store it was built over: a call with another store gets a stack of its own.
    inbound: OnceLock<(Arc<dyn DedupStore>, Box<dyn Any + Send + Sync>)>,
}

impl std::fmt::Debug for KeptStacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptStacks")
            .field("outbound", &self.outbound.get().is_some())
            .field("inbound", &self.inbound.get().is_some())
            .finish()
    }
}

/// A kept stack over a last hop of type `S`: the type is part of what is looked up, so a call with another
/// last hop never gets this stack.
struct Kept<S, E>(PolicyService<E>, PhantomData<fn() -> S>);

/// The client-side stack over `S`, unboxed: cloning it for a request copies reference counts only, and its
/// layers' futures nest without a box each.
pub type OutboundStack<S> =
    ConcurrencyLimit<Timeout<InjectKey<Retry<Timeout<Balance<CircuitBreaker<S>>>>>>>;

/// The kept client-side stack over `S`.
struct KeptOutbound<S>(OutboundStack<S>);

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
            first_requests: FirstRequests::default(),
            kept: Arc::default(),
        }
    }

    /// Sends `req` through the client-side stack over `S::default()` (see [`DestinationPolicy::outbound`]),
    /// built on the first call and kept for the later ones.
    pub fn send_outbound<S, E>(&self, req: Request<Body>) -> ResponseFuture<E>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = E>
            + Default
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send,
        E: Classify + Send + 'static,
    {
        let kept = self
            .kept
            .outbound
            .get_or_init(|| Box::new(KeptOutbound(self.outbound_stack(S::default()))));
        match kept.downcast_ref::<KeptOutbound<S>>() {
            Some(KeptOutbound(stack)) => crate::policy::oneshot(stack.clone(), req),
            // Another last hop was here first (not the data path's case): a stack for this call alone.
            None => crate::policy::oneshot(self.outbound_stack(S::default()), req),
        }
    }

    /// Sends `req` through the server-side stack over `S::default()` and `store` (see
    /// [`DestinationPolicy::inbound`]), built on the first call and kept for the later ones.
    pub fn send_inbound<S, E>(
        &self,
        store: &Arc<dyn DedupStore>,
        req: Request<Body>,
    ) -> ResponseFuture<E>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = E>
            + Default
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send,
        E: Send + 'static,
    {
        let (kept_store, kept) = self.kept.inbound.get_or_init(|| {
            let stack = self.inbound(S::default(), store.clone());
            (store.clone(), Box::new(Kept::<S, E>(stack, PhantomData)))
        });
        // The data pointers only: the same store may be reached through different vtables.
        let same_store = std::ptr::eq(
            Arc::as_ptr(kept_store).cast::<()>(),
            Arc::as_ptr(store).cast::<()>(),
        );
        match kept.downcast_ref::<Kept<S, E>>() {
            Some(Kept(stack, _)) if same_store => send(stack, req),
            _ => send(&self.inbound(S::default(), store.clone()), req),
        }
    }

    /// The client-side stack over `client`, which sends one request to the endpoint in the request's URI:
    ///
    /// `limit → timeout(request) → inject key → retry → timeout(per-try) → balance → breaker → client`
    ///
    /// A new stack per call, sharing this destination's state with every other.
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
        BoxCloneSyncService::new(self.outbound_stack(client))
    }

    /// [`DestinationPolicy::outbound`], unboxed.
    pub fn outbound_stack<S>(&self, client: S) -> OutboundStack<S> {
        let timeout = |kind| {
            TimeoutLayer::new(
                kind,
                &self.destination,
                self.policy.clone(),
                self.metrics.clone(),
            )
        };
        ServiceBuilder::new()
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
            .service(client)
    }

    /// The server-side stack in front of the app: the caller's deadline (`x-meshlet-deadline-ms` or
    /// `grpc-timeout`) bounds the request, and keyed requests are de-duplicated through `store`.
    ///
    /// A new stack per call, sharing this destination's state (including its bound on first requests in
    /// flight) with every other.
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
            self.first_requests.clone(),
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;

    use super::*;
    use crate::policy::idempotency::MemoryStore;
    use crate::policy::{full_body, FailureKind, PolicyFile};

    static HOPS_MADE: AtomicUsize = AtomicUsize::new(0);

    /// A last hop that counts how often a stack was built over it.
    #[derive(Clone)]
    struct CountedHop;

    impl Default for CountedHop {
        fn default() -> Self {
            HOPS_MADE.fetch_add(1, Ordering::SeqCst);
            CountedHop
        }
    }

    #[derive(Debug)]
    struct Never;

    impl Classify for Never {
        fn failure_kind(&self) -> FailureKind {
            FailureKind::Other
        }
    }

    impl Service<Request<Body>> for CountedHop {
        type Response = Response<Body>;
        type Error = Never;
        type Future = std::future::Ready<Result<Response<Body>, Never>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Never>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            std::future::ready(Ok(Response::new(full_body(Bytes::from_static(b"ok")))))
        }
    }

    /// The app of the inbound test: answers at once.
    #[derive(Clone, Default)]
    struct App;

    impl Service<Request<Body>> for App {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            std::future::ready(Ok(Response::new(full_body(Bytes::from_static(b"ok")))))
        }
    }

    fn get() -> Request<Body> {
        Request::get("http://127.0.0.1:8080/")
            .body(full_body(Bytes::new()))
            .unwrap()
    }

    #[tokio::test]
    async fn stacks_are_built_once_per_destination_and_kept() {
        let metrics = PolicyMetrics::unregistered();
        let file = PolicyFile::from_yaml("services:\n  svc: {}\n").unwrap();
        let endpoint = "127.0.0.1:8080".parse().unwrap();
        let dp = DestinationPolicy::new("svc", file.resolve("svc"), &[endpoint], &metrics);
        let before = HOPS_MADE.load(Ordering::SeqCst);
        for _ in 0..5 {
            let resp = dp.send_outbound::<CountedHop, _>(get()).await.unwrap();
            assert_eq!(resp.status(), 200);
        }
        assert_eq!(HOPS_MADE.load(Ordering::SeqCst) - before, 1, "built once");
        // Clones of the destination (the mesh table hands them out) share the kept stack.
        let _ = dp.clone().send_outbound::<CountedHop, _>(get()).await;
        assert_eq!(HOPS_MADE.load(Ordering::SeqCst) - before, 1);

        let store: Arc<dyn DedupStore> =
            Arc::new(MemoryStore::new("svc", 10, 1 << 20, metrics.clone()));
        let first = dp.kept.inbound.get().is_none();
        for _ in 0..3 {
            let resp = dp.send_inbound::<App, _>(&store, get()).await.unwrap();
            assert_eq!(resp.status(), 200);
        }
        assert!(first && dp.kept.inbound.get().is_some());
        let (kept_store, _) = dp.kept.inbound.get().unwrap();
        assert!(Arc::ptr_eq(kept_store, &store));
    }
}
