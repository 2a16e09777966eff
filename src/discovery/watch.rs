//! The sidecar's discovery watch: one long-lived stream from the control plane (`GET /v1/mesh/watch` over
//! the shared mTLS channel, [`ControlPlaneClient`]) whose states are put in force with [`Mesh::replace`].
//!
//! Used when the sidecar has a control plane and no `--mesh-config` file: a local file always wins, so an
//! operator can pin a sidecar to a hand-written mesh while the control plane is being fixed.
//!
//! Why the sidecar never gives up its last good state: the control plane is not on the request path. When the
//! stream breaks, the control plane restarts or sends something this sidecar refuses, requests keep flowing
//! with the state in force (endpoints, identities, policies), and the watch reconnects with exponential
//! backoff and full jitter, starting again from a fresh snapshot (a full resync: nothing missed while
//! disconnected can be lost). A stream that stays silent past the heartbeat timeout is treated as dead.
//!
//! Readiness: like Linkerd's proxy, a sidecar with a control plane reports ready only once it holds its first
//! mesh state (or after [`FIRST_STATE_WAIT`], so a control plane without the watch cannot keep every pod
//! unready: the sidecar then serves plain until the state arrives).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rand::Rng;
use tokio::sync::watch;

use super::protocol::{WatchMessage, HEARTBEAT_INTERVAL, MAX_MESSAGE_BYTES, WATCH_PATH};
use super::{Mesh, MeshConfig};
use crate::control_plane::{ControlPlaneClient, ControlPlaneError};
use crate::tls::IdentityStore;

/// Longest a sidecar with a control plane waits for its first mesh state before it reports ready anyway.
pub const FIRST_STATE_WAIT: Duration = Duration::from_secs(10);

/// Timing and bounds of the watch client.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// A stream with no message for this long is dropped and reopened.
    pub heartbeat_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Longest line accepted.
    pub max_line_bytes: usize,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            heartbeat_timeout: 3 * HEARTBEAT_INTERVAL,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            max_line_bytes: MAX_MESSAGE_BYTES,
        }
    }
}

/// Metrics of the watch: how states were handled, the version in force, and whether a stream is open.
#[derive(Clone)]
pub struct DiscoveryMetrics {
    updates: IntCounterVec,
    version: IntGauge,
    connected: IntGauge,
}

impl DiscoveryMetrics {
    /// Creates the metrics on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let updates = IntCounterVec::new(
            Opts::new(
                "meshlet_discovery_updates_total",
                "Mesh states received from the control plane, by result (applied, unchanged, invalid, stale, resync).",
            ),
            &["result"],
        )?;
        let version = IntGauge::new(
            "meshlet_discovery_version",
            "Version of the last mesh state received from the control plane.",
        )?;
        let connected = IntGauge::new(
            "meshlet_discovery_connected",
            "1 while the discovery watch stream to the control plane is open.",
        )?;
        registry.register(Box::new(updates.clone()))?;
        registry.register(Box::new(version.clone()))?;
        registry.register(Box::new(connected.clone()))?;
        Ok(DiscoveryMetrics {
            updates,
            version,
            connected,
        })
    }

    fn count(&self, result: &str) {
        self.updates.with_label_values(&[result]).inc();
    }
}

/// Why one watch stream ended; the watch reconnects after each.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The request did not get a response.
    #[error(transparent)]
    Request(#[from] ControlPlaneError),
    /// The control plane refused the watch.
    #[error("the control plane refused the watch with {status}: {message}")]
    Refused {
        /// Its status.
        status: StatusCode,
        /// The start of its answer.
        message: String,
    },
    /// No message within the heartbeat timeout.
    #[error("no message from the control plane for {0:?}; the stream is presumed dead")]
    Silent(Duration),
    /// The control plane closed the stream.
    #[error("the control plane ended the stream")]
    Ended,
    /// The stream broke.
    #[error("the stream broke: {0}")]
    Body(String),
    /// A line longer than the limit.
    #[error("a message exceeds {0} bytes")]
    LineTooLong(usize),
    /// A line that is not a message of the protocol (or whose mesh does not match this sidecar's schema).
    #[error("cannot decode a message: {0}")]
    Decode(serde_json::Error),
    /// The stream cannot be followed from the state held; a fresh snapshot is needed.
    #[error("resync needed: {0}")]
    Resync(String),
}

/// What to do with a message, decided by [`Follower::on_message`].
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A new state to check and put in force.
    Apply {
        /// Its version.
        version: u64,
        /// The state.
        mesh: Box<MeshConfig>,
    },
    /// A snapshot equal to the state held (typically after a reconnect): only the version moves.
    Unchanged {
        /// The snapshot's version.
        version: u64,
    },
    /// Not newer than the state held: ignored.
    Stale {
        /// The message's version.
        version: u64,
    },
    /// The stream cannot be followed from here; reconnect for a snapshot.
    Resync(String),
    /// A heartbeat or an unknown message: nothing to do.
    Alive,
}

/// The control plane's state as this sidecar follows it: the version and mesh of the stream, whether or not
/// the sidecar accepted that mesh (deltas apply to what the control plane sent, so one refused state does not
/// break the stream).
#[derive(Debug, Default)]
pub struct Follower {
    current: Option<(u64, MeshConfig)>,
    awaiting_snapshot: bool,
}

impl Follower {
    /// A follower with no state.
    pub fn new() -> Self {
        Follower {
            current: None,
            awaiting_snapshot: true,
        }
    }

    /// A new stream begins: its first message must be a snapshot, which is taken whatever its version (the
    /// control plane may have restarted, or be another replica).
    pub fn new_stream(&mut self) {
        self.awaiting_snapshot = true;
    }

    /// The version followed, if any.
    pub fn version(&self) -> Option<u64> {
        self.current.as_ref().map(|(version, _)| *version)
    }

    /// Decides what `message` means given the state held.
    pub fn on_message(&mut self, message: WatchMessage) -> Step {
        let held = self.version();
        match message {
            WatchMessage::Snapshot { version, mesh } => {
                if !self.awaiting_snapshot && held.is_some_and(|held| version <= held) {
                    return Step::Stale { version };
                }
                self.awaiting_snapshot = false;
                let same = self.current.as_ref().is_some_and(|(_, held)| *held == mesh);
                self.current = Some((version, mesh.clone()));
                if same {
                    Step::Unchanged { version }
                } else {
                    Step::Apply {
                        version,
                        mesh: Box::new(mesh),
                    }
                }
            }
            WatchMessage::Delta(delta) => {
                let Some((held, mesh)) = self.current.as_ref().filter(|_| !self.awaiting_snapshot)
                else {
                    return Step::Resync("a delta arrived before the snapshot".into());
                };
                if delta.version <= *held {
                    return Step::Stale {
                        version: delta.version,
                    };
                }
                if delta.base != *held {
                    return Step::Resync(format!(
                        "a delta from version {} to {} arrived at version {held}",
                        delta.base, delta.version
                    ));
                }
                let next = delta.apply(mesh);
                self.current = Some((delta.version, next.clone()));
                Step::Apply {
                    version: delta.version,
                    mesh: Box::new(next),
                }
            }
            WatchMessage::Heartbeat { version } => match held {
                Some(held) if !self.awaiting_snapshot && version > held => Step::Resync(format!(
                    "the control plane is at version {version}, this sidecar at {held}"
                )),
                _ => Step::Alive,
            },
            WatchMessage::Unknown => Step::Alive,
        }
    }
}

/// Splits a byte stream into lines, refusing any longer than the limit.
#[derive(Debug)]
pub struct LineBuffer {
    buffer: BytesMut,
    max: usize,
}

impl LineBuffer {
    /// A buffer for lines of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        LineBuffer {
            buffer: BytesMut::new(),
            max,
        }
    }

    /// Adds `data` and returns the complete lines it finished (newlines removed, empty lines skipped).
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Bytes>, WatchError> {
        self.buffer.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
            let line = self.buffer.split_to(end).freeze();
            self.buffer.advance(1);
            if line.len() > self.max {
                return Err(WatchError::LineTooLong(self.max));
            }
            if !line.is_empty() {
                lines.push(line);
            }
        }
        if self.buffer.len() > self.max {
            return Err(WatchError::LineTooLong(self.max));
        }
        Ok(lines)
    }
}

/// Resolves once the sidecar holds its first mesh state from the control plane.
pub struct FirstState(watch::Receiver<bool>);

impl FirstState {
    /// Waits for the first state, at most `limit`; false when the wait ran out.
    pub async fn wait(mut self, limit: Duration) -> bool {
        let arrived = tokio::time::timeout(limit, self.0.wait_for(|seen| *seen))
            .await
            .is_ok_and(|r| r.is_ok());
        if !arrived {
            tracing::warn!(
                waited = ?limit,
                "no mesh state from the control plane yet; reporting ready and serving plain until it arrives"
            );
        }
        arrived
    }
}

/// Follows the control plane's mesh state into `mesh` for as long as the process runs, once `identity` holds
/// the sidecar's certificate (the watch is authenticated with it).
pub fn spawn(
    client: Arc<ControlPlaneClient>,
    identity: Arc<IdentityStore>,
    mesh: Arc<Mesh>,
    metrics: DiscoveryMetrics,
    settings: WatchSettings,
) -> FirstState {
    let (first, first_rx) = watch::channel(false);
    tokio::spawn(async move {
        identity.ready().await;
        let watcher = Watcher {
            client,
            settings,
            applier: Applier {
                mesh,
                metrics,
                first,
            },
        };
        watcher.run().await;
    });
    FirstState(first_rx)
}

struct Watcher {
    client: Arc<ControlPlaneClient>,
    settings: WatchSettings,
    applier: Applier,
}

impl Watcher {
    async fn run(self) {
        let mut follower = Follower::new();
        let mut backoff = self.settings.backoff_initial;
        loop {
            let mut synced = false;
            let ended = self.follow(&mut follower, &mut synced).await;
            self.applier.metrics.connected.set(0);
            // A stream that delivered a state was a success: the next attempt starts from the shortest delay.
            if synced {
                backoff = self.settings.backoff_initial;
            }
            let delay = jittered(backoff);
            tracing::warn!(
                control_plane = %self.client.addr(),
                error = %ended,
                retry_in = ?delay,
                version = ?follower.version(),
                "discovery watch ended; serving with the last good mesh state"
            );
            tokio::time::sleep(delay).await;
            backoff = (backoff * 2).min(self.settings.backoff_max);
        }
    }

    /// Opens one stream and follows it until it ends; the result says why it ended, and `synced` whether a
    /// snapshot was taken.
    async fn follow(&self, follower: &mut Follower, synced: &mut bool) -> WatchError {
        let response = match self.client.get(WATCH_PATH).await {
            Ok(response) => response,
            Err(error) => return error.into(),
        };
        if response.status() != StatusCode::OK {
            return refused(response).await;
        }
        self.applier.metrics.connected.set(1);
        tracing::info!(control_plane = %self.client.addr(), "discovery watch connected");
        follower.new_stream();
        self.applier
            .read(response.into_body(), &self.settings, follower, synced)
            .await
    }
}

/// Puts the states of the stream in force: decodes a line, lets the follower judge it, checks it.
struct Applier {
    mesh: Arc<Mesh>,
    metrics: DiscoveryMetrics,
    first: watch::Sender<bool>,
}

impl Applier {
    /// Follows one stream's body until it ends, breaks, stays silent past the heartbeat timeout, or carries
    /// something that cannot be followed; `synced` tells whether a state was taken.
    async fn read<B>(
        &self,
        mut body: B,
        settings: &WatchSettings,
        follower: &mut Follower,
        synced: &mut bool,
    ) -> WatchError
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut lines = LineBuffer::new(settings.max_line_bytes);
        loop {
            let frame = match tokio::time::timeout(settings.heartbeat_timeout, body.frame()).await {
                Err(_) => return WatchError::Silent(settings.heartbeat_timeout),
                Ok(None) => return WatchError::Ended,
                Ok(Some(Err(error))) => return WatchError::Body(error.to_string()),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let complete = match lines.push(&data) {
                Ok(complete) => complete,
                Err(error) => return error,
            };
            for line in complete {
                match self.handle(follower, &line) {
                    Ok(took_state) => *synced |= took_state,
                    Err(error) => return error,
                }
            }
        }
    }

    /// Handles one line; `Ok(true)` when it was a state (applied, refused or unchanged).
    fn handle(&self, follower: &mut Follower, line: &[u8]) -> Result<bool, WatchError> {
        let message: WatchMessage = match serde_json::from_slice(line) {
            Ok(message) => message,
            Err(error) => {
                self.metrics.count("invalid");
                return Err(WatchError::Decode(error));
            }
        };
        match follower.on_message(message) {
            Step::Apply { version, mesh } => {
                self.metrics
                    .version
                    .set(i64::try_from(version).unwrap_or(i64::MAX));
                match mesh.check() {
                    Ok(()) => {
                        self.mesh.replace(&mesh);
                        self.metrics.count("applied");
                        tracing::info!(
                            version,
                            services = mesh.services.len(),
                            "mesh state from the control plane in force"
                        );
                    }
                    Err(error) => {
                        self.metrics.count("invalid");
                        tracing::warn!(version, %error, "mesh state from the control plane refused; keeping the last good one");
                    }
                }
                self.first.send_replace(true);
                return Ok(true);
            }
            Step::Unchanged { version } => {
                self.metrics
                    .version
                    .set(i64::try_from(version).unwrap_or(i64::MAX));
                self.metrics.count("unchanged");
                self.first.send_replace(true);
                return Ok(true);
            }
            Step::Stale { version } => {
                self.metrics.count("stale");
                tracing::debug!(version, "stale mesh update ignored");
            }
            Step::Resync(reason) => {
                self.metrics.count("resync");
                return Err(WatchError::Resync(reason));
            }
            Step::Alive => {}
        }
        Ok(false)
    }
}

/// The error for a non-200 answer, with the start of its body (the control plane's JSON problem).
async fn refused(response: http::Response<Incoming>) -> WatchError {
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), 1024).collect();
    let message = match tokio::time::timeout(Duration::from_secs(2), body).await {
        Ok(Ok(body)) => String::from_utf8_lossy(&body.to_bytes()).trim().to_string(),
        _ => String::new(),
    };
    WatchError::Refused { status, message }
}

/// A delay between half of `ceiling` and `ceiling`, so sidecars that lost the control plane together do not
/// come back together.
fn jittered(ceiling: Duration) -> Duration {
    let half = ceiling / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::super::protocol::Delta;
    use super::*;

    fn mesh(name: &str) -> MeshConfig {
        MeshConfig::from_yaml(&format!(
            "services:\n  - {{name: {name}, identity: 'spiffe://cluster.local/ns/x/sa/{name}', endpoints: [{{address: '10.0.0.1:80'}}]}}\n"
        ))
        .unwrap()
    }

    fn snapshot(version: u64, name: &str) -> WatchMessage {
        WatchMessage::Snapshot {
            version,
            mesh: mesh(name),
        }
    }

    fn delta(base: u64, version: u64, from: &str, to: &str) -> WatchMessage {
        WatchMessage::Delta(Delta::between(&mesh(from), base, &mesh(to), version).unwrap())
    }

    #[test]
    fn deltas_apply_only_on_their_base_and_stale_messages_are_ignored() {
        let mut follower = Follower::new();
        assert!(matches!(
            follower.on_message(delta(0, 1, "a", "b")),
            Step::Resync(_)
        ));
        assert_eq!(
            follower.on_message(snapshot(5, "a")),
            Step::Apply {
                version: 5,
                mesh: Box::new(mesh("a"))
            }
        );
        // Not newer than what is held: ignored, whatever its content.
        assert_eq!(
            follower.on_message(snapshot(5, "z")),
            Step::Stale { version: 5 }
        );
        assert_eq!(
            follower.on_message(delta(4, 5, "a", "z")),
            Step::Stale { version: 5 }
        );
        assert_eq!(
            follower.on_message(delta(5, 6, "a", "b")),
            Step::Apply {
                version: 6,
                mesh: Box::new(mesh("b"))
            }
        );
        // A delta for another base means a change was missed: resync.
        match follower.on_message(delta(7, 8, "c", "d")) {
            Step::Resync(reason) => {
                assert!(reason.contains('7') && reason.contains('6'), "{reason}")
            }
            other => panic!("expected a resync, got {other:?}"),
        }
        assert_eq!(follower.version(), Some(6));
        assert_eq!(
            follower.on_message(WatchMessage::Heartbeat { version: 6 }),
            Step::Alive
        );
        assert!(matches!(
            follower.on_message(WatchMessage::Heartbeat { version: 9 }),
            Step::Resync(_)
        ));
        assert_eq!(follower.on_message(WatchMessage::Unknown), Step::Alive);
    }

    #[test]
    fn a_new_stream_takes_its_snapshot_whatever_the_version() {
        let mut follower = Follower::new();
        follower.on_message(snapshot(50, "a"));
        // A restarted control plane may count from lower; the first snapshot of a stream is the truth.
        follower.new_stream();
        assert_eq!(
            follower.on_message(snapshot(3, "b")),
            Step::Apply {
                version: 3,
                mesh: Box::new(mesh("b"))
            }
        );
        follower.new_stream();
        assert_eq!(
            follower.on_message(snapshot(4, "b")),
            Step::Unchanged { version: 4 }
        );
        // Until the snapshot arrives, deltas cannot be followed.
        follower.new_stream();
        assert!(matches!(
            follower.on_message(delta(4, 5, "b", "c")),
            Step::Resync(_)
        ));
    }

    /// A response body fed from a queue: frames as they are sent, silence while none is.
    struct QueueBody(tokio::sync::mpsc::Receiver<Bytes>);

    impl hyper::body::Body for QueueBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|d| Ok(hyper::body::Frame::data(d))))
        }
    }

    fn queue_body() -> (tokio::sync::mpsc::Sender<Bytes>, QueueBody) {
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        (sender, QueueBody(receiver))
    }

    fn applier() -> (Applier, Arc<Mesh>, watch::Receiver<bool>) {
        let registry = Registry::new();
        let policy = crate::policy::PolicyMetrics::register(&registry).unwrap();
        let live = Arc::new(Mesh::new(&MeshConfig::default(), policy, None));
        let (first, first_rx) = watch::channel(false);
        let applier = Applier {
            mesh: live.clone(),
            metrics: DiscoveryMetrics::register(&registry).unwrap(),
            first,
        };
        (applier, live, first_rx)
    }

    #[tokio::test]
    async fn a_silent_stream_ends_at_the_heartbeat_timeout_and_a_long_line_ends_it_too() {
        let (applier, live, _) = applier();
        let settings = WatchSettings {
            heartbeat_timeout: Duration::from_millis(200),
            max_line_bytes: 64 << 10,
            ..WatchSettings::default()
        };
        let (sender, body) = queue_body();
        let line = super::super::protocol::encode_line(&snapshot(1, "a")).unwrap();
        // The snapshot arrives in two frames, then nothing: the stream is alive until the timeout.
        sender
            .send(Bytes::copy_from_slice(&line[..10]))
            .await
            .unwrap();
        sender
            .send(Bytes::copy_from_slice(&line[10..]))
            .await
            .unwrap();
        let (mut follower, mut synced) = (Follower::new(), false);
        let started = tokio::time::Instant::now();
        let ended = applier
            .read(body, &settings, &mut follower, &mut synced)
            .await;
        assert!(matches!(ended, WatchError::Silent(_)), "{ended}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(synced);
        let endpoint: std::net::SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert!(live.table().outbound(endpoint).is_some());
        drop(sender);

        let (sender, body) = queue_body();
        sender
            .send(Bytes::from(vec![b'x'; 70 << 10]))
            .await
            .unwrap();
        let ended = applier
            .read(body, &settings, &mut follower, &mut false)
            .await;
        assert!(matches!(ended, WatchError::LineTooLong(_)), "{ended}");
    }

    #[test]
    fn a_state_that_fails_the_checks_is_refused_and_the_last_good_one_stays() {
        let (applier, live, first_rx) = applier();
        let line = |message: &WatchMessage| super::super::protocol::encode_line(message).unwrap();
        let mut follower = Follower::new();
        assert_eq!(
            applier.handle(&mut follower, &line(&snapshot(1, "a"))).ok(),
            Some(true)
        );
        assert!(*first_rx.borrow());
        let endpoint: std::net::SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert_eq!(
            live.table().outbound(endpoint).unwrap().service.as_ref(),
            "a"
        );

        // A virtual address without a port to route: refused, counted, and "a" stays in force.
        let mut unroutable = mesh("b");
        unroutable.services[0].addresses = vec!["10.96.0.1".parse().unwrap()];
        let bad = WatchMessage::Snapshot {
            version: 2,
            mesh: unroutable,
        };
        assert_eq!(applier.handle(&mut follower, &line(&bad)).ok(), Some(true));
        assert_eq!(
            live.table().outbound(endpoint).unwrap().service.as_ref(),
            "a"
        );
        assert_eq!(
            applier
                .metrics
                .updates
                .with_label_values(&["invalid"])
                .get(),
            1
        );
        assert_eq!(
            applier
                .metrics
                .updates
                .with_label_values(&["applied"])
                .get(),
            1
        );
        assert_eq!(applier.metrics.version.get(), 2);
        // Not JSON of the protocol: the stream is given up.
        assert!(matches!(
            applier.handle(&mut follower, b"{\"type\":\"snapshot\",\"version\":\"x\"}"),
            Err(WatchError::Decode(_))
        ));
    }

    #[test]
    fn lines_are_split_and_bounded() {
        let mut lines = LineBuffer::new(8);
        assert!(lines.push(b"abc").unwrap().is_empty());
        assert_eq!(
            lines.push(b"de\n\nfg\nh").unwrap(),
            vec![Bytes::from("abcde"), Bytes::from("fg")]
        );
        assert!(matches!(
            lines.push(b"123456789"),
            Err(WatchError::LineTooLong(8))
        ));
        let mut lines = LineBuffer::new(4);
        assert!(matches!(
            lines.push(b"12345\n"),
            Err(WatchError::LineTooLong(4))
        ));
    }

    #[test]
    fn reconnect_delays_are_jittered_below_the_ceiling() {
        for _ in 0..100 {
            let delay = jittered(Duration::from_millis(400));
            assert!((Duration::from_millis(200)..=Duration::from_millis(400)).contains(&delay));
        }
    }
}
