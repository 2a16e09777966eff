//! The load generator: checkouts at a steady rate through the loadgen pod's sidecar to `api-gateway`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

use super::shop::Directory;

/// What the load generator saw.
#[derive(Debug, Default)]
pub struct LoadStats {
    /// Checkouts sent.
    pub sent: AtomicU64,
    /// Answered 201: the order was placed.
    pub placed: AtomicU64,
    /// Answered 402 or 409: the order was cancelled (the saga compensated).
    pub cancelled: AtomicU64,
    /// Anything else: the checkout failed.
    pub failed: AtomicU64,
    /// Checkouts waiting for an answer.
    pub in_flight: AtomicU64,
}

/// Sends `rate` checkouts per second until the task is aborted.
pub async fn run(client: Arc<Directory>, rate: u32, stats: Arc<LoadStats>) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut customer = 0u64;
    loop {
        tick.tick().await;
        customer = customer % 50 + 1;
        let (client, stats) = (client.clone(), stats.clone());
        stats.sent.fetch_add(1, Ordering::Relaxed);
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let body = format!(r#"{{"customer":{customer},"sku":"tea"}}"#);
            let answer = client
                .call(Method::POST, "api-gateway", "/checkout", Some(body))
                .await;
            let counter = match answer {
                Ok((StatusCode::CREATED, _)) => &stats.placed,
                Ok((StatusCode::PAYMENT_REQUIRED | StatusCode::CONFLICT, _)) => &stats.cancelled,
                _ => &stats.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
