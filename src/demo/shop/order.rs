//! `order`: the checkout saga, every step a call through the mesh.
//!
//! 1. create the order (`pending`, in this service's book);
//! 2. reserve stock with `inventory` (`POST /reservations`, keyed by order);
//! 3. charge `payment` (`POST /charges`); the caller's sidecar injects an `Idempotency-Key` and retries,
//!    payment's sidecar de-duplicates;
//! 4. on success: `placed`, and `order.created` is published to the event path.
//!
//! Any failure runs the compensations in reverse: **void the payment**, release the stock, cancel the order.
//!
//! Why void, and void always? A charge that failed with 503 or 402 charged nothing, but one whose answer was
//! lost (the caller's request timeout ran out while payment was still working) may have charged, or may
//! charge later, when a retry still in flight lands. The saga cannot tell these apart, so it does not try:
//! `POST /voids {"order": n}` is keyed by the order, not by a request, so sending it again is harmless; it
//! refunds whatever was charged for the order and makes payment refuse every later charge for it. After a
//! void, the order's net charge is zero whatever happened to the charge, and no charge is ever issued twice
//! because the saga never sends a second charge request (retries are the sidecar's, under one key).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

use super::{lock, not_found, Directory};
use crate::demo::events::{OrderCreated, Publisher};
use crate::proxy::Body;

/// Orders remembered at most (oldest forgotten first).
const MAX_ORDERS: usize = 1_000_000;
/// Tries of one compensation step before the order is marked `compensation_failed`.
const COMPENSATION_ATTEMPTS: u32 = 10;
/// What every order costs.
pub const PRICE_CENTS: u64 = 450;

/// Where an order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// The saga is running.
    Pending,
    /// Reserved and charged.
    Placed,
    /// A step failed and every compensation ran.
    Cancelled,
    /// A step failed and a compensation could not be completed.
    CompensationFailed,
}

/// The order service's book and counters.
#[derive(Default)]
pub struct Orders {
    next: AtomicU64,
    book: Mutex<BTreeMap<u64, OrderState>>,
    events: Option<Publisher>,
    /// Orders placed.
    pub placed: AtomicU64,
    /// Orders cancelled after compensation.
    pub cancelled: AtomicU64,
    /// Voids sent to payment (compensations).
    pub voids: AtomicU64,
    /// Stock releases sent to inventory (compensations).
    pub releases: AtomicU64,
    /// Sagas running now.
    pub in_flight: AtomicU64,
}

impl Orders {
    /// An order service publishing `order.created` through `events` (none: the event path is off).
    pub fn new(events: Option<Publisher>) -> Orders {
        Orders {
            events,
            ..Orders::default()
        }
    }

    /// Every order and where it is.
    pub fn book(&self) -> Vec<(u64, OrderState)> {
        lock(&self.book).iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn set(&self, order: u64, state: OrderState) {
        let mut book = lock(&self.book);
        book.insert(order, state);
        if book.len() > MAX_ORDERS {
            book.pop_first();
        }
    }
}

/// Counts a running saga for as long as it lives.
struct Running<'a>(&'a AtomicU64);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `POST /orders {"customer": n, "sku": s, "qty": q}` runs the saga.
pub async fn handle(
    orders: &Orders,
    method: &Method,
    path: &str,
    body: &Value,
    directory: &Directory,
) -> http::Response<Body> {
    if (method, path) != (&Method::POST, "/orders") {
        return not_found();
    }
    orders.in_flight.fetch_add(1, Ordering::Relaxed);
    let _running = Running(&orders.in_flight);
    let order = orders.next.fetch_add(1, Ordering::Relaxed) + 1;
    orders.set(order, OrderState::Pending);
    let sku = body.get("sku").and_then(Value::as_str).unwrap_or("tea");
    let qty = body.get("qty").and_then(Value::as_u64).unwrap_or(1);

    let reserve = json!({"order": order, "sku": sku, "qty": qty}).to_string();
    match directory
        .call(Method::POST, "inventory", "/reservations", Some(reserve))
        .await
    {
        Ok((status, _)) if status.is_success() => {}
        answer => {
            let reason = failure("inventory", &answer);
            return compensate(orders, directory, order, false, &reason).await;
        }
    }

    let charge = json!({"order": order, "amount_cents": PRICE_CENTS}).to_string();
    match directory
        .call(Method::POST, "payment", "/charges", Some(charge))
        .await
    {
        Ok((status, _)) if status.is_success() => {
            orders.set(order, OrderState::Placed);
            orders.placed.fetch_add(1, Ordering::Relaxed);
            if let Some(events) = &orders.events {
                events.publish(OrderCreated {
                    order,
                    amount_cents: PRICE_CENTS,
                });
            }
            super::json(
                StatusCode::CREATED,
                json!({"order": order, "status": "placed"}).to_string(),
            )
        }
        answer => {
            let reason = failure("payment", &answer);
            compensate(orders, directory, order, true, &reason).await
        }
    }
}

fn failure(service: &str, answer: &super::Answer) -> String {
    match answer {
        Ok((status, _)) => format!("{service} answered {}", status.as_u16()),
        Err(e) => format!("{service} unreachable: {e}"),
    }
}

/// The compensations, in reverse order of the steps: void the payment (when it was asked to charge), release
/// the stock, cancel the order.
async fn compensate(
    orders: &Orders,
    directory: &Directory,
    order: u64,
    payment_asked: bool,
    reason: &str,
) -> http::Response<Body> {
    let void = json!({"order": order}).to_string();
    let voided = !payment_asked
        || until_done(
            directory,
            Method::POST,
            "payment",
            "/voids",
            Some(void),
            &orders.voids,
        )
        .await;
    let released = until_done(
        directory,
        Method::DELETE,
        "inventory",
        &format!("/reservations/{order}"),
        None,
        &orders.releases,
    )
    .await;
    if voided && released {
        orders.set(order, OrderState::Cancelled);
        orders.cancelled.fetch_add(1, Ordering::Relaxed);
        let status = if reason.ends_with(" 402") {
            StatusCode::PAYMENT_REQUIRED
        } else {
            StatusCode::CONFLICT
        };
        super::json(
            status,
            json!({"order": order, "status": "cancelled", "reason": reason}).to_string(),
        )
    } else {
        orders.set(order, OrderState::CompensationFailed);
        super::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"order": order, "status": "compensation_failed", "reason": reason}).to_string(),
        )
    }
}

/// Sends a compensation until it succeeds (it is keyed by the order, so repeats are harmless), counting
/// every attempt in `sent`.
async fn until_done(
    directory: &Directory,
    method: Method,
    service: &str,
    path: &str,
    body: Option<String>,
    sent: &AtomicU64,
) -> bool {
    for attempt in 1..=COMPENSATION_ATTEMPTS {
        sent.fetch_add(1, Ordering::Relaxed);
        let answer = directory
            .call(method.clone(), service, path, body.clone())
            .await;
        if matches!(answer, Ok((status, _)) if status.is_success()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100) * attempt).await;
    }
    false
}
