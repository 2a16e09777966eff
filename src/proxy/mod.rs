//! The data path: accept a connection, find its destination and protocol, forward it.
//!
//! `outbound` and `inbound` differ only in where a connection goes; detection, HTTP forwarding (`http`)
//! and opaque TCP (`tcp`) are shared.

pub mod error;
mod head;
pub mod http;
mod inbound;
pub mod mesh;
pub mod pool;
pub mod tcp;
pub mod transport;
pub mod upstream;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info_span, warn, Instrument};

use self::error::ProxyError;
use self::http::{ConnContext, Target};
use self::mesh::MeshClient;
use self::pool::{Pool, Version};
use crate::config::ProxyArgs;
use crate::detect::{self, PrefixedIo, Protocol};
use crate::discovery::{InboundMode, Mesh, MeshedEndpoint, PortProtocol};
use crate::drain;
use crate::metrics::{Direction, Metrics};

/// Errors carried inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response on the data path.
pub type Body = BoxBody<Bytes, BoxError>;

/// What every connection needs, shared through one `Arc`.
pub struct Inputs {
    /// Which destinations are meshed, and each service's inbound rules.
    pub mesh: Arc<Mesh>,
    /// mTLS to peer sidecars; `None` when the sidecar runs without identity (plain).
    pub mesh_client: Option<Arc<MeshClient>>,
    /// mTLS from peer sidecars; `None` without identity.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// Effective settings.
    pub config: ProxyArgs,
    /// Data-path metrics.
    pub metrics: Metrics,
    /// Upstream connections.
    pub pool: Arc<Pool>,
    /// Bounds the connections served at once.
    pub connection_limit: Arc<Semaphore>,
}

impl Inputs {
    /// The meshed endpoint at `dst`, when this sidecar has an identity to reach it with.
    pub fn meshed(&self, dst: std::net::SocketAddr) -> Option<MeshedEndpoint> {
        self.mesh_client.as_ref()?;
        self.mesh.table().outbound(dst).cloned()
    }

    /// Whether connections to `dst` skip detection: its port is in `--opaque-ports`, or it is a service
    /// port (virtual address or endpoint) marked `protocol: opaque`.
    pub fn is_opaque(&self, dst: std::net::SocketAddr) -> bool {
        self.config.opaque_ports.contains(&dst.port())
            || self.mesh.table().protocol(dst) == Some(PortProtocol::Opaque)
    }
}

/// Accepts connections until draining starts; each connection keeps its own drain watch.
pub async fn serve_listener(
    inputs: Arc<Inputs>,
    direction: Direction,
    listener: TcpListener,
    watch: drain::Watch,
) {
    loop {
        let permit = tokio::select! {
            _ = watch.signaled() => return,
            permit = inputs.connection_limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = watch.signaled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or similar: back off briefly instead of spinning.
                warn!(direction = direction.as_str(), error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let inputs = inputs.clone();
        let watch = watch.clone();
        let span = info_span!("conn", dir = direction.as_str(), %peer);
        tokio::spawn(
            async move {
                serve_connection(inputs, direction, stream, watch).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Routes one accepted connection by its destination and protocol.
async fn serve_connection(
    inputs: Arc<Inputs>,
    direction: Direction,
    mut stream: TcpStream,
    watch: drain::Watch,
) {
    let original = match crate::listener::original_dst(&stream) {
        Ok(original) => original,
        Err(e) => {
            debug!(error = %e, "reading the original destination failed");
            None
        }
    };
    let target = match (direction, original) {
        (_, Some(dst)) => Target::Original(dst),
        // Inbound: only a peer sidecar's mTLS may address the listener itself (it states the target port).
        (_, None) => Target::Explicit,
    };
    let _ = stream.set_nodelay(true);
    let metrics = &inputs.metrics;

    // Opaque ports skip detection: server-first protocols must not wait for the client. Inbound keeps it
    // when the sidecar has an identity, since a peer sidecar's mTLS must still be recognised.
    let skip_detection = direction == Direction::Outbound || inputs.tls_server.is_none();
    if let (Target::Original(dst), true) = (target, skip_detection) {
        if inputs.is_opaque(dst) {
            metrics
                .protocols
                .with_label_values(&[direction.as_str(), Protocol::Opaque.as_str()])
                .inc();
            tcp::proxy(&inputs, direction, dst, Bytes::new(), stream).await;
            return;
        }
    }

    // An explicit-proxy client must speak HTTP, so it gets the full header timeout; a redirected one may be
    // a server-first protocol, so silence soon means opaque.
    let timeout = match target {
        Target::Explicit => inputs.config.header_read_timeout,
        Target::Original(_) => inputs.config.detect_timeout,
    };
    let detected = match detect::detect(&mut stream, timeout).await {
        Ok(detected) => detected,
        Err(e) => {
            debug!(error = %e, "connection failed during detection");
            return;
        }
    };
    if direction == Direction::Inbound {
        let mut prefix = detected.prefix;
        if inbound::is_tls_handshake(&prefix) && inputs.tls_server.is_some() {
            match inbound::offers_mesh(&mut stream, &mut prefix, inputs.config.detect_timeout).await
            {
                Ok(true) => {
                    let app_ip = match target {
                        Target::Original(dst) => dst.ip(),
                        Target::Explicit => match stream.local_addr() {
                            Ok(local) => local.ip(),
                            Err(_) => return,
                        },
                    };
                    metrics
                        .protocols
                        .with_label_values(&[direction.as_str(), "mtls"])
                        .inc();
                    inbound::serve_mesh(
                        inputs,
                        PrefixedIo::new(prefix.freeze(), stream),
                        app_ip,
                        watch,
                    )
                    .await;
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    debug!(error = %e, "connection failed while reading a ClientHello");
                    return;
                }
            }
        }
        let Target::Original(dst) = target else {
            debug!("refusing plaintext addressed to the inbound listener itself");
            metrics.proxy_error(direction, ProxyError::Loop.reason());
            return;
        };
        if inputs.mesh.table().inbound(dst).mode == InboundMode::Strict {
            debug!(%dst, "refusing plaintext to a strict service");
            metrics.proxy_error(direction, "plaintext-refused");
            return;
        }
        if inputs.is_opaque(dst) {
            metrics
                .protocols
                .with_label_values(&[direction.as_str(), Protocol::Opaque.as_str()])
                .inc();
            tcp::proxy(&inputs, direction, dst, prefix.freeze(), stream).await;
            return;
        }
        return serve_detected(
            inputs,
            direction,
            target,
            detected.protocol,
            prefix,
            stream,
            watch,
            timeout,
            detected.timed_out,
        )
        .await;
    }
    serve_detected(
        inputs,
        direction,
        target,
        detected.protocol,
        detected.prefix,
        stream,
        watch,
        timeout,
        detected.timed_out,
    )
    .await;
}

/// Serves a plaintext connection whose protocol is known.
#[allow(clippy::too_many_arguments)]
async fn serve_detected(
    inputs: Arc<Inputs>,
    direction: Direction,
    target: Target,
    protocol: Protocol,
    prefix: BytesMut,
    mut stream: TcpStream,
    watch: drain::Watch,
    timeout: std::time::Duration,
    timed_out: bool,
) {
    let metrics = &inputs.metrics;
    metrics
        .protocols
        .with_label_values(&[direction.as_str(), protocol.as_str()])
        .inc();
    match (protocol, target) {
        (Protocol::Opaque, Target::Original(dst)) => {
            tcp::proxy(&inputs, direction, dst, prefix.freeze(), stream).await;
        }
        (Protocol::Opaque, Target::Explicit) => {
            if prefix.is_empty() {
                return;
            }
            let error = if timed_out {
                ProxyError::HeaderTimeout(timeout)
            } else {
                ProxyError::MalformedRequest("not an HTTP request")
            };
            refuse(&inputs, direction, stream, &error).await;
        }
        (Protocol::Http1, target) => {
            let mut prefix = prefix;
            let max = inputs.config.max_header_bytes as usize;
            if let Err(error) = head::read_first_head(
                &mut stream,
                &mut prefix,
                inputs.config.header_read_timeout,
                max,
            )
            .await
            {
                refuse(&inputs, direction, stream, &error).await;
                return;
            }
            let io = PrefixedIo::new(prefix.freeze(), stream);
            let ctx = HttpConnection {
                inputs,
                direction,
                target,
                version: Version::Http1,
                peer: None,
                mesh_app_ip: None,
            };
            serve_http(ctx, io, watch).await;
        }
        (Protocol::H2, target) => {
            let io = PrefixedIo::new(prefix.freeze(), stream);
            let ctx = HttpConnection {
                inputs,
                direction,
                target,
                version: Version::Http2,
                peer: None,
                mesh_app_ip: None,
            };
            serve_http(ctx, io, watch).await;
        }
    }
}

/// Answers a request the proxy cannot parse, then closes the connection.
async fn refuse(inputs: &Inputs, direction: Direction, mut stream: TcpStream, error: &ProxyError) {
    debug!(error = %error, "refusing request");
    inputs.metrics.proxy_error(direction, error.reason());
    let _ = stream.write_all(&error.to_http1_bytes()).await;
    let _ = stream.shutdown().await;
}

/// How an HTTP connection is served: whose it is, where its requests go, which protocol it speaks.
pub(crate) struct HttpConnection {
    inputs: Arc<Inputs>,
    direction: Direction,
    target: Target,
    version: Version,
    peer: Option<crate::tls::SpiffeId>,
    mesh_app_ip: Option<std::net::IpAddr>,
}

async fn serve_http<I>(conn: HttpConnection, io: I, watch: drain::Watch)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let HttpConnection {
        inputs,
        direction,
        target,
        version,
        peer,
        mesh_app_ip,
    } = conn;
    let destination_label = match target {
        Target::Original(dst) => Some(Arc::from(dst.to_string())),
        Target::Explicit => None,
    };
    let header_read_timeout = inputs.config.header_read_timeout;
    let max_buf = (inputs.config.max_header_bytes as usize).max(8192);
    let ctx = Arc::new(ConnContext {
        inputs,
        direction,
        target,
        version,
        destination_label,
        metric_cache: Default::default(),
        peer,
        mesh_app_ip,
    });
    let service = hyper::service::service_fn(move |req| http::serve(ctx.clone(), req));
    let io = TokioIo::new(io);
    let result = match version {
        Version::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(max_buf)
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => result,
                _ = watch.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Version::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(max_buf as u32)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => result,
                _ = watch.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "http connection ended with an error");
    }
}
