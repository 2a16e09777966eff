use std::sync::Arc;

use tower::Layer;

use super::{BreakerTable, CircuitBreaker};
use crate::policy::SharedPolicy;

/// Applies failure accrual per endpoint of one destination service. Share its [`BreakerTable`] with the
/// balancer so that ejected endpoints are not chosen.
#[derive(Clone, Debug)]
pub struct CircuitBreakerLayer {
    table: Arc<BreakerTable>,
    policy: SharedPolicy,
}

impl CircuitBreakerLayer {
    /// A layer recording into `table`.
    pub fn new(table: Arc<BreakerTable>, policy: SharedPolicy) -> Self {
        CircuitBreakerLayer { table, policy }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            table: self.table.clone(),
            policy: self.policy.clone(),
        }
    }
}
