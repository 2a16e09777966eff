//! Telemetry: every few seconds the sidecar posts what it counted, per destination, to the control plane,
//! which aggregates the mesh's golden signals (`meshlet stat`).
//!
//! The report is built from the sidecar's own metrics registry ([`collect`]), so the data path is untouched,
//! and is cumulative since the sidecar started ([`report`] says why), so the reporter never has to retry: a
//! failed send is logged at debug, counted in `meshlet_telemetry_reports_total{result}`, and superseded by
//! the next report.

pub mod api;
pub mod collect;
pub mod report;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::control_plane::ControlPlaneClient;
use crate::discovery::Mesh;
use crate::metrics::LATENCY_BUCKETS;
use crate::tls::SpiffeId;
use report::{Report, MAX_REPORT_BYTES, REPORT_VERSION, TELEMETRY_PATH};

/// Largest answer body read from the control plane (it only says which outcome the report had).
const MAX_ANSWER_BYTES: usize = 4096;

/// Counts of the reporter's sends.
#[derive(Clone)]
pub struct ReporterMetrics {
    reports: IntCounterVec,
}

impl ReporterMetrics {
    /// `meshlet_telemetry_reports_total{result="sent|refused|failed|too-large"}` on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<ReporterMetrics> {
        let reports = IntCounterVec::new(
            Opts::new(
                "meshlet_telemetry_reports_total",
                "Telemetry reports to the control plane, by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reports.clone()))?;
        for result in ["sent", "refused", "failed", "too-large"] {
            reports.with_label_values(&[result]);
        }
        Ok(ReporterMetrics { reports })
    }

    fn count(&self, result: &str) {
        self.reports.with_label_values(&[result]).inc();
    }
}

/// Builds the sidecar's reports: one instance id for its life, a sequence that grows by one per report.
pub struct Reporter {
    instance: String,
    sequence: u64,
    source: SpiffeId,
    registry: Registry,
    mesh: Arc<Mesh>,
    names: collect::Names,
}

impl Reporter {
    /// A reporter for the sidecar with identity `source`, reading `registry` and naming destinations
    /// through `mesh`.
    pub fn new(source: SpiffeId, registry: Registry, mesh: Arc<Mesh>) -> Reporter {
        Reporter {
            instance: uuid::Uuid::now_v7().to_string(),
            sequence: 0,
            source,
            registry,
            mesh,
            names: collect::Names::default(),
        }
    }

    /// The instance id (a UUIDv7 made at start).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The next report: everything counted so far.
    pub fn build(&mut self) -> Report {
        self.sequence += 1;
        let table = self.mesh.table();
        Report {
            version: REPORT_VERSION,
            instance: self.instance.clone(),
            sequence: self.sequence,
            source: self.source.to_string(),
            latency_bounds_seconds: LATENCY_BUCKETS.to_vec(),
            edges: collect::edges(&self.registry.gather(), &table, &mut self.names),
        }
    }
}

/// Posts a report every `interval` until the process ends. Start it once the sidecar has its certificate.
pub async fn run(
    mut reporter: Reporter,
    client: Arc<ControlPlaneClient>,
    interval: Duration,
    metrics: ReporterMetrics,
) {
    tracing::info!(
        instance = reporter.instance(),
        control_plane = client.addr(),
        every = ?interval,
        "reporting telemetry"
    );
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let report = reporter.build();
        let result = send(&client, &report).await;
        match &result {
            Ok(()) => tracing::trace!(sequence = report.sequence, "telemetry report sent"),
            Err((_, error)) => {
                tracing::debug!(sequence = report.sequence, %error, "telemetry report not sent")
            }
        }
        metrics.count(result.map_or_else(|(kind, _)| kind, |()| "sent"));
    }
}

/// Sends one report; the error says which `result` to count and why.
async fn send(client: &ControlPlaneClient, report: &Report) -> Result<(), (&'static str, String)> {
    let json = serde_json::to_vec(report).map_err(|e| ("failed", e.to_string()))?;
    if json.len() > MAX_REPORT_BYTES {
        return Err((
            "too-large",
            format!("{} bytes (at most {MAX_REPORT_BYTES})", json.len()),
        ));
    }
    let response = client
        .post_json(TELEMETRY_PATH, Bytes::from(json))
        .await
        .map_err(|e| ("failed", e.to_string()))?;
    let status = response.status();
    // Read the (small) answer so the stream ends cleanly; its content only matters for the log.
    let answer = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map(|body| String::from_utf8_lossy(&body.to_bytes()).into_owned())
        .unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(("refused", format!("{status}: {answer}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::MeshConfig;
    use crate::policy::PolicyMetrics;

    #[test]
    fn reports_are_numbered_and_carry_one_instance_id() {
        let registry = Registry::new();
        let mesh = Arc::new(Mesh::new(
            &MeshConfig::default(),
            PolicyMetrics::unregistered(),
            None,
        ));
        let source = SpiffeId::new("cluster.local", "shop", "order").unwrap();
        let mut reporter = Reporter::new(source, registry, mesh);
        let first = reporter.build();
        let second = reporter.build();
        assert_eq!((first.sequence, second.sequence), (1, 2));
        assert_eq!(first.instance, second.instance);
        assert_eq!(
            uuid::Uuid::parse_str(&first.instance)
                .unwrap()
                .get_version_num(),
            7
        );
        assert_eq!(first.source, "spiffe://cluster.local/ns/shop/sa/order");
        assert_eq!(first.latency_bounds_seconds, LATENCY_BUCKETS);
    }
}
