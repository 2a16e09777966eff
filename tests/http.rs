//! HTTP/1.1 through the proxy as real clients use it: explicit proxy with curl, keep-alive, large streaming
//! bodies with bounded memory, metrics that pass promtool, bad configuration, and graceful drain.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

const MIB: usize = 1024 * 1024;

/// An origin with `/echo-headers`, `/upload` (counts the body), `/download?mib=N` (streams N MiB) and
/// `/slow` (answers after two seconds).
async fn test_origin() -> SocketAddr {
    origin(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/upload" => {
                let mut body = req.into_body();
                let mut total = 0usize;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(frame) => total += frame.data_ref().map_or(0, |d| d.len()),
                        Err(_) => {
                            return Response::builder()
                                .status(400)
                                .body(full("broken body"))
                                .unwrap()
                        }
                    }
                }
                Response::new(full(total.to_string()))
            }
            "/download" => {
                let mib: usize = req
                    .uri()
                    .query()
                    .and_then(|q| q.strip_prefix("mib="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                let chunk = Bytes::from(vec![b'x'; MIB]);
                let frames =
                    futures_util::stream::iter((0..mib).map(move |_| {
                        Ok::<_, meshlet::proxy::BoxError>(Frame::data(chunk.clone()))
                    }));
                Response::builder()
                    .header("content-length", (mib * MIB).to_string())
                    .body(BodyExt::boxed(StreamBody::new(frames)))
                    .unwrap()
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Response::new(full("slow done"))
            }
            _ => {
                let mut seen = String::new();
                for (name, value) in req.headers() {
                    seen.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
                }
                Response::new(full(seen))
            }
        }
    })
    .await
}

fn get(proxy: SocketAddr, origin: SocketAddr, path: &str) -> RawResponse {
    let req = format!(
        "GET http://{origin}{path} HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n"
    );
    raw_request(proxy, req.as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_proxy_with_curl_absolute_form_and_connect() {
    if !have("curl") {
        return skip_or_fail("curl is not installed");
    }
    let origin = test_origin().await;
    let proxy = Proxy::start(&[]);
    let url = format!("http://{origin}/hello");
    let proxy_url = format!("http://{}", proxy.outbound);
    let absolute = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-x",
            &proxy_url,
            "-H",
            "x-request-id: req-1",
        ])
        .args([
            "-H",
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            &url,
        ])
        .output()
        .unwrap();
    assert!(absolute.status.success(), "{absolute:?}");
    let seen = String::from_utf8_lossy(&absolute.stdout);
    assert!(seen.contains("x-request-id: req-1"), "{seen}");
    assert!(
        seen.contains("traceparent: 00-0af7651916cd43dd8448eb211c80319c"),
        "{seen}"
    );
    assert!(seen.contains(&format!("host: {origin}")), "{seen}");
    assert!(
        !seen.contains("proxy-connection"),
        "hop-by-hop header forwarded: {seen}"
    );

    // -p makes curl tunnel through CONNECT; the proxy relays opaque bytes.
    let tunnel = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-p", "-x", &proxy_url, &url])
        .output()
        .unwrap();
    assert!(tunnel.status.success(), "{tunnel:?}");
    assert!(String::from_utf8_lossy(&tunnel.stdout).contains(&format!("host: {origin}")));

    let dst = format!("destination=\"{origin}\"");
    // The tunnel's close is recorded when the proxy sees both sides finish, a moment after curl exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.metric_sum("meshlet_tcp_connections_closed_total", &[&dst]) < 1.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = proxy.metrics();
    assert_eq!(
        sum_metric(
            &metrics,
            "meshlet_requests_total",
            &[&dst, "method=\"GET\"", "status_code=\"200\""]
        ),
        1.0
    );
    assert_eq!(
        sum_metric(&metrics, "meshlet_requests_total", &["method=\"CONNECT\""]),
        1.0
    );
    assert_eq!(
        sum_metric(&metrics, "meshlet_tcp_connections_closed_total", &[&dst]),
        1.0
    );
    assert!(
        sum_metric(
            &metrics,
            "meshlet_tcp_bytes_total",
            &[&dst, "flow=\"from_upstream\""]
        ) > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_upstream_connections() {
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(full("ok")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let proxy = Proxy::start(&[]);
    let outbound = proxy.outbound;
    tokio::task::spawn_blocking(move || {
        let mut client = TcpStream::connect(outbound).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        for _ in 0..20 {
            let req = format!("GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\n\r\n");
            client.write_all(req.as_bytes()).unwrap();
            let rsp = read_response(&mut client).unwrap();
            assert_eq!(rsp.status, 200);
            assert_eq!(rsp.body, b"ok");
        }
    })
    .await
    .unwrap();
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "20 sequential requests should share one upstream connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_in_bounded_memory() {
    let origin = test_origin().await;
    let proxy = Proxy::start(&[]);
    let outbound = proxy.outbound;
    let before = proxy.vm_hwm_kib();
    let upload_mib = 128;
    tokio::task::spawn_blocking(move || {
        let mut client = TcpStream::connect(outbound).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let head = format!(
            "POST http://{origin}/upload HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {}\r\n\r\n",
            upload_mib * MIB
        );
        client.write_all(head.as_bytes()).unwrap();
        let chunk = vec![b'u'; MIB];
        for _ in 0..upload_mib {
            client.write_all(&chunk).unwrap();
        }
        let rsp = read_response(&mut client).unwrap();
        assert_eq!(rsp.status, 200);
        assert_eq!(
            String::from_utf8_lossy(&rsp.body),
            (upload_mib * MIB).to_string()
        );

        let req =
            format!("GET http://{origin}/download?mib=128 HTTP/1.1\r\nHost: {origin}\r\n\r\n");
        client.write_all(req.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            client.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut remaining = 128 * MIB;
        let mut buf = vec![0u8; 256 * 1024];
        while remaining > 0 {
            let n = client.read(&mut buf[..remaining.min(256 * 1024)]).unwrap();
            assert!(n > 0, "download ended {remaining} bytes early");
            remaining -= n;
        }
    })
    .await
    .unwrap();
    let grown_kib = proxy.vm_hwm_kib().saturating_sub(before);
    assert!(
        grown_kib < 64 * 1024,
        "peak RSS grew by {grown_kib} KiB while streaming 256 MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    if !have("promtool") {
        return skip_or_fail("promtool (Debian package prometheus) is not installed");
    }
    let origin = test_origin().await;
    let proxy = Proxy::start(&[]);
    let outbound = proxy.outbound;
    tokio::task::spawn_blocking(move || {
        assert_eq!(get(outbound, origin, "/a").status, 200);
        assert_eq!(
            get(outbound, "127.0.0.1:1".parse().unwrap(), "/").status,
            502
        );
        let weird =
            format!("PURGE http://{origin}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_eq!(raw_request(outbound, weird.as_bytes()).unwrap().status, 200);
    })
    .await
    .unwrap();
    let exposition = proxy.metrics();
    assert!(
        exposition.contains("method=\"OTHER\""),
        "non-standard methods must be bounded to OTHER"
    );
    assert!(exposition.contains("process_resident_memory_bytes"));
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && findings.trim().is_empty(),
        "promtool findings:\n{findings}"
    );
}

#[test]
fn bad_configuration_names_the_setting_and_value() {
    let out = Command::new(MESHLET)
        .args(["proxy", "--connect-timeout", "soonish"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--connect-timeout") && err.contains("soonish"),
        "{err}"
    );

    let out = Command::new(MESHLET)
        .args(["proxy"])
        .env("MESHLET_ADMIN_ADDR", "localhost")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin-addr") && err.contains("localhost"),
        "{err}"
    );

    // A busy port is reported with the listener's name and address, before anything is served.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = Command::new(MESHLET)
        .args([
            "proxy",
            "--outbound-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            &addr,
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inbound") && err.contains(&addr), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_gracefully() {
    let origin = test_origin().await;
    let mut proxy = Proxy::start(&["--drain-delay", "1s", "--drain-timeout", "10s"]);
    let outbound = proxy.outbound;
    let slow = tokio::task::spawn_blocking(move || get(outbound, origin, "/slow"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    proxy.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Still inside the drain delay: new requests are served (the app may still be calling out).
    let during = tokio::task::spawn_blocking(move || get(outbound, origin, "/during"))
        .await
        .unwrap();
    assert_eq!(during.status, 200);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "the in-flight request must complete");
    assert_eq!(slow.body, b"slow done");
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = proxy.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let status = status.expect("proxy did not exit after draining");
    assert!(status.success(), "proxy exited with {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(12),
        "exit must come within drain delay + drain timeout"
    );
}

/// A long-lived tunnel (a broker or database connection) shows its bytes while it is open, not only once
/// it closes.
#[test]
fn tunnel_bytes_are_counted_while_the_tunnel_is_open() {
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = echo.accept() {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    let proxy = Proxy::start(&[]);
    let mut tunnel = TcpStream::connect(proxy.outbound).unwrap();
    tunnel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        tunnel,
        "CONNECT {echo_addr} HTTP/1.1\r\nHost: {echo_addr}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tunnel.read(&mut byte).unwrap(), 1, "tunnel head cut short");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    let payload = [7u8; 3000];
    tunnel.write_all(&payload).unwrap();
    let mut echoed = vec![0u8; payload.len()];
    tunnel.read_exact(&mut echoed).unwrap();

    let dst = format!("destination=\"{echo_addr}\"");
    let counted = |flow: &str| {
        proxy.metric_sum(
            "meshlet_tcp_bytes_total",
            &[&dst, &format!("flow=\"{flow}\"")],
        )
    };
    assert_eq!(counted("to_upstream"), 3000.0);
    assert_eq!(counted("from_upstream"), 3000.0);
    assert_eq!(
        proxy.metric_sum("meshlet_tcp_connections_closed_total", &[&dst]),
        0.0,
        "the tunnel is still open"
    );
}
