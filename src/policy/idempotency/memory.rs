//! The in-memory store of one replica, bounded in entries and bytes.
//!
//! Entries expire after their TTL; when a bound is reached the oldest entries are evicted first (counted as
//! `meshlet_dedup_total{outcome="evicted"}`). Eviction forgets a key, so a later duplicate of it would be
//! processed again: size the bounds to the traffic × TTL that matters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::store::{
    Claim, ClaimToken, DedupStore, Entry, Fingerprint, StoreFuture, StoredResponse,
};
use crate::policy::PolicyMetrics;

#[derive(Debug)]
struct Slot {
    entry: Entry,
    token: ClaimToken,
    expires: Instant,
    bytes: usize,
    /// Insertion number, to tell a slot from a newer one under the same key when evicting.
    serial: u64,
    /// Woken when the slot completes or goes away.
    changed: Arc<Notify>,
}

/// De-duplication state in this process.
#[derive(Debug)]
pub struct MemoryStore {
    slots: DashMap<String, Slot>,
    /// Keys in insertion order, oldest first, with the serial of the slot they were inserted for.
    order: Mutex<VecDeque<(String, u64)>>,
    bytes: AtomicUsize,
    serial: AtomicU64,
    max_entries: usize,
    max_bytes: usize,
    metrics: PolicyMetrics,
    destination: Arc<str>,
}

impl MemoryStore {
    /// A store for `destination` (the metric label) holding at most `max_entries` keys and `max_bytes` of
    /// responses.
    pub fn new(
        destination: &str,
        max_entries: usize,
        max_bytes: usize,
        metrics: PolicyMetrics,
    ) -> MemoryStore {
        MemoryStore {
            slots: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            bytes: AtomicUsize::new(0),
            serial: AtomicU64::new(0),
            max_entries: max_entries.max(1),
            max_bytes,
            metrics,
            destination: Arc::from(destination),
        }
    }

    /// Keys currently held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Bytes of stored responses currently held.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn order(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, u64)>> {
        crate::policy::lock(&self.order)
    }

    fn remove_slot(&self, key: &str, serial: Option<u64>) -> bool {
        let removed = self
            .slots
            .remove_if(key, |_, slot| serial.is_none_or(|s| s == slot.serial));
        match removed {
            Some((_, slot)) => {
                self.bytes.fetch_sub(slot.bytes, Ordering::Relaxed);
                slot.changed.notify_waiters();
                true
            }
            None => false,
        }
    }

    /// Evicts the oldest keys until both bounds hold (expired keys go first, as they are the oldest too).
    fn enforce_bounds(&self) {
        let mut order = self.order();
        while self.slots.len() > self.max_entries
            || self.bytes.load(Ordering::Relaxed) > self.max_bytes
        {
            let Some((key, serial)) = order.pop_front() else {
                break;
            };
            let expired = self
                .slots
                .get(&key)
                .is_some_and(|s| s.serial == serial && s.expires <= Instant::now());
            if self.remove_slot(&key, Some(serial)) && !expired {
                self.metrics
                    .dedup
                    .with_label_values(&[&*self.destination, "evicted"])
                    .inc();
            }
        }
        // Entries replaced or removed since keep their place in `order` until popped; keep it bounded too.
        if order.len() > self.max_entries.saturating_mul(2) {
            order.retain(|(key, serial)| self.slots.get(key).is_some_and(|s| s.serial == *serial));
        }
    }
}

impl DedupStore for MemoryStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        fingerprint: Fingerprint,
        ttl: Duration,
    ) -> StoreFuture<'a, Claim> {
        Box::pin(async move {
            let now = Instant::now();
            let token = ClaimToken::new();
            let serial = self.serial.fetch_add(1, Ordering::Relaxed);
            let fresh = Slot {
                entry: Entry::InFlight { fingerprint },
                token: token.clone(),
                expires: now + ttl,
                bytes: key.len(),
                serial,
                changed: Arc::new(Notify::new()),
            };
            let claim = match self.slots.entry(key.to_string()) {
                MapEntry::Occupied(mut occupied) => {
                    if occupied.get().expires > now {
                        return Ok(Claim::Taken(occupied.get().entry.clone()));
                    }
                    let old = occupied.insert(fresh);
                    self.bytes.fetch_sub(old.bytes, Ordering::Relaxed);
                    old.changed.notify_waiters();
                    Claim::Won(token)
                }
                MapEntry::Vacant(vacant) => {
                    vacant.insert(fresh);
                    Claim::Won(token)
                }
            };
            self.bytes.fetch_add(key.len(), Ordering::Relaxed);
            self.order().push_back((key.to_string(), serial));
            self.enforce_bounds();
            Ok(claim)
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: &'a ClaimToken,
        fingerprint: Fingerprint,
        response: StoredResponse,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let size = key.len() + response.size();
            if let Some(mut slot) = self.slots.get_mut(key) {
                if slot.token == *token {
                    self.bytes.fetch_add(size, Ordering::Relaxed);
                    self.bytes.fetch_sub(slot.bytes, Ordering::Relaxed);
                    slot.bytes = size;
                    slot.entry = Entry::Done {
                        fingerprint,
                        response,
                    };
                    slot.expires = Instant::now() + ttl;
                    slot.changed.notify_waiters();
                }
            }
            self.enforce_bounds();
            Ok(())
        })
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a ClaimToken) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let serial = self
                .slots
                .get(key)
                .filter(|s| s.token == *token)
                .map(|s| s.serial);
            if let Some(serial) = serial {
                self.remove_slot(key, Some(serial));
            }
            Ok(())
        })
    }

    fn wait<'a>(&'a self, key: &'a str, until: Instant) -> StoreFuture<'a, Option<Entry>> {
        Box::pin(async move {
            loop {
                let (entry, changed) = match self.slots.get(key) {
                    Some(slot) if slot.expires > Instant::now() => {
                        (slot.entry.clone(), slot.changed.clone())
                    }
                    _ => return Ok(None),
                };
                if !matches!(entry, Entry::InFlight { .. }) {
                    return Ok(Some(entry));
                }
                let notified = changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                // Re-check after registering, so a completion in between is not missed.
                match self.slots.get(key) {
                    Some(slot)
                        if matches!(slot.entry, Entry::InFlight { .. })
                            && Arc::ptr_eq(&slot.changed, &changed) => {}
                    _ => continue,
                }
                if tokio::time::timeout_at(until, notified).await.is_err() {
                    return Ok(Some(entry));
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn response(body: &'static str) -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![],
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn claim_complete_replay_and_expire() {
        let store = MemoryStore::new("svc", 10, 1 << 20, PolicyMetrics::unregistered());
        let ttl = Duration::from_secs(60);
        let Claim::Won(token) = store.claim("k", [1; 32], ttl).await.unwrap() else {
            panic!("first claim wins")
        };
        assert_eq!(
            store.claim("k", [1; 32], ttl).await.unwrap(),
            Claim::Taken(Entry::InFlight {
                fingerprint: [1; 32]
            })
        );
        store
            .complete("k", &token, [1; 32], response("ok"), ttl)
            .await
            .unwrap();
        let Claim::Taken(Entry::Done { response: r, .. }) =
            store.claim("k", [1; 32], ttl).await.unwrap()
        else {
            panic!("completed")
        };
        assert_eq!(r.body, "ok");
        tokio::time::advance(ttl).await;
        assert!(
            matches!(store.claim("k", [1; 32], ttl).await.unwrap(), Claim::Won(_)),
            "expired keys are free"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_on_completion_and_release() {
        let store = Arc::new(MemoryStore::new(
            "svc",
            10,
            1 << 20,
            PolicyMetrics::unregistered(),
        ));
        let ttl = Duration::from_secs(60);
        let Claim::Won(token) = store.claim("k", [1; 32], ttl).await.unwrap() else {
            panic!()
        };
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .wait("k", Instant::now() + Duration::from_secs(5))
                    .await
            })
        };
        tokio::task::yield_now().await;
        store
            .complete("k", &token, [1; 32], response("done"), ttl)
            .await
            .unwrap();
        assert!(matches!(
            waiter.await.unwrap().unwrap(),
            Some(Entry::Done { .. })
        ));

        let Claim::Won(token) = store.claim("j", [2; 32], ttl).await.unwrap() else {
            panic!()
        };
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .wait("j", Instant::now() + Duration::from_secs(5))
                    .await
            })
        };
        tokio::task::yield_now().await;
        store.release("j", &token).await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), None);
        let _ = store.claim("i", [3; 32], ttl).await.unwrap();
        let still = store
            .wait("i", Instant::now() + Duration::from_secs(1))
            .await
            .unwrap();
        assert!(
            matches!(still, Some(Entry::InFlight { .. })),
            "deadline reached while in flight"
        );
    }

    #[tokio::test]
    async fn bounded_in_entries_and_bytes() {
        let metrics = PolicyMetrics::unregistered();
        let store = MemoryStore::new("svc", 3, 1000, metrics.clone());
        let ttl = Duration::from_secs(60);
        for i in 0..5 {
            let key = format!("k{i}");
            let Claim::Won(token) = store.claim(&key, [0; 32], ttl).await.unwrap() else {
                panic!()
            };
            store
                .complete(&key, &token, [0; 32], response("x"), ttl)
                .await
                .unwrap();
        }
        assert_eq!(store.len(), 3);
        assert!(
            matches!(
                store.claim("k0", [0; 32], ttl).await.unwrap(),
                Claim::Won(_)
            ),
            "oldest evicted"
        );
        let big = StoredResponse {
            status: 200,
            headers: vec![],
            body: Bytes::from(vec![0u8; 900]),
        };
        let Claim::Won(token) = store.claim("big", [0; 32], ttl).await.unwrap() else {
            panic!()
        };
        store
            .complete("big", &token, [0; 32], big.clone(), ttl)
            .await
            .unwrap();
        let Claim::Won(token) = store.claim("big2", [0; 32], ttl).await.unwrap() else {
            panic!()
        };
        store
            .complete("big2", &token, [0; 32], big, ttl)
            .await
            .unwrap();
        assert!(store.bytes() <= 1000, "{}", store.bytes());
        assert!(metrics.dedup.with_label_values(&["svc", "evicted"]).get() >= 3);
    }
}
