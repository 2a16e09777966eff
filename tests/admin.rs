//! The admin port's helpers for Kubernetes: `meshlet wait-ready` (the injected postStart hook) and the
//! application probes the injector rewrote to `/app-health/...`.

mod common;

use std::process::Command;

use common::*;
use http::{Request, Response};
use hyper::body::Incoming;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_returns_once_the_proxy_is_ready_and_fails_otherwise() {
    let proxy = Proxy::start(&[]);
    let admin = proxy.admin.to_string();
    let ok = Command::new(MESHLET)
        .args(["wait-ready", "--admin-addr", &admin, "--timeout", "5s"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let nowhere = format!("127.0.0.1:{}", free_port());
    let failed = Command::new(MESHLET)
        .args(["wait-ready", "--admin-addr", &nowhere, "--timeout", "1s"])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains(&nowhere));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_probes_reach_the_application() {
    let app = origin(|req: Request<Incoming>| async move {
        let status = match req.uri().path() {
            "/healthz" if req.headers().get("x-probe").is_some_and(|v| v == "kubelet") => 200,
            "/healthz" => 401,
            _ => 500,
        };
        Response::builder().status(status).body(full("")).unwrap()
    })
    .await;
    let closed = free_port();
    let probes = format!(
        r#"{{"/app-health/app/livez":{{"port":{p},"path":"/healthz","scheme":"HTTP","headers":[{{"name":"x-probe","value":"kubelet"}}]}},
            "/app-health/app/readyz":{{"port":{p},"path":"/broken","scheme":"HTTP"}},
            "/app-health/app/startupz":{{"port":{closed},"path":"/","scheme":"HTTP"}}}}"#,
        p = app.port()
    );
    let proxy = Proxy::start(&["--app-probes", &probes]);
    let admin = proxy.admin;
    let status = move |path: &'static str| {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        raw_request(admin, req.as_bytes()).unwrap().status
    };
    let statuses = tokio::task::spawn_blocking(move || {
        [
            status("/app-health/app/livez"),
            status("/app-health/app/readyz"),
            status("/app-health/app/startupz"),
            status("/app-health/other/livez"),
        ]
    })
    .await
    .unwrap();
    assert_eq!(statuses, [200, 500, 503, 404]);

    let bad = Command::new(MESHLET)
        .args([
            "proxy",
            "--outbound-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .args(["--app-probes", "{not json"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("MESHLET_APP_PROBES"),
        "{bad:?}"
    );
}
