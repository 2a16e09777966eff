//! Resilience policies on the real data path: client sidecar (timeouts, retries, key injection) → mTLS →
//! server sidecar (de-duplication) → a fault-injecting app with its own ledger of side effects.

mod common;
#[path = "common/mesh.rs"]
mod mesh;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::{Request, Response};
use hyper::body::Incoming;
use mesh::*;

/// What the app saw: calls per path, and committed payments.
#[derive(Default)]
struct Ledger {
    calls: Mutex<HashMap<String, usize>>,
    charges: AtomicUsize,
}

/// `/flaky-get`: 503 twice, then 200. `/always-503`: 503. `/charge`: commits, then answers only after 1 s
/// (longer than the caller's per-try timeout).
async fn fault_app(ledger: Arc<Ledger>) -> SocketAddr {
    origin(move |req: Request<Incoming>| {
        let ledger = ledger.clone();
        async move {
            let path = req.uri().path().to_string();
            let n = {
                let mut calls = ledger.calls.lock().unwrap();
                let n = calls.entry(path.clone()).or_default();
                *n += 1;
                *n
            };
            match path.as_str() {
                "/flaky-get" if n <= 2 => Response::builder()
                    .status(503)
                    .body(full("not yet"))
                    .unwrap(),
                "/flaky-get" => Response::new(full("finally")),
                "/always-503" => Response::builder().status(503).body(full("down")).unwrap(),
                "/charge" => {
                    let charge = ledger.charges.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                    Response::builder()
                        .status(201)
                        .body(full(format!("charge {charge}")))
                        .unwrap()
                }
                _ => Response::new(full("ok")),
            }
        }
    })
    .await
}

fn calls(ledger: &Ledger, path: &str) -> usize {
    ledger.calls.lock().unwrap().get(path).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_safe_and_payments_happen_once() {
    let Some(binary) = control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    let cp = start_control_plane(&binary, &[("shop", "client"), ("shop", "server")]);
    let ledger = Arc::new(Ledger::default());
    let app = fault_app(ledger.clone()).await;
    let server_inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = TempDir::new("resilience");
    let mesh = dir.0.join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "services:
  - name: server
    identity: {}
    endpoints:
      - {{address: '{app}', sidecar: '{server_inbound}'}}
policy:
  services:
    server:
      timeouts: {{request: 5s, per_try: 400ms}}
      retries: {{max_attempts: 3, backoff: {{base: 10ms, max: 50ms}}}}
      idempotency: {{inject: true, enforce: true}}
",
            identity("shop", "server")
        ),
    )
    .unwrap();
    let _server = start_sidecar(&cp, &mesh, server_inbound, "shop", "server");
    let client = start_client_sidecar(&cp, &mesh, "shop", "client");
    let outbound = client.outbound;
    let send = move |method: &'static str, path: &'static str| {
        let req = format!("{method} http://{app}{path} HTTP/1.1\r\nHost: {app}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
        raw_request(outbound, req.as_bytes()).unwrap()
    };

    // A GET that fails twice with 503 is retried and succeeds on the third attempt.
    let rsp = tokio::task::spawn_blocking(move || send("GET", "/flaky-get"))
        .await
        .unwrap();
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(rsp.body, b"finally");
    assert_eq!(rsp.header("x-meshlet-attempts"), Some("3"), "{rsp:?}");
    assert_eq!(calls(&ledger, "/flaky-get"), 3);

    // The first attempt of a POST charges, then outlives the per-try timeout; the retry carries the same
    // injected key, and the server sidecar answers it with the first attempt's response: one charge.
    let rsp = tokio::task::spawn_blocking(move || send("POST", "/charge"))
        .await
        .unwrap();
    assert_eq!(rsp.status, 201, "{rsp:?}");
    assert_eq!(String::from_utf8_lossy(&rsp.body), "charge 1");
    assert_eq!(
        ledger.charges.load(Ordering::SeqCst),
        1,
        "the payment must be applied exactly once"
    );
    assert_eq!(calls(&ledger, "/charge"), 1);

    // Without a policy that injects keys a POST is not retried: change the file, the sidecars reload it.
    let text = std::fs::read_to_string(&mesh)
        .unwrap()
        .replace("inject: true", "inject: false");
    std::fs::write(&mesh, text).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rsp = tokio::task::spawn_blocking(move || send("POST", "/always-503"))
        .await
        .unwrap();
    assert_eq!(rsp.status, 503, "{rsp:?}");
    assert_eq!(
        calls(&ledger, "/always-503"),
        1,
        "a POST without an Idempotency-Key must not be retried"
    );

    let metrics = client.metrics();
    assert!(
        sum_metric(&metrics, "meshlet_retries_total", &[]) >= 3.0,
        "retries not counted"
    );
}

/// A TCP relay standing in for the network between the two sidecars: once `cut_when` says so, it drops every
/// connection it carries (once); connections opened after the cut pass through.
async fn cutting_relay(
    to: SocketAddr,
    cut_when: impl Fn() -> bool + Send + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The connections to drop at the cut; `None` once it happened.
    let carried: Arc<Mutex<Option<Vec<tokio::task::AbortHandle>>>> =
        Arc::new(Mutex::new(Some(Vec::new())));
    let cuts = Arc::new(AtomicUsize::new(0));
    let (doomed, cut) = (carried.clone(), cuts.clone());
    tokio::spawn(async move {
        while !cut_when() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for conn in doomed.lock().unwrap().take().unwrap_or_default() {
            conn.abort();
            cut.fetch_add(1, Ordering::SeqCst);
        }
    });
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let Ok(mut server) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let relay = tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
            if let Some(carried) = carried.lock().unwrap().as_mut() {
                carried.push(relay.abort_handle());
            }
        }
    });
    (addr, cuts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_between_the_sidecars_after_the_app_committed_is_answered_by_replay() {
    let Some(binary) = control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    let cp = start_control_plane(&binary, &[("shop", "client"), ("shop", "server")]);
    let charges = Arc::new(AtomicUsize::new(0));
    let ledger = charges.clone();
    // Commits, then takes 300 ms to answer: the connection is cut in between.
    let app = origin(move |_req: Request<Incoming>| {
        let ledger = ledger.clone();
        async move {
            let charge = ledger.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::builder()
                .status(201)
                .body(full(format!("charge {charge}")))
                .unwrap()
        }
    })
    .await;
    let server_inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let committed = charges.clone();
    let (relay, cuts) = cutting_relay(server_inbound, move || {
        committed.load(Ordering::SeqCst) >= 1
    })
    .await;
    let dir = TempDir::new("resilience-cut");
    let mesh = dir.0.join("mesh.yaml");
    // The client sidecar reaches the server sidecar through the relay; the per-try timeout is long, so it is
    // the cut, not a timeout, that ends the first attempt.
    std::fs::write(
        &mesh,
        format!(
            "services:
  - name: server
    identity: {}
    endpoints:
      - {{address: '{app}', sidecar: '{relay}'}}
policy:
  services:
    server:
      timeouts: {{request: 5s, per_try: 3s}}
      retries: {{max_attempts: 3, backoff: {{base: 10ms, max: 50ms}}}}
      idempotency: {{inject: true, enforce: true}}
",
            identity("shop", "server")
        ),
    )
    .unwrap();
    let _server = start_sidecar(&cp, &mesh, server_inbound, "shop", "server");
    let client = start_client_sidecar(&cp, &mesh, "shop", "client");
    let outbound = client.outbound;
    let req = format!("POST http://{app}/charge HTTP/1.1\r\nHost: {app}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
    let rsp = tokio::task::spawn_blocking(move || raw_request(outbound, req.as_bytes()).unwrap())
        .await
        .unwrap();
    assert!(
        cuts.load(Ordering::SeqCst) >= 1,
        "the relay cut a connection"
    );
    assert_eq!(rsp.status, 201, "{rsp:?}");
    assert_eq!(String::from_utf8_lossy(&rsp.body), "charge 1");
    assert_eq!(rsp.header("idempotent-replayed"), Some("true"), "{rsp:?}");
    assert_eq!(rsp.header("x-meshlet-attempts"), Some("2"), "{rsp:?}");
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "the payment must be applied exactly once"
    );
    assert!(
        client.metric_sum("meshlet_retries_total", &["reason=\"reset\""]) >= 1.0,
        "the cut was retried as a reset"
    );
}
