use std::sync::Arc;

use tower::Layer;

use super::dedup::{Dedup, FirstRequests};
use super::inject::InjectKey;
use super::store::DedupStore;
use crate::policy::{PolicyMetrics, SharedPolicy};

/// Outbound: injects keys (see [`InjectKey`]).
#[derive(Clone, Debug)]
pub struct InjectKeyLayer {
    policy: SharedPolicy,
}

impl InjectKeyLayer {
    /// Injects keys where `policy` says `idempotency.inject`.
    pub fn new(policy: SharedPolicy) -> Self {
        InjectKeyLayer { policy }
    }
}

impl<S> Layer<S> for InjectKeyLayer {
    type Service = InjectKey<S>;

    fn layer(&self, inner: S) -> InjectKey<S> {
        InjectKey {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Inbound: de-duplicates keyed requests (see [`Dedup`]) through `store`.
#[derive(Clone)]
pub struct DedupLayer {
    store: Arc<dyn DedupStore>,
    policy: SharedPolicy,
    metrics: PolicyMetrics,
    destination: Arc<str>,
    first_requests: FirstRequests,
}

impl std::fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupLayer")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

impl DedupLayer {
    /// A layer for `destination` (the metric label); `first_requests` counts the destination's first requests
    /// in flight, shared by every layer of the destination so that their bound holds for all of them.
    pub fn new(
        destination: &str,
        store: Arc<dyn DedupStore>,
        policy: SharedPolicy,
        metrics: PolicyMetrics,
        first_requests: FirstRequests,
    ) -> Self {
        DedupLayer {
            store,
            policy,
            metrics,
            destination: Arc::from(destination),
            first_requests,
        }
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;

    fn layer(&self, inner: S) -> Dedup<S> {
        Dedup {
            inner,
            store: self.store.clone(),
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            destination: self.destination.clone(),
            first_requests: self.first_requests.clone(),
        }
    }
}
