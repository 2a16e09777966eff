//! Opaque TCP: bytes both ways, half-close respected, idle connections closed, bytes counted.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use super::error::ProxyError;
use super::transport::{Carried, TransportHeader};
use super::Inputs;
use crate::discovery::{MeshedEndpoint, VirtualPort};
use crate::metrics::Direction;
use crate::tls::SpiffeId;
use tokio_rustls::client::TlsStream;

/// Copy buffer per direction: large enough for bulk transfers, small enough for many idle connections.
const COPY_BUFFER: usize = 16 * 1024;

/// Proxies an opaque connection to `dst`, first sending the bytes already read by detection. A meshed
/// destination is reached over mTLS to its sidecar.
pub async fn proxy(
    inputs: &Inputs,
    direction: Direction,
    dst: SocketAddr,
    prefix: Bytes,
    client: TcpStream,
) {
    let service = match direction {
        Direction::Outbound => inputs.mesh.table().virtual_port(dst).cloned(),
        Direction::Inbound => None,
    };
    let connected = match (direction, service) {
        (Direction::Outbound, Some(service)) => connect_virtual(inputs, dst, &service).await,
        (Direction::Outbound, None) => {
            Upstream::connect(inputs, dst, inputs.meshed(dst).as_ref()).await
        }
        (Direction::Inbound, _) => Upstream::connect(inputs, dst, None).await,
    };
    let mut upstream = match connected {
        Ok(upstream) => upstream,
        Err(e) => {
            debug!(%dst, error = %e, "opaque connect failed");
            inputs.metrics.proxy_error(direction, e.reason());
            return;
        }
    };
    if !prefix.is_empty() {
        if let Err(e) = upstream.write_all(&prefix).await {
            debug!(%dst, error = %e, "opaque write failed");
            return;
        }
        inputs
            .metrics
            .tcp_bytes
            .with_label_values(&[direction.as_str(), &dst.to_string(), "to_upstream"])
            .inc_by(prefix.len() as u64);
    }
    upstream.relay(inputs, direction, dst, None, client).await;
}

/// Endpoints tried for one connection to a virtual address before giving up: nothing was sent yet, so
/// another endpoint is always safe.
const VIRTUAL_CONNECT_ATTEMPTS: usize = 3;

/// Connects to one endpoint behind the virtual address `dst`, chosen as the balancer would (breaker-ejected
/// endpoints skipped), over mTLS when it has a sidecar.
async fn connect_virtual(
    inputs: &Inputs,
    dst: SocketAddr,
    service: &VirtualPort,
) -> Result<Upstream, ProxyError> {
    let mut last = ProxyError::NoEndpoints(dst);
    for _ in 0..VIRTUAL_CONNECT_ATTEMPTS {
        let Some(endpoint) = service.policies.destination.endpoints.pick() else {
            break;
        };
        match Upstream::connect(inputs, endpoint, inputs.meshed(endpoint).as_ref()).await {
            Ok(upstream) => return Ok(upstream),
            Err(e) => {
                debug!(%dst, %endpoint, error = %e, "endpoint of a virtual address failed");
                last = e;
            }
        }
    }
    Err(last)
}

/// An upstream byte stream: plain TCP, or mTLS to a peer sidecar that was told the target port.
pub enum Upstream {
    /// Straight to the destination.
    Plain(TcpStream),
    /// To the destination's sidecar, which proved this identity.
    Mesh(Box<TlsStream<TcpStream>>, SpiffeId),
}

impl Upstream {
    /// Connects to `dst`, over mTLS when `via` names its sidecar.
    pub async fn connect(
        inputs: &Inputs,
        dst: SocketAddr,
        via: Option<&MeshedEndpoint>,
    ) -> Result<Self, ProxyError> {
        match (via, &inputs.mesh_client) {
            (Some(endpoint), Some(mesh)) => {
                let header = TransportHeader {
                    port: dst.port(),
                    carried: Carried::Tcp,
                };
                let tls = mesh.open(endpoint, header).await?;
                Ok(Upstream::Mesh(Box::new(tls), endpoint.identity.clone()))
            }
            _ => Ok(Upstream::Plain(inputs.pool.connect_tcp(dst).await?)),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Upstream::Plain(s) => s.write_all(bytes).await,
            Upstream::Mesh(s, _) => s.write_all(bytes).await,
        }
    }

    /// Relays between `client` and this upstream until both sides are done. `caller` is the verified
    /// identity of an inbound mTLS client; outbound, the mesh upstream's identity is the peer.
    pub async fn relay<C>(
        self,
        inputs: &Inputs,
        direction: Direction,
        dst: SocketAddr,
        caller: Option<&SpiffeId>,
        client: C,
    ) where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let destination = dst.to_string();
        let link = |peer| Link {
            direction,
            destination: &destination,
            peer,
        };
        match self {
            Upstream::Plain(s) => relay(inputs, &link(caller), client, s).await,
            Upstream::Mesh(s, server) => {
                relay(inputs, &link(caller.or(Some(&server))), client, s).await
            }
        }
    }
}

/// How a relayed connection is labelled in the metrics.
pub struct Link<'a> {
    /// Which listener it came through.
    pub direction: Direction,
    /// Where it goes (`ip:port`).
    pub destination: &'a str,
    /// The peer sidecar's verified identity: the server's outbound, the caller's inbound. Only mTLS
    /// connections have one.
    pub peer: Option<&'a SpiffeId>,
}

impl Link<'_> {
    /// Labels of the connection counters: direction, destination, tls, peer identity.
    fn labels(&self) -> [&str; 4] {
        [
            self.direction.as_str(),
            self.destination,
            if self.peer.is_some() { "true" } else { "false" },
            self.peer.map_or("", |p| p.as_str()),
        ]
    }
}

/// Copies bytes both ways until both sides have closed, or nothing moved for the idle timeout.
///
/// When one side finishes sending, the other side's write half is shut down and the other direction goes
/// on (half-close), as `tokio::io::copy_bidirectional` does.
pub async fn relay<C, U>(inputs: &Inputs, link: &Link<'_>, client: C, upstream: U)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = &inputs.metrics;
    let direction = link.direction;
    let dir = direction.as_str();
    let label = link.destination;
    metrics.tcp_opened.with_label_values(&link.labels()).inc();
    let open = metrics.tcp_open.with_label_values(&[dir]);
    open.inc();

    // Bytes are counted as they flow, so long-lived tunnels (brokers, databases) show their traffic while
    // open, not only when they close.
    let to_upstream = Arc::new(AtomicU64::new(0));
    let from_upstream = Arc::new(AtomicU64::new(0));
    let mut client = Counted {
        inner: client,
        read: to_upstream.clone(),
        metric: metrics
            .tcp_bytes
            .with_label_values(&[dir, label, "to_upstream"]),
    };
    let mut upstream = Counted {
        inner: upstream,
        read: from_upstream.clone(),
        metric: metrics
            .tcp_bytes
            .with_label_values(&[dir, label, "from_upstream"]),
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        COPY_BUFFER,
        COPY_BUFFER,
    );
    tokio::pin!(copy);
    let idle = inputs.config.tcp_idle_timeout;
    let mut seen = (0, 0);
    loop {
        tokio::select! {
            result = &mut copy => {
                if let Err(e) = result {
                    debug!(destination = label, error = %e, "tcp relay ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep(idle) => {
                let now = (to_upstream.load(Ordering::Relaxed), from_upstream.load(Ordering::Relaxed));
                if now == seen {
                    debug!(destination = label, "closing idle tcp connection");
                    metrics.proxy_error(direction, "tcp-idle-timeout");
                    break;
                }
                seen = now;
            }
        }
    }
    open.dec();
    metrics.tcp_closed.with_label_values(&link.labels()).inc();
}

/// Counts the bytes read from the wrapped IO: for the idle check, and in the byte metric.
struct Counted<I> {
    inner: I,
    read: Arc<AtomicU64>,
    metric: prometheus::IntCounter,
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read.fetch_add(n, Ordering::Relaxed);
            self.metric.inc_by(n);
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
