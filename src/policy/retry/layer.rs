use std::sync::Arc;

use tower::Layer;

use super::{budget::BudgetSlot, Retry, RetryShared};
use crate::policy::{PolicyMetrics, SharedPolicy};

/// Retries failed attempts as the destination's policy allows. One layer per destination service: the retry
/// budget is shared by every request to it.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    shared: Arc<RetryShared>,
}

impl RetryLayer {
    /// A layer for `destination` (the metric label).
    pub fn new(destination: &str, policy: SharedPolicy, metrics: PolicyMetrics) -> Self {
        RetryLayer {
            shared: Arc::new(RetryShared {
                policy,
                metrics,
                destination: Arc::from(destination),
                budget: BudgetSlot::default(),
            }),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            shared: self.shared.clone(),
        }
    }
}
