//! Where the live table's numbers come from.
//!
//! Today: each sidecar's own `/metrics`, scraped the way a person would read them. When sidecars report
//! telemetry to the control plane, [`read_counters`] is the one function to switch to its JSON API; the
//! table, the deltas and the report do not change.

use std::net::SocketAddr;

use super::summary::{self, Edge, Row, TcpEdge};
use super::{admin_get, Pod};

/// Cumulative counters of every edge, as of now.
#[derive(Debug, Default, Clone)]
pub struct MeshCounters {
    /// HTTP edges: calling pod, destination service, counters.
    pub http: Vec<Row<Edge>>,
    /// Opaque TCP edges.
    pub tcp: Vec<Row<TcpEdge>>,
}

impl MeshCounters {
    /// The counts since `earlier`, edge by edge (an edge new since then counts from zero).
    pub fn since(&self, earlier: &MeshCounters) -> MeshCounters {
        MeshCounters {
            http: self
                .http
                .iter()
                .map(|(from, to, edge)| {
                    let before = find(&earlier.http, from, to).unwrap_or_default();
                    (from.clone(), to.clone(), edge.since(&before))
                })
                .collect(),
            tcp: self
                .tcp
                .iter()
                .map(|(from, to, edge)| {
                    let before = find(&earlier.tcp, from, to).unwrap_or_default();
                    (from.clone(), to.clone(), edge.since(&before))
                })
                .collect(),
        }
    }
}

fn find<E: Clone>(rows: &[Row<E>], from: &str, to: &str) -> Option<E> {
    rows.iter()
        .find(|(f, t, _)| f == from && t == to)
        .map(|(_, _, e)| e.clone())
}

/// Reads every edge's counters from the sidecars of `pods`. A sidecar that does not answer is left out.
pub(crate) async fn read_counters(pods: &[Pod]) -> MeshCounters {
    let mut counters = MeshCounters::default();
    let name_of = |dst: &str| {
        pods.iter()
            .find(|p| p.app_addr().is_some_and(|a| a.to_string() == dst))
            .map_or(dst.to_string(), |p| p.name.to_string())
    };
    for pod in pods {
        let Ok(text) = fetch_metrics(pod.admin_addr()).await else {
            continue;
        };
        let samples = summary::parse(&text);
        let tcp = summary::outbound_tcp_edges(&samples);
        // A CONNECT tunnel is one HTTP request, then opaque TCP: it belongs in the TCP rows only.
        for (dst, mut edge) in summary::outbound_edges(&samples)
            .into_iter()
            .filter(|(dst, _)| !tcp.contains_key(dst))
        {
            let to = name_of(&dst);
            // Policy metrics are labelled with the destination service's name.
            edge.retries = of_destination(&samples, "meshlet_retries_total", &to)
                .map(|s| s.value)
                .sum();
            // The worst endpoint: open, then half-open, then closed.
            edge.breaker = of_destination(&samples, "meshlet_breaker_state", &to)
                .map(|s| s.value as i64)
                .max_by_key(|state| match state {
                    1 => 2,
                    2 => 1,
                    _ => 0,
                });
            counters.http.push((pod.name.to_string(), to, edge));
        }
        for (dst, edge) in tcp {
            counters
                .tcp
                .push((pod.name.to_string(), name_of(&dst), edge));
        }
    }
    counters
}

fn of_destination<'a>(
    samples: &'a [summary::Sample],
    name: &'a str,
    destination: &'a str,
) -> impl Iterator<Item = &'a summary::Sample> + 'a {
    samples.iter().filter(move |s| {
        s.name == name && s.labels.get("destination").map(String::as_str) == Some(destination)
    })
}

async fn fetch_metrics(admin: SocketAddr) -> anyhow::Result<String> {
    let rsp = admin_get(admin, "/metrics").await?;
    Ok(rsp
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}
