//! The versioned mesh state every watch stream serves.
//!
//! The store follows a source of [`MeshConfig`] values (the local mesh file, or the Kubernetes watchers),
//! each handed over as a `tokio::sync::watch::Receiver`. Every distinct state gets the next version; a value
//! equal to the current one (a file saved without changes, a resync of the Kubernetes watchers) makes no new
//! version, so sidecars are not disturbed by no-op updates.
//!
//! Why the first version comes from the clock: versions then keep increasing across restarts of the control
//! plane (on a clock that does not go back), which makes the version gauges of the control plane and of the
//! sidecars readable over time. Sidecars do not rely on it: the first snapshot of every stream is taken
//! whatever its version.
//!
//! Watchers follow the store through a `watch` channel: a slow watcher never blocks the store or other
//! watchers, it simply gets the latest state when it is ready for it (intermediate states are skipped,
//! and the delta it receives goes from what it last got to the latest).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use meshlet::discovery::protocol::MAX_MESSAGE_BYTES;
use meshlet::discovery::MeshConfig;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::watch;

/// Why a mesh state cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Its snapshot would not fit in one watch message.
    #[error("the mesh state is {bytes} bytes as JSON, more than the {limit} bytes a watch message may carry")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// It cannot be encoded as JSON.
    #[error("cannot encode the mesh state as JSON: {0}")]
    Encode(#[from] serde_json::Error),
}

/// One version of the mesh.
#[derive(Debug)]
pub struct MeshState {
    /// Its version; every later state has a larger one.
    pub version: u64,
    /// The mesh.
    pub mesh: MeshConfig,
    /// The mesh as JSON, encoded once for every watcher's snapshot.
    mesh_json: Bytes,
}

impl MeshState {
    fn new(version: u64, mesh: MeshConfig) -> Result<Self, StoreError> {
        let mesh_json = Bytes::from(serde_json::to_vec(&mesh)?);
        // The envelope adds well under 64 bytes.
        if mesh_json.len() + 64 > MAX_MESSAGE_BYTES {
            return Err(StoreError::TooLarge {
                bytes: mesh_json.len(),
                limit: MAX_MESSAGE_BYTES,
            });
        }
        Ok(MeshState {
            version,
            mesh,
            mesh_json,
        })
    }

    /// This state as a snapshot line of the watch stream.
    pub fn snapshot_line(&self) -> Bytes {
        let head = format!(
            "{{\"type\":\"snapshot\",\"version\":{},\"mesh\":",
            self.version
        );
        let mut line = Vec::with_capacity(head.len() + self.mesh_json.len() + 2);
        line.extend_from_slice(head.as_bytes());
        line.extend_from_slice(&self.mesh_json);
        line.extend_from_slice(b"}\n");
        Bytes::from(line)
    }
}

/// Metrics of the store.
#[derive(Clone)]
pub struct StoreMetrics {
    version: IntGauge,
    updates: IntCounterVec,
}

impl StoreMetrics {
    /// Creates the metrics on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let version = IntGauge::new(
            "meshlet_control_mesh_version",
            "Version of the mesh state the control plane serves.",
        )?;
        let updates = IntCounterVec::new(
            Opts::new(
                "meshlet_control_mesh_updates_total",
                "Mesh states offered by the source, by result (new, unchanged, too-large).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(version.clone()))?;
        registry.register(Box::new(updates.clone()))?;
        Ok(StoreMetrics { version, updates })
    }
}

/// What became of a state offered to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// It is the new current state, with this version.
    New(u64),
    /// It equals the current state.
    Unchanged,
    /// It is too large to serve; the current state stays.
    TooLarge,
}

/// The current mesh state and its version, followed by every watch stream.
pub struct Store {
    state: watch::Sender<Arc<MeshState>>,
    metrics: StoreMetrics,
}

impl Store {
    /// A store serving `initial` at a first version taken from the clock.
    pub fn new(initial: MeshConfig, metrics: StoreMetrics) -> Result<Arc<Store>, StoreError> {
        Self::starting_at(first_version(), initial, metrics)
    }

    /// A store serving `initial` at `version`.
    pub fn starting_at(
        version: u64,
        initial: MeshConfig,
        metrics: StoreMetrics,
    ) -> Result<Arc<Store>, StoreError> {
        let state = MeshState::new(version, initial)?;
        metrics.version.set(gauge(version));
        Ok(Arc::new(Store {
            state: watch::Sender::new(Arc::new(state)),
            metrics,
        }))
    }

    /// The state served now.
    pub fn current(&self) -> Arc<MeshState> {
        self.state.borrow().clone()
    }

    /// A receiver that sees the latest state whenever it looks (for one watch stream).
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshState>> {
        self.state.subscribe()
    }

    /// Makes `mesh` the current state under the next version, unless it equals the current one.
    pub fn offer(&self, mesh: MeshConfig) -> Offered {
        let mut outcome = Offered::Unchanged;
        self.state.send_if_modified(|current| {
            if current.mesh == mesh {
                return false;
            }
            let version = current.version + 1;
            match MeshState::new(version, mesh) {
                Ok(next) => {
                    *current = Arc::new(next);
                    outcome = Offered::New(version);
                    true
                }
                Err(error) => {
                    tracing::error!(%error, version = current.version, "mesh state refused; serving the last good one");
                    outcome = Offered::TooLarge;
                    false
                }
            }
        });
        let result = match outcome {
            Offered::New(version) => {
                self.metrics.version.set(gauge(version));
                tracing::info!(
                    version,
                    services = self.current().mesh.services.len(),
                    "new mesh state"
                );
                "new"
            }
            Offered::Unchanged => "unchanged",
            Offered::TooLarge => "too-large",
        };
        self.metrics.updates.with_label_values(&[result]).inc();
        outcome
    }

    /// Offers every value of `source` (its current one first) until its sender is gone.
    pub async fn follow(self: Arc<Self>, mut source: watch::Receiver<MeshConfig>) {
        loop {
            let mesh = source.borrow_and_update().clone();
            self.offer(mesh);
            if source.changed().await.is_err() {
                return;
            }
        }
    }
}

fn first_version() -> u64 {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    u64::try_from(millis).unwrap_or(u64::MAX / 2).max(1)
}

fn gauge(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet::discovery::protocol::WatchMessage;

    fn mesh(name: &str) -> MeshConfig {
        MeshConfig::from_yaml(&format!(
            "services:\n  - {{name: {name}, identity: 'spiffe://cluster.local/ns/x/sa/{name}'}}\n"
        ))
        .unwrap()
    }

    fn store(version: u64, initial: MeshConfig) -> Arc<Store> {
        let metrics = StoreMetrics::register(&Registry::new()).unwrap();
        Store::starting_at(version, initial, metrics).unwrap()
    }

    #[test]
    fn each_distinct_state_gets_the_next_version() {
        let store = store(10, MeshConfig::default());
        assert_eq!(store.offer(MeshConfig::default()), Offered::Unchanged);
        assert_eq!(store.offer(mesh("a")), Offered::New(11));
        assert_eq!(store.offer(mesh("a")), Offered::Unchanged);
        assert_eq!(store.offer(mesh("b")), Offered::New(12));
        // Going back to an earlier content is a change too: versions never repeat.
        assert_eq!(store.offer(mesh("a")), Offered::New(13));
        assert_eq!(store.current().version, 13);
        assert_eq!(store.current().mesh, mesh("a"));
    }

    #[test]
    fn a_state_too_large_for_a_message_is_refused_and_the_last_good_stays() {
        let store = store(1, mesh("a"));
        let mut huge = mesh("b");
        huge.services[0].name = "x".repeat(MAX_MESSAGE_BYTES);
        assert_eq!(store.offer(huge), Offered::TooLarge);
        assert_eq!(store.current().version, 1);
        assert_eq!(store.current().mesh, mesh("a"));
    }

    #[test]
    fn the_snapshot_line_is_a_protocol_message() {
        let store = store(7, mesh("a"));
        let line = store.current().snapshot_line();
        assert_eq!(line.last(), Some(&b'\n'));
        let message: WatchMessage = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            message,
            WatchMessage::Snapshot {
                version: 7,
                mesh: mesh("a")
            }
        );
    }

    #[tokio::test]
    async fn watchers_see_the_latest_state_and_slow_ones_skip_intermediate_ones() {
        let (source, rx) = watch::channel(mesh("a"));
        let store = store(100, MeshConfig::default());
        let mut slow = store.subscribe();
        let follower = tokio::spawn(store.clone().follow(rx));
        let mut fast = store.subscribe();
        fast.wait_for(|s| s.version == 101).await.unwrap();
        for name in ["b", "c", "d"] {
            source.send(mesh(name)).unwrap();
            fast.wait_for(|s| s.mesh == mesh(name)).await.unwrap();
        }
        assert_eq!(fast.borrow().version, 104);
        // The slow watcher never looked in between: it sees only the latest.
        assert!(slow.has_changed().unwrap());
        assert_eq!(slow.borrow_and_update().version, 104);
        // A source that closes leaves the last state in force.
        drop(source);
        follower.await.unwrap();
        assert_eq!(store.current().mesh, mesh("d"));
    }

    #[test]
    fn the_first_version_comes_from_the_clock() {
        // 2020-09-13 in milliseconds: any sane clock is past it.
        assert!(first_version() > 1_600_000_000_000);
    }
}
