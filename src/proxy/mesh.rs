//! Outbound mutual TLS to other sidecars.
//!
//! HTTP between sidecars always runs over HTTP/2 (ALPN `meshlet/h2`), whatever the application speaks, so
//! many application connections share one mTLS connection per (endpoint, identity). Upgrades, `CONNECT` and
//! opaque TCP get a connection of their own (ALPN `meshlet/tcp`) that starts with a transport header.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::error::ProxyError;
use super::transport::TransportHeader;
use super::Body;
use crate::discovery::MeshedEndpoint;
use crate::listener;
use crate::tls::{self, IdentityStore, SpiffeId, ALPN_MESH_H2, ALPN_MESH_TCP};

/// Header carrying the application port on the receiving pod, on HTTP requests between sidecars.
pub const TARGET_PORT_HEADER: &str = "meshlet-target-port";
/// Header saying the application spoke HTTP/1.x (absent: HTTP/2), so the receiving sidecar restores it.
pub const ORIG_PROTO_HEADER: &str = "meshlet-orig-proto";
/// Header the receiving sidecar sets for the application: the caller's verified SPIFFE identity.
pub const PEER_ID_HEADER: &str = "x-meshlet-peer-id";

/// A client configuration per (expected identity, ALPN id).
type ConfigKey = (SpiffeId, &'static [u8]);

/// Opens and reuses mTLS connections to other sidecars.
pub struct MeshClient {
    store: Arc<IdentityStore>,
    connect_timeout: Duration,
    configs: Mutex<HashMap<ConfigKey, Arc<ClientConfig>>>,
    h2: Mutex<HashMap<(SocketAddr, SpiffeId), http2::SendRequest<Body>>>,
}

impl MeshClient {
    /// A client presenting the store's certificate.
    pub fn new(store: Arc<IdentityStore>, connect_timeout: Duration) -> Self {
        MeshClient {
            store,
            connect_timeout,
            configs: Mutex::default(),
            h2: Mutex::default(),
        }
    }

    /// The sidecar's own identity store.
    pub fn store(&self) -> &Arc<IdentityStore> {
        &self.store
    }

    /// Sends an HTTP/2 request to the endpoint's sidecar over a shared mTLS connection.
    pub async fn send(
        &self,
        endpoint: &MeshedEndpoint,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let key = (endpoint.dial, endpoint.identity.clone());
        let cached = self
            .h2
            .lock()
            .ok()
            .and_then(|map| map.get(&key).filter(|s| !s.is_closed()).cloned());
        let mut sender = match cached {
            Some(sender) => sender,
            // Connecting is the rare path: boxed, so that its large future does not size every request's.
            None => Box::pin(self.open_h2(endpoint, key)).await?,
        };
        sender.send_request(req).await.map_err(|e| {
            if e.is_user() {
                ProxyError::MalformedBody(e)
            } else {
                ProxyError::UpstreamReset(endpoint.dial, e)
            }
        })
    }

    /// Opens the shared HTTP/2 mTLS connection to an endpoint's sidecar and caches it under `key`.
    async fn open_h2(
        &self,
        endpoint: &MeshedEndpoint,
        key: (SocketAddr, SpiffeId),
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        let tls = self.connect(endpoint, ALPN_MESH_H2).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ProxyError::UpstreamReset(endpoint.dial, e))?;
        let dial = endpoint.dial;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%dial, error = %e, "mesh h2 connection failed");
            }
        });
        if let Ok(mut map) = self.h2.lock() {
            map.insert(key, sender.clone());
        }
        Ok(sender)
    }

    /// Opens a dedicated mTLS connection that carries `header`'s protocol to `header.port` on the peer pod.
    pub async fn open(
        &self,
        endpoint: &MeshedEndpoint,
        header: TransportHeader,
    ) -> Result<TlsStream<TcpStream>, ProxyError> {
        let mut tls = self.connect(endpoint, ALPN_MESH_TCP).await?;
        tls.write_all(&header.encode())
            .await
            .map_err(|e| ProxyError::Connect(endpoint.dial, e))?;
        Ok(tls)
    }

    async fn connect(
        &self,
        endpoint: &MeshedEndpoint,
        alpn: &'static [u8],
    ) -> Result<TlsStream<TcpStream>, ProxyError> {
        let config = self.config(&endpoint.identity, alpn)?;
        let dial = endpoint.dial;
        let handshake = async {
            let tcp = listener::connect(dial)
                .await
                .map_err(|e| ProxyError::from_connect(dial, e))?;
            TlsConnector::from(config)
                .connect(ServerName::IpAddress(dial.ip().into()), tcp)
                .await
                .map_err(|e| ProxyError::TlsHandshake(dial, e))
        };
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::ConnectTimeout(dial, self.connect_timeout)),
        }
    }

    fn config(
        &self,
        identity: &SpiffeId,
        alpn: &'static [u8],
    ) -> Result<Arc<ClientConfig>, ProxyError> {
        let key = (identity.clone(), alpn);
        if let Some(config) = self.configs.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(config);
        }
        let config = tls::client_config(&self.store, identity.clone(), alpn)
            .map_err(|e| ProxyError::TlsConfig(e.to_string()))?;
        if let Ok(mut map) = self.configs.lock() {
            map.insert(key, config.clone());
        }
        Ok(config)
    }
}
