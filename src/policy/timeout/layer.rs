use std::sync::Arc;

use tower::Layer;

use super::{Timeout, TimeoutKind, TimeoutShared};
use crate::policy::{PolicyMetrics, SharedPolicy};

/// Applies the request or per-try timeout of a destination's policy.
#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    shared: Arc<TimeoutShared>,
}

impl TimeoutLayer {
    /// A layer for `destination` (the metric label) that applies the given kind of timeout.
    pub fn new(
        kind: TimeoutKind,
        destination: &str,
        policy: SharedPolicy,
        metrics: PolicyMetrics,
    ) -> Self {
        TimeoutLayer {
            shared: Arc::new(TimeoutShared {
                kind,
                policy,
                metrics,
                destination: Arc::from(destination),
            }),
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            shared: self.shared.clone(),
        }
    }
}
