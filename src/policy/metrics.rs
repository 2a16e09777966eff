//! Counters of what the policies did, registered once on the proxy's own `Registry`.

use std::sync::Arc;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// The policy layers' metrics. Cloning shares the same counters, and costs one reference count: every
/// layer of a stack holds them, and layers are cloned several times per request (tower's way), so eight
/// separately counted vectors would cost eight.
#[derive(Clone, Debug)]
pub struct PolicyMetrics(Arc<PolicyCounters>);

impl std::ops::Deref for PolicyMetrics {
    type Target = PolicyCounters;

    fn deref(&self) -> &PolicyCounters {
        &self.0
    }
}

/// The counters behind [`PolicyMetrics`].
#[derive(Debug)]
pub struct PolicyCounters {
    /// `meshlet_retries_total{destination, reason}`: retries sent, by the condition that caused them.
    pub retries: IntCounterVec,
    /// `meshlet_retry_budget_exhausted_total{destination}`: retries refused because the budget was spent.
    pub budget_exhausted: IntCounterVec,
    /// `meshlet_retry_body_too_large_total{destination}`: requests not retryable because their body was
    /// larger than the replay buffer.
    pub body_too_large: IntCounterVec,
    /// `meshlet_timeouts_total{destination, kind="request|per-try"}`.
    pub timeouts: IntCounterVec,
    /// `meshlet_breaker_state{destination, endpoint}`: 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGaugeVec,
    /// `meshlet_breaker_transitions_total{destination, endpoint, to="closed|open|half-open"}`.
    pub breaker_transitions: IntCounterVec,
    /// `meshlet_dedup_total{destination, outcome="stored|replayed|conflict|mismatch|evicted|too-large|overloaded|bypassed|unavailable"}`.
    pub dedup: IntCounterVec,
    /// `meshlet_limit_rejections_total{destination, reason="overloaded"}`.
    pub limit_rejections: IntCounterVec,
}

impl PolicyMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<PolicyMetrics> {
        fn counter(
            registry: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
        ) -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "meshlet_breaker_state",
                "Circuit state per endpoint: 0 closed, 1 open, 2 half-open.",
            ),
            &["destination", "endpoint"],
        )?;
        registry.register(Box::new(breaker_state.clone()))?;
        Ok(PolicyMetrics(Arc::new(PolicyCounters {
            retries: counter(
                registry,
                "meshlet_retries_total",
                "Retries sent, by cause.",
                &["destination", "reason"],
            )?,
            budget_exhausted: counter(
                registry,
                "meshlet_retry_budget_exhausted_total",
                "Retries refused because the retry budget was spent.",
                &["destination"],
            )?,
            body_too_large: counter(
                registry,
                "meshlet_retry_body_too_large_total",
                "Requests not retryable because their body exceeded the replay buffer.",
                &["destination"],
            )?,
            timeouts: counter(
                registry,
                "meshlet_timeouts_total",
                "Timeouts, by kind.",
                &["destination", "kind"],
            )?,
            breaker_state,
            breaker_transitions: counter(
                registry,
                "meshlet_breaker_transitions_total",
                "Circuit state changes per endpoint.",
                &["destination", "endpoint", "to"],
            )?,
            dedup: counter(
                registry,
                "meshlet_dedup_total",
                "Idempotency-Key de-duplication outcomes.",
                &["destination", "outcome"],
            )?,
            limit_rejections: counter(
                registry,
                "meshlet_limit_rejections_total",
                "Requests refused by the concurrency limit.",
                &["destination", "reason"],
            )?,
        })))
    }

    /// Metrics on a private registry, for tests and tools that do not export them.
    pub fn unregistered() -> PolicyMetrics {
        PolicyMetrics::register(&Registry::new())
            .unwrap_or_else(|e| unreachable!("fresh registry: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_the_documented_contract() {
        let registry = Registry::new();
        let m = PolicyMetrics::register(&registry).unwrap();
        m.retries.with_label_values(&["d", "503"]).inc();
        m.budget_exhausted.with_label_values(&["d"]).inc();
        m.body_too_large.with_label_values(&["d"]).inc();
        m.timeouts.with_label_values(&["d", "per-try"]).inc();
        m.breaker_state
            .with_label_values(&["d", "127.0.0.1:1"])
            .set(1);
        m.breaker_transitions
            .with_label_values(&["d", "127.0.0.1:1", "open"])
            .inc();
        m.dedup.with_label_values(&["d", "replayed"]).inc();
        m.limit_rejections
            .with_label_values(&["d", "overloaded"])
            .inc();
        use prometheus::Encoder;
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            r#"meshlet_retries_total{destination="d",reason="503"} 1"#,
            r#"meshlet_retry_budget_exhausted_total{destination="d"} 1"#,
            r#"meshlet_retry_body_too_large_total{destination="d"} 1"#,
            r#"meshlet_timeouts_total{destination="d",kind="per-try"} 1"#,
            r#"meshlet_breaker_state{destination="d",endpoint="127.0.0.1:1"} 1"#,
            r#"meshlet_breaker_transitions_total{destination="d",endpoint="127.0.0.1:1",to="open"} 1"#,
            r#"meshlet_dedup_total{destination="d",outcome="replayed"} 1"#,
            r#"meshlet_limit_rejections_total{destination="d",reason="overloaded"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            PolicyMetrics::register(&registry).is_err(),
            "registering twice is refused, not doubled"
        );
    }
}
