//! Upstream HTTP connections, kept alive and reused per destination address.
//!
//! HTTP/1 connections carry one request at a time, so idle ones wait in a bounded stack per destination
//! and expire after the idle timeout. HTTP/2 connections multiplex, so one is shared per destination.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::debug;

use super::error::ProxyError;
use super::{Body, BoxError};
use crate::listener;

/// Settings of the pool, from the proxy's configuration.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Time allowed for a TCP connect.
    pub connect_timeout: Duration,
    /// Idle HTTP/1 connections older than this are closed.
    pub idle_timeout: Duration,
    /// Idle HTTP/1 connections kept per destination.
    pub max_idle_per_destination: usize,
}

/// The HTTP version spoken to the upstream: the same one the client spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1 (or 1.0) with keep-alive.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// Lets one request at a time open the HTTP/2 connection to a destination, so a burst of streams to a new
/// destination shares that connection instead of opening one each.
#[derive(Default)]
struct Http2Connecting {
    lock: tokio::sync::Mutex<()>,
    /// Failed connects so far: a request that waited through a failed attempt connects on its own instead of
    /// queueing behind the next one (which could multiply the connect timeout by the number of waiters).
    failures: AtomicU64,
}

/// Keeps upstream connections for reuse.
pub struct Pool {
    settings: PoolSettings,
    http1: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    http2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
    http2_connecting: Mutex<HashMap<SocketAddr, Arc<Http2Connecting>>>,
}

impl Pool {
    /// Creates an empty pool and starts its idle sweeper on the current runtime.
    pub fn new(settings: PoolSettings) -> Arc<Self> {
        let pool = Arc::new(Self {
            settings,
            http1: Mutex::default(),
            http2: Mutex::default(),
            http2_connecting: Mutex::default(),
        });
        let weak = Arc::downgrade(&pool);
        let period = (pool.settings.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(pool) => pool.sweep(),
                    None => return,
                }
            }
        });
        pool
    }

    /// Sends `req` to `dst`, reusing a connection when one is free.
    pub async fn send(
        self: &Arc<Self>,
        dst: SocketAddr,
        version: Version,
        req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        match version {
            Version::Http1 => self.send_http1(dst, req).await,
            Version::Http2 => Ok(self
                .send_http2(dst, req)
                .await?
                .map(|b| b.map_err(Into::into).boxed())),
        }
    }

    async fn send_http1(
        self: &Arc<Self>,
        dst: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        // A kept-alive connection may have been closed by the upstream just now; the request then comes back
        // unsent and goes out again on a fresh connection.
        while let Some(mut sender) = self.checkout_http1(dst) {
            // A connection checked in when its last response body ended is ready as soon as its task has
            // seen that end; one the upstream closed in the meantime fails here and is dropped.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(rsp) => return Ok(self.pooled(dst, sender, rsp)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(classify(dst, e.into_error())),
                },
            }
        }
        // Connecting is the rare path: boxed, so that its large future does not size every request's.
        let mut sender = Box::pin(self.connect_http1(dst, false)).await?;
        let rsp = sender
            .send_request(req)
            .await
            .map_err(|e| classify(dst, e))?;
        Ok(self.pooled(dst, sender, rsp))
    }

    /// Wraps the response body so that the connection returns to the pool once the body has been read to
    /// the end, without a task per request.
    fn pooled(
        self: &Arc<Self>,
        dst: SocketAddr,
        sender: http1::SendRequest<Body>,
        rsp: Response<Incoming>,
    ) -> Response<Body> {
        let checkin = Checkin {
            pool: Arc::downgrade(self),
            dst,
            sender,
        };
        rsp.map(|inner| {
            PooledBody {
                inner,
                checkin: Some(checkin),
                finished: false,
            }
            .boxed()
        })
    }

    async fn send_http2(
        &self,
        dst: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = match self.cached_http2(dst) {
            Some(sender) => sender,
            None => Box::pin(self.connect_http2_once(dst)).await?,
        };
        sender.send_request(req).await.map_err(|e| classify(dst, e))
    }

    fn cached_http2(&self, dst: SocketAddr) -> Option<http2::SendRequest<Body>> {
        let map = self.http2.lock().ok()?;
        map.get(&dst).filter(|s| !s.is_closed()).cloned()
    }

    /// Opens the shared HTTP/2 connection to `dst`, or waits for the request already opening it.
    async fn connect_http2_once(
        &self,
        dst: SocketAddr,
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        let connecting = match self.http2_connecting.lock() {
            Ok(mut map) => map.entry(dst).or_default().clone(),
            Err(_) => Arc::default(),
        };
        let failures_before = connecting.failures.load(Ordering::Acquire);
        let guard = connecting.lock.lock().await;
        if let Some(sender) = self.cached_http2(dst) {
            return Ok(sender);
        }
        if connecting.failures.load(Ordering::Acquire) != failures_before {
            drop(guard);
            return self.connect_http2(dst).await;
        }
        match self.connect_http2(dst).await {
            Ok(sender) => {
                if let Ok(mut map) = self.http2.lock() {
                    map.insert(dst, sender.clone());
                }
                Ok(sender)
            }
            Err(e) => {
                connecting.failures.fetch_add(1, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Opens a new HTTP/1 connection; `upgrades` keeps it usable after a `101 Switching Protocols`.
    pub async fn connect_http1(
        &self,
        dst: SocketAddr,
        upgrades: bool,
    ) -> Result<http1::SendRequest<Body>, ProxyError> {
        http1_handshake(dst, self.connect_tcp(dst).await?, upgrades).await
    }

    async fn connect_http2(&self, dst: SocketAddr) -> Result<http2::SendRequest<Body>, ProxyError> {
        let io = TokioIo::new(self.connect_tcp(dst).await?);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(io)
            .await
            .map_err(|e| ProxyError::UpstreamReset(dst, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%dst, error = %e, "upstream h2 connection failed");
            }
        });
        Ok(sender)
    }

    /// Opens a TCP connection within the connect timeout.
    pub async fn connect_tcp(&self, dst: SocketAddr) -> Result<tokio::net::TcpStream, ProxyError> {
        let timeout = self.settings.connect_timeout;
        match tokio::time::timeout(timeout, listener::connect(dst)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(ProxyError::from_connect(dst, e)),
            Err(_) => Err(ProxyError::ConnectTimeout(dst, timeout)),
        }
    }

    fn checkout_http1(&self, dst: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut map = self.http1.lock().ok()?;
        let idle = map.get_mut(&dst)?;
        while let Some(entry) = idle.pop() {
            if entry.since.elapsed() < self.settings.idle_timeout && !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    fn checkin(&self, dst: SocketAddr, sender: http1::SendRequest<Body>) {
        let Ok(mut map) = self.http1.lock() else {
            return;
        };
        let idle = map.entry(dst).or_default();
        if idle.len() < self.settings.max_idle_per_destination {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn sweep(&self) {
        let timeout = self.settings.idle_timeout;
        if let Ok(mut map) = self.http1.lock() {
            map.retain(|_, idle| {
                idle.retain(|e| e.since.elapsed() < timeout && !e.sender.is_closed());
                !idle.is_empty()
            });
        }
        if let Ok(mut map) = self.http2.lock() {
            map.retain(|_, sender| !sender.is_closed());
        }
        if let Ok(mut map) = self.http2_connecting.lock() {
            map.retain(|_, connecting| Arc::strong_count(connecting) > 1);
        }
    }

    /// Idle HTTP/1 connections to `dst`, for tests and the admin view.
    pub fn idle_count(&self, dst: SocketAddr) -> usize {
        self.http1
            .lock()
            .map(|m| m.get(&dst).map_or(0, Vec::len))
            .unwrap_or(0)
    }
}

/// Separates the client's broken body (their fault, 400) from an upstream failure (502).
fn classify(dst: SocketAddr, e: hyper::Error) -> ProxyError {
    if e.is_user() {
        ProxyError::MalformedBody(e)
    } else {
        ProxyError::UpstreamReset(dst, e)
    }
}

/// Where a response body returns its connection when it ends.
struct Checkin {
    pool: Weak<Pool>,
    dst: SocketAddr,
    sender: http1::SendRequest<Body>,
}

/// The body of a response on a pooled HTTP/1 connection. Read to the end, it checks the connection back
/// in; dropped early, it drops the connection (the rest of the body would be in the way).
struct PooledBody {
    inner: Incoming,
    checkin: Option<Checkin>,
    finished: bool,
}

impl http_body::Body for PooledBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.finished = true,
            Some(Err(_)) => self.checkin = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if !(self.finished || self.inner.is_end_stream()) {
            return;
        }
        if let Some(Checkin { pool, dst, sender }) = self.checkin.take() {
            if let Some(pool) = pool.upgrade() {
                pool.checkin(dst, sender);
            }
        }
    }
}

/// Starts HTTP/1 on an established connection (plain TCP or mTLS); `upgrades` keeps it usable after a
/// `101 Switching Protocols`.
pub async fn http1_handshake<I>(
    dst: SocketAddr,
    io: I,
    upgrades: bool,
) -> Result<http1::SendRequest<Body>, ProxyError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ProxyError::UpstreamReset(dst, e))?;
    if upgrades {
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%dst, error = %e, "upstream connection failed");
            }
        });
    } else {
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%dst, error = %e, "upstream connection failed");
            }
        });
    }
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Empty, Full};

    use super::*;

    /// `count` HTTP/2 GETs to `dst` sent at once through a new pool.
    async fn h2_burst(dst: SocketAddr, count: usize) -> Vec<Result<Response<Body>, ProxyError>> {
        let pool = Pool::new(PoolSettings {
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(30),
            max_idle_per_destination: 4,
        });
        let mut burst = tokio::task::JoinSet::new();
        for _ in 0..count {
            let pool = pool.clone();
            let req = Request::get(format!("http://{dst}/"))
                .body(Empty::new().map_err(|never| match never {}).boxed())
                .unwrap();
            burst.spawn(async move { pool.send(dst, Version::Http2, req).await });
        }
        burst.join_all().await
    }

    /// An h2c server that counts the connections it accepts.
    async fn h2_server(connections: Arc<AtomicUsize>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                        bytes::Bytes::from_static(b"ok"),
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_burst_of_h2_requests_shares_one_new_connection() {
        let connections = Arc::new(AtomicUsize::new(0));
        let dst = h2_server(connections.clone()).await;
        for rsp in h2_burst(dst, 50).await {
            assert_eq!(rsp.expect("response").status(), 200);
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_burst_to_a_dead_destination_fails_every_request() {
        let dst = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        for result in h2_burst(dst, 20).await {
            assert!(matches!(result, Err(ProxyError::ConnectRefused(a)) if a == dst));
        }
    }
}
