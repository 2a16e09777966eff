//! The demo's live table: per edge (calling pod → destination) requests/s, success rate, latency, retries,
//! breaker state and mTLS share for HTTP, and connections and bytes for opaque TCP, from the counters that
//! [`super::stats`] reads.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels, sorted by name.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// Parses the Prometheus text exposition format (no escapes inside label values are needed here).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let labels = labels
        .split("\",")
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.to_string(), v.trim_matches('"').to_string()))
        })
        .collect();
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Counters of one edge.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Edge {
    /// Requests by status class (`2xx`, `4xx`, `5xx`, ...).
    pub by_class: BTreeMap<String, f64>,
    /// Cumulative latency histogram buckets (upper bound in seconds → count).
    pub buckets: Vec<(f64, f64)>,
    /// Requests that travelled over mTLS.
    pub mtls: f64,
    /// Retries the calling sidecar made (policy metrics).
    pub retries: f64,
    /// The calling sidecar's circuit state for the destination, worst endpoint: 0 closed, 1 open,
    /// 2 half-open; `None` when the destination has no policy.
    pub breaker: Option<i64>,
}

impl Edge {
    /// All requests.
    pub fn total(&self) -> f64 {
        self.by_class.values().sum()
    }

    /// Share of requests that travelled over mTLS.
    pub fn mtls_share(&self) -> f64 {
        let total = self.total();
        if total == 0.0 {
            0.0
        } else {
            self.mtls / total
        }
    }

    /// Share of requests that were not 5xx.
    pub fn success_rate(&self) -> f64 {
        let total = self.total();
        if total == 0.0 {
            return 1.0;
        }
        1.0 - self.by_class.get("5xx").copied().unwrap_or(0.0) / total
    }

    /// The latency under which `q` of requests finished, at bucket resolution.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total == 0.0 {
            return None;
        }
        self.buckets
            .iter()
            .find(|(_, count)| *count >= q * total)
            .map(|(le, _)| *le)
    }

    /// This edge's counts since `earlier`.
    pub fn since(&self, earlier: &Edge) -> Edge {
        let by_class = self
            .by_class
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v - earlier.by_class.get(k).copied().unwrap_or(0.0),
                )
            })
            .collect();
        let buckets = self
            .buckets
            .iter()
            .map(|(le, c)| {
                (
                    *le,
                    c - earlier
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0.0, |(_, c)| *c),
                )
            })
            .collect();
        Edge {
            by_class,
            buckets,
            mtls: self.mtls - earlier.mtls,
            retries: self.retries - earlier.retries,
            breaker: self.breaker,
        }
    }
}

/// Counters of one opaque TCP edge.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TcpEdge {
    /// Connections opened.
    pub opened: f64,
    /// Connections closed.
    pub closed: f64,
    /// Bytes both ways over the interval (the proxy counts them as they flow).
    pub bytes: f64,
    /// Connections open now.
    pub open: f64,
}

impl TcpEdge {
    /// This edge's counts since `earlier`; `open` stays the connections open now.
    pub fn since(&self, earlier: &TcpEdge) -> TcpEdge {
        TcpEdge {
            opened: self.opened - earlier.opened,
            closed: self.closed - earlier.closed,
            bytes: self.bytes - earlier.bytes,
            open: self.open,
        }
    }
}

/// Outbound opaque TCP edges of one sidecar, by destination.
pub fn outbound_tcp_edges(samples: &[Sample]) -> BTreeMap<String, TcpEdge> {
    let mut edges: BTreeMap<String, TcpEdge> = BTreeMap::new();
    for s in samples {
        if s.labels.get("direction").map(String::as_str) != Some("outbound") {
            continue;
        }
        let Some(dst) = s.labels.get("destination") else {
            continue;
        };
        if !matches!(
            s.name.as_str(),
            "meshlet_tcp_connections_opened_total"
                | "meshlet_tcp_connections_closed_total"
                | "meshlet_tcp_bytes_total"
        ) {
            continue;
        }
        let edge = edges.entry(dst.clone()).or_default();
        match s.name.as_str() {
            "meshlet_tcp_connections_opened_total" => edge.opened += s.value,
            "meshlet_tcp_connections_closed_total" => edge.closed += s.value,
            _ => edge.bytes += s.value,
        }
        edge.open = (edge.opened - edge.closed).max(0.0);
    }
    edges
}

/// A circuit state as the table shows it.
fn breaker_name(state: Option<i64>) -> &'static str {
    match state {
        None => "-",
        Some(0) => "closed",
        Some(1) => "OPEN",
        Some(_) => "half-open",
    }
}

/// Outbound edges of one sidecar, by destination.
pub fn outbound_edges(samples: &[Sample]) -> BTreeMap<String, Edge> {
    let mut edges: BTreeMap<String, Edge> = BTreeMap::new();
    for s in samples {
        if s.labels.get("direction").map(String::as_str) != Some("outbound") {
            continue;
        }
        let Some(dst) = s.labels.get("destination") else {
            continue;
        };
        match s.name.as_str() {
            "meshlet_requests_total" => {
                let code = s.labels.get("status_code").map_or("?", String::as_str);
                let class = format!("{}xx", code.chars().next().unwrap_or('?'));
                let edge = edges.entry(dst.clone()).or_default();
                *edge.by_class.entry(class).or_default() += s.value;
                if s.labels.get("tls").map(String::as_str) == Some("true") {
                    edge.mtls += s.value;
                }
            }
            "meshlet_request_duration_seconds_bucket" => {
                let le = s.labels.get("le").and_then(|v| {
                    if v == "+Inf" {
                        Some(f64::INFINITY)
                    } else {
                        v.parse().ok()
                    }
                });
                if let Some(le) = le {
                    edges
                        .entry(dst.clone())
                        .or_default()
                        .buckets
                        .push((le, s.value));
                }
            }
            _ => {}
        }
    }
    for edge in edges.values_mut() {
        edge.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    edges
}

/// One row of the table: calling pod, destination service, counts over the last interval.
pub type Row<E> = (String, String, E);

/// Formats the table: one row per HTTP edge, then one per opaque TCP edge, over the last interval.
/// `tcp_mtls` is what the TCP rows say about mTLS (the proxy does not label TCP metrics with it; the demo
/// knows whether the receiving sidecars are strict).
pub fn render(
    rows: &[Row<Edge>],
    tcp: &[Row<TcpEdge>],
    tcp_mtls: &str,
    interval_secs: f64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<12} {:>7} {:>8} {:>5} {:>5} {:>5} {:>9} {:>9} {:>7} {:>9} {:>6}",
        "FROM",
        "TO",
        "RPS",
        "SUCCESS",
        "2xx",
        "4xx",
        "5xx",
        "P50",
        "P99",
        "RETRIES",
        "BREAKER",
        "MTLS"
    );
    for (from, to, edge) in rows {
        let ms = |q| {
            edge.quantile(q).map_or("-".to_string(), |s: f64| {
                if s.is_finite() {
                    format!("≤{}ms", s * 1000.0)
                } else {
                    ">30s".into()
                }
            })
        };
        let class = |c: &str| edge.by_class.get(c).copied().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "{:<12} {:<12} {:>7.1} {:>7.1}% {:>5} {:>5} {:>5} {:>9} {:>9} {:>7} {:>9} {:>5.0}%",
            from,
            to,
            edge.total() / interval_secs,
            edge.success_rate() * 100.0,
            class("2xx"),
            class("4xx"),
            class("5xx"),
            ms(0.5),
            ms(0.99),
            edge.retries.round() as i64,
            breaker_name(edge.breaker),
            edge.mtls_share() * 100.0,
        );
    }
    for (from, to, edge) in tcp {
        let _ = writeln!(
            out,
            "{:<12} {:<12} {:>7} {:>8} {:>5} {:>5} {:>5} {:>9} {:>9} {:>7} {:>9} {:>6}",
            from,
            to,
            "tcp",
            format!("{} open", edge.open),
            format!("+{}", edge.opened),
            format!("-{}", edge.closed),
            "",
            format!("{:.0} B/s", edge.bytes / interval_secs),
            "",
            "",
            "",
            tcp_mtls,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_proxy_exposition_into_edges() {
        let text = r#"# HELP meshlet_requests_total x
meshlet_requests_total{destination="127.0.3.1:8080",direction="outbound",method="POST",peer_identity="spiffe://cluster.local/ns/shop/sa/inventory",status_code="200",tls="true"} 9
meshlet_requests_total{destination="127.0.3.1:8080",direction="outbound",method="POST",status_code="503",tls="false"} 1
meshlet_request_duration_seconds_bucket{destination="127.0.3.1:8080",direction="outbound",le="0.001"} 5
meshlet_request_duration_seconds_bucket{destination="127.0.3.1:8080",direction="outbound",le="0.01"} 9
meshlet_request_duration_seconds_bucket{destination="127.0.3.1:8080",direction="outbound",le="+Inf"} 10
"#;
        let edges = outbound_edges(&parse(text));
        let edge = &edges["127.0.3.1:8080"];
        assert_eq!(edge.total(), 10.0);
        assert!((edge.success_rate() - 0.9).abs() < 1e-9);
        assert_eq!(edge.quantile(0.5), Some(0.001));
        assert_eq!(edge.quantile(0.9), Some(0.01));
        assert_eq!(edge.quantile(0.99), Some(f64::INFINITY));
        let table = render(
            &[("order".into(), "inventory".into(), edge.clone())],
            &[],
            "strict",
            1.0,
        );
        assert!(table.contains("90.0%"), "{table}");
        assert!((edge.mtls_share() - 0.9).abs() < 1e-9);
    }

    #[test]
    fn tcp_edges_count_connections_and_bytes() {
        let text = r#"meshlet_tcp_connections_opened_total{destination="127.0.8.1:6379",direction="outbound"} 2
meshlet_tcp_connections_closed_total{destination="127.0.8.1:6379",direction="outbound"} 1
meshlet_tcp_bytes_total{destination="127.0.8.1:6379",direction="outbound",flow="to_upstream"} 300
meshlet_tcp_bytes_total{destination="127.0.8.1:6379",direction="outbound",flow="from_upstream"} 100
meshlet_tcp_bytes_total{destination="127.0.8.1:6379",direction="inbound",flow="from_upstream"} 100
"#;
        let edges = outbound_tcp_edges(&parse(text));
        let edge = &edges["127.0.8.1:6379"];
        assert_eq!(
            edge,
            &TcpEdge {
                opened: 2.0,
                closed: 1.0,
                bytes: 400.0,
                open: 1.0
            }
        );
        let table = render(
            &[],
            &[("order".into(), "redis".into(), edge.clone())],
            "strict",
            2.0,
        );
        assert!(
            table.contains("1 open") && table.contains("200 B/s") && table.contains("strict"),
            "{table}"
        );
    }
}
