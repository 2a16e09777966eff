//! gRPC and HTTP/2 through the explicit proxy: a real grpcio server and client (unary, server streaming,
//! 12.5 MiB of streamed messages, bidirectional streaming, a failing call with details and custom trailers), and 200 concurrent h2c streams on one connection.

mod common;
#[path = "common/mesh.rs"]
mod mesh;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

/// Runs the grpcio client against `connect_addr` with `:authority` = `server`, and returns what it saw.
fn grpc_calls(connect_addr: SocketAddr, server: SocketAddr) -> Value {
    let out = run_python(
        "grpc_client.py",
        &[&connect_addr.to_string(), &server.to_string()],
        Duration::from_secs(60),
    );
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("grpc_client.py printed {out:?}: {e}"))
}

/// A JSON array of strings.
fn strings(array: &Value) -> Vec<&str> {
    let items = array
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {array}"));
    items.iter().map(|v| v.as_str().unwrap()).collect()
}

#[test]
fn grpc_unary_streaming_bidi_and_errors_keep_trailers_and_status() {
    let Some(server) = python_server_or_skip("grpc_server.py", "grpc", "grpcio") else {
        return;
    };
    let proxy = Proxy::start(&[]);
    let seen = grpc_calls(proxy.outbound, server.addr());

    let unary = &seen["unary"];
    assert_eq!(unary["code"], "OK", "{seen}");
    assert_eq!(
        unary["reply"], "echo:hello id=req-42",
        "x-request-id must reach the server: {seen}"
    );
    assert_eq!(unary["trailers"]["x-echo-trailer"], "unary-done", "{seen}");

    let stream = &seen["stream"];
    assert_eq!(stream["code"], "OK", "{seen}");
    let items: Vec<&str> = strings(&stream["items"]);
    let expected: Vec<String> = (0..50).map(|i| format!("item {i}")).collect();
    assert_eq!(items, expected, "every streamed message, in order");
    assert_eq!(stream["trailers"]["x-stream-count"], "50", "{seen}");

    let bulk = &seen["bulk"];
    assert_eq!(bulk["code"], "OK", "{seen}");
    assert_eq!(bulk["count"], 200, "{seen}");
    assert_eq!(bulk["bytes"], 200 * 65536, "{seen}");
    assert_eq!(bulk["in_order"], true, "{seen}");

    let chat = &seen["chat"];
    assert_eq!(chat["code"], "OK", "{seen}");
    let replies: Vec<&str> = strings(&chat["replies"]);
    let expected: Vec<String> = (0..20).map(|i| format!("re:m{i}")).collect();
    assert_eq!(replies, expected, "bidirectional stream, in order");
    assert_eq!(chat["trailers"]["x-chat-count"], "20", "{seen}");

    let fail = &seen["fail"];
    assert_eq!(fail["code"], "FAILED_PRECONDITION", "{seen}");
    assert_eq!(fail["details"], "cannot serve order-7", "{seen}");
    assert_eq!(
        fail["trailers"]["x-failure-reason"], "out-of-stock",
        "{seen}"
    );
    assert_eq!(
        fail["trailers"]["x-failure-bin"],
        serde_json::json!([0, 1, 254]),
        "binary trailer: {seen}"
    );

    // The calls really went through the proxy, as h2, and reached the server.
    let metrics = proxy.metrics();
    assert!(
        sum_metric(
            &metrics,
            "meshlet_protocol_detected_total",
            &["protocol=\"h2\""]
        ) >= 1.0,
        "{metrics}"
    );
    let destination = format!("destination=\"{}\"", server.addr());
    assert_eq!(
        sum_metric(&metrics, "meshlet_requests_total", &[&destination, "method=\"POST\"", "status_code=\"200\""]),
        5.0,
        "unary, streaming, bulk, chat and failing calls are all HTTP 200 (gRPC status lives in trailers):\n{metrics}"
    );
}

/// 200 requests in flight at once on one client connection: the origin holds each response until all 200
/// have arrived, so the test passes only if the proxy multiplexes them both ways.
#[test]
fn h2c_two_hundred_concurrent_streams_on_one_connection() {
    const STREAMS: usize = 200;
    let arrived = Arc::new(tokio::sync::Barrier::new(STREAMS));
    let connections = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let origin = rt.block_on(counting_h2_origin(arrived, connections.clone()));
    let proxy = Proxy::start(&[]);

    let bodies = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(proxy.outbound)
            .await
            .unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2c handshake with the proxy");
        tokio::spawn(conn);
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..STREAMS {
            let mut sender = sender.clone();
            calls.spawn(async move {
                let req = http::Request::get(format!("http://{origin}/stream/{i}"))
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap();
                let rsp = sender.send_request(req).await.expect("response");
                assert_eq!(rsp.status(), 200, "stream {i}");
                let body = rsp.into_body().collect().await.expect("body").to_bytes();
                (i, String::from_utf8_lossy(&body).to_string())
            });
        }
        tokio::time::timeout(Duration::from_secs(60), calls.join_all())
            .await
            .expect("all streams finished")
    });
    assert_eq!(bodies.len(), STREAMS);
    for (i, body) in bodies {
        assert_eq!(
            body,
            format!("/stream/{i}"),
            "each stream gets its own answer"
        );
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the proxy multiplexed every stream on one upstream connection"
    );
    let metrics = proxy.metrics();
    assert_eq!(
        sum_metric(
            &metrics,
            "meshlet_protocol_detected_total",
            &["protocol=\"h2\""]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sum_metric(
            &metrics,
            "meshlet_requests_total",
            &["method=\"GET\"", "status_code=\"200\""]
        ),
        STREAMS as f64,
        "{metrics}"
    );
}

/// An h2c origin that counts its connections and answers each request with its path once `arrived` has
/// seen every request (or after 20 s, with 503, so a proxy that serialises streams fails instead of hanging).
async fn counting_h2_origin(
    arrived: Arc<tokio::sync::Barrier>,
    connections: Arc<AtomicUsize>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            connections.fetch_add(1, Ordering::SeqCst);
            let arrived = arrived.clone();
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let arrived = arrived.clone();
                    async move {
                        let all_in_flight =
                            tokio::time::timeout(Duration::from_secs(20), arrived.wait())
                                .await
                                .is_ok();
                        let mut rsp = http::Response::new(full(req.uri().path().to_string()));
                        if !all_in_flight {
                            *rsp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(rsp)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// The same gRPC calls between two sidecars over mTLS: the client sidecar sends HTTP/2 to the server's
/// sidecar (ALPN `meshlet/h2`), which verifies the caller and delivers to the grpcio server; status,
/// details, trailers and streams arrive intact.
#[test]
fn grpc_over_mtls_between_sidecars() {
    let Some(binary) = mesh::control_plane_binary() else {
        return skip_or_fail("meshlet-control is not built (run `cargo build --workspace`)");
    };
    let Some(server) = python_server_or_skip("grpc_server.py", "grpc", "grpcio") else {
        return;
    };
    let cp = mesh::start_control_plane(&binary, &[("shop", "client"), ("shop", "inventory")]);
    let server_inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = mesh::TempDir::new("grpc-mtls");
    let mesh_file = mesh::mesh_file(
        &dir,
        &mesh::identity("shop", "inventory"),
        &[server.addr()],
        server_inbound,
    );
    let server_sidecar = mesh::start_sidecar(&cp, &mesh_file, server_inbound, "shop", "inventory");
    let client = mesh::start_sidecar(
        &cp,
        &mesh_file,
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        "shop",
        "client",
    );

    let seen = grpc_calls(client.outbound, server.addr());
    assert_eq!(seen["unary"]["code"], "OK", "{seen}");
    assert_eq!(
        seen["unary"]["trailers"]["x-echo-trailer"], "unary-done",
        "{seen}"
    );
    assert_eq!(strings(&seen["stream"]["items"]).len(), 50, "{seen}");
    assert_eq!(seen["bulk"]["bytes"], 200 * 65536, "{seen}");
    assert_eq!(seen["fail"]["code"], "FAILED_PRECONDITION", "{seen}");
    assert_eq!(
        seen["fail"]["trailers"]["x-failure-reason"], "out-of-stock",
        "{seen}"
    );

    let peer = format!("peer_identity=\"{}\"", mesh::identity("shop", "client"));
    let inbound = server_sidecar.metric_sum(
        "meshlet_requests_total",
        &["direction=\"inbound\"", "tls=\"true\"", &peer],
    );
    assert!(
        inbound >= 5.0,
        "the server sidecar saw {inbound} mTLS requests from the client"
    );
    let plain = client.metric_sum(
        "meshlet_requests_total",
        &["direction=\"outbound\"", "tls=\"false\""],
    );
    assert_eq!(plain, 0.0, "every call must have gone over mTLS");
}
