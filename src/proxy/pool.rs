//! Upstream HTTP connections, kept alive and reused per destination address.
//!
//! HTTP/1 connections carry one request at a time, so idle ones wait in a bounded stack per destination
//! and expire after the idle timeout. HTTP/2 connections multiplex, so one is shared per destination.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::debug;

use super::error::ProxyError;
use super::Body;
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

/// Keeps upstream connections for reuse.
pub struct Pool {
    settings: PoolSettings,
    http1: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    http2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

impl Pool {
    /// Creates an empty pool and starts its idle sweeper on the current runtime.
    pub fn new(settings: PoolSettings) -> Arc<Self> {
        let pool = Arc::new(Self {
            settings,
            http1: Mutex::default(),
            http2: Mutex::default(),
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
    ) -> Result<Response<Incoming>, ProxyError> {
        match version {
            Version::Http1 => self.send_http1(dst, req).await,
            Version::Http2 => self.send_http2(dst, req).await,
        }
    }

    async fn send_http1(
        self: &Arc<Self>,
        dst: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        // A kept-alive connection may have been closed by the upstream just now; the request then comes back
        // unsent and goes out again on a fresh connection.
        while let Some(mut sender) = self.checkout_http1(dst) {
            match sender.try_send_request(req).await {
                Ok(rsp) => {
                    self.checkin_when_ready(dst, sender);
                    return Ok(rsp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(classify(dst, e.into_error())),
                },
            }
        }
        let mut sender = self.connect_http1(dst, false).await?;
        let rsp = sender
            .send_request(req)
            .await
            .map_err(|e| classify(dst, e))?;
        self.checkin_when_ready(dst, sender);
        Ok(rsp)
    }

    async fn send_http2(
        &self,
        dst: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let cached = self
            .http2
            .lock()
            .ok()
            .and_then(|map| map.get(&dst).filter(|s| !s.is_closed()).cloned());
        let mut sender = match cached {
            Some(sender) => sender,
            None => {
                let sender = self.connect_http2(dst).await?;
                if let Ok(mut map) = self.http2.lock() {
                    map.insert(dst, sender.clone());
                }
                sender
            }
        };
        sender.send_request(req).await.map_err(|e| classify(dst, e))
    }

    /// Opens a new HTTP/1 connection; `upgrades` keeps it usable after a `101 Switching Protocols`.
    pub async fn connect_http1(
        &self,
        dst: SocketAddr,
        upgrades: bool,
    ) -> Result<http1::SendRequest<Body>, ProxyError> {
        let io = TokioIo::new(self.connect_tcp(dst).await?);
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
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
            if entry.since.elapsed() < self.settings.idle_timeout && entry.sender.is_ready() {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Returns the connection once its response has been read to the end (or drops it if that fails).
    fn checkin_when_ready(self: &Arc<Self>, dst: SocketAddr, mut sender: http1::SendRequest<Body>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let Some(pool) = pool.upgrade() else { return };
            let Ok(mut map) = pool.http1.lock() else {
                return;
            };
            let idle = map.entry(dst).or_default();
            if idle.len() < pool.settings.max_idle_per_destination {
                idle.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        });
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
