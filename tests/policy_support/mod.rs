//! Shared pieces of the policy tests: a programmable fault-injecting upstream on loopback, a plain hyper
//! client service (standing in for the data path's client), a server that runs a policy stack, and a
//! redis-server started for the test.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshlet::policy::{
    full_body, Body, BoxError, Classify, FailureKind, PolicyFile, PolicyService, ServicePolicy,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::Service;

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// 0 for the first request, 1 for the second, ...
    pub n: usize,
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub type Reply = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;
pub type Handler = Arc<dyn Fn(Seen) -> Reply + Send + Sync>;

/// A handler from a closure returning a future.
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Seen) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, BoxError>> + Send + 'static,
{
    Arc::new(move |seen| Box::pin(f(seen)))
}

/// A response with `status` and `body`.
pub fn reply(status: u16, body: &str) -> Response<Body> {
    let mut resp = Response::new(full_body(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp
}

/// A loopback HTTP/1 + h2c server whose every answer is decided by a handler. Returning `Err` from the
/// handler makes hyper drop the connection without a response (a reset before any response byte).
pub struct Upstream {
    pub addr: SocketAddr,
    /// TCP connections accepted.
    pub accepts: Arc<AtomicUsize>,
    /// Requests received.
    pub calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// The error a test server's service fails with: hyper then drops the connection without a response.
#[derive(Debug)]
pub struct Fail(pub String);

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fail {}

type ConnReply = Pin<Box<dyn Future<Output = Result<Response<Body>, Fail>> + Send>>;
type ConnService = Arc<dyn Fn(Request<hyper::body::Incoming>) -> ConnReply + Send + Sync>;

/// Serves one connection (HTTP/1 or h2c). Not generic and boxed outside any `async` block, which keeps
/// rustc's `Send` check away from the boxed error type (see `meshlet::policy::send`).
fn serve_connection(
    stream: tokio::net::TcpStream,
    svc: ConnService,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let svc = hyper::service::service_fn(move |req| svc(req));
    Box::pin(async move {
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    })
}

/// One request to the upstream, boxed outside any `async` block (see `meshlet::policy::send`).
fn handle(handler: Handler, n: usize, req: Request<hyper::body::Incoming>) -> ConnReply {
    Box::pin(async move {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return Err(Fail(e.to_string())),
        };
        let seen = Seen {
            n,
            method: parts.method,
            path: parts.uri.path().to_string(),
            headers: parts.headers,
            body,
        };
        handler(seen).await.map_err(|e| Fail(e.to_string()))
    })
}

impl Upstream {
    pub async fn start(handler: Handler) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let (a, c) = (accepts.clone(), calls.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let calls = c.clone();
                conns.spawn(serve_connection(
                    stream,
                    Arc::new(move |req| {
                        handle(handler.clone(), calls.fetch_add(1, Ordering::SeqCst), req)
                    }),
                ));
            }
        });
        Upstream {
            addr,
            accepts,
            calls,
            task,
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Stops accepting and drops every open connection.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The upstream client's error, classified the way the data path classifies its own.
#[derive(Debug)]
pub struct ClientError(pub hyper_util::client::legacy::Error);

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for ClientError {}

impl Classify for ClientError {
    fn failure_kind(&self) -> FailureKind {
        if self.0.is_connect() {
            return FailureKind::ConnectRefused;
        }
        let mut source = std::error::Error::source(&self.0);
        while let Some(err) = source {
            if let Some(h) = err.downcast_ref::<hyper::Error>() {
                if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                    return FailureKind::ResetBeforeResponse;
                }
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) {
                    return FailureKind::ResetBeforeResponse;
                }
            }
            source = err.source();
        }
        FailureKind::Other
    }
}

/// A plain pooled hyper client as a tower service: sends each request to the authority in its URI.
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, Body>,
}

impl TestClient {
    pub fn http1() -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .build_http(),
        }
    }

    pub fn h2c() -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .http2_only(true)
                .build_http(),
        }
    }
}

impl Service<Request<Body>> for TestClient {
    type Response = Response<Body>;
    type Error = ClientError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, ClientError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let fut = self.client.request(req);
        Box::pin(async move {
            let resp = fut.await.map_err(ClientError)?;
            Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
        })
    }
}

/// Serves a tower service (e.g. an inbound policy stack) on loopback, like a sidecar's listener.
/// `stop` drops the listener, every connection and with them the service.
pub struct Sidecar {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Sidecar {
    pub async fn start<E>(svc: PolicyService<E>) -> Sidecar
    where
        E: Into<BoxError> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    break;
                };
                let svc = svc.clone();
                conns.spawn(serve_connection(
                    stream,
                    Arc::new(move |req: Request<hyper::body::Incoming>| {
                        let mut req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
                        req.extensions_mut()
                            .insert(meshlet::policy::Caller(peer.ip().to_string()));
                        let fut = meshlet::policy::send(&svc, req);
                        Box::pin(async move { fut.await.map_err(|e| Fail(e.into().to_string())) })
                            as ConnReply
                    }),
                ));
            }
        });
        Sidecar { addr, task }
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The resolved policy of service `svc` in a YAML policy file.
pub fn policy(yaml: &str) -> ServicePolicy {
    PolicyFile::from_yaml(yaml).unwrap().resolve("svc")
}

pub fn request(method: &str, addr: SocketAddr, path: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(full_body(Bytes::from(body.to_string())))
        .unwrap()
}

pub async fn body_string(resp: Response<Body>) -> String {
    String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

pub fn header<'a>(resp: &'a Response<Body>, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

/// A redis-server of its own on a free loopback port, stopped (by PID) when dropped.
pub struct RedisServer {
    pub url: String,
    child: Child,
}

impl RedisServer {
    /// Starts one, or returns `None` (after printing why) when redis-server is not installed; under
    /// `CI=true` a missing redis-server fails the test instead.
    pub async fn start() -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is not installed"
            );
            eprintln!("skipping: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("setsid")
            .args([
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let server = RedisServer {
            url: format!("redis://127.0.0.1:{port}/"),
            child,
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on port {port}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // `setsid` execs redis-server in place, so this PID is the server's.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `svc`, counting the requests that reach it.
pub fn counted<E: Send + 'static>(
    svc: PolicyService<E>,
    counter: Arc<AtomicUsize>,
) -> PolicyService<E> {
    PolicyService::new(tower::service_fn(move |req| {
        counter.fetch_add(1, Ordering::SeqCst);
        meshlet::policy::send(&svc, req)
    }))
}

/// Polls `done` every 10 ms for up to 10 s.
pub async fn eventually(what: &str, done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
