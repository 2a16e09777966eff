//! HTTP forwarding: one request in, one request out, bodies streamed both ways.
//!
//! The request keeps its protocol (HTTP/1 → HTTP/1, HTTP/2 → HTTP/2), its `Host`, `x-request-id` and
//! `traceparent`; hop-by-hop headers are removed (RFC 9110 §7.6.1) except `TE: trailers`. WebSocket upgrades
//! and `CONNECT` tunnels get a connection of their own.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::debug;

use super::error::ProxyError;
use super::mesh::{ORIG_PROTO_HEADER, PEER_ID_HEADER, TARGET_PORT_HEADER};
use super::pool::{self, Version};
use super::transport::{Carried, TransportHeader};
use super::upstream::{AppClient, ClientFromRequest, UpstreamClient};
use super::{tcp, Body, Inputs};
use crate::discovery::{MeshedEndpoint, ServicePolicies, VirtualPort};
use crate::metrics::{method_label, Direction};
use crate::policy::Caller;
use crate::tls::SpiffeId;

/// Where requests on a connection go.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The connection was redirected: every request goes to its original destination.
    Original(SocketAddr),
    /// The client uses the proxy explicitly: each request names its destination.
    Explicit,
}

/// What every request on one client connection shares.
pub struct ConnContext {
    /// Proxy-wide state.
    pub inputs: Arc<Inputs>,
    /// Inbound or outbound.
    pub direction: Direction,
    /// Where requests go.
    pub target: Target,
    /// The protocol the client speaks.
    pub version: Version,
    /// Destination label, computed once for redirected connections.
    pub destination_label: Option<Arc<str>>,
    /// Metric handles already looked up on this connection, so that a kept-alive connection pays for the
    /// label hashing once rather than per request.
    pub metric_cache: MetricCache,
    /// The caller's verified identity, when the client is a peer sidecar over mTLS.
    pub peer: Option<SpiffeId>,
    /// Inbound HTTP/2 from a peer sidecar: each request names its application port in a header, and the
    /// application listens on this address.
    pub mesh_app_ip: Option<IpAddr>,
}

/// What a request's metrics are labelled with, learnt while forwarding it.
struct Outcome {
    destination: Option<Arc<str>>,
    tls: bool,
    peer: Option<SpiffeId>,
}

/// Serves one request: forwards it, or answers with the proxy's own error.
pub async fn serve(
    ctx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let method = method_label(req.method());
    let mut outcome = Outcome {
        destination: ctx.destination_label.clone(),
        tls: ctx.peer.is_some(),
        peer: ctx.peer.clone(),
    };
    let rsp = match forward(&ctx, req, &mut outcome).await {
        Ok(rsp) => rsp,
        Err(e) => {
            debug!(direction = ctx.direction.as_str(), error = %e, "request failed");
            ctx.inputs.metrics.proxy_error(ctx.direction, e.reason());
            e.to_response()
        }
    };
    let destination = outcome.destination.unwrap_or_else(|| Arc::from("unknown"));
    let key = RequestKey {
        destination,
        method,
        status: rsp.status().as_u16(),
        tls: outcome.tls,
        peer: outcome.peer,
    };
    let (counter, histogram) = ctx
        .metric_cache
        .handles(&ctx.inputs.metrics, ctx.direction, key);
    counter.inc();
    histogram.observe(start.elapsed().as_secs_f64());
    Ok(rsp)
}

/// The labels of one request's metrics.
#[derive(Clone, PartialEq, Eq)]
struct RequestKey {
    destination: Arc<str>,
    method: &'static str,
    status: u16,
    tls: bool,
    peer: Option<SpiffeId>,
}

/// Most connections see a handful of label combinations; more than this are looked up each time.
const METRIC_CACHE_ENTRIES: usize = 16;

/// Per-connection cache of labelled metric handles.
#[derive(Default)]
pub struct MetricCache(
    std::sync::Mutex<Vec<(RequestKey, prometheus::IntCounter, prometheus::Histogram)>>,
);

impl MetricCache {
    fn handles(
        &self,
        metrics: &crate::metrics::Metrics,
        direction: Direction,
        key: RequestKey,
    ) -> (prometheus::IntCounter, prometheus::Histogram) {
        let mut cache = match self.0.lock() {
            Ok(cache) => cache,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((_, counter, histogram)) = cache.iter().find(|(k, _, _)| *k == key) {
            return (counter.clone(), histogram.clone());
        }
        let status = key.status.to_string();
        let tls = if key.tls { "true" } else { "false" };
        let peer = key.peer.as_ref().map_or("", |p| p.as_str());
        let counter = metrics.requests.with_label_values(&[
            direction.as_str(),
            &key.destination,
            key.method,
            &status,
            tls,
            peer,
        ]);
        let histogram = metrics
            .request_duration
            .with_label_values(&[direction.as_str(), &key.destination]);
        if cache.len() < METRIC_CACHE_ENTRIES {
            cache.push((key, counter.clone(), histogram.clone()));
        }
        (counter, histogram)
    }
}

async fn forward(
    ctx: &ConnContext,
    req: Request<Incoming>,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ProxyError> {
    if ctx.direction == Direction::Inbound {
        return inbound(ctx, req, outcome).await;
    }
    let dst = match ctx.target {
        Target::Original(dst) => dst,
        Target::Explicit => {
            let authority = explicit_authority(&req)?;
            outcome.destination = Some(Arc::from(authority.as_str()));
            resolve(&authority).await?
        }
    };
    if outcome.destination.is_none() {
        outcome.destination = Some(Arc::from(dst.to_string()));
    }
    if let Some(service) = ctx.inputs.mesh.table().virtual_port(dst).cloned() {
        return to_virtual(ctx, dst, &service, req, outcome).await;
    }
    let meshed = ctx.inputs.meshed(dst);
    if let Some(endpoint) = &meshed {
        outcome.tls = true;
        outcome.peer = Some(endpoint.identity.clone());
    }
    let via = meshed.as_ref();
    if req.method() == Method::CONNECT {
        connect_tunnel(ctx, dst, via, req).await
    } else if ctx.version == Version::Http1 && is_websocket_upgrade(req.headers()) {
        websocket(ctx, dst, via, req).await
    } else if let Some(policies) = ctx.inputs.mesh.table().policies(dst).cloned() {
        with_policies(ctx, &policies, req).await
    } else if via.is_some() {
        to_peer_sidecar(ctx, dst, req).await
    } else {
        plain(ctx, dst, ctx.version, req).await
    }
}

/// A request to a service's virtual address: balanced per request over the endpoints behind the port
/// (each reached over mTLS proving its own identity when it has a sidecar, plain otherwise); `CONNECT` and
/// WebSocket upgrades take one endpoint for the whole connection.
async fn to_virtual(
    ctx: &ConnContext,
    dst: SocketAddr,
    service: &VirtualPort,
    req: Request<Incoming>,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ProxyError> {
    if service.meshed && ctx.inputs.mesh_client.is_some() {
        outcome.tls = true;
        outcome.peer = Some(service.identity.clone());
    }
    let tunnel = req.method() == Method::CONNECT;
    let own_connection =
        tunnel || (ctx.version == Version::Http1 && is_websocket_upgrade(req.headers()));
    if !own_connection {
        return with_policies(ctx, &service.policies, req).await;
    }
    let endpoint = service
        .policies
        .destination
        .endpoints
        .pick()
        .ok_or(ProxyError::NoEndpoints(dst))?;
    let via = ctx.inputs.meshed(endpoint);
    if tunnel {
        connect_tunnel(ctx, endpoint, via.as_ref(), req).await
    } else {
        websocket(ctx, endpoint, via.as_ref(), req).await
    }
}

/// Inbound: authorize the caller, restore what the peer sidecar changed, and deliver to the application.
async fn inbound(
    ctx: &ConnContext,
    mut req: Request<Incoming>,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ProxyError> {
    let (dst, version) = match ctx.mesh_app_ip {
        Some(ip) => {
            let port = req
                .headers()
                .get(TARGET_PORT_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u16>().ok())
                .filter(|p| *p != 0)
                .ok_or(ProxyError::MissingTarget)?;
            let http1 = req
                .headers()
                .get(ORIG_PROTO_HEADER)
                .is_some_and(|v| v.as_bytes().starts_with(b"HTTP/1"));
            (
                SocketAddr::new(ip, port),
                if http1 {
                    Version::Http1
                } else {
                    Version::Http2
                },
            )
        }
        None => match ctx.target {
            Target::Original(dst) => (dst, ctx.version),
            Target::Explicit => return Err(ProxyError::Loop),
        },
    };
    if outcome.destination.is_none() {
        outcome.destination = Some(Arc::from(dst.to_string()));
    }
    let policy = ctx.inputs.mesh.table().inbound(dst);
    if !policy.admits(ctx.peer.as_ref()) {
        let who = ctx
            .peer
            .as_ref()
            .map_or_else(|| "plaintext".to_string(), |p| p.to_string());
        return Err(ProxyError::Unauthorized(who));
    }
    let headers = req.headers_mut();
    headers.remove(TARGET_PORT_HEADER);
    headers.remove(ORIG_PROTO_HEADER);
    // Only this sidecar may say who the caller is: a value sent by the caller is never passed on.
    headers.remove(PEER_ID_HEADER);
    if let Some(peer) = &ctx.peer {
        if let Ok(value) = HeaderValue::from_str(peer.as_str()) {
            headers.insert(PEER_ID_HEADER, value);
        }
    }
    if ctx.version == Version::Http1 && is_websocket_upgrade(req.headers()) {
        return websocket(ctx, dst, None, req).await;
    }
    if let Some(policies) = ctx.inputs.mesh.table().policies(dst).cloned() {
        return deduplicated(ctx, dst, version, &policies, req).await;
    }
    plain(ctx, dst, version, req).await
}

/// A request to a service with resilience policies: through its outbound stack (limits, timeouts, key
/// injection, retries, balancing across its endpoints, circuit breaking) to the chosen endpoint.
async fn with_policies(
    ctx: &ConnContext,
    policies: &ServicePolicies,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    // The URI stays as it came: the balancer writes the chosen endpoint into it.
    let mut req = forwarded(req);
    req.extensions_mut().insert(UpstreamClient {
        inputs: ctx.inputs.clone(),
        app_version: ctx.version,
    });
    let rsp = policies
        .destination
        .send_outbound::<ClientFromRequest<UpstreamClient>, _>(req)
        .await?;
    Ok(downstream(ctx, rsp))
}

/// Inbound to a service with policies: the caller's deadline and idempotency de-duplication before the app.
async fn deduplicated(
    ctx: &ConnContext,
    dst: SocketAddr,
    version: Version,
    policies: &ServicePolicies,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    prepare_for_upstream(&mut parts, version);
    // De-duplication keys on who is calling: the verified identity, else the sidecar's own view of the peer.
    let caller = ctx
        .peer
        .as_ref()
        .map_or_else(|| "plaintext".to_string(), |p| p.to_string());
    parts.extensions.insert(Caller(caller));
    parts.extensions.insert(AppClient {
        inputs: ctx.inputs.clone(),
        dst,
        version,
    });
    let req = Request::from_parts(parts, body.map_err(Into::into).boxed());
    let rsp = policies
        .destination
        .send_inbound::<ClientFromRequest<AppClient>, _>(&policies.dedup, req)
        .await?;
    Ok(downstream(ctx, rsp))
}

/// A response from a policy stack as the client gets it.
fn downstream(ctx: &ConnContext, rsp: Response<Body>) -> Response<Body> {
    let (mut parts, body) = rsp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    parts.version = match ctx.version {
        Version::Http1 => http::Version::HTTP_11,
        Version::Http2 => http::Version::HTTP_2,
    };
    Response::from_parts(parts, body)
}

/// Hop-by-hop headers out; for an HTTP/1 upstream, origin-form with `Host` set.
fn prepare_for_upstream(parts: &mut http::request::Parts, version: Version) {
    strip_hop_by_hop(&mut parts.headers, true);
    if version == Version::Http1 {
        set_host_if_missing(&mut parts.headers, &parts.uri);
        parts.uri = origin_form(&parts.uri);
        parts.version = http::Version::HTTP_11;
    }
}

/// An ordinary request: through the pool, within the response timeout, speaking `version` upstream.
async fn plain(
    ctx: &ConnContext,
    dst: SocketAddr,
    version: Version,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    prepare_for_upstream(&mut parts, version);
    let upstream_req = Request::from_parts(parts, body.map_err(Into::into).boxed());
    let timeout = ctx.inputs.config.response_timeout;
    let rsp = tokio::time::timeout(timeout, ctx.inputs.pool.send(dst, version, upstream_req))
        .await
        .map_err(|_| ProxyError::ResponseTimeout(dst, timeout))??;
    Ok(downstream(ctx, rsp))
}

/// A request to a meshed destination: HTTP/2 over mTLS to its sidecar, whatever the application spoke.
async fn to_peer_sidecar(
    ctx: &ConnContext,
    dst: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let client = UpstreamClient {
        inputs: ctx.inputs.clone(),
        app_version: ctx.version,
    };
    let rsp = client.send(endpoint_form(req, dst)?).await?;
    Ok(downstream(ctx, rsp))
}

/// The request with hop-by-hop headers removed and the original authority in `Host`, ready for a policy
/// stack or [`UpstreamClient`].
fn forwarded(req: Request<Incoming>) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    set_host_if_missing(&mut parts.headers, &parts.uri);
    Request::from_parts(parts, body.map_err(Into::into).boxed())
}

/// The request as [`UpstreamClient`] takes it without a balancer: [`forwarded`], with the endpoint's
/// address in the URI.
fn endpoint_form(req: Request<Incoming>, dst: SocketAddr) -> Result<Request<Body>, ProxyError> {
    let mut req = forwarded(req);
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    *req.uri_mut() = Uri::try_from(format!("http://{dst}{path}"))
        .map_err(|_| ProxyError::MalformedRequest("request target is not a valid path"))?;
    Ok(req)
}

/// The upstream's response as the client gets it: hop-by-hop headers removed, the client's HTTP version.
fn downstream_response(ctx: &ConnContext, rsp: Response<Incoming>) -> Response<Body> {
    downstream(ctx, rsp.map(|body| body.map_err(Into::into).boxed()))
}

/// `Upgrade: websocket` on HTTP/1.1: a dedicated upstream connection (over mTLS to a meshed destination),
/// then bytes both ways after `101`.
async fn websocket(
    ctx: &ConnContext,
    dst: SocketAddr,
    via: Option<&MeshedEndpoint>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    set_upgrade_headers(&mut parts.headers);
    set_host_if_missing(&mut parts.headers, &parts.uri);
    parts.uri = origin_form(&parts.uri);
    let mut sender = match (via, &ctx.inputs.mesh_client) {
        (Some(endpoint), Some(mesh)) => {
            let tls = mesh
                .open(
                    endpoint,
                    TransportHeader {
                        port: dst.port(),
                        carried: Carried::Http1,
                    },
                )
                .await?;
            pool::http1_handshake(dst, tls, true).await?
        }
        _ => ctx.inputs.pool.connect_http1(dst, true).await?,
    };
    let upstream_req = Request::from_parts(parts, body.map_err(Into::into).boxed());
    let timeout = ctx.inputs.config.response_timeout;
    let mut rsp = tokio::time::timeout(timeout, sender.send_request(upstream_req))
        .await
        .map_err(|_| ProxyError::ResponseTimeout(dst, timeout))?
        .map_err(|e| ProxyError::UpstreamReset(dst, e))?;
    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut rsp);
        let inputs = ctx.inputs.clone();
        let direction = ctx.direction;
        // The peer sidecar: the server's outbound through the mesh, the verified caller's inbound.
        let peer = via.map(|v| v.identity.clone()).or_else(|| ctx.peer.clone());
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let destination = dst.to_string();
                    let link = tcp::Link {
                        direction,
                        destination: &destination,
                        peer: peer.as_ref(),
                    };
                    tcp::relay(&inputs, &link, TokioIo::new(client), TokioIo::new(upstream)).await;
                }
                Err(e) => debug!(%dst, error = %e, "websocket upgrade failed"),
            }
        });
    }
    let mut rsp = downstream_response(ctx, rsp);
    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        set_upgrade_headers(rsp.headers_mut());
    }
    Ok(rsp)
}

/// `CONNECT host:port`: connect first (so a failure is still a 502), answer 200, then relay bytes.
async fn connect_tunnel(
    ctx: &ConnContext,
    dst: SocketAddr,
    via: Option<&MeshedEndpoint>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let upstream = tcp::Upstream::connect(&ctx.inputs, dst, via).await?;
    let inputs = ctx.inputs.clone();
    let direction = ctx.direction;
    let caller = ctx.peer.clone();
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(client) => {
                upstream
                    .relay(
                        &inputs,
                        direction,
                        dst,
                        caller.as_ref(),
                        TokioIo::new(client),
                    )
                    .await
            }
            Err(e) => debug!(%dst, error = %e, "CONNECT upgrade failed"),
        }
    });
    Ok(Response::new(
        Empty::new().map_err(|never| match never {}).boxed(),
    ))
}

/// The `host:port` an explicit-proxy request names.
fn explicit_authority(req: &Request<Incoming>) -> Result<String, ProxyError> {
    let uri = req.uri();
    let authority = uri
        .authority()
        .ok_or_else(|| ProxyError::NotAProxyRequest(uri.to_string()))?;
    if req.method() != Method::CONNECT && uri.scheme() != Some(&http::uri::Scheme::HTTP) {
        return Err(ProxyError::NotAProxyRequest(uri.to_string()));
    }
    match authority.port_u16() {
        Some(_) => Ok(authority.as_str().to_owned()),
        None => Ok(format!("{}:80", authority.host())),
    }
}

/// Resolves `host:port`; IP literals skip the resolver.
async fn resolve(authority: &str) -> Result<SocketAddr, ProxyError> {
    if let Ok(addr) = authority.parse() {
        return Ok(addr);
    }
    let unbracketed = authority.replace(['[', ']'], "");
    if let Ok(addr) = unbracketed.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let fail = |reason: String| ProxyError::Resolve {
        host: authority.to_string(),
        reason,
    };
    let mut addrs = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| fail(e.to_string()))?;
    addrs.next().ok_or_else(|| fail("no addresses".into()))
}

fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

fn set_host_if_missing(headers: &mut HeaderMap, uri: &Uri) {
    if headers.contains_key(header::HOST) {
        return;
    }
    if let Some(value) = uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        headers.insert(header::HOST, value);
    }
}

/// Whether a request asks to switch to WebSocket (the only upgrade meshlet forwards; `h2c` is dropped).
fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok());
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade && upgrade.is_some_and(|u| u.trim().eq_ignore_ascii_case("websocket"))
}

fn set_upgrade_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including any named in `Connection`.
///
/// `TE: trailers` survives on requests, since gRPC servers need it to send trailers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, is_request: bool) {
    // Most messages carry none of these: one pass over the names is cheaper than a lookup per name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let te_trailers = is_request
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for name in HOP_BY_HOP_NONSTANDARD {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

const HOP_BY_HOP_NONSTANDARD: [&str; 3] = ["keep-alive", "proxy-connection", "http2-settings"];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || HOP_BY_HOP_NONSTANDARD.contains(&name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_but_te_trailers_and_tracing_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret, upgrade"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.insert("host", HeaderValue::from_static("svc"));
        assert!(!is_websocket_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(h.get("te").unwrap(), "trailers");
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "upgrade",
            "http2-settings",
        ] {
            assert!(!names.contains(&gone), "{gone} kept: {names:?}");
        }
        for kept in ["traceparent", "x-request-id", "host"] {
            assert!(names.contains(&kept), "{kept} dropped");
        }
    }

    #[test]
    fn websocket_upgrades_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_websocket_upgrade(&h));
    }
}
