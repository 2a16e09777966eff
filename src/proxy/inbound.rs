//! Inbound mTLS from peer sidecars.
//!
//! A permissive inbound port sees three kinds of clients: plaintext, the application's own TLS (passed
//! through untouched) and peer sidecars (mesh mTLS). The last two both start with a TLS ClientHello; the
//! mesh ALPN ids (`meshlet/h2`, `meshlet/tcp`) tell them apart before anything is answered.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::http::Target;
use super::pool::Version;
use super::transport::{Carried, TransportHeader};
use super::{serve_http, tcp, HttpConnection, Inputs};
use crate::detect::PrefixedIo;
use crate::drain;
use crate::metrics::Direction;
use crate::tls::{offers_mesh_alpn, peer_identity, ALPN_MESH_H2, ALPN_MESH_TCP};

/// Largest TLS record (RFC 8446 §5.1) plus its 5-byte header.
const MAX_RECORD: usize = 16 * 1024 + 5;

/// Whether the first bytes are a TLS handshake record.
pub fn is_tls_handshake(prefix: &[u8]) -> bool {
    prefix.first() == Some(&0x16)
}

/// Reads the rest of the first TLS record into `prefix` (nothing is lost: the bytes are replayed to
/// whoever handles the connection) and says whether its ClientHello offers a mesh ALPN id.
pub async fn offers_mesh(
    stream: &mut TcpStream,
    prefix: &mut BytesMut,
    timeout: Duration,
) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if prefix.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([prefix[3], prefix[4]])) + 5;
            if prefix.len() >= len.min(MAX_RECORD) {
                break;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(prefix)).await {
            Ok(Ok(0)) | Err(_) => return Ok(false),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut bytes = &prefix[..];
    while !bytes.is_empty() {
        if acceptor.read_tls(&mut bytes).is_err() {
            return Ok(false);
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok(offers_mesh_alpn(&accepted.client_hello())),
            Ok(None) => {}
            Err(_) => return Ok(false),
        }
    }
    Ok(false)
}

/// Completes the mesh handshake and serves what the peer sidecar sends: HTTP/2 requests that name their
/// port, or one transport-header connection (opaque TCP or HTTP/1 with an upgrade).
pub async fn serve_mesh(
    inputs: Arc<Inputs>,
    io: PrefixedIo<TcpStream>,
    app_ip: IpAddr,
    watch: drain::Watch,
) {
    let Some(config) = inputs.tls_server.clone() else {
        return;
    };
    let direction = Direction::Inbound;
    let handshake = TlsAcceptor::from(config).accept(io);
    let mut tls = match tokio::time::timeout(inputs.config.header_read_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "mesh handshake failed");
            inputs
                .metrics
                .proxy_error(direction, "tls-handshake-failed");
            return;
        }
        Err(_) => {
            inputs
                .metrics
                .proxy_error(direction, "tls-handshake-timeout");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let peer = peer_identity(session);
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    match alpn.as_deref() {
        Some(p) if p == ALPN_MESH_H2 => {
            let conn = HttpConnection {
                inputs,
                direction,
                target: Target::Explicit,
                version: Version::Http2,
                peer,
                mesh_app_ip: Some(app_ip),
            };
            serve_http(conn, tls, watch).await;
        }
        Some(p) if p == ALPN_MESH_TCP => {
            let header = match tokio::time::timeout(
                inputs.config.header_read_timeout,
                TransportHeader::read(&mut tls),
            )
            .await
            {
                Ok(Ok(header)) => header,
                Ok(Err(e)) => {
                    debug!(error = %e, "bad transport header");
                    inputs
                        .metrics
                        .proxy_error(direction, "malformed-transport-header");
                    return;
                }
                Err(_) => {
                    inputs.metrics.proxy_error(direction, "header-read-timeout");
                    return;
                }
            };
            let app = SocketAddr::new(app_ip, header.port);
            if !inputs.mesh.table().inbound(app).admits(peer.as_ref()) {
                debug!(%app, peer = ?peer, "peer not allowed; closing");
                inputs.metrics.proxy_error(direction, "unauthorized");
                return;
            }
            match header.carried {
                Carried::Tcp => match tcp::Upstream::connect(&inputs, app, None).await {
                    Ok(upstream) => {
                        upstream
                            .relay(&inputs, direction, app, peer.as_ref(), tls)
                            .await
                    }
                    Err(e) => {
                        debug!(%app, error = %e, "inbound connect failed");
                        inputs.metrics.proxy_error(direction, e.reason());
                    }
                },
                Carried::Http1 => {
                    let conn = HttpConnection {
                        inputs,
                        direction,
                        target: Target::Original(app),
                        version: Version::Http1,
                        peer,
                        mesh_app_ip: None,
                    };
                    serve_http(conn, tls, watch).await;
                }
            }
        }
        _ => {
            debug!("mesh client negotiated no mesh protocol; closing");
            inputs.metrics.proxy_error(direction, "no-mesh-alpn");
        }
    }
}
