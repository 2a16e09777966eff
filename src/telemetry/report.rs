//! The telemetry report a sidecar posts to the control plane (`POST /v1/telemetry`), defined once for both
//! binaries.
//!
//! Why cumulative counts: every report carries everything the sidecar counted since it started, tagged with
//! the sidecar's instance id and a sequence number. A report lost in transit is simply superseded by the next
//! one, a report delivered twice (or late, after a newer one) changes nothing, and a restarted control plane
//! gets the full counts back with the first report of each sidecar. Nothing is ever double counted, at the
//! price of reports growing with the number of edges, not with time. See `docs/telemetry.md`.

use serde::{Deserialize, Serialize};

/// Where sidecars post their reports on the control plane's API.
pub const TELEMETRY_PATH: &str = "/v1/telemetry";

/// The report format version this build writes and reads.
pub const REPORT_VERSION: u32 = 1;

/// Most edges one report may carry; a sidecar with more sends the busiest ones.
pub const MAX_EDGES_PER_REPORT: usize = 256;

/// Largest report body the control plane reads.
pub const MAX_REPORT_BYTES: usize = 512 * 1024;

/// Longest destination name accepted (a DNS name plus a port).
pub const MAX_NAME_BYTES: usize = 256;

/// One sidecar's cumulative counts, per destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// Made (UUIDv7) when the sidecar started; counts are cumulative since then.
    pub instance: String,
    /// Increases by one with every report the instance builds; older or repeated sequences are ignored.
    pub sequence: u64,
    /// The sidecar's SPIFFE identity; must be the identity its client certificate proves.
    pub source: String,
    /// Upper bounds of the latency buckets, in seconds (the last bucket, `+Inf`, is implicit).
    pub latency_bounds_seconds: Vec<f64>,
    /// Counts per destination.
    pub edges: Vec<Edge>,
}

/// What the sidecar saw towards one destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    /// The mesh's service name, or `host:port` for destinations outside the mesh.
    pub destination: String,
    /// The counts.
    #[serde(flatten)]
    pub counts: Counts,
}

/// Cumulative counters of one edge. Every field only grows while the sidecar runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    /// Requests that travelled over mutual TLS, by response status class.
    pub mtls: StatusClasses,
    /// Plaintext requests, by response status class.
    pub plaintext: StatusClasses,
    /// Requests per latency bucket (not cumulative): one entry per bound plus the `+Inf` bucket.
    pub latency_buckets: Vec<u64>,
    /// Sum of all latencies, in seconds.
    pub latency_sum_seconds: f64,
    /// Retries sent.
    pub retries: u64,
    /// Request and per-try timeouts.
    pub timeouts: u64,
    /// Circuit breaker state changes of the destination's endpoints.
    pub breaker_transitions: u64,
    /// Idempotency-Key de-duplication outcomes.
    pub dedup: DedupOutcomes,
}

/// Requests by the class of their response status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusClasses {
    /// 1xx.
    #[serde(rename = "1xx")]
    pub informational: u64,
    /// 2xx.
    #[serde(rename = "2xx")]
    pub success: u64,
    /// 3xx.
    #[serde(rename = "3xx")]
    pub redirection: u64,
    /// 4xx.
    #[serde(rename = "4xx")]
    pub client_error: u64,
    /// 5xx, and statuses outside 100..=599.
    #[serde(rename = "5xx")]
    pub server_error: u64,
}

/// The status class labels, in the order of [`StatusClasses::values`].
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl StatusClasses {
    /// The counter a status code belongs to.
    pub fn class_mut(&mut self, status: u16) -> &mut u64 {
        match status {
            100..=199 => &mut self.informational,
            200..=299 => &mut self.success,
            300..=399 => &mut self.redirection,
            400..=499 => &mut self.client_error,
            _ => &mut self.server_error,
        }
    }

    /// The counts in the order of [`STATUS_CLASSES`].
    pub fn values(&self) -> [u64; 5] {
        [
            self.informational,
            self.success,
            self.redirection,
            self.client_error,
            self.server_error,
        ]
    }

    /// All requests.
    pub fn total(&self) -> u64 {
        self.values().iter().sum()
    }

    fn fields_mut(&mut self) -> [&mut u64; 5] {
        [
            &mut self.informational,
            &mut self.success,
            &mut self.redirection,
            &mut self.client_error,
            &mut self.server_error,
        ]
    }
}

/// Outcomes of the idempotency de-duplication (the `outcome` label of `meshlet_dedup_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DedupOutcomes {
    /// A stored answer was replayed to a repeated request.
    pub replayed: u64,
    /// A request with the key was already in flight.
    pub conflict: u64,
    /// A key was reused with a different request.
    pub mismatch: u64,
    /// Entries evicted to stay within bounds.
    pub evicted: u64,
    /// Answers stored.
    pub stored: u64,
    /// Requests that waited for the first one with the same key.
    pub waited: u64,
    /// Requests that skipped de-duplication.
    pub bypassed: u64,
}

/// The de-dup outcome labels, in the order of [`DedupOutcomes::values`].
pub const DEDUP_OUTCOMES: [&str; 7] = [
    "replayed", "conflict", "mismatch", "evicted", "stored", "waited", "bypassed",
];

impl DedupOutcomes {
    /// The counter of an outcome label, if it is a known one.
    pub fn outcome_mut(&mut self, outcome: &str) -> Option<&mut u64> {
        let index = DEDUP_OUTCOMES.iter().position(|o| *o == outcome)?;
        self.fields_mut().into_iter().nth(index)
    }

    /// The counts in the order of [`DEDUP_OUTCOMES`].
    pub fn values(&self) -> [u64; 7] {
        [
            self.replayed,
            self.conflict,
            self.mismatch,
            self.evicted,
            self.stored,
            self.waited,
            self.bypassed,
        ]
    }

    fn fields_mut(&mut self) -> [&mut u64; 7] {
        [
            &mut self.replayed,
            &mut self.conflict,
            &mut self.mismatch,
            &mut self.evicted,
            &mut self.stored,
            &mut self.waited,
            &mut self.bypassed,
        ]
    }
}

impl Counts {
    /// Zero counts with `buckets` latency buckets.
    pub fn with_buckets(buckets: usize) -> Counts {
        Counts {
            latency_buckets: vec![0; buckets],
            ..Counts::default()
        }
    }

    /// All requests.
    pub fn requests(&self) -> u64 {
        self.mtls.total() + self.plaintext.total()
    }

    /// Requests answered with 5xx (or an out-of-range status).
    pub fn failures(&self) -> u64 {
        self.mtls.server_error + self.plaintext.server_error
    }

    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &Counts) {
        self.combine(other, |a, b| a.saturating_add(b));
        self.latency_sum_seconds += other.latency_sum_seconds;
    }

    /// Takes `other` (an earlier snapshot of the same counters) away, saturating at zero.
    pub fn subtract(&mut self, other: &Counts) {
        self.combine(other, |a, b| a.saturating_sub(b));
        self.latency_sum_seconds = (self.latency_sum_seconds - other.latency_sum_seconds).max(0.0);
    }

    /// Whether every counter of `self` is at least the one in `earlier` (cumulative counters never shrink).
    pub fn covers(&self, earlier: &Counts) -> bool {
        let mut covers = true;
        let mut probe = self.clone();
        probe.combine(earlier, |a, b| {
            covers &= a >= b;
            a
        });
        covers && self.latency_buckets.len() >= earlier.latency_buckets.len()
    }

    /// Applies `f` to each integer counter of `self` and the same counter of `other`.
    fn combine(&mut self, other: &Counts, mut f: impl FnMut(u64, u64) -> u64) {
        let mut other = other.clone();
        let pairs = self
            .mtls
            .fields_mut()
            .into_iter()
            .zip(other.mtls.fields_mut())
            .chain(
                self.plaintext
                    .fields_mut()
                    .into_iter()
                    .zip(other.plaintext.fields_mut()),
            )
            .chain(
                self.dedup
                    .fields_mut()
                    .into_iter()
                    .zip(other.dedup.fields_mut()),
            )
            .chain([
                (&mut self.retries, &mut other.retries),
                (&mut self.timeouts, &mut other.timeouts),
                (
                    &mut self.breaker_transitions,
                    &mut other.breaker_transitions,
                ),
            ]);
        for (mine, theirs) in pairs {
            *mine = f(*mine, *theirs);
        }
        if self.latency_buckets.len() < other.latency_buckets.len() {
            self.latency_buckets.resize(other.latency_buckets.len(), 0);
        }
        for (mine, theirs) in self.latency_buckets.iter_mut().zip(&other.latency_buckets) {
            *mine = f(*mine, *theirs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(ok: u64, failed: u64) -> Counts {
        let mut c = Counts::with_buckets(3);
        c.mtls.success = ok;
        c.mtls.server_error = failed;
        c.latency_buckets[0] = ok + failed;
        c.latency_sum_seconds = 0.001 * (ok + failed) as f64;
        c.dedup.replayed = failed;
        c
    }

    #[test]
    fn adding_and_subtracting_are_inverse() {
        let mut total = counts(5, 1);
        total.add(&counts(2, 2));
        assert_eq!(total.requests(), 10);
        assert_eq!(total.failures(), 3);
        assert_eq!(total.dedup.replayed, 3);
        total.subtract(&counts(2, 2));
        assert_eq!(total.requests(), 6);
        assert_eq!(total.latency_buckets, vec![6, 0, 0]);
        assert!(total.covers(&counts(5, 1)));
        assert!(!counts(4, 1).covers(&counts(5, 1)));
    }

    #[test]
    fn status_codes_fall_into_their_class() {
        let mut classes = StatusClasses::default();
        for status in [101, 200, 204, 302, 404, 503, 999] {
            *classes.class_mut(status) += 1;
        }
        assert_eq!(classes.values(), [1, 2, 1, 1, 2]);
    }

    #[test]
    fn the_wire_format_is_self_describing() {
        let report = Report {
            version: REPORT_VERSION,
            instance: "i".into(),
            sequence: 3,
            source: "spiffe://cluster.local/ns/shop/sa/order".into(),
            latency_bounds_seconds: vec![0.1, 1.0],
            edges: vec![Edge {
                destination: "payment".into(),
                counts: counts(1, 0),
            }],
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["edges"][0]["mtls"]["2xx"], 1);
        assert_eq!(json["edges"][0]["destination"], "payment");
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
        let mut unknown = DedupOutcomes::default();
        assert!(unknown.outcome_mut("nonsense").is_none());
        *unknown.outcome_mut("waited").unwrap() += 1;
        assert_eq!(unknown.waited, 1);
    }
}
