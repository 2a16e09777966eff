//! Transparent interception end to end, as root: two "pods" (network namespaces joined by a veth pair), each
//! with `meshlet init` and a `meshlet proxy` running as the proxy uid. An unmodified `curl` in the client pod
//! calls a real HTTP server in the server pod; the request must pass through the client's outbound listener
//! and the server's inbound listener, and neither proxy's own upstream connection may be redirected back
//! into a proxy. Once over IPv4 (iptables) and once over IPv6 (ip6tables).

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::fs;
use std::time::Duration;

use netns::{wait_for, Background, Netns, SharedDir};

/// The pods' addresses in one family.
struct Family {
    client_ip: &'static str,
    server_ip: &'static str,
    prefix_len: &'static str,
    /// The proxy's inbound listener takes one address, `0.0.0.0:15006` by default: an IPv6 pod needs `[::]`.
    inbound_addr: &'static str,
}

const IPV4: Family = Family {
    client_ip: "10.200.0.1",
    server_ip: "10.200.0.2",
    prefix_len: "24",
    inbound_addr: "0.0.0.0:15006",
};
const IPV6: Family = Family {
    client_ip: "fd00:200::1",
    server_ip: "fd00:200::2",
    prefix_len: "64",
    inbound_addr: "[::]:15006",
};
const APP_PORT: u16 = 8080;
/// The uid `meshlet init` exempts by default.
const PROXY_UID: &str = "2102";
const PAGE: &str = "hello from the server pod\n";

/// One pod's sidecar: its proxy process and a name for messages.
struct Sidecar {
    process: Background,
    name: &'static str,
}

/// Two pods with their sidecars and the server's app. Fields drop in order: processes first, then the
/// namespaces (which takes the veth pair with them), then the directory holding the binary and the logs.
struct Pods {
    client_sidecar: Sidecar,
    server_sidecar: Sidecar,
    _extra_apps: Vec<Background>,
    app: Background,
    client: Netns,
    server: Netns,
    /// Held only to be removed last.
    _dir: SharedDir,
}

impl Pods {
    /// Builds both pods with addresses of one family, starts the app on the server's address, then
    /// intercepts both pods and starts their sidecars.
    fn start(family: &Family) -> Pods {
        Pods::start_with(family, &[], None)
    }

    /// Like [`Pods::start`], with more server-pod apps (argv lists) started before interception.
    /// `server_mesh`: a mesh file (YAML text) for the server pod's sidecar.
    fn start_with(family: &Family, extra_apps: &[&[&str]], server_mesh: Option<&str>) -> Pods {
        let Family {
            client_ip,
            server_ip,
            prefix_len,
            inbound_addr,
        } = *family;
        // A process running as the proxy uid cannot read the build directory under /root.
        let dir = SharedDir::create("interception");
        let meshlet = dir.install_executable(common::MESHLET);
        let meshlet = meshlet.to_str().expect("utf-8 path");
        let www = dir.path().join("www");
        fs::create_dir(&www).expect("create www");
        fs::write(www.join("index.html"), PAGE).expect("write index.html");

        let client = Netns::create("cli");
        let server = Netns::create("srv");
        // The veth pair is created inside the client pod with its peer placed straight into the server pod,
        // so it never appears in the host's namespace.
        let pid = std::process::id();
        let (client_if, server_if) = (format!("mc{pid}"), format!("ms{pid}"));
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
            (&client, &client_if, client_ip),
            (&server, &server_if, server_ip),
        ] {
            let address = format!("{ip}/{prefix_len}");
            let mut argv = vec!["ip", "addr", "add", &address, "dev", interface];
            if ip.contains(':') {
                // Usable at once, instead of after duplicate address detection.
                argv.push("nodad");
            }
            pod.run(&argv);
            pod.run(&["ip", "link", "set", interface, "up"]);
        }

        // The app, up before interception starts so that its readiness check is not proxied.
        let port = APP_PORT.to_string();
        let www = www.to_str().expect("utf-8 path");
        let mut app = server.spawn(
            &[
                "python3",
                "-m",
                "http.server",
                &port,
                "--bind",
                server_ip,
                "--directory",
                www,
            ],
            &dir.path().join("app.log"),
        );
        wait_for("the server app", Duration::from_secs(30), || {
            app.assert_running("the server app (python3 -m http.server)");
            curl_in(&server, &["-s", &app_url(server_ip)]).filter(|body| body == PAGE)
        });

        let mut extras = Vec::new();
        for (i, argv) in extra_apps.iter().enumerate() {
            extras.push(server.spawn(argv, &dir.path().join(format!("extra-{i}.log"))));
        }

        let proxy_args = ["--inbound-addr", inbound_addr];
        let mesh_path = dir.path().join("server-mesh.yaml");
        let mut server_args = proxy_args.to_vec();
        if let Some(mesh) = server_mesh {
            fs::write(&mesh_path, mesh).expect("write the server's mesh file");
            server_args.extend(["--mesh-config", mesh_path.to_str().expect("utf-8 path")]);
        }
        let server_sidecar = start_sidecar(&server, meshlet, &dir, "server", &server_args);
        let client_sidecar = start_sidecar(&client, meshlet, &dir, "client", &proxy_args);
        Pods {
            client_sidecar,
            server_sidecar,
            _extra_apps: extras,
            app,
            client,
            server,
            _dir: dir,
        }
    }

    /// Both proxies' logs and the app's, for failure messages.
    fn logs(&self) -> String {
        [&self.server_sidecar, &self.client_sidecar]
            .map(|sidecar| format!("--- {} proxy log\n{}", sidecar.name, sidecar.process.log()))
            .join("\n")
            + &format!("--- app log\n{}", self.app.log())
    }
}

/// Runs `meshlet init`, then `meshlet proxy` as the proxy uid, and waits until the proxy is ready.
fn start_sidecar(
    pod: &Netns,
    meshlet: &str,
    dir: &SharedDir,
    name: &'static str,
    proxy_args: &[&str],
) -> Sidecar {
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
    let mut process = pod.spawn(&[&argv[..], proxy_args].concat(), &log);
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

/// The app's address as `host:port`, with brackets around an IPv6 host.
fn app_authority(server_ip: &str) -> String {
    if server_ip.contains(':') {
        format!("[{server_ip}]:{APP_PORT}")
    } else {
        format!("{server_ip}:{APP_PORT}")
    }
}

fn app_url(server_ip: &str) -> String {
    format!("http://{}/", app_authority(server_ip))
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

/// Sends one plain request from the client pod's app to the server's app and checks that it went through
/// both sidecars, and only once through each.
fn assert_intercepted(pods: &Pods, server_ip: &str) {
    // The app in the client pod knows nothing of the proxy: a plain request to the server's address.
    let url = app_url(server_ip);
    let response = pods
        .client
        .command(&["curl", "-sS", "--max-time", "10", &url])
        .output()
        .expect("run curl");
    assert!(
        response.status.success() && response.stdout == PAGE.as_bytes(),
        "curl {url} from the client pod: {}\n{}",
        netns::describe(&response),
        pods.logs()
    );

    let metrics_of =
        |pod: &Netns| curl_in(pod, &["-sS", "http://127.0.0.1:15020/metrics"]).unwrap_or_default();
    // Counters are recorded as the exchange ends, which may be a moment after curl has its response.
    let (client_metrics, server_metrics) = wait_for(
        "both sidecars to count the request",
        Duration::from_secs(10),
        || {
            let (client_metrics, server_metrics) =
                (metrics_of(&pods.client), metrics_of(&pods.server));
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
    let destination = format!("destination=\"{}\"", app_authority(server_ip));
    let to_the_app = [destination.as_str(), "status_code=\"200\""];
    for (pod, metrics, direction, count) in expected {
        let seen = format!(
            "{pod} sidecar, {direction}:\n{}\n{}",
            request_samples(metrics),
            pods.logs()
        );
        assert_eq!(requests(metrics, direction, &[]), count, "{seen}");
        assert_eq!(requests(metrics, direction, &to_the_app), count, "{seen}");
    }

    // The app itself saw the request come from its own pod's address (the server sidecar), never straight from
    // the client pod; the other request in its log is the readiness check made before interception started.
    let app_log = pods.app.log();
    let seen_by_app: Vec<&str> = app_log
        .lines()
        .filter(|line| line.contains("\"GET / HTTP/1.1\""))
        .collect();
    assert_eq!(seen_by_app.len(), 2, "app log:\n{app_log}");
    assert!(
        seen_by_app
            .iter()
            .all(|line| line.starts_with(&format!("{server_ip} "))),
        "app log:\n{app_log}"
    );
}

#[test]
fn curl_reaches_the_server_through_both_sidecars() {
    let Some(_lock) = netns::lock_if_root("curl_reaches_the_server_through_both_sidecars") else {
        return;
    };
    let pods = Pods::start(&IPV4);
    assert_intercepted(&pods, IPV4.server_ip);
}

#[test]
fn curl_reaches_the_server_through_both_sidecars_over_ipv6() {
    let Some(_lock) =
        netns::lock_if_root("curl_reaches_the_server_through_both_sidecars_over_ipv6")
    else {
        return;
    };
    let pods = Pods::start(&IPV6);
    assert_intercepted(&pods, IPV6.server_ip);
}

/// A line-echo server that speaks first (an SMTP-style banner), and a plain echo server, in Python.
const BANNER_SERVER: &str = r#"
import socket, sys, threading
def serve(port, banner):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], port)); s.listen(16)
    while True:
        c, _ = s.accept()
        def talk(c=c):
            if banner: c.sendall(b"220 meshlet-test ready\r\n")
            while True:
                d = c.recv(4096)
                if not d: break
                c.sendall(d)
            c.close()
        threading.Thread(target=talk, daemon=True).start()
threading.Thread(target=serve, args=(25, True), daemon=True).start()
serve(9000, False)
"#;

/// Talks to the server pod's TCP apps from the client pod: waits for the banner, then echoes a line.
const TCP_CLIENT: &str = r#"
import socket, sys
host, port, banner = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "banner"
c = socket.create_connection((host, port), timeout=5)
if banner:
    got = c.recv(100)
    assert got.startswith(b"220 "), got
c.sendall(b"hello through two sidecars\n")
buf = b""
while not buf.endswith(b"\n"):
    d = c.recv(100)
    if not d: break
    buf += d
assert buf == b"hello through two sidecars\n", buf
print("ok")
"#;

/// Opaque TCP through both sidecars: Redis (an opaque port, `redis-cli`), a server-speaks-first protocol on
/// an opaque port (SMTP's 25: the banner must arrive without the client sending anything), and binary-ish
/// bytes on an ordinary port (detected as opaque).
#[test]
fn opaque_tcp_and_server_first_protocols_pass_both_sidecars() {
    let Some(_lock) =
        netns::lock_if_root("opaque_tcp_and_server_first_protocols_pass_both_sidecars")
    else {
        return;
    };
    for tool in ["redis-server", "redis-cli"] {
        if !common::have(tool) {
            return common::skip_or_fail(&format!(
                "{tool} is not installed (Debian package redis-server)"
            ));
        }
    }
    let ip = IPV4.server_ip;
    let redis = [
        "redis-server",
        "--bind",
        ip,
        "--port",
        "6379",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    let banner = ["python3", "-c", BANNER_SERVER, ip];
    let pods = Pods::start_with(&IPV4, &[&redis, &banner], None);
    wait_for(
        "redis and the banner server",
        Duration::from_secs(20),
        || {
            let up = pods
                .server
                .command(&["redis-cli", "-h", ip, "PING"])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&up.stdout).trim() == "PONG").then_some(())
        },
    );

    let redis_cli = |args: &[&str]| {
        let out = pods
            .client
            .command(&[&["redis-cli", "-h", ip], args].concat())
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        redis_cli(&["SET", "order:7", "placed"]),
        "OK",
        "{}",
        pods.logs()
    );
    assert_eq!(redis_cli(&["GET", "order:7"]), "placed", "{}", pods.logs());
    for (port, mode) in [("25", "banner"), ("9000", "plain")] {
        let out = pods
            .client
            .command(&["python3", "-c", TCP_CLIENT, ip, port, mode])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "port {port}: {}\n{}",
            netns::describe(&out),
            pods.logs()
        );
    }

    let metrics_of =
        |pod: &Netns| curl_in(pod, &["-sS", "http://127.0.0.1:15020/metrics"]).unwrap_or_default();
    let (client_metrics, server_metrics) = wait_for(
        "the sidecars to count the connections",
        Duration::from_secs(10),
        || {
            let (c, s) = (metrics_of(&pods.client), metrics_of(&pods.server));
            let closed = |m: &str, dir: &str| {
                common::sum_metric(
                    m,
                    "meshlet_tcp_connections_closed_total",
                    &[&format!("direction=\"{dir}\"")],
                )
            };
            (closed(&c, "outbound") >= 4.0 && closed(&s, "inbound") >= 4.0).then_some((c, s))
        },
    );
    for port in ["6379", "25", "9000"] {
        let dst = format!("destination=\"{ip}:{port}\"");
        for (m, dir) in [(&client_metrics, "outbound"), (&server_metrics, "inbound")] {
            let bytes = common::sum_metric(
                m,
                "meshlet_tcp_bytes_total",
                &[
                    &dst,
                    &format!("direction=\"{dir}\""),
                    "flow=\"from_upstream\"",
                ],
            );
            assert!(
                bytes > 0.0,
                "{dir} {dst}: no bytes counted\n{}",
                pods.logs()
            );
        }
    }
    assert_eq!(
        requests(&client_metrics, "outbound", &[]),
        0.0,
        "opaque traffic must not be parsed as HTTP"
    );
}

/// A service in strict mTLS mode refuses plaintext: the client pod's sidecar has no identity, so its
/// redirected connection reaches the server pod's sidecar in plaintext and is closed there.
#[test]
fn plaintext_to_a_strict_service_is_refused() {
    let Some(_lock) = netns::lock_if_root("plaintext_to_a_strict_service_is_refused") else {
        return;
    };
    let ip = IPV4.server_ip;
    let mesh = format!(
        "services:\n  - name: web\n    identity: spiffe://cluster.local/ns/shop/sa/web\n    endpoints:\n      - address: '{ip}:{APP_PORT}'\n    inbound:\n      mode: strict\n"
    );
    let pods = Pods::start_with(&IPV4, &[], Some(&mesh));
    let url = app_url(ip);
    let out = pods
        .client
        .command(&["curl", "-sS", "--max-time", "10", &url])
        .output()
        .expect("run curl");
    assert!(
        !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains(PAGE.trim()),
        "plaintext got through: {}\n{}",
        netns::describe(&out),
        pods.logs()
    );
    let metrics =
        curl_in(&pods.server, &["-sS", "http://127.0.0.1:15020/metrics"]).unwrap_or_default();
    assert_eq!(
        common::sum_metric(
            &metrics,
            "meshlet_proxy_errors_total",
            &["direction=\"inbound\"", "reason=\"plaintext-refused\""]
        ),
        1.0,
        "{}",
        pods.logs()
    );
    assert_eq!(
        requests(&metrics, "inbound", &[]),
        0.0,
        "nothing may reach the app"
    );
}
