//! Discovery on the real data path: services reached on virtual addresses (nothing listens there), balanced
//! over their endpoints, each endpoint proving its own identity over mTLS or reached plain when it has no
//! sidecar; opaque ports; direct pod-IP destinations; and per-service state (breakers, de-dup records)
//! surviving mesh updates.
//!
//! Sidecars run without iptables: clients use the outbound listener as an explicit proxy, and endpoints
//! name their sidecar's inbound listener (`sidecar:`).

mod common;
#[path = "common/mesh.rs"]
mod mesh;
#[path = "common/netns.rs"]
mod netns;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Request, Response};
use hyper::body::Incoming;
use mesh::*;

/// An app at `addr` answering `<name> <caller identity or "plaintext">` after a short pause (so that
/// the balancer's latency estimates move and sequential requests spread), counting its calls.
async fn named_app(addr: SocketAddr, name: &'static str, calls: Arc<AtomicUsize>) -> SocketAddr {
    origin_at(addr, move |req: Request<Incoming>| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let peer = req
                .headers()
                .get("x-meshlet-peer-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("plaintext")
                .to_string();
            Response::new(full(format!("{name} {peer}")))
        }
    })
    .await
}

fn at(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// A server-first TCP service: it greets every connection before the client says anything.
async fn banner_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = stream.write_all(b"+READY\r\n").await;
                let mut buf = [0u8; 64];
                if let Ok(n) = stream.read(&mut buf).await {
                    let _ = stream.write_all(&buf[..n]).await;
                }
            });
        }
    });
    addr
}

fn get(outbound: SocketAddr, url_authority: &str, path: &str) -> RawResponse {
    let req = format!(
        "GET http://{url_authority}{path} HTTP/1.1\r\nHost: {url_authority}\r\nConnection: close\r\n\r\n"
    );
    raw_request(outbound, req.as_bytes()).unwrap()
}

/// `CONNECT authority` through the explicit proxy; the open tunnel after the `200`.
fn connect(outbound: SocketAddr, authority: &str) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(outbound).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "tunnel closed early");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_addresses_reach_every_endpoint_with_its_identity() {
    let Some(binary) = control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    let cp = start_control_plane(
        &binary,
        &[("shop", "client"), ("shop", "web"), ("shop", "web-canary")],
    );
    // Two pods of `web` listen on the same port at different addresses; b runs as another identity.
    let calls: Vec<Arc<AtomicUsize>> = (0..5).map(|_| Arc::default()).collect();
    let web_port = free_port();
    let app_a = named_app(at("127.0.0.1", web_port), "a", calls[0].clone()).await;
    let app_b = named_app(at("127.0.0.3", web_port), "b", calls[1].clone()).await;
    let impostor = named_app(at("127.0.0.3", free_port()), "impostor", calls[2].clone()).await;
    let legacy_port = free_port();
    let legacy_1 = named_app(at("127.0.0.1", legacy_port), "legacy-1", calls[3].clone()).await;
    let legacy_2 = named_app(at("127.0.0.2", legacy_port), "legacy-2", calls[4].clone()).await;
    let banner = banner_server().await;
    // Each sidecar delivers to the application on its own inbound address, as in a pod.
    let side_a = at("127.0.0.1", free_port());
    let side_b = at("127.0.0.3", free_port());
    let dir = TempDir::new("discovery-vip");
    let mesh = dir.0.join("mesh.yaml");
    let web = identity("shop", "web");
    let canary = identity("shop", "web-canary");
    let (impostor_port, banner_port) = (impostor.port(), banner.port());
    std::fs::write(
        &mesh,
        format!(
            "services:
  - name: web
    identity: {web}
    addresses: [127.0.77.1]
    ports: [{{port: 80, target_port: {web_port}, protocol: http}}]
    endpoints:
      - {{address: '{app_a}', sidecar: '{side_a}'}}
      - {{address: '{app_b}', sidecar: '{side_b}', identity: '{canary}'}}
  - name: impostor
    identity: {web}
    addresses: [127.0.77.3]
    ports: [{{port: 80, target_port: {impostor_port}}}]
    endpoints:
      - {{address: '{impostor}', sidecar: '{side_b}'}}
  - name: legacy
    identity: {web}
    addresses: [127.0.77.4]
    ports: [{{port: 80, target_port: {legacy_port}}}]
    endpoints:
      - {{address: '{legacy_1}', meshed: false}}
      - {{address: '{legacy_2}', meshed: false}}
  - name: cache
    identity: {web}
    addresses: [127.0.77.5]
    ports: [{{port: 6379, target_port: {banner_port}, protocol: opaque}}]
    endpoints:
      - {{address: '{banner}', sidecar: '{side_a}'}}
"
        ),
    )
    .unwrap();
    let _a = start_sidecar(&cp, &mesh, side_a, "shop", "web");
    let _b = start_sidecar(&cp, &mesh, side_b, "shop", "web-canary");
    let client = start_client_sidecar(&cp, &mesh, "shop", "client");
    let outbound = client.outbound;
    let caller = identity("shop", "client");

    // Requests to the virtual address (nothing listens there) are balanced over both pods, each over
    // mTLS: b proves its own identity (web-canary), and both see the client's verified identity.
    let mut bodies: HashMap<String, usize> = HashMap::new();
    for _ in 0..20 {
        let rsp = tokio::task::spawn_blocking(move || get(outbound, "127.0.77.1:80", "/"))
            .await
            .unwrap();
        assert_eq!(rsp.status, 200, "{rsp:?}");
        *bodies
            .entry(String::from_utf8_lossy(&rsp.body).into_owned())
            .or_default() += 1;
    }
    let (via_a, via_b) = (format!("a {caller}"), format!("b {caller}"));
    assert!(
        bodies.contains_key(&via_a) && bodies.contains_key(&via_b) && bodies.len() == 2,
        "both endpoints over mTLS: {bodies:?}"
    );
    let mtls = sum_metric(
        &client.metrics(),
        "meshlet_requests_total",
        &["destination=\"127.0.77.1:80\"", "tls=\"true\""],
    );
    assert_eq!(
        mtls, 20.0,
        "requests to the virtual address counted as mTLS"
    );

    // impostor's only endpoint sits behind b's sidecar, which proves web-canary, not the service's
    // identity: the handshake is refused and the app is never reached.
    let rsp = tokio::task::spawn_blocking(move || get(outbound, "127.0.77.3:80", "/"))
        .await
        .unwrap();
    assert_eq!(rsp.status, 502, "{rsp:?}");
    assert_eq!(
        rsp.header("x-meshlet-error"),
        Some("tls-handshake-failed"),
        "{rsp:?}"
    );
    assert_eq!(
        calls[2].load(Ordering::SeqCst),
        0,
        "the impostor was reached"
    );

    // Endpoints without a sidecar are reached plain, still balanced.
    let mut plain: HashMap<String, usize> = HashMap::new();
    for _ in 0..10 {
        let rsp = tokio::task::spawn_blocking(move || get(outbound, "127.0.77.4:80", "/"))
            .await
            .unwrap();
        assert_eq!(rsp.status, 200, "{rsp:?}");
        *plain
            .entry(String::from_utf8_lossy(&rsp.body).into_owned())
            .or_default() += 1;
    }
    assert!(
        plain.contains_key("legacy-1 plaintext")
            && plain.contains_key("legacy-2 plaintext")
            && plain.len() == 2,
        "both unmeshed endpoints, plain: {plain:?}"
    );

    // An opaque port carries a server-first protocol over mTLS: the greeting arrives before the client
    // writes anything.
    let (greeting, echo) = tokio::task::spawn_blocking(move || {
        let mut tunnel = connect(outbound, "127.0.77.5:6379");
        let mut greeting = [0u8; 8];
        tunnel.read_exact(&mut greeting).unwrap();
        tunnel.write_all(b"PING").unwrap();
        let mut echo = [0u8; 4];
        tunnel.read_exact(&mut echo).unwrap();
        (greeting, echo)
    })
    .await
    .unwrap();
    assert_eq!(&greeting, b"+READY\r\n");
    assert_eq!(&echo, b"PING");

    // Direct pod-IP destinations (headless services) still work: b's own address, b's identity.
    let rsp = tokio::task::spawn_blocking(move || get(outbound, &app_b.to_string(), "/"))
        .await
        .unwrap();
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(String::from_utf8_lossy(&rsp.body), via_b);
}

/// A payment app: `/charge` commits and answers `charge <n>`, `/slow` answers after a second.
async fn payment_app(addr: SocketAddr, charges: Arc<AtomicUsize>) -> SocketAddr {
    origin_at(addr, move |req: Request<Incoming>| {
        let charges = charges.clone();
        async move {
            match req.uri().path() {
                "/charge" => {
                    let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
                    Response::builder()
                        .status(201)
                        .body(full(format!("charge {n}")))
                        .unwrap()
                }
                "/slow" => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Response::new(full("slow"))
                }
                _ => Response::new(full("good")),
            }
        }
    })
    .await
}

/// An app that always answers 503, counting its calls.
async fn failing_app(addr: SocketAddr, calls: Arc<AtomicUsize>) -> SocketAddr {
    origin_at(addr, move |_req: Request<Incoming>| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Response::builder().status(503).body(full("down")).unwrap()
        }
    })
    .await
}

fn post_with_key(outbound: SocketAddr, authority: &str, key: &str) -> RawResponse {
    let req = format!(
        "POST http://{authority}/charge HTTP/1.1\r\nHost: {authority}\r\nIdempotency-Key: \"{key}\"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    raw_request(outbound, req.as_bytes()).unwrap()
}

/// Rewrites the mesh file and waits for the sidecars' watchers (every 250 ms) to pick it up.
async fn edit(mesh: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(mesh).unwrap();
    assert!(text.contains(from), "{from} not in the mesh file");
    std::fs::write(mesh, text.replace(from, to)).unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_and_dedup_records_survive_mesh_updates() {
    let Some(binary) = control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    let cp = start_control_plane(&binary, &[("shop", "client"), ("shop", "pay")]);
    let charges = Arc::new(AtomicUsize::new(0));
    let bad_calls = Arc::new(AtomicUsize::new(0));
    let port = free_port();
    let good = payment_app(at("127.0.0.1", port), charges.clone()).await;
    let bad = failing_app(at("127.0.0.2", port), bad_calls.clone()).await;
    let side = at("127.0.0.1", free_port());
    let dir = TempDir::new("discovery-state");
    let mesh = dir.0.join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "services:
  - name: pay
    identity: {}
    addresses: [127.0.78.1]
    ports: [{{port: 80, target_port: {port}}}]
    endpoints:
      - {{address: '{good}', sidecar: '{side}'}}
      - {{address: '{bad}', meshed: false}}
  - name: other
    identity: {}
    endpoints: [{{address: '127.0.0.9:9', meshed: false}}]
policy:
  services:
    pay:
      timeouts: {{request: 5s}}
      retries: {{max_attempts: 3, backoff: {{base: 10ms, max: 20ms}}}}
      breaker: {{consecutive_failures: 2, base_ejection: 120s}}
      idempotency: {{enforce: true}}
    other:
      timeouts: {{request: 7s}}
",
            identity("shop", "pay"),
            identity("shop", "other")
        ),
    )
    .unwrap();
    let _pay = start_sidecar(&cp, &mesh, side, "shop", "pay");
    let client = start_client_sidecar(&cp, &mesh, "shop", "client");
    let outbound = client.outbound;
    let vip = "127.0.78.1:80";
    let bad_state = |client: &Proxy| {
        sum_metric(
            &client.metrics(),
            "meshlet_breaker_state",
            &["destination=\"pay\"", &format!("endpoint=\"{bad}\"")],
        )
    };

    // The failing endpoint answers 503 until its breaker opens; retries land on the good one.
    for _ in 0..40 {
        let rsp = tokio::task::spawn_blocking(move || get(outbound, vip, "/"))
            .await
            .unwrap();
        assert_eq!(rsp.status, 200, "{rsp:?}");
        if bad_state(&client) == 1.0 {
            break;
        }
    }
    assert_eq!(
        bad_state(&client),
        1.0,
        "the failing endpoint was not ejected"
    );
    let ejected_at = bad_calls.load(Ordering::SeqCst);

    // A keyed POST completes once.
    let first = tokio::task::spawn_blocking(move || post_with_key(outbound, vip, "order-1"))
        .await
        .unwrap();
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(String::from_utf8_lossy(&first.body), "charge 1");

    // Another service's policy changes: pay's breaker stays open, its de-dup records stay.
    edit(&mesh, "request: 7s", "request: 8s").await;
    for _ in 0..10 {
        let rsp = tokio::task::spawn_blocking(move || get(outbound, vip, "/slow"))
            .await
            .unwrap();
        assert_eq!(rsp.status, 200, "{rsp:?}");
    }
    assert_eq!(
        bad_calls.load(Ordering::SeqCst),
        ejected_at,
        "the ejected endpoint got traffic after an unrelated update"
    );
    assert_eq!(bad_state(&client), 1.0);
    let replay = tokio::task::spawn_blocking(move || post_with_key(outbound, vip, "order-1"))
        .await
        .unwrap();
    assert_eq!(replay.status, 201, "{replay:?}");
    assert_eq!(String::from_utf8_lossy(&replay.body), "charge 1");
    assert_eq!(charges.load(Ordering::SeqCst), 1, "the POST ran twice");

    // pay's own policy changes: the new timeout applies at once, and the breaker is still open.
    edit(&mesh, "request: 5s", "request: 300ms").await;
    let rsp = tokio::task::spawn_blocking(move || get(outbound, vip, "/slow"))
        .await
        .unwrap();
    assert_eq!(rsp.status, 504, "{rsp:?}");
    assert_eq!(rsp.header("x-meshlet-error"), Some("timeout"), "{rsp:?}");
    assert_eq!(bad_state(&client), 1.0, "the edit reset the breaker");
    assert_eq!(bad_calls.load(Ordering::SeqCst), ejected_at);
}

/// Greets each connection with `+READY`, then echoes one read: a server-first protocol.
const BANNER_SERVER: &str = r#"
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(16)
def serve(conn):
    with conn:
        conn.sendall(b"+READY\r\n")
        data = conn.recv(64)
        conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// Connects, waits up to `timeout` seconds for the server to speak first, prints what it said.
const BANNER_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
print(s.recv(64).decode().strip())
"#;

/// A redirected connection (iptables, as in a pod) to a virtual address whose port is marked
/// `protocol: opaque` is relayed at once, so the server speaks first although the sidecar's detection
/// would wait 30 s; the same service on a port without the hint still waits for detection.
#[test]
fn an_opaque_service_port_skips_detection_when_redirected() {
    let Some(_lock) = netns::lock_if_root("an_opaque_service_port_skips_detection_when_redirected")
    else {
        return;
    };
    let dir = netns::SharedDir::create("discovery");
    let meshlet = dir.install_executable(common::MESHLET);
    let meshlet = meshlet.to_str().expect("utf-8 path");
    let pod = netns::Netns::create("disc");
    // The pod's own address on a veth (its peer in a namespace of its own, so the link is up), and a route
    // to the virtual addresses, as a cluster gives.
    let peer = netns::Netns::create("disc-peer");
    let pod_ip = "10.201.0.1";
    let (pod_if, peer_if) = (
        format!("dv{}", std::process::id()),
        format!("dp{}", std::process::id()),
    );
    pod.run(&[
        "ip",
        "link",
        "add",
        &pod_if,
        "type",
        "veth",
        "peer",
        "name",
        &peer_if,
        "netns",
        peer.name(),
    ]);
    pod.run(&["ip", "addr", "add", "10.201.0.1/24", "dev", &pod_if]);
    pod.run(&["ip", "link", "set", &pod_if, "up"]);
    peer.run(&["ip", "link", "set", &peer_if, "up"]);
    pod.run(&["ip", "route", "add", "10.96.0.0/16", "dev", &pod_if]);
    let mut banner = pod.spawn(
        &["python3", "-c", BANNER_SERVER, pod_ip, "7000"],
        &dir.path().join("banner.log"),
    );
    let client = |port: &str, timeout: &str| {
        pod.command(&["python3", "-c", BANNER_CLIENT, "10.96.7.7", port, timeout])
            .output()
            .expect("python3")
    };
    netns::wait_for("the banner server", Duration::from_secs(20), || {
        banner.assert_running("the banner server");
        let out = pod
            .command(&["python3", "-c", BANNER_CLIENT, pod_ip, "7000", "5"])
            .output()
            .ok()?;
        out.status.success().then_some(())
    });
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "services:
  - name: greeter
    identity: spiffe://cluster.local/ns/shop/sa/greeter
    addresses: [10.96.7.7]
    ports:
      - {{port: 7777, target_port: 7000, protocol: opaque}}
      - {{port: 7778, target_port: 7000}}
    endpoints:
      - {{address: '{pod_ip}:7000', meshed: false}}
"
        ),
    )
    .unwrap();
    pod.run(&[meshlet, "init"]);
    let mut proxy = pod.spawn(
        &[
            "setpriv",
            "--reuid",
            "2102",
            "--regid",
            "2102",
            "--clear-groups",
            meshlet,
            "proxy",
            "--detect-timeout",
            "30s",
            "--mesh-config",
            mesh.to_str().expect("utf-8 path"),
        ],
        &dir.path().join("proxy.log"),
    );
    netns::wait_for("the proxy's /ready", Duration::from_secs(30), || {
        proxy.assert_running("the proxy");
        let out = pod
            .command(&[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:15020/ready",
            ])
            .output()
            .ok()?;
        (String::from_utf8_lossy(&out.stdout) == "200").then_some(())
    });

    let hinted = client("7777", "10");
    assert!(
        hinted.status.success() && String::from_utf8_lossy(&hinted.stdout).trim() == "+READY",
        "{}\n{}",
        netns::describe(&hinted),
        proxy.log()
    );
    let unhinted = client("7778", "3");
    assert!(
        !unhinted.status.success(),
        "without the hint the sidecar waits for the client to speak: {}",
        netns::describe(&unhinted)
    );
    let metrics = pod
        .command(&["curl", "-s", "http://127.0.0.1:15020/metrics"])
        .output()
        .expect("curl");
    let opened = sum_metric(
        &String::from_utf8_lossy(&metrics.stdout),
        "meshlet_tcp_connections_opened_total",
        &["destination=\"10.96.7.7:7777\""],
    );
    assert_eq!(opened, 1.0, "the connection went through the sidecar");
}
