//! Mesh-wide telemetry: the sidecars' cumulative reports (`POST /v1/telemetry`) aggregated into totals per
//! source → destination edge, served as Prometheus metrics ([`collector`]) and golden signals over a window
//! ([`stat`]).
//!
//! Why the totals are right: each sidecar instance reports everything it counted since it started, so the
//! control plane keeps only the latest snapshot per (instance, edge) and the totals are the sum over
//! instances. A repeated or out-of-order report (sequence not newer) changes nothing, a lost one is superseded
//! by the next, and after a control-plane restart the first report of every sidecar restores its counts.
//! The totals therefore count "since each sidecar started": a sidecar that stopped before the control plane
//! restarted is not counted again.
//!
//! Memory is bounded: edges per report, instances kept and distinct edges. When the instance table is full
//! the least recently heard instance is retired: its counts stay in the totals (which never go down) and its
//! id is remembered, so a late report from it is ignored instead of counted a second time.
//!
//! Windows (requests per second, percentiles over the last minute) need history: the increments this control
//! plane has seen are summed per edge and snapshotted every few seconds into a bounded ring. A sidecar first
//! heard with a sequence above 1 (the control plane restarted, or its first reports were lost) contributes
//! its counts to the totals but not to the windowed figures, so a restart does not show up as a burst.

pub mod collector;
pub mod http;
pub mod stat;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshlet::telemetry::report::{
    Counts, Report, MAX_EDGES_PER_REPORT, MAX_NAME_BYTES, REPORT_VERSION,
};
use meshlet::tls::SpiffeId;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// How often the windowed history takes a snapshot (the sidecars report every 5 s by default).
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);

/// Bounds of the aggregator.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sidecar instances kept before the least recently heard is retired.
    pub max_instances: usize,
    /// Retired instance ids remembered (so their late reports are not counted twice).
    pub max_retired_ids: usize,
    /// Distinct source → destination edges; reports of further edges are dropped (and counted).
    pub max_edges: usize,
    /// How much history the windows can reach back.
    pub history: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instances: 4096,
            max_retired_ids: 16384,
            max_edges: 2048,
            history: Duration::from_secs(meshlet::telemetry::api::MAX_WINDOW_SECS) + SNAPSHOT_EVERY,
        }
    }
}

/// A source → destination edge: the calling workload (its service account) and the called service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EdgeKey {
    /// Service account of the reporting sidecar.
    pub source: String,
    /// Service name, or host:port outside the mesh.
    pub destination: String,
}

/// Why a report was refused; each maps to an HTTP status.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReportError {
    /// The report's source is not the identity the connection proved.
    #[error("report source {claimed:?} is not the caller's identity {proved}")]
    WrongSource {
        /// What the report says.
        claimed: String,
        /// What the certificate proves.
        proved: String,
    },
    /// The report does not follow the format.
    #[error("invalid report: {0}")]
    Invalid(String),
}

/// What happened to an accepted-for-reading report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Counted.
    Applied,
    /// Not newer than what the instance reported before; nothing changed.
    Stale,
    /// From an instance already retired; nothing changed.
    Retired,
}

impl Outcome {
    /// The `result` label and the answer's `outcome` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::Retired => "retired",
        }
    }
}

struct Instance {
    source: String,
    sequence: u64,
    last_heard: Instant,
    edges: HashMap<String, Counts>,
}

struct State {
    instances: HashMap<String, Instance>,
    retired_ids: HashSet<String>,
    retired_order: VecDeque<String>,
    /// Sum over instances (live and retired) of their latest counts.
    totals: BTreeMap<EdgeKey, Counts>,
    /// Increments this control plane has seen (what windows are computed from).
    observed: BTreeMap<EdgeKey, Counts>,
    /// Snapshots of `observed`, oldest first.
    history: VecDeque<(Instant, BTreeMap<EdgeKey, Counts>)>,
}

/// The aggregator, shared by the API (ingestion) and the admin listener (metrics, stat).
pub struct Telemetry {
    state: Mutex<State>,
    limits: Limits,
    bounds: Vec<f64>,
    reports: IntCounterVec,
    dropped_edges: prometheus::IntCounter,
    instances: IntGauge,
}

impl Telemetry {
    /// An empty aggregator whose report counters are registered on `registry`, and whose mesh metrics are
    /// exposed through a collector registered there too.
    pub fn register(
        registry: &Registry,
        limits: Limits,
    ) -> Result<std::sync::Arc<Telemetry>, prometheus::Error> {
        let reports = IntCounterVec::new(
            Opts::new(
                "meshlet_telemetry_reports_received_total",
                "Sidecar telemetry reports received, by result.",
            ),
            &["result"],
        )?;
        let dropped_edges = prometheus::IntCounter::new(
            "meshlet_telemetry_edges_dropped_total",
            "Reported edges not kept because the edge limit was reached.",
        )?;
        let instances = IntGauge::new(
            "meshlet_telemetry_instances",
            "Sidecar instances whose latest report is kept.",
        )?;
        registry.register(Box::new(reports.clone()))?;
        for result in [
            "applied",
            "stale",
            "retired",
            "invalid",
            "forbidden",
            "unauthenticated",
        ] {
            reports.with_label_values(&[result]);
        }
        registry.register(Box::new(dropped_edges.clone()))?;
        registry.register(Box::new(instances.clone()))?;
        let telemetry =
            std::sync::Arc::new(Telemetry::new(limits, reports, dropped_edges, instances));
        registry.register(Box::new(collector::MeshCollector::new(telemetry.clone())?))?;
        Ok(telemetry)
    }

    fn new(
        limits: Limits,
        reports: IntCounterVec,
        dropped_edges: prometheus::IntCounter,
        instances: IntGauge,
    ) -> Telemetry {
        let mut history = VecDeque::new();
        history.push_back((Instant::now(), BTreeMap::new()));
        Telemetry {
            state: Mutex::new(State {
                instances: HashMap::new(),
                retired_ids: HashSet::new(),
                retired_order: VecDeque::new(),
                totals: BTreeMap::new(),
                observed: BTreeMap::new(),
                history,
            }),
            limits,
            bounds: meshlet::metrics::LATENCY_BUCKETS.to_vec(),
            reports,
            dropped_edges,
            instances,
        }
    }

    /// An aggregator on a private registry (tests).
    pub fn unregistered(limits: Limits) -> std::sync::Arc<Telemetry> {
        Telemetry::register(&Registry::new(), limits)
            .unwrap_or_else(|e| unreachable!("fresh registry: {e}"))
    }

    /// The latency bucket bounds every report must use.
    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }

    /// Counts `result` in `meshlet_telemetry_reports_received_total`.
    pub fn count(&self, result: &str) {
        self.reports.with_label_values(&[result]).inc();
    }

    /// Applies a report sent by the sidecar whose certificate proved `peer`.
    pub fn ingest(&self, peer: &SpiffeId, report: &Report) -> Result<Outcome, ReportError> {
        self.ingest_at(peer, report, Instant::now())
    }

    fn ingest_at(
        &self,
        peer: &SpiffeId,
        report: &Report,
        now: Instant,
    ) -> Result<Outcome, ReportError> {
        if report.source != peer.as_str() {
            return Err(ReportError::WrongSource {
                claimed: report.source.clone(),
                proved: peer.to_string(),
            });
        }
        self.validate(report)?;
        let source = peer.service_account().to_string();
        let mut state = self.lock();
        if state.retired_ids.contains(&report.instance) {
            return Ok(Outcome::Retired);
        }
        let baseline = match state.instances.get(&report.instance) {
            Some(known) if known.source != source => {
                return Err(ReportError::Invalid(format!(
                    "instance {:?} reported before as {}",
                    report.instance, known.source
                )))
            }
            Some(known) if report.sequence <= known.sequence => return Ok(Outcome::Stale),
            Some(known) => {
                for edge in &report.edges {
                    if let Some(before) = known.edges.get(&edge.destination) {
                        if !edge.counts.covers(before) {
                            return Err(ReportError::Invalid(format!(
                                "counts of edge {:?} went down since sequence {}",
                                edge.destination, known.sequence
                            )));
                        }
                    }
                }
                false
            }
            None => {
                self.make_room(&mut state);
                report.sequence > 1
            }
        };
        let state = &mut *state;
        let instance = state
            .instances
            .entry(report.instance.clone())
            .or_insert_with(|| Instance {
                source: source.clone(),
                sequence: 0,
                last_heard: now,
                edges: HashMap::new(),
            });
        instance.sequence = report.sequence;
        instance.last_heard = now;
        for edge in &report.edges {
            let key = EdgeKey {
                source: source.clone(),
                destination: edge.destination.clone(),
            };
            if !state.totals.contains_key(&key) && state.totals.len() >= self.limits.max_edges {
                self.dropped_edges.inc();
                continue;
            }
            let mut increment = edge.counts.clone();
            if let Some(before) = instance.edges.get(&edge.destination) {
                increment.subtract(before);
            }
            state.totals.entry(key.clone()).or_default().add(&increment);
            let observed = state.observed.entry(key).or_default();
            if baseline {
                // Make sure the edge exists (so windows find it) without counting what came before.
                observed.add(&Counts::with_buckets(increment.latency_buckets.len()));
            } else {
                observed.add(&increment);
            }
            instance
                .edges
                .insert(edge.destination.clone(), edge.counts.clone());
        }
        self.instances.set(state.instances.len() as i64);
        Self::snapshot_if_due(state, now, self.limits.history);
        Ok(Outcome::Applied)
    }

    /// Checks what can be checked without state; errors name the field and value.
    fn validate(&self, report: &Report) -> Result<(), ReportError> {
        let invalid = |m: String| Err(ReportError::Invalid(m));
        if report.version != REPORT_VERSION {
            return invalid(format!(
                "version {} (this control plane reads {REPORT_VERSION})",
                report.version
            ));
        }
        if report.instance.is_empty() || report.instance.len() > 64 {
            return invalid(format!("instance {:?}: 1 to 64 bytes", report.instance));
        }
        if report.sequence == 0 {
            return invalid("sequence 0: sequences start at 1".into());
        }
        if report.latency_bounds_seconds != self.bounds {
            return invalid(format!(
                "latency_bounds_seconds {:?} differ from the control plane's {:?}",
                report.latency_bounds_seconds, self.bounds
            ));
        }
        if report.edges.len() > MAX_EDGES_PER_REPORT {
            return invalid(format!(
                "{} edges (at most {MAX_EDGES_PER_REPORT})",
                report.edges.len()
            ));
        }
        let mut seen = HashSet::new();
        for edge in &report.edges {
            let name = &edge.destination;
            if name.is_empty()
                || name.len() > MAX_NAME_BYTES
                || name
                    .chars()
                    .any(|c| c.is_control() || c == '"' || c == '\\')
            {
                return invalid(format!("destination {name:?}"));
            }
            if !seen.insert(name) {
                return invalid(format!("destination {name:?} appears twice"));
            }
            if edge.counts.latency_buckets.len() != self.bounds.len() + 1 {
                return invalid(format!(
                    "edge {name:?}: {} latency_buckets (expected {})",
                    edge.counts.latency_buckets.len(),
                    self.bounds.len() + 1
                ));
            }
            let sum = edge.counts.latency_sum_seconds;
            if !sum.is_finite() || sum < 0.0 {
                return invalid(format!("edge {name:?}: latency_sum_seconds {sum}"));
            }
        }
        Ok(())
    }

    /// Retires the least recently heard instance when the table is full.
    fn make_room(&self, state: &mut State) {
        while state.instances.len() >= self.limits.max_instances {
            let Some(oldest) = state
                .instances
                .iter()
                .min_by_key(|(_, i)| i.last_heard)
                .map(|(id, _)| id.clone())
            else {
                return;
            };
            // Its counts are already in the totals and stay there; only its snapshot goes.
            state.instances.remove(&oldest);
            state.retired_ids.insert(oldest.clone());
            state.retired_order.push_back(oldest);
            while state.retired_order.len() > self.limits.max_retired_ids {
                if let Some(forgotten) = state.retired_order.pop_front() {
                    state.retired_ids.remove(&forgotten);
                }
            }
        }
    }

    fn snapshot_if_due(state: &mut State, now: Instant, history: Duration) {
        let due = state
            .history
            .back()
            .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= SNAPSHOT_EVERY);
        if due {
            state.history.push_back((now, state.observed.clone()));
        }
        // Keep one snapshot older than the longest window, so that window always has a start.
        while state.history.len() > 2
            && state
                .history
                .get(1)
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) > history)
        {
            state.history.pop_front();
        }
    }

    /// The totals per edge (since each sidecar started).
    pub fn totals(&self) -> BTreeMap<EdgeKey, Counts> {
        self.lock().totals.clone()
    }

    /// Increments per edge over (about) the last `window`, and the span they really cover.
    pub fn window(&self, window: Duration) -> (BTreeMap<EdgeKey, Counts>, Duration) {
        self.window_at(window, Instant::now())
    }

    fn window_at(&self, window: Duration, now: Instant) -> (BTreeMap<EdgeKey, Counts>, Duration) {
        let state = self.lock();
        let start = now.checked_sub(window).unwrap_or(now);
        // The newest snapshot taken at or before the window's start; the oldest one when history is shorter.
        let base = state
            .history
            .iter()
            .rev()
            .find(|(at, _)| *at <= start)
            .or(state.history.front());
        let mut deltas = state.observed.clone();
        let span = match base {
            Some((at, counts)) => {
                for (key, before) in counts {
                    if let Some(now_counts) = deltas.get_mut(key) {
                        now_counts.subtract(before);
                    }
                }
                now.saturating_duration_since(*at)
            }
            None => Duration::ZERO,
        };
        (deltas, span)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet::telemetry::report::Edge;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).unwrap()
    }

    fn telemetry() -> std::sync::Arc<Telemetry> {
        Telemetry::unregistered(Limits::default())
    }

    fn report(t: &Telemetry, instance: &str, sequence: u64, edges: &[(&str, u64, u64)]) -> Report {
        Report {
            version: REPORT_VERSION,
            instance: instance.into(),
            sequence,
            source: id("order").to_string(),
            latency_bounds_seconds: t.bounds().to_vec(),
            edges: edges
                .iter()
                .map(|(destination, ok, failed)| {
                    let mut counts = Counts::with_buckets(t.bounds().len() + 1);
                    counts.mtls.success = *ok;
                    counts.mtls.server_error = *failed;
                    counts.latency_buckets[3] = ok + failed;
                    Edge {
                        destination: destination.to_string(),
                        counts,
                    }
                })
                .collect(),
        }
    }

    fn total(t: &Telemetry, destination: &str) -> (u64, u64) {
        let key = EdgeKey {
            source: "order".into(),
            destination: destination.into(),
        };
        t.totals()
            .get(&key)
            .map_or((0, 0), |c| (c.requests(), c.failures()))
    }

    #[test]
    fn a_repeated_or_older_report_changes_nothing() {
        let t = telemetry();
        let first = report(&t, "a", 1, &[("payment", 8, 2)]);
        assert_eq!(t.ingest(&id("order"), &first).unwrap(), Outcome::Applied);
        assert_eq!(total(&t, "payment"), (10, 2));
        // The same cumulative report again (a retry after a lost answer): stale.
        assert_eq!(t.ingest(&id("order"), &first).unwrap(), Outcome::Stale);
        assert_eq!(total(&t, "payment"), (10, 2));
        let third = report(&t, "a", 3, &[("payment", 20, 5)]);
        assert_eq!(t.ingest(&id("order"), &third).unwrap(), Outcome::Applied);
        // Sequence 2 (sent before 3, delivered after it) is older: ignored.
        let second = report(&t, "a", 2, &[("payment", 15, 3)]);
        assert_eq!(t.ingest(&id("order"), &second).unwrap(), Outcome::Stale);
        assert_eq!(total(&t, "payment"), (25, 5));
    }

    #[test]
    fn a_lost_report_is_superseded_and_instances_add_up() {
        let t = telemetry();
        t.ingest(&id("order"), &report(&t, "a", 1, &[("payment", 1, 0)]))
            .unwrap();
        // Sequence 2 was lost; 3 carries everything.
        t.ingest(&id("order"), &report(&t, "a", 3, &[("payment", 7, 1)]))
            .unwrap();
        // A second replica (or the same sidecar after a restart) is another instance.
        t.ingest(&id("order"), &report(&t, "b", 1, &[("payment", 4, 0)]))
            .unwrap();
        assert_eq!(total(&t, "payment"), (12, 1));
        // An edge missing from a later report keeps its last counts.
        t.ingest(&id("order"), &report(&t, "a", 4, &[("inventory", 3, 0)]))
            .unwrap();
        assert_eq!(total(&t, "payment"), (12, 1));
        assert_eq!(total(&t, "inventory"), (3, 0));
    }

    #[test]
    fn the_source_must_be_the_callers_identity() {
        let t = telemetry();
        let err = t
            .ingest(&id("payment"), &report(&t, "a", 1, &[("payment", 1, 0)]))
            .unwrap_err();
        assert!(matches!(err, ReportError::WrongSource { .. }), "{err}");
        assert_eq!(total(&t, "payment"), (0, 0));
    }

    #[test]
    fn invalid_reports_are_refused_naming_the_field() {
        let t = telemetry();
        let mut bad = report(&t, "a", 1, &[("payment", 1, 0)]);
        bad.edges[0].counts.latency_buckets.pop();
        let err = t.ingest(&id("order"), &bad).unwrap_err().to_string();
        assert!(err.contains("latency_buckets"), "{err}");
        let mut bad = report(&t, "a", 1, &[("payment", 1, 0), ("payment", 1, 0)]);
        let err = t.ingest(&id("order"), &bad).unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
        bad.edges.truncate(1);
        bad.latency_bounds_seconds = vec![1.0];
        let err = t.ingest(&id("order"), &bad).unwrap_err().to_string();
        assert!(err.contains("latency_bounds_seconds"), "{err}");
        t.ingest(&id("order"), &report(&t, "a", 1, &[("payment", 5, 0)]))
            .unwrap();
        let err = t
            .ingest(&id("order"), &report(&t, "a", 2, &[("payment", 4, 0)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("went down"), "{err}");
        assert_eq!(total(&t, "payment"), (5, 0));
    }

    #[test]
    fn retiring_instances_never_lowers_the_totals_nor_counts_twice() {
        let t = Telemetry::unregistered(Limits {
            max_instances: 2,
            ..Limits::default()
        });
        let order = id("order");
        t.ingest(&order, &report(&t, "a", 1, &[("payment", 5, 0)]))
            .unwrap();
        t.ingest(&order, &report(&t, "b", 1, &[("payment", 5, 0)]))
            .unwrap();
        t.ingest(&order, &report(&t, "c", 1, &[("payment", 5, 0)]))
            .unwrap();
        assert_eq!(total(&t, "payment"), (15, 0));
        // "a" was retired; its late report must not be added again.
        assert_eq!(
            t.ingest(&order, &report(&t, "a", 2, &[("payment", 6, 0)]))
                .unwrap(),
            Outcome::Retired
        );
        assert_eq!(total(&t, "payment"), (15, 0));
    }

    #[test]
    fn edges_beyond_the_limit_are_dropped() {
        let t = Telemetry::unregistered(Limits {
            max_edges: 1,
            ..Limits::default()
        });
        t.ingest(
            &id("order"),
            &report(&t, "a", 1, &[("payment", 1, 0), ("zeta", 1, 0)]),
        )
        .unwrap();
        assert_eq!(t.totals().len(), 1);
        assert_eq!(t.dropped_edges.get(), 1);
    }

    #[test]
    fn windows_count_increments_and_a_resent_baseline_is_not_a_burst() {
        let t = telemetry();
        let order = id("order");
        let start = Instant::now();
        // First heard at sequence 7: the control plane restarted; these 100 requests happened before.
        t.ingest_at(&order, &report(&t, "a", 7, &[("payment", 100, 0)]), start)
            .unwrap();
        let later = start + Duration::from_secs(10);
        t.ingest_at(&order, &report(&t, "a", 8, &[("payment", 130, 0)]), later)
            .unwrap();
        let (window, span) = t.window_at(Duration::from_secs(60), later);
        let key = EdgeKey {
            source: "order".into(),
            destination: "payment".into(),
        };
        assert_eq!(window[&key].requests(), 30);
        assert!(span >= Duration::from_secs(10), "{span:?}");
        assert_eq!(total(&t, "payment"), (130, 0));
        // A window that starts after the second snapshot sees nothing new.
        let (window, _) = t.window_at(Duration::from_secs(1), later + Duration::from_secs(6));
        assert_eq!(window[&key].requests(), 0);
    }
}
