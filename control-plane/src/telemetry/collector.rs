//! The mesh-wide Prometheus metrics, built from the aggregated totals at scrape time (the totals are
//! replaced by the sidecars' cumulative reports, so they are not counters this process increments).
//!
//! Labels are bounded by the aggregator's limits: `source` (service account), `destination` (service), a
//! five-valued `status_class`, `tls`, and the seven de-dup outcomes.

use std::collections::HashMap;
use std::sync::Arc;

use meshlet::telemetry::report::{Counts, DEDUP_OUTCOMES, STATUS_CLASSES};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};

use super::{EdgeKey, Telemetry};

const REQUESTS: &str = "meshlet_mesh_requests_total";
const DURATION: &str = "meshlet_mesh_request_duration_seconds";
const RETRIES: &str = "meshlet_mesh_retries_total";
const TIMEOUTS: &str = "meshlet_mesh_timeouts_total";
const BREAKER: &str = "meshlet_mesh_breaker_transitions_total";
const DEDUP: &str = "meshlet_mesh_dedup_total";

/// Exposes [`Telemetry`]'s totals on a registry.
pub struct MeshCollector {
    telemetry: Arc<Telemetry>,
    descs: Vec<Desc>,
}

impl MeshCollector {
    /// The collector of `telemetry`'s totals.
    pub fn new(telemetry: Arc<Telemetry>) -> Result<MeshCollector, prometheus::Error> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.to_string(),
                help.to_string(),
                labels.iter().map(|l| l.to_string()).collect(),
                HashMap::new(),
            )
        };
        let edge = ["source", "destination"];
        Ok(MeshCollector {
            telemetry,
            descs: vec![
                desc(
                    REQUESTS,
                    "Requests between meshed workloads since each sidecar started, as the caller's sidecar saw them.",
                    &["source", "destination", "status_class", "tls"],
                )?,
                desc(
                    DURATION,
                    "Time until the response head, as the caller's sidecar saw it.",
                    &edge,
                )?,
                desc(RETRIES, "Retries sent by the caller's sidecar.", &edge)?,
                desc(TIMEOUTS, "Request and per-try timeouts.", &edge)?,
                desc(
                    BREAKER,
                    "Circuit breaker state changes of the destination's endpoints.",
                    &edge,
                )?,
                desc(
                    DEDUP,
                    "Idempotency-Key de-duplication outcomes.",
                    &["source", "destination", "outcome"],
                )?,
            ],
        })
    }
}

fn labels(key: &EdgeKey, extra: &[(&str, &str)]) -> Vec<LabelPair> {
    let mut pairs = vec![
        ("source", key.source.as_str()),
        ("destination", &key.destination),
    ];
    pairs.extend_from_slice(extra);
    pairs
        .into_iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        })
        .collect()
}

fn counter(labels: Vec<LabelPair>, value: u64) -> proto::Metric {
    let mut metric = proto::Metric::from_label(labels);
    let mut counter = proto::Counter::default();
    counter.set_value(value as f64);
    metric.set_counter(counter);
    metric
}

fn histogram(labels: Vec<LabelPair>, bounds: &[f64], counts: &Counts) -> proto::Metric {
    let mut cumulative = 0;
    let buckets = bounds
        .iter()
        .zip(&counts.latency_buckets)
        .map(|(bound, count)| {
            cumulative += count;
            let mut bucket = proto::Bucket::default();
            bucket.set_upper_bound(*bound);
            bucket.set_cumulative_count(cumulative);
            bucket
        })
        .collect();
    let mut histogram = proto::Histogram::default();
    histogram.set_bucket(buckets);
    histogram.set_sample_count(counts.latency_buckets.iter().sum());
    histogram.set_sample_sum(counts.latency_sum_seconds);
    let mut metric = proto::Metric::from_label(labels);
    metric.set_histogram(histogram);
    metric
}

fn family(desc: &Desc, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

impl Collector for MeshCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let totals = self.telemetry.totals();
        let bounds = self.telemetry.bounds();
        // One list of samples per descriptor, in the order of `descs`.
        let mut samples: [Vec<proto::Metric>; 6] = Default::default();
        let [requests, durations, retries, timeouts, breaker, dedup] = &mut samples;
        for (key, counts) in &totals {
            for (tls, classes) in [("true", &counts.mtls), ("false", &counts.plaintext)] {
                for (class, value) in STATUS_CLASSES.iter().zip(classes.values()) {
                    if value > 0 {
                        let labels = labels(key, &[("status_class", class), ("tls", tls)]);
                        requests.push(counter(labels, value));
                    }
                }
            }
            durations.push(histogram(labels(key, &[]), bounds, counts));
            retries.push(counter(labels(key, &[]), counts.retries));
            timeouts.push(counter(labels(key, &[]), counts.timeouts));
            breaker.push(counter(labels(key, &[]), counts.breaker_transitions));
            for (outcome, value) in DEDUP_OUTCOMES.iter().zip(counts.dedup.values()) {
                if value > 0 {
                    dedup.push(counter(labels(key, &[("outcome", outcome)]), value));
                }
            }
        }
        let kinds = [
            MetricType::COUNTER,
            MetricType::HISTOGRAM,
            MetricType::COUNTER,
            MetricType::COUNTER,
            MetricType::COUNTER,
            MetricType::COUNTER,
        ];
        self.descs
            .iter()
            .zip(kinds)
            .zip(samples)
            .filter(|(_, metrics)| !metrics.is_empty())
            .map(|((desc, kind), metrics)| family(desc, kind, metrics))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use meshlet::telemetry::report::{Counts, Edge, Report, REPORT_VERSION};
    use meshlet::tls::SpiffeId;
    use prometheus::{Encoder, Registry, TextEncoder};

    use crate::telemetry::{Limits, Telemetry};

    #[test]
    fn totals_are_exposed_with_bounded_labels() {
        let registry = Registry::new();
        let t = Telemetry::register(&registry, Limits::default()).unwrap();
        let mut counts = Counts::with_buckets(t.bounds().len() + 1);
        counts.mtls.success = 7;
        counts.mtls.server_error = 3;
        counts.latency_buckets[2] = 10;
        counts.latency_sum_seconds = 0.02;
        counts.retries = 4;
        counts.dedup.replayed = 2;
        let order = SpiffeId::new("cluster.local", "shop", "order").unwrap();
        let report = Report {
            version: REPORT_VERSION,
            instance: "a".into(),
            sequence: 1,
            source: order.to_string(),
            latency_bounds_seconds: t.bounds().to_vec(),
            edges: vec![Edge {
                destination: "payment".into(),
                counts,
            }],
        };
        t.ingest(&order, &report).unwrap();
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            r#"meshlet_mesh_requests_total{source="order",destination="payment",status_class="2xx",tls="true"} 7"#,
            r#"meshlet_mesh_requests_total{source="order",destination="payment",status_class="5xx",tls="true"} 3"#,
            r#"meshlet_mesh_request_duration_seconds_bucket{source="order",destination="payment",le="+Inf"} 10"#,
            r#"meshlet_mesh_request_duration_seconds_count{source="order",destination="payment"} 10"#,
            r#"meshlet_mesh_retries_total{source="order",destination="payment"} 4"#,
            r#"meshlet_mesh_dedup_total{source="order",destination="payment",outcome="replayed"} 2"#,
            r#"meshlet_telemetry_reports_received_total"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
