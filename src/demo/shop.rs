//! The demo shop's services: small real HTTP apps that call each other through their own sidecar.
//!
//! `order` checks stock with `inventory`, then charges `payment`; a load generator places orders. Every call
//! leaves the app as an explicit-proxy request to the app's own sidecar, exactly as an app with
//! `HTTP_PROXY` set would send it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::debug;

use crate::proxy::pool::{Pool, Version};
use crate::proxy::Body;

/// Which shop service an app is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Places orders: reserves stock, then charges.
    Order,
    /// Reserves stock.
    Inventory,
    /// Charges cards.
    Payment,
}

/// Payment's own record of what it charged, to check that no order is charged twice.
#[derive(Default)]
pub struct Ledger {
    charges: std::sync::Mutex<std::collections::HashMap<u64, u32>>,
}

impl Ledger {
    /// Records a charge for `order`.
    fn charge(&self, order: u64) {
        let mut charges = match self.charges.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        *charges.entry(order).or_default() += 1;
    }

    /// Orders charged, and orders charged more than once.
    pub fn totals(&self) -> (usize, usize) {
        let charges = match self.charges.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        (charges.len(), charges.values().filter(|n| **n > 1).count())
    }
}

/// How an app reaches the other services.
pub struct Directory {
    /// The app's own sidecar (outbound listener).
    pub sidecar: SocketAddr,
    /// Upstream connections to the sidecar.
    pub pool: Arc<Pool>,
    /// Where `inventory` listens.
    pub inventory: SocketAddr,
    /// Where `payment` listens.
    pub payment: SocketAddr,
    /// Share of payment calls that fail: half before charging (503), the rest after charging, with a
    /// response that comes too late (slow) or never in time (lost).
    pub payment_failure_rate: f64,
    /// Payment's ledger.
    pub ledger: Arc<Ledger>,
}

impl Directory {
    /// Sends `method url` with `body` through the app's sidecar, as an explicit-proxy request.
    pub async fn call(
        &self,
        method: Method,
        dst: SocketAddr,
        path: &str,
        body: String,
    ) -> Result<(StatusCode, Bytes), String> {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{dst}{path}"))
            .header(http::header::HOST, dst.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(
                Full::new(Bytes::from(body))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .map_err(|e| e.to_string())?;
        let rsp = self
            .pool
            .send(self.sidecar, Version::Http1, req)
            .await
            .map_err(|e| e.to_string())?;
        let status = rsp.status();
        let body = rsp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}

/// Serves one shop service on `listener` until the process ends.
pub async fn serve(service: Service, listener: TcpListener, directory: Arc<Directory>) {
    let sequence = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let directory = directory.clone();
        let sequence = sequence.clone();
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |req| {
                let directory = directory.clone();
                let sequence = sequence.clone();
                async move { Ok::<_, Infallible>(handle(service, req, &directory, &sequence).await) }
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

async fn handle(
    service: Service,
    req: Request<Incoming>,
    directory: &Directory,
    sequence: &AtomicU64,
) -> Response<Body> {
    let n = sequence.fetch_add(1, Ordering::Relaxed) + 1;
    match (service, req.method(), req.uri().path()) {
        (Service::Inventory, &Method::POST, "/reserve") => {
            json(StatusCode::OK, format!(r#"{{"reservation":{n}}}"#))
        }
        (Service::Payment, &Method::POST, "/charge") => charge(n, req, directory).await,
        (Service::Order, &Method::POST, "/orders") => place_order(n, directory).await,
        _ => json(
            StatusCode::NOT_FOUND,
            r#"{"error":"no such route"}"#.to_string(),
        ),
    }
}

/// The flaky payment provider: some calls fail before charging, some charge and then answer too late.
async fn charge(n: u64, req: Request<Incoming>, directory: &Directory) -> Response<Body> {
    let Ok(body) = http_body_util::Limited::new(req.into_body(), 4096)
        .collect()
        .await
    else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"unreadable body"}"#.to_string(),
        );
    };
    let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    let Some(order) = body
        .split("\"order\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse::<u64>().ok())
    else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"no order id"}"#.to_string(),
        );
    };
    let rate = directory.payment_failure_rate;
    let roll: f64 = rand::random();
    if roll < rate * 0.5 {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"card network unavailable"}"#.to_string(),
        );
    }
    directory.ledger.charge(order);
    if roll < rate * 0.9 {
        tokio::time::sleep(Duration::from_millis(400)).await;
    } else if roll < rate {
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    json(
        StatusCode::OK,
        format!(r#"{{"charge":{n},"order":{order}}}"#),
    )
}

async fn place_order(n: u64, directory: &Directory) -> Response<Body> {
    let reserve = directory
        .call(
            Method::POST,
            directory.inventory,
            "/reserve",
            format!(r#"{{"order":{n},"sku":"tea","qty":1}}"#),
        )
        .await;
    match reserve {
        Ok((status, _)) if status.is_success() => {}
        Ok((status, _)) => {
            return json(
                StatusCode::BAD_GATEWAY,
                format!(r#"{{"error":"inventory answered {status}"}}"#),
            )
        }
        Err(e) => {
            return json(
                StatusCode::BAD_GATEWAY,
                format!(r#"{{"error":"inventory unreachable: {e}"}}"#),
            )
        }
    }
    let charge = directory
        .call(
            Method::POST,
            directory.payment,
            "/charge",
            format!(r#"{{"order":{n},"amount_cents":450}}"#),
        )
        .await;
    match charge {
        Ok((status, _)) if status.is_success() => json(
            StatusCode::CREATED,
            format!(r#"{{"order":{n},"status":"placed"}}"#),
        ),
        Ok((status, _)) => json(
            StatusCode::BAD_GATEWAY,
            format!(r#"{{"error":"payment answered {status}"}}"#),
        ),
        Err(e) => json(
            StatusCode::BAD_GATEWAY,
            format!(r#"{{"error":"payment unreachable: {e}"}}"#),
        ),
    }
}

fn json(status: StatusCode, body: String) -> Response<Body> {
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
