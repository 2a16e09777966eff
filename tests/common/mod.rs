//! Helpers shared by the end-to-end tests: a real `meshlet proxy` process on free loopback ports, tiny
//! raw-HTTP clients that send exactly the bytes a test asks for, and process accounting from /proc.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The proxy binary cargo built for these tests.
pub const MESHLET: &str = env!("CARGO_BIN_EXE_meshlet");

/// A free TCP port on 127.0.0.1 (the kernel's choice; released before the proxy binds it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `meshlet proxy` child process, killed on drop.
pub struct Proxy {
    pub child: Child,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

impl Proxy {
    /// Starts the proxy on free loopback ports with `extra` flags, and waits until `/ready` says 200.
    pub fn start(extra: &[&str]) -> Proxy {
        Proxy::start_at(format!("127.0.0.1:{}", free_port()).parse().unwrap(), extra)
    }

    /// Like [`Proxy::start`], with the inbound listener at a chosen address.
    ///
    /// A port from [`free_port`] is released before the proxy binds it, so another test may take it first:
    /// the proxy then exits on the bind error, and it starts again on fresh outbound and admin ports.
    pub fn start_at(inbound: SocketAddr, extra: &[&str]) -> Proxy {
        for _ in 0..3 {
            let outbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut defaults = vec!["--log", "meshlet=debug"];
            if !extra.contains(&"--drain-delay") {
                defaults.extend(["--drain-delay", "0s"]);
            }
            let child = Command::new(MESHLET)
                .arg("proxy")
                .args(["--outbound-addr", &outbound.to_string()])
                .args(["--inbound-addr", &inbound.to_string()])
                .args(["--admin-addr", &admin.to_string()])
                .args(&defaults)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start meshlet proxy");
            let mut proxy = Proxy {
                child,
                outbound,
                inbound,
                admin,
            };
            if proxy.wait_ready() {
                return proxy;
            }
        }
        panic!("proxy exited at start three times (ports taken?)");
    }

    /// Waits for `/ready` to say 200; false when the proxy exited instead. The answer counts only while the
    /// child still runs a moment later: a 200 from another test's proxy on a reused admin port must not
    /// pass for this one, which then fails to bind and exits.
    fn wait_ready(&mut self) -> bool {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if let Ok(rsp) = raw_request(
                self.admin,
                b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
            ) {
                if rsp.status == 200 {
                    std::thread::sleep(
                        Duration::from_millis(100).saturating_sub(started.elapsed()),
                    );
                    return self.child.try_wait().ok().flatten().is_none();
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("proxy did not become ready");
    }

    /// The Prometheus exposition from `/metrics`.
    pub fn metrics(&self) -> String {
        let rsp = raw_request(
            self.admin,
            b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        assert_eq!(rsp.status, 200);
        String::from_utf8(rsp.body).unwrap()
    }

    /// The value of one sample, e.g. `metric(r#"meshlet_requests_total{...}"#)` matched by substring parts.
    pub fn metric_sum(&self, name: &str, label_parts: &[&str]) -> f64 {
        sum_metric(&self.metrics(), name, label_parts)
    }

    /// Peak resident memory (`VmHWM`) of the proxy process, in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM")
    }

    /// Current resident memory (`VmRSS`) of the proxy process, in KiB.
    pub fn vm_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS")
    }

    /// Sends SIGTERM, as the kubelet does.
    pub fn sigterm(&self) {
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sums every sample of `name` whose label set contains all of `label_parts` (e.g. `status_code="200"`).
pub fn sum_metric(exposition: &str, name: &str, label_parts: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| label_parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A field of /proc/PID/status in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` bytes on a fresh connection and reads one response (until close or content-length).
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> std::io::Result<RawResponse> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(request)?;
    read_response(&mut stream)
}

/// Reads one HTTP/1.1 response from `stream` (content-length or read-to-close framing).
pub fn read_response(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut rsp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = rsp.parse(&buf) {
            let status = rsp.code.unwrap_or(0);
            let headers: Vec<(String, String)> = rsp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).to_string(),
                    )
                })
                .collect();
            let length = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse::<usize>().ok());
            let mut body = buf[head_len..].to_vec();
            match length {
                Some(len) => {
                    while body.len() < len {
                        let n = stream.read(&mut chunk)?;
                        if n == 0 {
                            break;
                        }
                        body.extend_from_slice(&chunk[..n]);
                    }
                }
                None if status == 101 || status == 200 && body.is_empty() => {}
                None => {
                    let _ = stream.read_to_end(&mut body);
                }
            }
            return Ok(RawResponse {
                status,
                headers,
                body,
            });
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before a response head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the current user is root (netns and iptables tests need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// For tests that need root or an installed tool: skip with a reason locally, fail under `CI=true`.
pub fn skip_or_fail(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("required under CI: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A real HTTP origin (HTTP/1.1 and h2c) on a free loopback port, answering with `handler`.
pub async fn origin<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<meshlet::proxy::Body>> + Send + 'static,
{
    origin_at("127.0.0.1:0".parse().unwrap(), handler).await
}

/// Like [`origin`], listening on `addr` (another loopback address, so two apps share a port number).
pub async fn origin_at<F, Fut>(addr: SocketAddr, handler: F) -> SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<meshlet::proxy::Body>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
}

/// A body from bytes.
pub fn full(bytes: impl Into<bytes::Bytes>) -> meshlet::proxy::Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Runs [`origin`] on a runtime of its own, so a synchronous test can use blocking sockets against it.
/// Keep the runtime alive as long as the origin is needed.
pub fn origin_on_runtime<F, Fut>(handler: F) -> (tokio::runtime::Runtime, SocketAddr)
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<meshlet::proxy::Body>> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(origin(handler));
    (rt, addr)
}

/// Whether `python3` can import every module in `modules`.
pub fn python_has(modules: &[&str]) -> bool {
    let script = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    Command::new("python3")
        .args(["-c", &script])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The path of a helper script in `tests/fixtures/`.
pub fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A Python fixture server in a session of its own (`setsid`), stopped by its PID on drop.
pub struct PythonServer {
    pub child: Child,
    pub port: u16,
}

impl PythonServer {
    /// Starts `python3 tests/fixtures/<script> <args>` and waits (bounded) for it to print `PORT <n>`.
    pub fn start(script: &str, args: &[&str]) -> PythonServer {
        use std::io::BufRead;
        let mut child = Command::new("setsid")
            .args(["python3", "-u", &fixture(script)])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python fixture");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(port) = line
                    .strip_prefix("PORT ")
                    .and_then(|p| p.trim().parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(port) => PythonServer { child, port },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{script} did not report its port within 20s");
            }
        }
    }

    /// The server's loopback address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a Python fixture server, or skips (fails under `CI=true`) when `module` from the pip package
/// `package` is not installed.
pub fn python_server_or_skip(script: &str, module: &str, package: &str) -> Option<PythonServer> {
    if !python_has(&[module]) {
        skip_or_fail(&format!(
            "python3 module {module} (pip install {package}, see tests/requirements.txt) is not installed"
        ));
        return None;
    }
    Some(PythonServer::start(script, &[]))
}

/// Runs a Python fixture client to completion within `limit`; returns its stdout, or panics with its output.
pub fn run_python(script: &str, args: &[&str], limit: Duration) -> String {
    let mut child = Command::new("python3")
        .args(["-u", &fixture(script)])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python fixture");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).to_string()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    match status {
        Some(status) if status.success() => stdout,
        Some(status) => panic!("{script} failed ({status}):\nstdout:\n{stdout}\nstderr:\n{stderr}"),
        None => panic!(
            "{script} did not finish within {limit:?}:\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ),
    }
}

/// Whether the proxy process is still running.
pub fn still_running(proxy: &mut Proxy) -> bool {
    matches!(proxy.child.try_wait(), Ok(None))
}

/// An exclusive `flock(2)` on a file (what `flock <path> <command>` takes), held until dropped: tests that
/// need fixed addresses (the demo) or the host's network setup take one so they never overlap, even across
/// test binaries and with a developer's own `flock` runs.
pub struct FileLock(#[allow(dead_code)] std::fs::File);

impl FileLock {
    /// Waits until nobody else holds the lock on `path`.
    pub fn exclusive(path: &str) -> FileLock {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: the descriptor belongs to `file`, which outlives the call. Closing it releases the lock.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {path}: {}", std::io::Error::last_os_error());
        FileLock(file)
    }
}

/// What the demo's tests hold: its addresses and ports are fixed, so one demo runs at a time.
pub const DEMO_LOCK: &str = "/tmp/meshlet-demo.lock";
