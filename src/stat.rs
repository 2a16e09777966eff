//! `meshlet stat`: the mesh's golden signals from the control plane's JSON API, as a table like
//! `linkerd viz stat` (or the JSON itself with `-o json`).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

use crate::config::parse_duration;
use crate::telemetry::api::{GroupBy, StatResponse, StatRow, STAT_PATH};

/// Largest answer read from the control plane.
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;
/// Time allowed for the whole exchange.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of `meshlet stat`.
#[derive(Debug, Clone, Args)]
pub struct StatArgs {
    /// The control plane's admin address (`http://host:port`; the demo's by default).
    #[arg(
        long,
        env = "MESHLET_CONTROL_PLANE_ADMIN",
        default_value = "http://127.0.0.1:19990",
        value_name = "URL"
    )]
    pub control_plane_admin: String,
    /// How far back requests per second, success rate and latency reach (1s to 10m).
    #[arg(long, default_value = "1m", value_parser = parse_duration, value_name = "DURATION")]
    pub window: Duration,
    /// One row per destination service, or per source → destination edge.
    #[arg(long, value_enum, default_value = "service")]
    pub by: GroupBy,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Output,
}

/// How `meshlet stat` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table for people.
    Table,
    /// The API's JSON.
    Json,
}

/// Runs `meshlet stat`.
pub fn run(args: StatArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = runtime.block_on(fetch(&args))?;
    match args.output {
        Output::Json => println!("{}", String::from_utf8_lossy(&body)),
        Output::Table => {
            let stat: StatResponse = serde_json::from_slice(&body).with_context(|| {
                format!(
                    "the answer of {} is not a stat response",
                    args.control_plane_admin
                )
            })?;
            print!("{}", table(&stat));
        }
    }
    Ok(())
}

/// `host:port` of an `http://host:port[/]` address.
fn authority(url: &str) -> anyhow::Result<&str> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        bail!("invalid value {url:?} for --control-plane-admin: expected http://host:port");
    }
    Ok(authority)
}

async fn fetch(args: &StatArgs) -> anyhow::Result<Bytes> {
    let url = &args.control_plane_admin;
    let authority = authority(url)?;
    let path = format!(
        "{STAT_PATH}?window={}s&by={}",
        args.window.as_secs().max(1),
        args.by.as_str()
    );
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| format!("cannot reach the control plane admin at {url} (is the control plane, or `meshlet demo`, running? set --control-plane-admin)"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(&path)
            .header(http::header::HOST, authority)
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            bail!(
                "the control plane at {url} answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        Ok(body)
    };
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => bail!("the control plane admin at {url} did not answer within {TIMEOUT:?}"),
    }
}

fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "-".into(), |s| format!("{:.2}%", s * 100.0))
}

fn millis(ms: Option<f64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 10.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{ms:.0}ms"),
    }
}

/// The table `meshlet stat` prints.
pub fn table(stat: &StatResponse) -> String {
    let first = match stat.by {
        GroupBy::Service => "NAME",
        GroupBy::Edge => "SOURCE → DESTINATION",
    };
    let headers = [
        first,
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
        "RETRIES",
        "TIMEOUTS",
        "MTLS",
        "TOTAL",
    ];
    let cells = |row: &StatRow| {
        let name = match (stat.by, &row.source, &row.destination) {
            (GroupBy::Edge, Some(source), Some(destination)) => {
                format!("{source} → {destination}")
            }
            _ => row.name.clone(),
        };
        [
            name,
            percent(row.success_rate),
            format!("{:.1}", row.rps),
            millis(row.latency_ms_p50),
            millis(row.latency_ms_p95),
            millis(row.latency_ms_p99),
            row.retries.to_string(),
            row.timeouts.to_string(),
            percent(row.mtls_share),
            row.total_requests.to_string(),
        ]
    };
    let mut rows: Vec<[String; 10]> = stat.rows.iter().map(cells).collect();
    rows.push(cells(&StatRow {
        source: None,
        destination: None,
        name: "(mesh)".into(),
        ..stat.totals.clone()
    }));
    let mut widths = headers.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            let pad = width - cell.chars().count();
            if i == 0 {
                let _ = write!(text, "{cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(text, "   {}{cell}", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&headers.map(String::from));
    for row in &rows {
        line(row);
    }
    let _ = writeln!(
        out,
        "window {:.0}s (observed {:.0}s); TOTAL counts requests since each sidecar started",
        stat.window_seconds, stat.observed_seconds
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_tables() {
        assert_eq!(
            authority("http://127.0.0.1:19990").unwrap(),
            "127.0.0.1:19990"
        );
        assert_eq!(authority("127.0.0.1:1/").unwrap(), "127.0.0.1:1");
        assert!(authority("http://a/b")
            .unwrap_err()
            .to_string()
            .contains("--control-plane-admin"));
        let row = StatRow {
            name: "order -> payment".into(),
            source: Some("order".into()),
            destination: Some("payment".into()),
            requests: 100,
            success_rate: Some(0.7),
            rps: 10.0,
            latency_ms_p50: Some(1.5),
            latency_ms_p95: Some(20.0),
            latency_ms_p99: Some(240.0),
            retries: 12,
            mtls_share: Some(1.0),
            total_requests: 900,
            ..StatRow::default()
        };
        let stat = StatResponse {
            by: GroupBy::Edge,
            window_seconds: 60.0,
            observed_seconds: 30.0,
            totals_since: "each sidecar's start".into(),
            rows: vec![row.clone()],
            totals: row,
        };
        let text = table(&stat);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SOURCE → DESTINATION"), "{text}");
        assert!(lines[1].starts_with("order → payment"), "{text}");
        for cell in ["70.00%", "10.0", "1.5ms", "240ms", "100.00%", "900"] {
            assert!(lines[1].contains(cell), "{cell} missing: {text}");
        }
    }
}
