//! The shop's asynchronous path: `order` publishes `order.created` to a Redis list and `notifier` consumes
//! it with `BLPOP`. Both talk to a real `redis-server` through their own sidecars, so the events travel as
//! opaque TCP over mTLS (`meshlet/tcp`) between the sidecars.
//!
//! Delivery is at least once: a publish whose reply was lost is sent again, and the notifier counts each
//! order once however many copies arrive.

pub mod resp;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::shop::lock;
use resp::{Connection, Reply};

/// The Redis list the events go through.
pub const QUEUE: &str = "shop:order-events";
/// Events waiting for the publisher at most; beyond this new events are dropped (and counted).
const OUTBOX: usize = 4096;
/// Orders the notifier remembers having notified at most (oldest forgotten first).
const MAX_REMEMBERED: usize = 1_000_000;
/// Tries to publish one event (200 ms apart) before it is dropped and counted.
const MAX_PUBLISH_ATTEMPTS: u32 = 50;
/// How long one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// Where `redis-server` is installed, if it is.
pub fn redis_server_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
}

/// Starts `redis-server` on `addr` with nothing persisted, and waits until it answers `PING`.
pub async fn start_redis(binary: &Path, addr: SocketAddr, dir: &Path) -> anyhow::Result<Child> {
    let child = super::child_command(binary)
        .args(["--bind", &addr.ip().to_string()])
        .args(["--port", &addr.port().to_string()])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--protected-mode", "no", "--loglevel", "warning"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    for _ in 0..100 {
        if ping(addr).await {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("redis-server did not answer at {addr} (is another demo running?)")
}

/// Redis's readiness probe: the pod's own check, straight to the server, not through the mesh.
async fn ping(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    if stream.write_all(&resp::encode(&[b"PING"])).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await,
        Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
    )
}

/// An `order.created` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderCreated {
    /// The order.
    pub order: u64,
    /// What was charged.
    pub amount_cents: u64,
}

impl OrderCreated {
    fn to_json(self) -> String {
        format!(
            r#"{{"type":"order.created","order":{},"amount_cents":{}}}"#,
            self.order, self.amount_cents
        )
    }

    fn from_json(bytes: &[u8]) -> Option<OrderCreated> {
        let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        if value.get("type")?.as_str()? != "order.created" {
            return None;
        }
        Some(OrderCreated {
            order: value.get("order")?.as_u64()?,
            amount_cents: value.get("amount_cents")?.as_u64()?,
        })
    }
}

/// Counters of the event path.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Events handed to the publisher.
    pub queued: AtomicU64,
    /// Events Redis acknowledged.
    pub published: AtomicU64,
    /// Events dropped because the outbox was full.
    pub dropped: AtomicU64,
    /// Events the notifier received (copies included).
    pub received: AtomicU64,
    notified: Mutex<BTreeSet<u64>>,
}

impl EventStats {
    /// Orders the notifier sent a notification for, each once.
    pub fn notified(&self) -> Vec<u64> {
        lock(&self.notified).iter().copied().collect()
    }

    /// How many distinct orders were notified.
    pub fn notified_count(&self) -> usize {
        lock(&self.notified).len()
    }

    fn notify(&self, order: u64) {
        let mut notified = lock(&self.notified);
        if notified.insert(order) && notified.len() > MAX_REMEMBERED {
            notified.pop_first();
        }
    }
}

/// The order service's side of the event path: a bounded outbox drained into Redis by one task.
#[derive(Clone)]
pub struct Publisher {
    outbox: mpsc::Sender<OrderCreated>,
    stats: Arc<EventStats>,
}

impl Publisher {
    /// Queues an event; never waits (a full outbox drops it and counts the drop).
    pub fn publish(&self, event: OrderCreated) {
        match self.outbox.try_send(event) {
            Ok(()) => self.stats.queued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Starts the publisher task: `order`'s app pushing to `redis` through its sidecar.
pub fn start_publisher(
    sidecar: SocketAddr,
    redis: SocketAddr,
    stats: Arc<EventStats>,
) -> (Publisher, JoinHandle<()>) {
    let (outbox, mut events) = mpsc::channel::<OrderCreated>(OUTBOX);
    let task_stats = stats.clone();
    let task = tokio::spawn(async move {
        let mut conn: Option<Connection> = None;
        while let Some(event) = events.recv().await {
            let body = event.to_json();
            for attempt in 1..=MAX_PUBLISH_ATTEMPTS {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match Connection::through_sidecar(sidecar, redis).await {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            debug!(error = %e, "publisher cannot reach redis");
                            if attempt == MAX_PUBLISH_ATTEMPTS {
                                task_stats.dropped.fetch_add(1, Ordering::Relaxed);
                            } else {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            continue;
                        }
                    },
                };
                match c
                    .command(
                        &[b"RPUSH", QUEUE.as_bytes(), body.as_bytes()],
                        COMMAND_TIMEOUT,
                    )
                    .await
                {
                    Ok(Reply::Integer(_)) => {
                        task_stats.published.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    other => {
                        debug!(reply = ?other, "RPUSH failed; publishing again on a new connection");
                        conn = None;
                        if attempt == MAX_PUBLISH_ATTEMPTS {
                            task_stats.dropped.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        }
    });
    (Publisher { outbox, stats }, task)
}

/// Runs the notifier: `BLPOP` through its sidecar, one notification per order.
pub async fn run_notifier(sidecar: SocketAddr, redis: SocketAddr, stats: Arc<EventStats>) {
    loop {
        let mut conn = match Connection::through_sidecar(sidecar, redis).await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "notifier cannot reach redis");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            match conn
                .command(&[b"BLPOP", QUEUE.as_bytes(), b"1"], COMMAND_TIMEOUT)
                .await
            {
                Ok(Reply::Array(Some(items))) => {
                    if let Some(Reply::Bulk(Some(body))) = items.get(1) {
                        stats.received.fetch_add(1, Ordering::Relaxed);
                        match OrderCreated::from_json(body) {
                            Some(event) => stats.notify(event.order),
                            None => debug!("notifier ignored an event it does not know"),
                        }
                    }
                }
                Ok(Reply::Array(None)) => {}
                other => {
                    debug!(reply = ?other, "BLPOP failed; reconnecting");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_unknown_ones_are_ignored() {
        let event = OrderCreated {
            order: 7,
            amount_cents: 450,
        };
        assert_eq!(
            OrderCreated::from_json(event.to_json().as_bytes()),
            Some(event)
        );
        assert_eq!(
            OrderCreated::from_json(br#"{"type":"order.shipped","order":7}"#),
            None
        );
        assert_eq!(OrderCreated::from_json(b"not json"), None);
    }

    #[test]
    fn the_notifier_counts_each_order_once() {
        let stats = EventStats::default();
        stats.notify(3);
        stats.notify(3);
        stats.notify(4);
        assert_eq!(stats.notified(), vec![3, 4]);
    }
}
