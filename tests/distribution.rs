//! Distribution end to end: a real `meshlet-control` in local mode serves its `--mesh-file` on the discovery
//! watch; two real sidecars (client and server, no `--mesh-config`) follow it over mTLS with their own
//! certificates; an origin answers `/fast` at once and `/slow` after 400 ms. A route timeout added to or
//! removed from the control plane's file turns `/slow` into 504s and back.

mod common;
#[path = "common/mesh.rs"]
mod mesh;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, Response};
use hyper::body::Incoming;
use mesh::*;

/// How long `/slow` takes at the origin.
const SLOW: Duration = Duration::from_millis(400);

async fn slow_app() -> SocketAddr {
    origin(|req: Request<Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(SLOW).await;
            return Response::new(full("slow"));
        }
        Response::new(full("fast"))
    })
    .await
}

/// The mesh: the origin as service `server` behind its sidecar; with `slow_limit`, a route override that
/// gives `/slow` a request timeout shorter than the origin takes.
fn mesh_yaml(app: SocketAddr, server_inbound: SocketAddr, slow_limit: Option<&str>) -> String {
    let routes = match slow_limit {
        Some(limit) => format!(
            "      routes:\n        - {{path_prefix: /slow, overrides: {{timeouts: {{request: {limit}}}}}}}\n"
        ),
        None => String::new(),
    };
    format!(
        "services:
  - name: server
    identity: {}
    endpoints:
      - {{address: '{app}', sidecar: '{server_inbound}'}}
policy:
  services:
    server:
      timeouts: {{request: 5s}}
{routes}",
        identity("shop", "server")
    )
}

/// Writes the mesh file so that its size and content change (a fresh write, as an editor would).
fn write_mesh(path: &PathBuf, text: &str) {
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file.sync_all().unwrap();
}

struct Mesh {
    /// `None` while it is stopped.
    cp: Option<ControlPlane>,
    server: Proxy,
    client: Proxy,
    app: SocketAddr,
    server_inbound: SocketAddr,
    mesh_file: PathBuf,
}

impl Mesh {
    fn cp(&self) -> &ControlPlane {
        self.cp.as_ref().expect("the control plane is running")
    }
}

const WORKLOADS: &[(&str, &str)] = &[("shop", "client"), ("shop", "server")];

async fn start_mesh(binary: &std::path::Path, slow_limit: Option<&str>) -> Mesh {
    let app = slow_app().await;
    let server_inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = TempDir::new("distribution");
    let mesh_file = dir.0.join("mesh.yaml");
    write_mesh(&mesh_file, &mesh_yaml(app, server_inbound, slow_limit));
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cp = launch(binary, api, admin, dir, &mesh_file);
    // Neither sidecar has a --mesh-config: both follow the control plane.
    let server = start_sidecar_with(&cp, server_inbound, "shop", "server", &[]);
    let client_inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let client = start_sidecar_with(&cp, client_inbound, "shop", "client", &[]);
    Mesh {
        cp: Some(cp),
        server,
        client,
        app,
        server_inbound,
        mesh_file,
    }
}

fn launch(
    binary: &std::path::Path,
    api: SocketAddr,
    admin: SocketAddr,
    dir: TempDir,
    mesh_file: &std::path::Path,
) -> ControlPlane {
    ControlPlane::launch_with(
        binary,
        WORKLOADS,
        "1h",
        api,
        admin,
        dir,
        &["--mesh-file", mesh_file.to_str().unwrap()],
    )
}

fn get(outbound: SocketAddr, app: SocketAddr, path: &str) -> RawResponse {
    let req =
        format!("GET http://{app}{path} HTTP/1.1\r\nHost: {app}\r\nConnection: close\r\n\r\n");
    raw_request(outbound, req.as_bytes()).unwrap()
}

async fn get_async(outbound: SocketAddr, app: SocketAddr, path: &'static str) -> RawResponse {
    tokio::task::spawn_blocking(move || get(outbound, app, path))
        .await
        .unwrap()
}

/// Polls `/slow` until it answers `status`; returns how long after `since` the first such request started.
async fn until_slow_is(mesh: &Mesh, status: u16, since: Instant, limit: Duration) -> Duration {
    loop {
        let started = Instant::now();
        let rsp = get_async(mesh.client.outbound, mesh.app, "/slow").await;
        if rsp.status == status {
            if status == 504 {
                assert_eq!(rsp.header("x-meshlet-error"), Some("timeout"), "{rsp:?}");
                assert_eq!(rsp.header("x-meshlet-timeout"), Some("request"), "{rsp:?}");
            }
            return started - since;
        }
        assert!(
            since.elapsed() < limit,
            "/slow still answers {} after {:?}, expected {status}",
            rsp.status,
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Requests `/fast` back to back on one kept-alive connection until stopped: (statuses, error if the
/// connection failed).
fn steady_traffic(
    outbound: SocketAddr,
    app: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<u16>, Option<String>)> {
    std::thread::spawn(move || {
        let mut statuses = Vec::new();
        let mut stream = match TcpStream::connect(outbound) {
            Ok(stream) => stream,
            Err(e) => return (statuses, Some(e.to_string())),
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let req = format!("GET http://{app}/fast HTTP/1.1\r\nHost: {app}\r\n\r\n");
        while !stop.load(Ordering::Acquire) {
            if let Err(e) = stream.write_all(req.as_bytes()) {
                return (statuses, Some(e.to_string()));
            }
            match read_response(&mut stream) {
                Ok(rsp) => statuses.push(rsp.status),
                Err(e) => return (statuses, Some(e.to_string())),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (statuses, None)
    })
}

/// Waits until a sidecar's metric sample reaches `value`.
fn until_metric(proxy: &Proxy, name: &str, labels: &[&str], value: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = proxy.metric_sum(name, labels);
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {now}, expected {value}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_edit_reaches_running_sidecars_within_a_second_without_a_failed_request() {
    let Some(binary) = control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    let mesh = start_mesh(&binary, None).await;
    // Ready means the first state is in force: the mesh (mTLS to the server) and its policy.
    assert_eq!(
        mesh.client.metric_sum("meshlet_discovery_connected", &[]),
        1.0
    );
    let rsp = get_async(mesh.client.outbound, mesh.app, "/slow").await;
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(rsp.body, b"slow");

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = steady_traffic(mesh.client.outbound, mesh.app, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Tighten: /slow now has 100 ms, less than the origin takes.
    let edited = Instant::now();
    write_mesh(
        &mesh.mesh_file,
        &mesh_yaml(mesh.app, mesh.server_inbound, Some("100ms")),
    );
    let took = until_slow_is(&mesh, 504, edited, Duration::from_secs(3)).await;
    eprintln!("policy edit (timeout added) in force after at most {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // And back: the edit that removes the route timeout lets /slow through again.
    let edited = Instant::now();
    write_mesh(
        &mesh.mesh_file,
        &mesh_yaml(mesh.app, mesh.server_inbound, None),
    );
    let took = until_slow_is(&mesh, 200, edited, Duration::from_secs(3)).await;
    eprintln!("policy edit (timeout removed) in force after at most {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Release);
    let (statuses, error) = tokio::task::spawn_blocking(move || traffic.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        error, None,
        "the kept-alive connection broke during the edits"
    );
    assert!(
        statuses.len() >= 20,
        "only {} requests were sent",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| *s == 200),
        "requests failed during the edits: {statuses:?}"
    );
    eprintln!(
        "{} requests on one connection during the edits, all 200",
        statuses.len()
    );

    // The two edits reached both sidecars as deltas on the same stream (no reconnect).
    for proxy in [&mesh.client, &mesh.server] {
        assert_eq!(
            proxy.metric_sum("meshlet_discovery_updates_total", &["result=\"applied\""]),
            3.0
        );
        assert_eq!(proxy.metric_sum("meshlet_discovery_connected", &[]), 1.0);
    }
    let cp_metrics = mesh.cp().metrics();
    assert!(
        sum_metric(
            &cp_metrics,
            "meshlet_control_watch_messages_total",
            &["type=\"delta\""]
        ) >= 4.0,
        "{cp_metrics}"
    );
    assert_eq!(
        sum_metric(&cp_metrics, "meshlet_control_watch_streams", &[]),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_keep_the_last_state_while_the_control_plane_is_down_and_resync_after() {
    let Some(binary) = control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    let mut mesh = start_mesh(&binary, Some("100ms")).await;
    let rsp = get_async(mesh.client.outbound, mesh.app, "/slow").await;
    assert_eq!(rsp.status, 504, "the route timeout is in force: {rsp:?}");
    let cp = mesh.cp.take().unwrap();
    let (api, admin) = (cp.api, cp.admin);
    let version_before = mesh.client.metric_sum("meshlet_discovery_version", &[]);

    // Kill the control plane: the watch breaks, the sidecars keep their state.
    let dir = cp.stop();
    until_metric(
        &mesh.client,
        "meshlet_discovery_connected",
        &[],
        0.0,
        Duration::from_secs(5),
    );
    let inbound_mtls_before = mesh.server.metric_sum(
        "meshlet_requests_total",
        &["direction=\"inbound\"", "tls=\"true\""],
    );
    let rsp = get_async(mesh.client.outbound, mesh.app, "/fast").await;
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let inbound_mtls = mesh.server.metric_sum(
        "meshlet_requests_total",
        &["direction=\"inbound\"", "tls=\"true\""],
    );
    assert!(
        inbound_mtls > inbound_mtls_before,
        "the request reached the server sidecar over mTLS while the control plane was down"
    );
    let rsp = get_async(mesh.client.outbound, mesh.app, "/slow").await;
    assert_eq!(rsp.status, 504, "the policy stays in force: {rsp:?}");

    // A change made while it is down is applied once it is back (same data dir: same CA).
    write_mesh(
        &mesh.mesh_file,
        &mesh_yaml(mesh.app, mesh.server_inbound, None),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rsp = get_async(mesh.client.outbound, mesh.app, "/slow").await;
    assert_eq!(rsp.status, 504, "nobody serves the edit yet: {rsp:?}");
    let restarted = Instant::now();
    let mesh_file = mesh.mesh_file.clone();
    mesh.cp = Some(launch(&binary, api, admin, dir, &mesh_file));
    let took = until_slow_is(&mesh, 200, restarted, Duration::from_secs(15)).await;
    eprintln!("resynced {took:?} after the control plane was restarted");
    until_metric(
        &mesh.client,
        "meshlet_discovery_connected",
        &[],
        1.0,
        Duration::from_secs(5),
    );
    let version_after = mesh.client.metric_sum("meshlet_discovery_version", &[]);
    assert!(
        version_after > version_before,
        "{version_after} > {version_before}"
    );
    assert_eq!(
        mesh.server.metric_sum("meshlet_discovery_connected", &[]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_edit_is_refused_naming_the_field_and_the_last_good_state_stays() {
    let Some(binary) = control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    let mesh = start_mesh(&binary, Some("100ms")).await;
    let applied = mesh
        .client
        .metric_sum("meshlet_discovery_updates_total", &["result=\"applied\""]);
    // A field with a value the schema does not have; then a policy value that contradicts another.
    let bad = mesh_yaml(mesh.app, mesh.server_inbound, None).replace(
        "    endpoints:\n",
        "    inbound: {mode: lax}\n    endpoints:\n",
    );
    write_mesh(&mesh.mesh_file, &bad);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sum_metric(
        &mesh.cp().metrics(),
        "meshlet_control_mesh_file_reloads_total",
        &["result=\"invalid\""],
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "the bad edit was not noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(mesh.cp().log_file()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("mesh file change refused"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    eprintln!("control plane log: {line}");
    assert!(
        line.contains("mode") && line.contains("lax"),
        "the log names the field and the value: {line}"
    );

    write_mesh(
        &mesh.mesh_file,
        &mesh_yaml(mesh.app, mesh.server_inbound, Some("100ms"))
            .replace("request: 5s", "request: 5s, per_try: 10s"),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let log = std::fs::read_to_string(mesh.cp().log_file()).unwrap();
    assert!(
        log.contains("per_try") && log.contains("10s"),
        "a policy value out of range names its field path and value:\n{log}"
    );

    // Behaviour unchanged: the route timeout is still in force, and nothing reached the sidecars.
    let rsp = get_async(mesh.client.outbound, mesh.app, "/slow").await;
    assert_eq!(rsp.status, 504, "{rsp:?}");
    assert_eq!(
        mesh.client
            .metric_sum("meshlet_discovery_updates_total", &["result=\"applied\""]),
        applied
    );
    assert_eq!(
        sum_metric(
            &mesh.cp().metrics(),
            "meshlet_control_mesh_file_reloads_total",
            &["result=\"invalid\""],
        ),
        2.0
    );
}
