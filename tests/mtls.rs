//! Automatic mTLS between sidecars, end to end: a real control plane issues each sidecar its certificate;
//! client → sidecar → mTLS → sidecar → app for HTTP/1.1, h2, a WebSocket-free opaque tunnel and gRPC-style
//! trailers; the app sees the verified caller; unauthorized identities get 403; and the inbound port demands a
//! client certificate over TLS 1.3 (checked with `openssl s_client`).

mod common;
#[path = "common/mesh.rs"]
mod mesh;

use std::net::SocketAddr;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, Response};
use hyper::body::Incoming;
use mesh::*;

/// An app that answers with the headers it received, so tests see what the server sidecar delivered.
async fn header_echo_app() -> SocketAddr {
    origin(|req: Request<Incoming>| async move {
        let mut seen = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
        for (name, value) in req.headers() {
            seen.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
        }
        Response::builder()
            .header("grpc-status", "0")
            .body(full(seen))
            .unwrap()
    })
    .await
}

/// A TCP echo server.
async fn tcp_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn curl(proxy: SocketAddr, url: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-i",
            "-x",
            &format!("http://{proxy}"),
        ])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_mtls_and_authorize_by_identity() {
    let Some(binary) = control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    if !have("curl") || !have("openssl") {
        return skip_or_fail("curl and openssl are needed");
    }
    let cp = start_control_plane(
        &binary,
        &[
            ("shop", "client"),
            ("shop", "server"),
            ("other", "intruder"),
        ],
    );
    let app = header_echo_app().await;
    let echo = tcp_echo().await;
    let server_inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = TempDir::new("mesh");
    let mesh_file = dir.0.join("mesh.yaml");
    std::fs::write(
        &mesh_file,
        format!(
            "services:\n  - name: server\n    identity: {}\n    endpoints:\n      - {{address: '{app}', sidecar: '{server_inbound}'}}\n      - {{address: '{echo}', sidecar: '{server_inbound}'}}\n    inbound:\n      mode: strict\n      allow: ['ns/shop/*']\n",
            identity("shop", "server")
        ),
    )
    .unwrap();
    let server = start_sidecar(&cp, &mesh_file, server_inbound, "shop", "server");
    let client = start_client_sidecar(&cp, &mesh_file, "shop", "client");
    let intruder = start_client_sidecar(&cp, &mesh_file, "other", "intruder");

    let url = format!("http://{app}/orders?id=7");
    let (client_out, intruder_out) = (client.outbound, intruder.outbound);
    let (ok, rsp) = tokio::task::spawn_blocking(move || {
        curl(
            client_out,
            &url,
            &["-H", "x-meshlet-peer-id: spiffe://evil/ns/x/sa/y"],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{rsp}");
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    // The app sees HTTP/1.1 restored, the verified caller, and not the caller's forged header.
    assert!(rsp.contains("GET /orders?id=7 HTTP/1.1"), "{rsp}");
    assert!(
        rsp.contains(&format!(
            "x-meshlet-peer-id: {}",
            identity("shop", "client")
        )),
        "{rsp}"
    );
    assert!(
        !rsp.contains("spiffe://evil"),
        "forged peer id passed through: {rsp}"
    );
    assert!(
        !rsp.contains("meshlet-target-port") && !rsp.contains("meshlet-orig-proto"),
        "{rsp}"
    );
    assert!(rsp.contains(&format!("host: {app}")), "{rsp}");

    let url = format!("http://{app}/");
    let (_, denied) = tokio::task::spawn_blocking(move || curl(intruder_out, &url, &[]))
        .await
        .unwrap();
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(
        denied
            .to_ascii_lowercase()
            .contains("x-meshlet-error: unauthorized"),
        "{denied}"
    );

    // h2 with prior knowledge from the app, many streams over the one mesh connection.
    let h2 = h2_get_many(client.outbound, app, 20).await;
    assert!(
        h2.iter().all(|body| body.contains(&format!(
            "x-meshlet-peer-id: {}",
            identity("shop", "client")
        ))),
        "{h2:?}"
    );

    // Opaque TCP through CONNECT: a meshed destination travels over meshlet/tcp.
    let echoed =
        tokio::task::spawn_blocking(move || tunnel_echo(client_out, echo, b"ping over mtls\n"))
            .await
            .unwrap();
    assert_eq!(echoed, b"ping over mtls\n");

    let client_metrics = client.metrics();
    let server_metrics = server.metrics();
    let server_id = format!("peer_identity=\"{}\"", identity("shop", "server"));
    let client_id = format!("peer_identity=\"{}\"", identity("shop", "client"));
    assert!(
        sum_metric(
            &client_metrics,
            "meshlet_requests_total",
            &[
                "direction=\"outbound\"",
                "tls=\"true\"",
                &server_id,
                "status_code=\"200\""
            ]
        ) >= 21.0
    );
    assert!(
        sum_metric(
            &server_metrics,
            "meshlet_requests_total",
            &[
                "direction=\"inbound\"",
                "tls=\"true\"",
                &client_id,
                "status_code=\"200\""
            ]
        ) >= 21.0
    );
    assert_eq!(
        sum_metric(
            &server_metrics,
            "meshlet_requests_total",
            &["direction=\"inbound\"", "status_code=\"403\""]
        ),
        1.0
    );
    assert_eq!(
        sum_metric(
            &client_metrics,
            "meshlet_requests_total",
            &["tls=\"false\"", "method=\"GET\""]
        ),
        0.0
    );
    // The opaque tunnel is counted as mTLS with the peer's identity on both sides.
    assert!(
        sum_metric(
            &client_metrics,
            "meshlet_tcp_connections_opened_total",
            &["direction=\"outbound\"", "tls=\"true\"", &server_id]
        ) >= 1.0,
        "{client_metrics}"
    );
    assert!(
        sum_metric(
            &server_metrics,
            "meshlet_tcp_connections_opened_total",
            &["direction=\"inbound\"", "tls=\"true\"", &client_id]
        ) >= 1.0,
        "{server_metrics}"
    );

    // The inbound port wants TLS 1.3 and a client certificate.
    let inbound = server_inbound.to_string();
    let out = tokio::task::spawn_blocking(move || {
        // stdin stays open for a moment, so s_client is still there to read the server's alert.
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sleep 1 | openssl s_client -connect {inbound} -alpn meshlet/h2 -tls1_3"
            ))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("TLSv1.3"), "{text}");
    assert!(
        text.contains("Requested Signature Algorithms"),
        "no CertificateRequest: {text}"
    );
    assert!(
        text.contains("certificate required") || text.contains("alert number 116"),
        "{text}"
    );
    drop((client, intruder, server, cp));
}

async fn h2_get_many(proxy: SocketAddr, app: SocketAddr, n: usize) -> Vec<String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                stream,
            ))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get(format!("http://{app}/h2/{i}"))
                .body(http_body_util::Empty::new())
                .unwrap();
            let rsp = sender.send_request(req).await.unwrap();
            assert_eq!(rsp.status(), 200);
            String::from_utf8(rsp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        bodies.push(t.await.unwrap());
    }
    bodies
}

fn tunnel_echo(proxy: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(format!("CONNECT {dst} HTTP/1.1\r\nHost: {dst}\r\n\r\n").as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream.write_all(payload).unwrap();
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed).unwrap();
    echoed
}

/// Certificates rotate every couple of seconds while traffic flows: nothing fails, new mTLS connections
/// (one per CONNECT tunnel) use the new certificates, and renewal survives a control-plane outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_and_control_plane_outage() {
    let Some(binary) = control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    let workloads = [("shop", "client"), ("shop", "server")];
    let (api, admin): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    let cp = ControlPlane::launch(&binary, &workloads, "4s", api, admin, TempDir::new("cp"));
    let app = header_echo_app().await;
    let echo = tcp_echo().await;
    let server_inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = TempDir::new("mesh");
    let mesh = mesh_file(
        &dir,
        &identity("shop", "server"),
        &[app, echo],
        server_inbound,
    );
    let _server = start_sidecar(&cp, &mesh, server_inbound, "shop", "server");
    let client = start_client_sidecar(&cp, &mesh, "shop", "client");
    let issued_at_start = cp.issued();

    let outbound = client.outbound;
    let traffic = |seconds: u64| {
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let (mut ok, mut failed) = (0u32, Vec::new());
            while Instant::now() < deadline {
                let req = format!(
                    "GET http://{app}/tick HTTP/1.1\r\nHost: {app}\r\nConnection: close\r\n\r\n"
                );
                match raw_request(outbound, req.as_bytes()) {
                    Ok(rsp) if rsp.status == 200 => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                if tunnel_echo(outbound, echo, b"rotate\n") == b"rotate\n" {
                    ok += 1;
                } else {
                    failed.push("tunnel echo mismatch".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
    };
    let (ok, failed) = traffic(7).await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} failed during rotation: {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(3)]
    );
    let rotations = cp.issued() - issued_at_start;
    assert!(
        rotations >= 6.0,
        "expected at least three renewals per sidecar, saw {rotations} issuances"
    );

    // Control plane down for longer than a renewal period: certificates are still valid, traffic goes on.
    let data = cp.stop();
    let (ok, failed) = traffic(2).await.unwrap();
    assert!(
        failed.is_empty() && ok > 0,
        "traffic failed without the control plane: {failed:?}"
    );
    // Back on the same address and CA: renewal resumes.
    let cp = ControlPlane::launch(&binary, &workloads, "4s", api, admin, data);
    let deadline = Instant::now() + Duration::from_secs(15);
    while cp.issued() < 2.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cp.issued() >= 2.0,
        "sidecars did not renew after the control plane returned"
    );
    let (_, failed) = traffic(1).await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
}

/// A destination that proves another identity than the mesh expects, or a peer from another CA, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_identity_and_foreign_ca_are_refused() {
    let Some(binary) = control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    let cp = start_control_plane(&binary, &[("shop", "client"), ("shop", "server")]);
    let other_ca = start_control_plane(&binary, &[("shop", "client")]);
    let app = header_echo_app().await;
    let server_inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = TempDir::new("mesh");
    // The mesh says the endpoint is `payment`, but the sidecar there is `server`.
    let wrong = mesh_file(&dir, &identity("shop", "payment"), &[app], server_inbound);
    let _server = start_sidecar(&cp, &wrong, server_inbound, "shop", "server");
    let client = start_client_sidecar(&cp, &wrong, "shop", "client");
    let rsp = get_through(client.outbound, app).await;
    assert_eq!(rsp.status, 502, "{rsp:?}");
    assert_eq!(rsp.header("x-meshlet-error"), Some("tls-handshake-failed"));

    // A client whose certificate comes from another CA: the right identity, the wrong trust anchor.
    let dir2 = TempDir::new("mesh2");
    let right = mesh_file(&dir2, &identity("shop", "server"), &[app], server_inbound);
    let foreign = start_client_sidecar(&other_ca, &right, "shop", "client");
    let rsp = get_through(foreign.outbound, app).await;
    assert_eq!(rsp.status, 502, "{rsp:?}");
    assert_eq!(rsp.header("x-meshlet-error"), Some("tls-handshake-failed"));
}
