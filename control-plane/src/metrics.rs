//! The control plane's Prometheus metrics, on a registry of its own (never the process-global one, so tests
//! running several control planes in one process count separately).

use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

/// Metrics of the identity service.
pub struct Metrics {
    registry: Registry,
    process: meshlet::metrics::ProcessMetrics,
    /// Workload certificates signed.
    pub certificates_issued: IntCounter,
    /// Refused or failed issuance requests, by reason (the `reason` of the API error).
    pub issuance_errors: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let certificates_issued = IntCounter::new(
            "meshlet_control_certificates_issued_total",
            "Workload certificates signed by the control plane.",
        )?;
        let issuance_errors = IntCounterVec::new(
            Opts::new(
                "meshlet_control_issuance_errors_total",
                "Certificate requests refused or failed, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(certificates_issued.clone()))?;
        registry.register(Box::new(issuance_errors.clone()))?;
        let process = meshlet::metrics::ProcessMetrics::new(&registry)?;
        Ok(Self {
            registry,
            process,
            certificates_issued,
            issuance_errors,
        })
    }

    /// The registry, for other parts of the control plane to add their metrics to.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything registered, in the Prometheus text format.
    pub fn encode(&self) -> Result<Vec<u8>, prometheus::Error> {
        self.process.refresh();
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_with_reason_label() {
        let metrics = Metrics::new().unwrap();
        metrics.certificates_issued.inc();
        metrics
            .issuance_errors
            .with_label_values(&["malformed-csr"])
            .inc();
        let text = String::from_utf8(metrics.encode().unwrap()).unwrap();
        assert!(
            text.contains("meshlet_control_certificates_issued_total 1"),
            "{text}"
        );
        assert!(
            text.contains("meshlet_control_issuance_errors_total{reason=\"malformed-csr\"} 1"),
            "{text}"
        );
    }
}
