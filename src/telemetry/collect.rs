//! Builds a report's edges from the sidecar's own Prometheus registry (`registry.gather()`), so the data path
//! counts nothing twice and pays nothing for telemetry.
//!
//! Only the outbound side is reported: an edge is counted by the caller's sidecar, once. Destinations are
//! named as the mesh names them (the `host:port` label mapped through the mesh table to its service), and a
//! name once given to a label is kept for the life of the sidecar, so an edge's cumulative counts never move
//! to another name when the mesh changes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use prometheus::proto::{Metric, MetricFamily};

use super::report::{Counts, Edge, MAX_EDGES_PER_REPORT, MAX_NAME_BYTES};
use crate::discovery::MeshTable;
use crate::metrics::{Direction, LATENCY_BUCKETS};

/// Most distinct destination labels remembered; more are reported under their raw label.
const MAX_NAMES: usize = 4 * MAX_EDGES_PER_REPORT;

/// The families a report is made of.
const REPORTED: [&str; 6] = [
    "meshlet_requests_total",
    "meshlet_request_duration_seconds",
    "meshlet_retries_total",
    "meshlet_timeouts_total",
    "meshlet_breaker_transitions_total",
    "meshlet_dedup_total",
];

/// Maps the registry's destination labels to the names reports use, remembering each choice.
#[derive(Default)]
pub struct Names(HashMap<String, String>);

impl Names {
    /// The report name of a destination label: the mesh service of a `host:port` the mesh knows, else the
    /// label itself.
    fn name(&mut self, label: &str, table: &MeshTable) -> String {
        if let Some(name) = self.0.get(label) {
            return name.clone();
        }
        let name = label
            .parse::<SocketAddr>()
            .ok()
            .and_then(|addr| table.outbound(addr))
            .map_or_else(
                || label.to_string(),
                |endpoint| endpoint.service.to_string(),
            );
        if self.0.len() < MAX_NAMES {
            self.0.insert(label.to_string(), name.clone());
        }
        name
    }
}

fn label<'a>(metric: &'a Metric, name: &str) -> Option<&'a str> {
    metric
        .get_label()
        .iter()
        .find(|pair| pair.name() == name)
        .map(|pair| pair.value())
}

fn outbound(metric: &Metric) -> bool {
    label(metric, "direction").is_none_or(|d| d == Direction::Outbound.as_str())
}

fn counter(metric: &Metric) -> u64 {
    let value = metric.get_counter().get_value();
    if value.is_finite() && value > 0.0 {
        value as u64
    } else {
        0
    }
}

/// The edges in `families`, busiest first and at most [`MAX_EDGES_PER_REPORT`].
pub fn edges(families: &[MetricFamily], table: &MeshTable, names: &mut Names) -> Vec<Edge> {
    let buckets = LATENCY_BUCKETS.len() + 1;
    let mut edges: BTreeMap<String, Counts> = BTreeMap::new();
    for family in families.iter().filter(|f| REPORTED.contains(&f.name())) {
        for metric in family.get_metric() {
            if !outbound(metric) {
                continue;
            }
            let Some(destination) = label(metric, "destination") else {
                continue;
            };
            if destination.is_empty() || destination.len() > MAX_NAME_BYTES {
                continue;
            }
            let edge = edges
                .entry(names.name(destination, table))
                .or_insert_with(|| Counts::with_buckets(buckets));
            match family.name() {
                "meshlet_requests_total" => {
                    let status = label(metric, "status_code")
                        .and_then(|s| s.parse::<u16>().ok())
                        .unwrap_or(0);
                    let classes = if label(metric, "tls") == Some("true") {
                        &mut edge.mtls
                    } else {
                        &mut edge.plaintext
                    };
                    *classes.class_mut(status) += counter(metric);
                }
                "meshlet_request_duration_seconds" => {
                    let histogram = metric.get_histogram();
                    let mut below = 0;
                    for (i, bucket) in histogram.get_bucket().iter().enumerate().take(buckets - 1) {
                        let cumulative = bucket.cumulative_count();
                        edge.latency_buckets[i] += cumulative.saturating_sub(below);
                        below = cumulative;
                    }
                    edge.latency_buckets[buckets - 1] +=
                        histogram.get_sample_count().saturating_sub(below);
                    let sum = histogram.get_sample_sum();
                    if sum.is_finite() && sum > 0.0 {
                        edge.latency_sum_seconds += sum;
                    }
                }
                "meshlet_retries_total" => edge.retries += counter(metric),
                "meshlet_timeouts_total" => edge.timeouts += counter(metric),
                "meshlet_breaker_transitions_total" => edge.breaker_transitions += counter(metric),
                "meshlet_dedup_total" => {
                    if let Some(slot) =
                        label(metric, "outcome").and_then(|outcome| edge.dedup.outcome_mut(outcome))
                    {
                        *slot += counter(metric);
                    }
                }
                _ => {}
            }
        }
    }
    let mut edges: Vec<Edge> = edges
        .into_iter()
        .map(|(destination, counts)| Edge {
            destination,
            counts,
        })
        .collect();
    if edges.len() > MAX_EDGES_PER_REPORT {
        edges.sort_by_key(|edge| std::cmp::Reverse(edge.counts.requests()));
        edges.truncate(MAX_EDGES_PER_REPORT);
    }
    edges
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::MeshConfig;
    use crate::metrics::Metrics;
    use crate::policy::PolicyMetrics;

    #[test]
    fn edges_come_from_the_registry_named_by_the_mesh() {
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let policy = PolicyMetrics::register(&registry).unwrap();
        let mesh = MeshConfig::from_yaml(
            "services:\n  - name: payment\n    identity: spiffe://cluster.local/ns/shop/sa/payment\n    endpoints:\n      - address: '127.0.4.1:8080'\n",
        )
        .unwrap();
        let table = MeshTable::new(&mesh, &policy, None);
        let request = |dst: &str, status: &str, tls: &str| {
            metrics
                .requests
                .with_label_values(&["outbound", dst, "GET", status, tls, ""])
        };
        request("127.0.4.1:8080", "200", "true").inc_by(7);
        request("127.0.4.1:8080", "503", "true").inc_by(2);
        request("10.9.9.9:80", "404", "false").inc();
        metrics
            .requests
            .with_label_values(&["inbound", "127.0.0.1:1", "GET", "200", "true", ""])
            .inc_by(100);
        let latency = metrics
            .request_duration
            .with_label_values(&["outbound", "127.0.4.1:8080"]);
        for _ in 0..9 {
            latency.observe(0.003);
        }
        latency.observe(100.0);
        policy
            .retries
            .with_label_values(&["payment", "503"])
            .inc_by(3);
        policy
            .dedup
            .with_label_values(&["payment", "replayed"])
            .inc();

        let edges = edges(&registry.gather(), &table, &mut Names::default());
        let names: Vec<&str> = edges.iter().map(|e| e.destination.as_str()).collect();
        assert_eq!(names, ["10.9.9.9:80", "payment"], "inbound is not reported");
        let payment = &edges[1].counts;
        assert_eq!(payment.mtls.success, 7);
        assert_eq!(payment.mtls.server_error, 2);
        assert_eq!(payment.retries, 3);
        assert_eq!(payment.dedup.replayed, 1);
        assert_eq!(payment.latency_buckets.iter().sum::<u64>(), 9 + 1);
        assert_eq!(
            *payment.latency_buckets.last().unwrap(),
            1,
            "100s is in +Inf"
        );
        assert_eq!(edges[0].counts.plaintext.client_error, 1);
    }

    #[test]
    fn a_name_once_given_is_kept() {
        let policy = PolicyMetrics::unregistered();
        let empty = MeshTable::new(&MeshConfig::default(), &policy, None);
        let mut names = Names::default();
        assert_eq!(names.name("127.0.4.1:8080", &empty), "127.0.4.1:8080");
        let mesh = MeshConfig::from_yaml(
            "services:\n  - name: payment\n    identity: spiffe://cluster.local/ns/shop/sa/payment\n    endpoints:\n      - address: '127.0.4.1:8080'\n",
        )
        .unwrap();
        let table = MeshTable::new(&mesh, &policy, None);
        assert_eq!(names.name("127.0.4.1:8080", &table), "127.0.4.1:8080");
        assert_eq!(names.name("127.0.4.1:8080", &empty), "127.0.4.1:8080");
        assert_eq!(Names::default().name("127.0.4.1:8080", &table), "payment");
    }
}
