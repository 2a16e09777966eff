use std::sync::Arc;

use tower::Layer;

use super::{ConcurrencyLimit, LimitState};
use crate::policy::{PolicyMetrics, SharedPolicy};

/// Limits the requests in flight to one destination service. One layer per service: every service built
/// from it shares the same slots.
#[derive(Clone, Debug)]
pub struct ConcurrencyLimitLayer {
    state: Arc<LimitState>,
}

impl ConcurrencyLimitLayer {
    /// A layer for `destination` (the metric label).
    pub fn new(destination: &str, policy: SharedPolicy, metrics: PolicyMetrics) -> Self {
        ConcurrencyLimitLayer {
            state: Arc::new(LimitState::new(destination, policy, metrics)),
        }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            state: self.state.clone(),
        }
    }
}
