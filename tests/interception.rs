//! Transparent interception end to end, as root: two "pods" (network namespaces joined by a veth pair), each
//! with `meshlet init` and a `meshlet proxy` running as the proxy uid. An unmodified `curl` in the client pod
//! calls a real HTTP server in the server pod; the request must pass through the client's outbound listener
//! and the server's inbound listener, and neither proxy's own upstream connection may be redirected back
//! into a proxy.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::fs;
use std::time::Duration;

use netns::{wait_for, Background, Netns, SharedDir};

const CLIENT_IP: &str = "10.200.0.1";
const SERVER_IP: &str = "10.200.0.2";
const APP_PORT: u16 = 8080;
/// The uid `meshlet init` exempts by default.
const PROXY_UID: &str = "2102";
const PAGE: &str = "hello from the server pod\n";

/// One pod's sidecar: the proxy process, and the namespace to reach its admin listener from.
struct Sidecar {
    process: Background,
    name: &'static str,
}

/// Runs `meshlet init`, then `meshlet proxy` as the proxy uid, and waits until the proxy is ready.
fn start_sidecar(pod: &Netns, meshlet: &str, dir: &SharedDir, name: &'static str) -> Sidecar {
    pod.run(&[meshlet, "init"]);
    let log = dir.path().join(format!("{name}-proxy.log"));
    let argv = [
        "setpriv",
        "--reuid",
        PROXY_UID,
        "--regid",
        PROXY_UID,
        "--clear-groups",
        meshlet,
        "proxy",
    ];
    let mut process = pod.spawn(&argv, &log);
    wait_for(
        &format!("the {name} proxy's /ready"),
        Duration::from_secs(30),
        || {
            process.assert_running(&format!("the {name} proxy"));
            let status = curl_in(
                pod,
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:15020/ready",
                ],
            );
            (status.as_deref() == Some("200")).then_some(())
        },
    );
    Sidecar { process, name }
}

/// Runs curl as root inside the pod; stdout when it succeeds.
fn curl_in(pod: &Netns, args: &[&str]) -> Option<String> {
    let output = pod
        .command(&[&["curl", "--max-time", "5"], args].concat())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Sum of the `meshlet_requests_total` samples of one direction whose labels contain all of `labels`.
fn requests(metrics: &str, direction: &str, labels: &[&str]) -> f64 {
    let direction = format!("direction=\"{direction}\"");
    common::sum_metric(
        metrics,
        "meshlet_requests_total",
        &[&[direction.as_str()], labels].concat(),
    )
}

/// The `meshlet_requests_total` samples, for failure messages.
fn request_samples(metrics: &str) -> String {
    let samples: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("meshlet_requests_total"))
        .collect();
    samples.join("\n")
}

#[test]
fn curl_reaches_the_server_through_both_sidecars() {
    let Some(_lock) = netns::lock_if_root("curl_reaches_the_server_through_both_sidecars") else {
        return;
    };

    // A process running as the proxy uid cannot read the build directory under /root.
    let dir = SharedDir::create("interception");
    let meshlet = dir.install_executable(common::MESHLET);
    let meshlet = meshlet.to_str().expect("utf-8 path");
    let www = dir.path().join("www");
    fs::create_dir(&www).expect("create www");
    fs::write(www.join("index.html"), PAGE).expect("write index.html");

    let client = Netns::create("cli");
    let server = Netns::create("srv");
    // The veth pair is created inside the client pod with its peer placed straight into the server pod, so it
    // never appears in the host's namespace; deleting the namespaces deletes it.
    let (client_if, server_if) = (
        format!("mc{}", std::process::id()),
        format!("ms{}", std::process::id()),
    );
    client.run(&[
        "ip",
        "link",
        "add",
        &client_if,
        "type",
        "veth",
        "peer",
        "name",
        &server_if,
        "netns",
        server.name(),
    ]);
    for (pod, interface, ip) in [
        (&client, &client_if, CLIENT_IP),
        (&server, &server_if, SERVER_IP),
    ] {
        pod.run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", interface]);
        pod.run(&["ip", "link", "set", interface, "up"]);
    }

    // The server pod's app, up before interception starts so that its readiness check is not proxied.
    let app_url = format!("http://{SERVER_IP}:{APP_PORT}/");
    let www = www.to_str().expect("utf-8 path");
    let port = APP_PORT.to_string();
    let mut app = server.spawn(
        &[
            "python3",
            "-m",
            "http.server",
            &port,
            "--bind",
            SERVER_IP,
            "--directory",
            www,
        ],
        &dir.path().join("app.log"),
    );
    wait_for("the server app", Duration::from_secs(30), || {
        app.assert_running("the server app (python3 -m http.server)");
        curl_in(&server, &["-s", &app_url]).filter(|body| body == PAGE)
    });

    let server_sidecar = start_sidecar(&server, meshlet, &dir, "server");
    let client_sidecar = start_sidecar(&client, meshlet, &dir, "client");
    let logs = || {
        [&server_sidecar, &client_sidecar]
            .map(|sidecar| format!("--- {} proxy log\n{}", sidecar.name, sidecar.process.log()))
            .join("\n")
            + &format!("--- app log\n{}", app.log())
    };

    // The app in the client pod knows nothing of the proxy: a plain request to the server's address.
    let response = client
        .command(&["curl", "-sS", "--max-time", "10", "-D", "-", &app_url])
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&response.stdout);
    assert!(
        response.status.success() && stdout.ends_with(PAGE),
        "curl {app_url} from the client pod failed: {}\n{}",
        netns::describe(&response),
        logs()
    );

    let destination = format!("destination=\"{SERVER_IP}:{APP_PORT}\"");
    let metrics_of =
        |pod: &Netns| curl_in(pod, &["-sS", "http://127.0.0.1:15020/metrics"]).unwrap_or_default();
    // Counters are recorded as the exchange ends, which may be a moment after curl has its response.
    let (client_metrics, server_metrics) = wait_for(
        "both sidecars to count the request",
        Duration::from_secs(10),
        || {
            let (client_metrics, server_metrics) = (metrics_of(&client), metrics_of(&server));
            let counted = requests(&client_metrics, "outbound", &[]) >= 1.0
                && requests(&server_metrics, "inbound", &[]) >= 1.0;
            counted.then_some((client_metrics, server_metrics))
        },
    );

    // Exactly one request, through the client's outbound and the server's inbound listener. A proxy whose
    // upstream connection were redirected back into a proxy would count it again (or never finish): the server
    // proxy's connection to the app, made as the proxy uid, must not pass its own outbound listener.
    let expected = [
        ("client", &client_metrics, "outbound", 1.0),
        ("server", &server_metrics, "inbound", 1.0),
        ("server", &server_metrics, "outbound", 0.0),
        ("client", &client_metrics, "inbound", 0.0),
    ];
    let to_the_app = [destination.as_str(), "status_code=\"200\""];
    for (pod, metrics, direction, count) in expected {
        let seen = format!(
            "{pod} sidecar, {direction}:\n{}\n{}",
            request_samples(metrics),
            logs()
        );
        assert_eq!(requests(metrics, direction, &[]), count, "{seen}");
        assert_eq!(requests(metrics, direction, &to_the_app), count, "{seen}");
    }

    // The app itself saw the request come from its own pod's address (the server sidecar), never straight from
    // the client pod; the other request in its log is the readiness check made before interception started.
    let app_log = app.log();
    let requests_seen: Vec<&str> = app_log
        .lines()
        .filter(|line| line.contains("\"GET / HTTP/1.1\""))
        .collect();
    assert_eq!(requests_seen.len(), 2, "app log:\n{app_log}");
    assert!(
        requests_seen
            .iter()
            .all(|line| line.starts_with(&format!("{SERVER_IP} "))),
        "app log:\n{app_log}"
    );
}
