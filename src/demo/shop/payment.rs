//! `payment`: a flaky card provider and its ledger.
//!
//! Of the charges it receives, a configurable share fails: 40% of those answer 503 before charging (the
//! caller's sidecar retries them), 20% are declined (402, final), 25% charge and answer late (past the
//! caller's per-try timeout: the retry carries the same injected `Idempotency-Key`, and payment's own sidecar
//! answers it with the stored response instead of charging again), and 15% charge and answer so late that
//! the caller gives up: the response is lost.
//!
//! This app applies every charge it is handed: de-duplication is the mesh's job, and the ledger shows
//! whether it did it. What the app does know is orders: `POST /voids` closes an order for good, refunds
//! whatever was charged for it, and refuses any charge for it that arrives later. That is how the order
//! saga makes a charge whose answer was lost safe (see `order.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::{json, lock, not_found, order_id};
use crate::proxy::Body;

/// Orders the ledger keeps at most (oldest forgotten first).
const MAX_LEDGER: usize = 1_000_000;
/// How long a "slow" charge takes: past the demo policy's 250 ms per-try timeout.
pub const SLOW: Duration = Duration::from_millis(400);
/// How long a "lost" charge takes: past the demo policy's 3 s request timeout.
pub const LOST: Duration = Duration::from_secs(5);

/// Payment's record of one order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    /// The order.
    pub order: u64,
    /// Times the card was charged for it.
    pub charges: u32,
    /// Times a charge was refunded.
    pub refunds: u32,
    /// Whether the order was voided (no charge accepted any more).
    pub voided: bool,
}

/// What a failing charge does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Unavailable,
    Declined,
    Slow,
    Lost,
    Charged,
}

/// The payment app: failure rate, ledger and counters.
#[derive(Default)]
pub struct Payment {
    /// Share of charges that fail, 0..=1.
    pub failure_rate: f64,
    ledger: Mutex<BTreeMap<u64, LedgerEntry>>,
    /// Charges that answered 503 without charging.
    pub unavailable: AtomicU64,
    /// Charges declined.
    pub declined: AtomicU64,
    /// Charges answered late.
    pub slow: AtomicU64,
    /// Charges whose answer came too late for the caller.
    pub lost: AtomicU64,
    /// Voids processed.
    pub voids: AtomicU64,
}

impl Payment {
    /// A payment app failing `failure_rate` of charges.
    pub fn new(failure_rate: f64) -> Payment {
        Payment {
            failure_rate,
            ..Payment::default()
        }
    }

    /// `POST /charges {"order": n, "amount_cents": c}` and `POST /voids {"order": n}`.
    pub async fn handle(&self, method: &Method, path: &str, body: &Value) -> http::Response<Body> {
        let Some(order) = order_id(body) else {
            return match (method, path) {
                (&Method::POST, "/charges" | "/voids") => {
                    json(StatusCode::BAD_REQUEST, r#"{"error":"no order id"}"#.into())
                }
                _ => not_found(),
            };
        };
        match (method, path) {
            (&Method::POST, "/charges") => self.charge(order).await,
            (&Method::POST, "/voids") => self.void(order),
            _ => not_found(),
        }
    }

    fn roll(&self) -> Outcome {
        let roll: f64 = rand::random();
        let rate = self.failure_rate;
        match roll {
            r if r < rate * 0.40 => Outcome::Unavailable,
            r if r < rate * 0.60 => Outcome::Declined,
            r if r < rate * 0.85 => Outcome::Slow,
            r if r < rate => Outcome::Lost,
            _ => Outcome::Charged,
        }
    }

    async fn charge(&self, order: u64) -> http::Response<Body> {
        let outcome = self.roll();
        match outcome {
            Outcome::Unavailable => {
                self.unavailable.fetch_add(1, Ordering::Relaxed);
                return json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    r#"{"error":"card network unavailable"}"#.into(),
                );
            }
            Outcome::Declined => {
                self.declined.fetch_add(1, Ordering::Relaxed);
                return json(
                    StatusCode::PAYMENT_REQUIRED,
                    format!(r#"{{"order":{order},"error":"card declined"}}"#),
                );
            }
            Outcome::Slow | Outcome::Lost | Outcome::Charged => {}
        }
        if !self.record_charge(order) {
            return json(
                StatusCode::CONFLICT,
                format!(r#"{{"order":{order},"error":"order voided"}}"#),
            );
        }
        match outcome {
            Outcome::Slow => {
                self.slow.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(SLOW).await;
            }
            Outcome::Lost => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(LOST).await;
            }
            _ => {}
        }
        json(
            StatusCode::OK,
            format!(r#"{{"order":{order},"charged_cents":450}}"#),
        )
    }

    /// Charges `order` unless it was voided; says whether it charged.
    fn record_charge(&self, order: u64) -> bool {
        let mut ledger = lock(&self.ledger);
        let entry = ledger.entry(order).or_insert(LedgerEntry {
            order,
            ..LedgerEntry::default()
        });
        if entry.voided {
            return false;
        }
        entry.charges += 1;
        if ledger.len() > MAX_LEDGER {
            ledger.pop_first();
        }
        true
    }

    fn void(&self, order: u64) -> http::Response<Body> {
        self.voids.fetch_add(1, Ordering::Relaxed);
        let mut ledger = lock(&self.ledger);
        let entry = ledger.entry(order).or_insert(LedgerEntry {
            order,
            ..LedgerEntry::default()
        });
        entry.voided = true;
        let refunded = entry.charges.saturating_sub(entry.refunds);
        entry.refunds = entry.charges;
        if ledger.len() > MAX_LEDGER {
            ledger.pop_first();
        }
        json(
            StatusCode::OK,
            format!(
                r#"{{"order":{order},"voided":true,"refunded_cents":{}}}"#,
                u64::from(refunded) * 450
            ),
        )
    }

    /// The whole ledger, by order.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        lock(&self.ledger).values().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_void_refunds_the_charge_and_refuses_a_late_one() {
        let payment = Payment::new(0.0);
        let charge = serde_json::json!({"order": 1});
        let rsp = payment.handle(&Method::POST, "/charges", &charge).await;
        assert_eq!(rsp.status(), StatusCode::OK);
        payment.handle(&Method::POST, "/voids", &charge).await;
        payment.handle(&Method::POST, "/voids", &charge).await;
        let late = payment.handle(&Method::POST, "/charges", &charge).await;
        assert_eq!(late.status(), StatusCode::CONFLICT);
        assert_eq!(
            payment.ledger(),
            vec![LedgerEntry {
                order: 1,
                charges: 1,
                refunds: 1,
                voided: true
            }]
        );
    }

    #[tokio::test]
    async fn every_charge_it_is_handed_counts_so_the_ledger_shows_missing_dedup() {
        let payment = Payment::new(0.0);
        let charge = serde_json::json!({"order": 2});
        payment.handle(&Method::POST, "/charges", &charge).await;
        payment.handle(&Method::POST, "/charges", &charge).await;
        assert_eq!(payment.ledger()[0].charges, 2);
    }

    #[test]
    fn failures_follow_the_configured_rate() {
        let payment = Payment::new(0.3);
        let failed = (0..10_000)
            .filter(|_| payment.roll() != Outcome::Charged)
            .count();
        assert!((2_500..3_500).contains(&failed), "{failed} of 10000");
        assert!((0..1000).all(|_| Payment::new(0.0).roll() == Outcome::Charged));
    }
}
