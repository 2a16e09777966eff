//! Golden signals per service or per edge over a window (`GET /api/v1/stat?window=1m&by=service|edge`):
//! success rate (share not answered with 5xx), requests per second, latency percentiles interpolated in the
//! histogram's buckets (as Prometheus' `histogram_quantile` does), retries, timeouts, breaker transitions and
//! the share over mTLS; plus the totals since each sidecar started.

use std::collections::BTreeMap;
use std::time::Duration;

use meshlet::telemetry::api::{GroupBy, StatResponse, StatRow, MAX_WINDOW_SECS};
use meshlet::telemetry::report::Counts;

use super::Telemetry;

/// A bad query parameter, named with its value.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid {name}={value:?}: {reason}")]
pub struct QueryError {
    /// The parameter.
    pub name: &'static str,
    /// What was given.
    pub value: String,
    /// What is expected.
    pub reason: String,
}

/// The parsed query of `GET /api/v1/stat`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatQuery {
    /// How far back the windowed figures reach.
    pub window: Duration,
    /// Grouping.
    pub by: GroupBy,
}

impl StatQuery {
    /// Parses `window=1m&by=edge` (both optional: one minute, by service).
    pub fn parse(query: Option<&str>) -> Result<StatQuery, QueryError> {
        let mut parsed = StatQuery {
            window: Duration::from_secs(60),
            by: GroupBy::Service,
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "window" => {
                    let window =
                        meshlet::config::parse_duration(value).map_err(|reason| QueryError {
                            name: "window",
                            value: value.to_string(),
                            reason,
                        })?;
                    if window < Duration::from_secs(1) || window.as_secs() > MAX_WINDOW_SECS {
                        return Err(QueryError {
                            name: "window",
                            value: value.to_string(),
                            reason: format!("between 1s and {MAX_WINDOW_SECS}s"),
                        });
                    }
                    parsed.window = window;
                }
                "by" => {
                    parsed.by = match value {
                        "service" => GroupBy::Service,
                        "edge" => GroupBy::Edge,
                        _ => {
                            return Err(QueryError {
                                name: "by",
                                value: value.to_string(),
                                reason: "service or edge".into(),
                            })
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(parsed)
    }
}

/// The golden signals for `query`.
pub fn stat(telemetry: &Telemetry, query: StatQuery) -> StatResponse {
    let totals = telemetry.totals();
    let (window, span) = telemetry.window(query.window);
    let bounds = telemetry.bounds();
    let group = |source: &str, destination: &str| match query.by {
        GroupBy::Service => (destination.to_string(), None),
        GroupBy::Edge => (
            format!("{source} -> {destination}"),
            Some(source.to_string()),
        ),
    };
    // name -> (source, destination, windowed, total)
    let mut rows: BTreeMap<String, (Option<String>, String, Counts, Counts)> = BTreeMap::new();
    let mut mesh = (Counts::default(), Counts::default());
    for (key, total) in &totals {
        let (name, source) = group(&key.source, &key.destination);
        let windowed = window.get(key).cloned().unwrap_or_default();
        let row = rows.entry(name).or_insert_with(|| {
            (
                source,
                key.destination.clone(),
                Counts::default(),
                Counts::default(),
            )
        });
        row.2.add(&windowed);
        row.3.add(total);
        mesh.0.add(&windowed);
        mesh.1.add(total);
    }
    let seconds = span.as_secs_f64();
    let rows = rows
        .into_iter()
        .filter(|(_, (_, _, windowed, total))| {
            query.by == GroupBy::Service || total.requests() > 0 || windowed.requests() > 0
        })
        .map(|(name, (source, destination, windowed, total))| StatRow {
            source,
            destination: Some(destination),
            ..row(name, &windowed, &total, seconds, bounds)
        })
        .collect();
    StatResponse {
        by: query.by,
        window_seconds: query.window.as_secs_f64(),
        observed_seconds: seconds,
        totals_since: "each sidecar's start".into(),
        rows,
        totals: row("mesh".into(), &mesh.0, &mesh.1, seconds, bounds),
    }
}

fn row(name: String, windowed: &Counts, total: &Counts, seconds: f64, bounds: &[f64]) -> StatRow {
    let requests = windowed.requests();
    let share = |part: u64| (requests > 0).then(|| part as f64 / requests as f64);
    let quantile = |q| quantile_ms(q, &windowed.latency_buckets, bounds);
    StatRow {
        name,
        source: None,
        destination: None,
        requests,
        success_rate: share(requests - windowed.failures()),
        rps: if seconds > 0.0 {
            requests as f64 / seconds
        } else {
            0.0
        },
        latency_ms_p50: quantile(0.50),
        latency_ms_p95: quantile(0.95),
        latency_ms_p99: quantile(0.99),
        retries: windowed.retries,
        timeouts: windowed.timeouts,
        breaker_transitions: windowed.breaker_transitions,
        dedup_replayed: windowed.dedup.replayed,
        mtls_share: share(windowed.mtls.total()),
        total_requests: total.requests(),
        total_failures: total.failures(),
    }
}

/// The `q` quantile in milliseconds of a histogram with per-bucket `counts` (the last one `+Inf`) and
/// upper `bounds` in seconds, interpolating linearly inside the bucket; `None` when empty. Values in the
/// `+Inf` bucket are reported as the highest finite bound.
pub fn quantile_ms(q: f64, counts: &[u64], bounds: &[f64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, count) in counts.iter().enumerate() {
        let upto = below + count;
        if upto as f64 >= rank && *count > 0 {
            let Some(upper) = bounds.get(i) else {
                return bounds.last().map(|b| b * 1000.0);
            };
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let within = (rank - below as f64) / *count as f64;
            return Some((lower + (upper - lower) * within) * 1000.0);
        }
        below = upto;
    }
    bounds.last().map(|b| b * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Limits;
    use meshlet::telemetry::report::{Edge, Report, REPORT_VERSION};
    use meshlet::tls::SpiffeId;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let bounds = [0.01, 0.1, 1.0];
        assert_eq!(quantile_ms(0.5, &[0, 0, 0, 0], &bounds), None);
        // 10 requests all in (10ms, 100ms]: the median is half-way.
        let p50 = quantile_ms(0.5, &[0, 10, 0, 0], &bounds).unwrap();
        assert!((p50 - 55.0).abs() < 1e-9, "{p50}");
        // 99 fast, 1 slow: p99 is still in the first bucket, the slow one is beyond the last bound.
        let p99 = quantile_ms(0.99, &[99, 0, 0, 1], &bounds).unwrap();
        assert!(p99 <= 10.0, "{p99}");
        assert_eq!(quantile_ms(1.0, &[99, 0, 0, 1], &bounds), Some(1000.0));
    }

    #[test]
    fn queries_are_parsed_and_bad_values_named() {
        let q = StatQuery::parse(Some("window=30s&by=edge")).unwrap();
        assert_eq!(q.window, Duration::from_secs(30));
        assert_eq!(q.by, GroupBy::Edge);
        assert_eq!(StatQuery::parse(None).unwrap().by, GroupBy::Service);
        let err = StatQuery::parse(Some("by=pod")).unwrap_err().to_string();
        assert!(err.contains("by=\"pod\""), "{err}");
        let err = StatQuery::parse(Some("window=1d")).unwrap_err().to_string();
        assert!(err.contains("window"), "{err}");
    }

    #[test]
    fn rows_per_edge_and_per_service() {
        let t = Telemetry::unregistered(Limits::default());
        for (sa, ok, failed) in [("order", 9, 1), ("gateway", 5, 0)] {
            let mut counts = Counts::with_buckets(t.bounds().len() + 1);
            counts.mtls.success = ok;
            counts.plaintext.server_error = failed;
            counts.latency_buckets[4] = ok + failed;
            let report = Report {
                version: REPORT_VERSION,
                instance: sa.into(),
                sequence: 1,
                source: SpiffeId::new("cluster.local", "shop", sa)
                    .unwrap()
                    .to_string(),
                latency_bounds_seconds: t.bounds().to_vec(),
                edges: vec![Edge {
                    destination: "payment".into(),
                    counts,
                }],
            };
            t.ingest(
                &SpiffeId::new("cluster.local", "shop", sa).unwrap(),
                &report,
            )
            .unwrap();
        }
        let by_edge = stat(
            &t,
            StatQuery {
                window: Duration::from_secs(60),
                by: GroupBy::Edge,
            },
        );
        assert_eq!(by_edge.rows.len(), 2);
        let order = by_edge
            .rows
            .iter()
            .find(|r| r.name == "order -> payment")
            .unwrap();
        assert_eq!(order.requests, 10);
        assert_eq!(order.success_rate, Some(0.9));
        assert_eq!(order.mtls_share, Some(0.9));
        assert!(order.latency_ms_p50.is_some());
        let by_service = stat(
            &t,
            StatQuery {
                window: Duration::from_secs(60),
                by: GroupBy::Service,
            },
        );
        assert_eq!(by_service.rows.len(), 1);
        assert_eq!(by_service.rows[0].total_requests, 15);
        assert_eq!(by_service.totals.total_failures, 1);
    }
}
