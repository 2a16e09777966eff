//! What the demo shows at every tick and at the end: the checkouts, the saga's outcomes checked against
//! payment's own ledger, and the event path. With `--report FILE` the raw records (every order's state,
//! every ledger entry, every notified order) are written as JSON, so a test can check them itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use super::events::EventStats;
use super::loadgen::LoadStats;
use super::shop::inventory::Inventory;
use super::shop::order::{OrderState, Orders};
use super::shop::payment::{LedgerEntry, Payment};

/// The shop's state, shared by its apps and read by the report.
pub struct Shop {
    /// The load generator's counts.
    pub load: Arc<LoadStats>,
    /// The order service.
    pub orders: Arc<Orders>,
    /// The inventory service.
    pub inventory: Arc<Inventory>,
    /// The payment service.
    pub payment: Arc<Payment>,
    /// The event path, when Redis is there.
    pub events: Option<Arc<EventStats>>,
}

/// The ledger checked against the orders' outcomes.
#[derive(Debug, Default, Serialize)]
pub struct LedgerCheck {
    /// Orders payment charged (net of nothing: at least one charge).
    pub charged: usize,
    /// Orders charged more than once.
    pub charged_twice: Vec<u64>,
    /// Cancelled orders whose charges were not all refunded.
    pub cancelled_left_charged: Vec<u64>,
    /// Placed orders with no standing charge.
    pub placed_not_charged: Vec<u64>,
    /// Charges refunded by a void (the charge went through, its answer did not).
    pub refunded: usize,
}

fn check_ledger(book: &[(u64, OrderState)], ledger: &[LedgerEntry]) -> LedgerCheck {
    let entries: BTreeMap<u64, &LedgerEntry> = ledger.iter().map(|e| (e.order, e)).collect();
    let net = |order: &u64| {
        entries
            .get(order)
            .map_or(0, |e| i64::from(e.charges) - i64::from(e.refunds))
    };
    LedgerCheck {
        charged: ledger.iter().filter(|e| e.charges > 0).count(),
        charged_twice: ledger
            .iter()
            .filter(|e| e.charges > 1)
            .map(|e| e.order)
            .collect(),
        cancelled_left_charged: book
            .iter()
            .filter(|(o, s)| *s == OrderState::Cancelled && net(o) != 0)
            .map(|(o, _)| *o)
            .collect(),
        placed_not_charged: book
            .iter()
            .filter(|(o, s)| *s == OrderState::Placed && net(o) != 1)
            .map(|(o, _)| *o)
            .collect(),
        refunded: ledger.iter().filter(|e| e.refunds > 0).count(),
    }
}

/// One order and where it ended.
#[derive(Debug, Serialize)]
pub struct OrderRecord {
    /// The order.
    pub order: u64,
    /// Its state.
    pub state: OrderState,
}

/// The event path's counts and the orders notified.
#[derive(Debug, Serialize)]
pub struct EventRecord {
    /// Events order queued.
    pub queued: u64,
    /// Events Redis acknowledged.
    pub published: u64,
    /// Events dropped (outbox full, or Redis unreachable for long).
    pub dropped: u64,
    /// Events the notifier received, copies included.
    pub received: u64,
    /// Orders notified, each once.
    pub notified: Vec<u64>,
}

/// Everything the demo saw, for `--report`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Seconds the traffic ran.
    pub seconds: f64,
    /// `--payment-failure-rate`.
    pub payment_failure_rate: f64,
    /// Checkouts sent, placed, cancelled and failed, as the load generator saw them.
    pub checkouts: BTreeMap<&'static str, u64>,
    /// Compensations the saga sent, and what the services did with them.
    pub compensations: BTreeMap<&'static str, u64>,
    /// How payment's charges failed.
    pub payment_failures: BTreeMap<&'static str, u64>,
    /// Every order and its state (order's book).
    pub orders: Vec<OrderRecord>,
    /// Payment's ledger.
    pub ledger: Vec<LedgerEntry>,
    /// The ledger checked against the orders.
    pub check: LedgerCheck,
    /// The event path (absent without Redis).
    pub events: Option<EventRecord>,
    /// Every edge the live table showed (`from -> to`).
    pub edges: BTreeSet<String>,
    /// The pids of every child process the demo started (all stopped when the report is written).
    pub children: Vec<u32>,
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Shop {
    /// One line for the live table's header.
    pub fn status_line(&self) -> String {
        let book = self.orders.book();
        let check = check_ledger(&book, &self.payment.ledger());
        let mut line = format!(
            "checkouts {} (placed {}, cancelled {}, failed {}) · compensations {} voids, {} stock releases · payment ledger: {} charged, {} charged twice, {} cancelled left charged",
            get(&self.load.sent),
            get(&self.load.placed),
            get(&self.load.cancelled),
            get(&self.load.failed),
            get(&self.orders.voids),
            get(&self.orders.releases),
            check.charged,
            check.charged_twice.len(),
            check.cancelled_left_charged.len(),
        );
        if let Some(events) = &self.events {
            line.push_str(&format!(" · notifications {}", events.notified_count()));
        }
        line
    }

    /// The final account, checked against payment's ledger.
    pub fn report(&self, seconds: f64, edges: BTreeSet<String>, children: Vec<u32>) -> Report {
        let book = self.orders.book();
        let ledger = self.payment.ledger();
        let check = check_ledger(&book, &ledger);
        let p = &self.payment;
        Report {
            seconds,
            payment_failure_rate: p.failure_rate,
            checkouts: BTreeMap::from([
                ("sent", get(&self.load.sent)),
                ("placed", get(&self.load.placed)),
                ("cancelled", get(&self.load.cancelled)),
                ("failed", get(&self.load.failed)),
            ]),
            compensations: BTreeMap::from([
                ("voids_sent", get(&self.orders.voids)),
                ("voids_processed", get(&p.voids)),
                ("releases_sent", get(&self.orders.releases)),
                ("stock_released", get(&self.inventory.released)),
            ]),
            payment_failures: BTreeMap::from([
                ("unavailable", get(&p.unavailable)),
                ("declined", get(&p.declined)),
                ("slow", get(&p.slow)),
                ("lost", get(&p.lost)),
            ]),
            orders: book
                .iter()
                .map(|(order, state)| OrderRecord {
                    order: *order,
                    state: *state,
                })
                .collect(),
            ledger,
            check,
            events: self.events.as_ref().map(|e| EventRecord {
                queued: get(&e.queued),
                published: get(&e.published),
                dropped: get(&e.dropped),
                received: get(&e.received),
                notified: e.notified(),
            }),
            edges,
            children,
        }
    }
}

impl Report {
    /// The closing lines a person reads.
    pub fn summary(&self) -> String {
        let count = |state| self.orders.iter().filter(|o| o.state == state).count();
        let mut out = format!(
            "payment ledger: {} orders charged, {} charged twice, {} cancelled orders left charged, {} placed orders not charged ({} charges refunded by a void)\n",
            self.check.charged,
            self.check.charged_twice.len(),
            self.check.cancelled_left_charged.len(),
            self.check.placed_not_charged.len(),
            self.check.refunded,
        );
        out.push_str(&format!(
            "saga: {} orders placed, {} cancelled, {} compensation failed, {} unfinished; compensations: {} voids, {} stock releases\n",
            count(OrderState::Placed),
            count(OrderState::Cancelled),
            count(OrderState::CompensationFailed),
            count(OrderState::Pending),
            self.compensations["voids_processed"],
            self.compensations["stock_released"],
        ));
        match &self.events {
            Some(e) => {
                let notified: BTreeSet<u64> = e.notified.iter().copied().collect();
                let missing = self
                    .orders
                    .iter()
                    .filter(|o| o.state == OrderState::Placed && !notified.contains(&o.order))
                    .count();
                out.push_str(&format!(
                    "events: {} order.created published, notifier received {} ({} orders notified), {} placed orders without a notification\n",
                    e.published,
                    e.received,
                    notified.len(),
                    missing
                ));
            }
            None => out.push_str("events: off (no redis-server)\n"),
        }
        out.push_str(&format!(
            "stopping: {} checkouts sent, {} placed, {} cancelled, {} failed",
            self.checkouts["sent"],
            self.checkouts["placed"],
            self.checkouts["cancelled"],
            self.checkouts["failed"],
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_check_finds_double_charges_and_unrefunded_cancellations() {
        let entry = |order, charges, refunds| LedgerEntry {
            order,
            charges,
            refunds,
            voided: refunds > 0,
        };
        let book = [
            (1, OrderState::Placed),
            (2, OrderState::Cancelled),
            (3, OrderState::Cancelled),
            (4, OrderState::Placed),
            (5, OrderState::Placed),
        ];
        let ledger = [
            entry(1, 1, 0),
            entry(2, 1, 1),
            entry(3, 1, 0),
            entry(5, 2, 0),
        ];
        let check = check_ledger(&book, &ledger);
        assert_eq!(check.charged, 4);
        assert_eq!(check.charged_twice, vec![5]);
        assert_eq!(check.cancelled_left_charged, vec![3]);
        assert_eq!(check.placed_not_charged, vec![4, 5]);
        assert_eq!(check.refunded, 1);
    }
}
