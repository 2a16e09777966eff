//! `inventory`: stock reservations keyed by order, so reserving or releasing twice changes nothing (the saga
//! and the sidecars may both send an operation again).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use http::{Method, StatusCode};
use serde_json::Value;

use super::{json, lock, not_found, order_id};
use crate::proxy::Body;

/// Reservations remembered at most (oldest forgotten first).
const MAX_RESERVATIONS: usize = 1_000_000;

/// Reservations by order: `true` while held, `false` once released.
#[derive(Default)]
pub struct Inventory {
    reservations: Mutex<BTreeMap<u64, bool>>,
    /// Reservations made.
    pub reserved: AtomicU64,
    /// Reservations released by a compensation.
    pub released: AtomicU64,
}

impl Inventory {
    /// `POST /reservations {"order": n}` reserves; `DELETE /reservations/{order}` releases.
    pub fn handle(&self, method: &Method, path: &str, body: &Value) -> http::Response<Body> {
        match (method, path) {
            (&Method::POST, "/reservations") => match order_id(body) {
                Some(order) => self.reserve(order),
                None => json(StatusCode::BAD_REQUEST, r#"{"error":"no order id"}"#.into()),
            },
            (&Method::DELETE, _) => match path
                .strip_prefix("/reservations/")
                .and_then(|id| id.parse().ok())
            {
                Some(order) => self.release(order),
                None => not_found(),
            },
            _ => not_found(),
        }
    }

    fn reserve(&self, order: u64) -> http::Response<Body> {
        let mut reservations = lock(&self.reservations);
        match reservations.get(&order) {
            Some(false) => {
                return json(
                    StatusCode::CONFLICT,
                    format!(r#"{{"order":{order},"error":"reservation already released"}}"#),
                )
            }
            Some(true) => {}
            None => {
                reservations.insert(order, true);
                self.reserved.fetch_add(1, Ordering::Relaxed);
                if reservations.len() > MAX_RESERVATIONS {
                    reservations.pop_first();
                }
            }
        }
        json(
            StatusCode::OK,
            format!(r#"{{"order":{order},"reserved":1}}"#),
        )
    }

    fn release(&self, order: u64) -> http::Response<Body> {
        let mut reservations = lock(&self.reservations);
        // A release that overtook its reservation leaves a tombstone, so the late reservation is refused.
        if reservations.insert(order, false) == Some(true) {
            self.released.fetch_add(1, Ordering::Relaxed);
        }
        if reservations.len() > MAX_RESERVATIONS {
            reservations.pop_first();
        }
        json(
            StatusCode::OK,
            format!(r#"{{"order":{order},"released":true}}"#),
        )
    }

    /// Reservations still held.
    pub fn held(&self) -> usize {
        lock(&self.reservations)
            .values()
            .filter(|held| **held)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserving_and_releasing_twice_changes_nothing_and_a_late_reservation_is_refused() {
        let inventory = Inventory::default();
        let order = serde_json::json!({"order": 1});
        assert_eq!(
            inventory
                .handle(&Method::POST, "/reservations", &order)
                .status(),
            StatusCode::OK
        );
        inventory.handle(&Method::POST, "/reservations", &order);
        assert_eq!(inventory.reserved.load(Ordering::Relaxed), 1);
        assert_eq!(inventory.held(), 1);
        inventory.handle(&Method::DELETE, "/reservations/1", &Value::Null);
        inventory.handle(&Method::DELETE, "/reservations/1", &Value::Null);
        assert_eq!(inventory.released.load(Ordering::Relaxed), 1);
        assert_eq!(inventory.held(), 0);
        assert_eq!(
            inventory
                .handle(&Method::POST, "/reservations", &order)
                .status(),
            StatusCode::CONFLICT
        );
        inventory.handle(&Method::DELETE, "/reservations/2", &Value::Null);
        assert_eq!(
            inventory
                .handle(
                    &Method::POST,
                    "/reservations",
                    &serde_json::json!({"order": 2})
                )
                .status(),
            StatusCode::CONFLICT
        );
    }
}
