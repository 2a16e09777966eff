//! The last hop as a tower `Service`, so the resilience policies (`crate::policy`) can wrap it.
//!
//! The request arrives with its endpoint in the URI authority (the balancer picks it) and its original
//! authority in `Host`. A meshed endpoint is reached over HTTP/2 mTLS through its sidecar; anything else
//! through the plain pool, in the application's protocol.

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;

use super::error::ProxyError;
use super::mesh::{ORIG_PROTO_HEADER, TARGET_PORT_HEADER};
use super::pool::Version;
use super::{Body, Inputs};
use crate::policy::{Classify, Deadline, FailureKind};

/// The future of the data path's last hops.
pub type HopFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

/// Sends one request to the endpoint named in its URI.
#[derive(Clone)]
pub struct UpstreamClient {
    /// Proxy-wide state (pools, mesh client, timeouts).
    pub inputs: Arc<Inputs>,
    /// The protocol the application spoke (restored by the peer sidecar when meshed).
    pub app_version: Version,
}

impl tower::Service<Request<Body>> for UpstreamClient {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = HopFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.send(req).await })
    }
}

impl UpstreamClient {
    /// Sends `req` (its URI naming the endpoint, its `Host` the original authority).
    pub async fn send(self, mut req: Request<Body>) -> Result<Response<Body>, ProxyError> {
        let dst: SocketAddr = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .ok_or(ProxyError::MalformedRequest(
                "upstream request without an endpoint address",
            ))?;
        let timeout = self.inputs.config.response_timeout;
        // Under a policy stack the request's own deadline is enforced above: no second timer.
        let bounded = req.extensions().get::<Deadline>().is_some();
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let sent = match self.inputs.meshed(dst) {
            Some(endpoint) => {
                let Some(mesh) = &self.inputs.mesh_client else {
                    return Err(ProxyError::TlsConfig("no identity".into()));
                };
                let authority = match req.headers_mut().remove(header::HOST) {
                    Some(host) => Authority::try_from(host.as_bytes()),
                    None => Authority::try_from(dst.to_string()),
                };
                let uri = authority.ok().and_then(|authority| {
                    Uri::builder()
                        .scheme(Scheme::HTTP)
                        .authority(authority)
                        .path_and_query(path)
                        .build()
                        .ok()
                });
                *req.uri_mut() = uri.ok_or(ProxyError::MalformedRequest(
                    "request authority is not a valid URI authority",
                ))?;
                if self.app_version == Version::Http1 {
                    req.headers_mut()
                        .insert(ORIG_PROTO_HEADER, HeaderValue::from_static("HTTP/1.1"));
                }
                req.headers_mut()
                    .insert(TARGET_PORT_HEADER, HeaderValue::from(dst.port()));
                *req.version_mut() = http::Version::HTTP_2;
                within(timeout, bounded, mesh.send(&endpoint, req))
                    .await
                    .map(|sent| sent.map(|rsp| rsp.map(|body| body.map_err(Into::into).boxed())))
            }
            None => {
                if self.app_version == Version::Http1 {
                    *req.uri_mut() = Uri::from(path);
                    *req.version_mut() = http::Version::HTTP_11;
                }
                within(
                    timeout,
                    bounded,
                    self.inputs.pool.send(dst, self.app_version, req),
                )
                .await
            }
        };
        sent.map_err(|_| ProxyError::ResponseTimeout(dst, timeout))?
    }
}

/// `send` within `timeout`, unless the request is `bounded` by a deadline enforced elsewhere.
async fn within<F: Future>(
    timeout: Duration,
    bounded: bool,
    send: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    if bounded {
        Ok(send.await)
    } else {
        tokio::time::timeout(timeout, send).await
    }
}

/// Sends one request to the local application at `dst` (inbound, under the de-duplication layer).
#[derive(Clone)]
pub struct AppClient {
    /// Proxy-wide state.
    pub inputs: Arc<Inputs>,
    /// The application's address.
    pub dst: SocketAddr,
    /// The application's protocol.
    pub version: Version,
}

impl tower::Service<Request<Body>> for AppClient {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = HopFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let timeout = this.inputs.config.response_timeout;
            let bounded = req.extensions().get::<Deadline>().is_some();
            let rsp = within(
                timeout,
                bounded,
                this.inputs.pool.send(this.dst, this.version, req),
            )
            .await
            .map_err(|_| ProxyError::ResponseTimeout(this.dst, timeout))??;
            Ok(rsp.map(|body| body.map_err(Into::into).boxed()))
        })
    }
}

/// The last hop of a destination's kept policy stack (`DestinationPolicy::send_outbound`/`send_inbound`):
/// sends through the client `C` the request carries as an extension.
///
/// The stack is built once per destination and shared by every connection, so it cannot own a connection's
/// client; owning one would also tie the mesh table, which keeps the stack, back to the proxy's `Inputs` in a
/// reference cycle. The data path inserts the connection's [`UpstreamClient`] or [`AppClient`] instead.
pub struct ClientFromRequest<C>(PhantomData<fn() -> C>);

impl<C> Default for ClientFromRequest<C> {
    fn default() -> Self {
        ClientFromRequest(PhantomData)
    }
}

impl<C> Clone for ClientFromRequest<C> {
    fn clone(&self) -> Self {
        ClientFromRequest(PhantomData)
    }
}

impl<C> tower::Service<Request<Body>> for ClientFromRequest<C>
where
    C: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = ProxyError,
            Future = HopFuture,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = HopFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> HopFuture {
        match req.extensions().get::<C>().cloned() {
            Some(mut client) => client.call(req),
            None => Box::pin(std::future::ready(Err(ProxyError::MalformedRequest(
                "request without the client of its connection",
            )))),
        }
    }
}

impl Classify for ProxyError {
    fn failure_kind(&self) -> FailureKind {
        match self {
            ProxyError::ConnectRefused(_) | ProxyError::Connect(..) => FailureKind::ConnectRefused,
            ProxyError::ConnectTimeout(..) => FailureKind::ConnectTimeout,
            ProxyError::UpstreamReset(_, e) if is_refused_stream(e) => FailureKind::RefusedStream,
            ProxyError::UpstreamReset(..) | ProxyError::TlsHandshake(..) => {
                FailureKind::ResetBeforeResponse
            }
            ProxyError::ResponseTimeout(..) => FailureKind::ResponseTimeout,
            _ => FailureKind::Other,
        }
    }
}

/// HTTP/2 `REFUSED_STREAM`: the server guarantees it did not process the request.
fn is_refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}
