//! The golden-signals JSON API of the control plane (`GET /api/v1/stat` on its admin listener), defined once
//! so the control plane writes and `meshlet stat` reads the same shape.

use serde::{Deserialize, Serialize};

/// Where the control plane's admin listener serves the golden signals.
pub const STAT_PATH: &str = "/api/v1/stat";

/// Longest window the control plane keeps history for.
pub const MAX_WINDOW_SECS: u64 = 600;

/// How rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// One row per destination service: everything its callers saw.
    Service,
    /// One row per source → destination edge.
    Edge,
}

impl GroupBy {
    /// The query parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Service => "service",
            GroupBy::Edge => "edge",
        }
    }
}

/// The answer of `GET /api/v1/stat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatResponse {
    /// How rows are grouped.
    pub by: GroupBy,
    /// The window asked for, in seconds.
    pub window_seconds: f64,
    /// The span the windowed figures really cover (shorter while the control plane has less history).
    pub observed_seconds: f64,
    /// What the `total_*` figures count from.
    pub totals_since: String,
    /// One row per service or edge, sorted by name.
    pub rows: Vec<StatRow>,
    /// The whole mesh.
    pub totals: StatRow,
}

/// The golden signals of one service or edge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatRow {
    /// The service, `source -> destination` for an edge, or `mesh` for the totals.
    pub name: String,
    /// The calling workload (service account), for edges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The called service, for services and edges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Requests in the window.
    pub requests: u64,
    /// Share of requests in the window not answered with 5xx; absent without requests.
    pub success_rate: Option<f64>,
    /// Requests per second over the window.
    pub rps: f64,
    /// Latency percentiles over the window, in milliseconds; absent without requests.
    pub latency_ms_p50: Option<f64>,
    /// 95th percentile.
    pub latency_ms_p95: Option<f64>,
    /// 99th percentile.
    pub latency_ms_p99: Option<f64>,
    /// Retries sent in the window.
    pub retries: u64,
    /// Timeouts in the window.
    pub timeouts: u64,
    /// Circuit breaker transitions in the window.
    pub breaker_transitions: u64,
    /// De-dup answers replayed in the window.
    pub dedup_replayed: u64,
    /// Share of requests in the window over mutual TLS; absent without requests.
    pub mtls_share: Option<f64>,
    /// Requests since each sidecar started.
    pub total_requests: u64,
    /// 5xx answers since each sidecar started.
    pub total_failures: u64,
}
