//! Telemetry end to end: a real control plane (local mode) and two sidecars with identities report what they
//! served; the control plane's totals (JSON API and /metrics) equal what the client counted, also across a
//! control-plane restart with traffic flowing while it was down, and the exposition passes
//! `promtool check metrics`.

mod common;
#[path = "common/mesh.rs"]
mod mesh;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use mesh::*;
use meshlet::telemetry::api::StatResponse;

/// Answers 500 to `/fail`, 200 otherwise.
async fn flaky_app() -> SocketAddr {
    origin(|req: Request<Incoming>| async move {
        let status = if req.uri().path() == "/fail" {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        Response::builder()
            .status(status)
            .body(full("answer\n"))
            .unwrap()
    })
    .await
}

/// What the client saw: requests sent and 5xx answers.
#[derive(Default, Debug, Clone, Copy, PartialEq)]
struct Counted {
    requests: u64,
    failures: u64,
}

/// Sends `ok` successful and `failing` failing requests through the client's sidecar, counting the answers.
async fn send(outbound: SocketAddr, app: SocketAddr, ok: u64, failing: u64, counted: &mut Counted) {
    for i in 0..ok + failing {
        let path = if i < failing { "/fail" } else { "/" };
        let req =
            format!("GET http://{app}{path} HTTP/1.1\r\nHost: {app}\r\nConnection: close\r\n\r\n");
        let rsp = tokio::task::spawn_blocking(move || raw_request(outbound, req.as_bytes()))
            .await
            .unwrap()
            .expect("request through the client sidecar");
        counted.requests += 1;
        if rsp.status >= 500 {
            counted.failures += 1;
        }
    }
}

fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n");
    let rsp = raw_request(addr, req.as_bytes()).ok()?;
    Some((rsp.status, String::from_utf8_lossy(&rsp.body).into_owned()))
}

/// The control plane's view of the client → server edge: (JSON total, JSON 5xx, /metrics total, /metrics 5xx).
fn control_plane_counts(admin: SocketAddr) -> Option<(u64, u64, f64, f64)> {
    let (status, body) = get(admin, "/api/v1/stat?by=edge&window=1m")?;
    assert_eq!(status, 200, "{body}");
    let stat: StatResponse = serde_json::from_str(&body).expect("stat JSON");
    let row = stat.rows.iter().find(|r| r.name == "client -> server")?;
    let (_, metrics) = get(admin, "/metrics")?;
    let edge = ["source=\"client\"", "destination=\"server\""];
    let total = sum_metric(&metrics, "meshlet_mesh_requests_total", &edge);
    let failed = sum_metric(
        &metrics,
        "meshlet_mesh_requests_total",
        &[edge[0], edge[1], "status_class=\"5xx\""],
    );
    Some((row.total_requests, row.total_failures, total, failed))
}

/// Waits until the control plane's totals equal what the client counted, and returns them.
async fn wait_for_totals(admin: SocketAddr, counted: Counted) -> (u64, u64, f64, f64) {
    let expected = (
        counted.requests,
        counted.failures,
        counted.requests as f64,
        counted.failures as f64,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    while Instant::now() < deadline {
        last = tokio::task::spawn_blocking(move || control_plane_counts(admin))
            .await
            .unwrap();
        if last == Some(expected) {
            return expected;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("control plane totals {last:?} never reached what the client counted {counted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_equal_what_the_client_counted_across_a_control_plane_restart() {
    let Some(binary) = control_plane_binary() else {
        panic!("meshlet-control is not built beside meshlet: run `cargo build -p meshlet-control` first");
    };
    // Sidecars inherit it: report often so the test does not wait long.
    std::env::set_var("MESHLET_REPORT_INTERVAL", "300ms");
    let workloads = [("shop", "client"), ("shop", "server")];
    let cp = start_control_plane(&binary, &workloads);
    let (api, admin) = (cp.api, cp.admin);
    let app = flaky_app().await;
    let server_inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = TempDir::new("telemetry-mesh");
    let mesh = mesh_file(&dir, &identity("shop", "server"), &[app], server_inbound);
    let _server = start_sidecar(&cp, &mesh, server_inbound, "shop", "server");
    let client = start_client_sidecar(&cp, &mesh, "shop", "client");

    let mut counted = Counted::default();
    send(client.outbound, app, 40, 7, &mut counted).await;
    assert_eq!(counted.failures, 7, "the app's 500s reach the client");
    wait_for_totals(admin, counted).await;

    // The exposition with real samples is valid.
    let (_, metrics) = get(admin, "/metrics").unwrap();
    assert!(metrics.contains("meshlet_mesh_request_duration_seconds_bucket{source=\"client\",destination=\"server\",le=\"+Inf\"} 47"), "{metrics}");
    assert!(
        metrics.contains("tls=\"true\""),
        "sidecar to sidecar is mTLS: {metrics}"
    );
    if have("promtool") {
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(metrics.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The control plane goes away; traffic continues (the sidecars keep their certificates), and the
    // reports made meanwhile fail.
    let data = cp.stop();
    send(client.outbound, app, 25, 3, &mut counted).await;
    let failed_before =
        client.metric_sum("meshlet_telemetry_reports_total", &["result=\"failed\""]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let failed_after = client.metric_sum("meshlet_telemetry_reports_total", &["result=\"failed\""]);
    assert!(
        failed_after > failed_before,
        "reports to a stopped control plane count as failed ({failed_before} → {failed_after})"
    );

    // Back on the same addresses and data directory: the sidecars' next cumulative reports restore the
    // totals, including what was served while it was down, and nothing is counted twice.
    let cp = ControlPlane::launch(&binary, &workloads, "1h", api, admin, data);
    send(client.outbound, app, 10, 2, &mut counted).await;
    assert_eq!(counted.requests, 87);
    let totals = wait_for_totals(cp.admin, counted).await;
    // A few more report rounds change nothing.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let again = tokio::task::spawn_blocking(move || control_plane_counts(admin))
        .await
        .unwrap();
    assert_eq!(again, Some(totals));
    let sent = client.metric_sum("meshlet_telemetry_reports_total", &["result=\"sent\""]);
    assert!(sent > 0.0);
}
