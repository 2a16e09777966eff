//! The demo shop's services: small real HTTP apps that call each other through their own sidecar.
//!
//! `api-gateway` fans out to `order`, `customer` and `shipping` in parallel and aggregates their answers;
//! `order` runs the checkout saga against `inventory` and `payment` and publishes `order.created`. Every call
//! leaves an app as an explicit-proxy request to the app's own sidecar, exactly as an app with `HTTP_PROXY`
//! set would send it.

pub mod gateway;
pub mod info;
pub mod inventory;
pub mod order;
pub mod payment;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::proxy::pool::{Pool, Version};
use crate::proxy::Body;

/// Largest request or response body an app reads.
const MAX_BODY: usize = 64 * 1024;
/// How long an app waits for any one call, whatever its sidecar's policy says.
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// A shop app and its own state.
#[derive(Clone)]
pub enum App {
    /// The front door: fans out and aggregates.
    Gateway,
    /// Orders and the checkout saga.
    Order(Arc<order::Orders>),
    /// Stock reservations.
    Inventory(Arc<inventory::Inventory>),
    /// The flaky payment provider and its ledger.
    Payment(Arc<payment::Payment>),
    /// Customer profiles.
    Customer,
    /// Shipping quotes.
    Shipping,
}

/// How an app reaches the other services: through its own sidecar.
pub struct Directory {
    /// The app's own sidecar (outbound listener).
    pub sidecar: SocketAddr,
    /// Upstream connections to the sidecar.
    pub pool: Arc<Pool>,
    /// Where each service listens, by name.
    pub services: Arc<HashMap<&'static str, SocketAddr>>,
}

/// An answer from another service: its status and body.
pub type Answer = Result<(StatusCode, Bytes), String>;

impl Directory {
    /// Sends `method path` with `body` to `service` through the app's sidecar, as an explicit-proxy request.
    pub async fn call(
        &self,
        method: Method,
        service: &str,
        path: &str,
        body: Option<String>,
    ) -> Answer {
        let dst = *self
            .services
            .get(service)
            .ok_or_else(|| format!("unknown service {service}"))?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{dst}{path}"))
            .header(http::header::HOST, dst.to_string());
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(
                Full::new(Bytes::from(body.unwrap_or_default()))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(CALL_LIMIT, self.exchange(req))
            .await
            .map_err(|_| format!("{service} did not answer within {CALL_LIMIT:?}"))?
    }

    async fn exchange(&self, req: Request<Body>) -> Answer {
        let rsp = self
            .pool
            .send(self.sidecar, Version::Http1, req)
            .await
            .map_err(|e| e.to_string())?;
        let status = rsp.status();
        Ok((status, read_limited(rsp.into_body()).await?))
    }
}

/// Reads a whole body of at most [`MAX_BODY`] bytes.
async fn read_limited<B>(body: B) -> Result<Bytes, String>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_BODY {
                return Err(format!("a body over {MAX_BODY} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// Serves one shop app on `listener` until the process ends.
pub async fn serve(app: App, listener: TcpListener, directory: Arc<Directory>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (app, directory) = (app.clone(), directory.clone());
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |req| {
                let (app, directory) = (app.clone(), directory.clone());
                async move { Ok::<_, Infallible>(handle(&app, req, &directory).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .await
            {
                debug!(error = %e, "demo app connection failed");
            }
        });
    }
}

async fn handle(app: &App, req: Request<Incoming>, directory: &Directory) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let Some(body) = read_json(req).await else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"the body is not JSON (or over 64 KiB)"}"#.into(),
        );
    };
    match app {
        App::Gateway => gateway::handle(&method, &path, &body, directory).await,
        App::Order(orders) => order::handle(orders, &method, &path, &body, directory).await,
        App::Inventory(inventory) => inventory.handle(&method, &path, &body),
        App::Payment(payment) => payment.handle(&method, &path, &body).await,
        App::Customer => info::customer(&method, &path),
        App::Shipping => info::shipping(&method, &path, &query).await,
    }
}

/// The request body as JSON (`null` when empty); `None` when unreadable, too large or not JSON.
async fn read_json(req: Request<Incoming>) -> Option<serde_json::Value> {
    let bytes = read_limited(req.into_body()).await.ok()?;
    if bytes.is_empty() {
        return Some(serde_json::Value::Null);
    }
    serde_json::from_slice(&bytes).ok()
}

/// A JSON response.
pub fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut rsp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// The 404 every app gives for routes it does not have.
pub fn not_found() -> Response<Body> {
    json(StatusCode::NOT_FOUND, r#"{"error":"no such route"}"#.into())
}

/// The order id in a request body (`{"order": 12, ...}`).
pub fn order_id(body: &serde_json::Value) -> Option<u64> {
    body.get("order")?.as_u64()
}

/// Locks a mutex even if a panicking thread poisoned it (the data are counters and tables).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
