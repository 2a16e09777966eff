//! `GET /v1/mesh/watch`: the discovery stream each sidecar keeps open over mutual TLS.
//!
//! The response is newline-delimited JSON ([`meshlet::discovery::protocol`]): a snapshot of the store's
//! current state, then a delta (or a snapshot, when a delta cannot express the change) whenever the store's
//! version moves, and a heartbeat every [`HEARTBEAT_INTERVAL`] of quiet.
//!
//! Each stream is fed by a task of its own that follows the store through a `watch` receiver and writes into
//! a small channel that the response body drains. A slow reader therefore only delays its own task, which
//! then sends the change from what that reader last got to the latest state; a reader that takes nothing
//! for [`SEND_TIMEOUT`] is dropped. Streams are bounded ([`MAX_WATCHERS`]) and end when the control plane
//! shuts down, so sidecars reconnect to its successor.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use meshlet::discovery::protocol::{
    encode_line, Delta, WatchMessage, CONTENT_TYPE, HEARTBEAT_INTERVAL, MAX_MESSAGE_BYTES,
};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::server::{json_error, ApiBody, PeerIdentity};
use crate::store::{MeshState, Store};

/// Most watch streams open at once.
pub const MAX_WATCHERS: usize = 4096;
/// A stream whose reader takes nothing for this long is ended.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages queued per stream beyond what the connection is sending.
const QUEUE: usize = 2;

/// Serves watch streams from the store.
pub struct WatchService {
    store: Arc<Store>,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    metrics: WatchMetrics,
}

#[derive(Clone)]
struct WatchMetrics {
    open: IntGauge,
    messages: IntCounterVec,
    refused: IntCounterVec,
}

impl WatchService {
    /// Serves `store`; every stream ends when `stop` turns true.
    pub fn new(
        store: Arc<Store>,
        stop: watch::Receiver<bool>,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let open = IntGauge::new(
            "meshlet_control_watch_streams",
            "Discovery watch streams open now.",
        )?;
        let messages = IntCounterVec::new(
            Opts::new(
                "meshlet_control_watch_messages_total",
                "Messages sent on discovery watch streams, by type (snapshot, delta, heartbeat).",
            ),
            &["type"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "meshlet_control_watch_refused_total",
                "Discovery watch requests refused, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        Ok(WatchService {
            store,
            permits: Arc::new(Semaphore::new(MAX_WATCHERS)),
            stop,
            metrics: WatchMetrics {
                open,
                messages,
                refused,
            },
        })
    }

    /// Answers a watch request: a stream for a caller with a mesh certificate, a JSON problem otherwise.
    pub fn serve(&self, request: &Request<Incoming>) -> Response<ApiBody> {
        if request.method() != Method::GET {
            return self.refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                format!("the watch takes GET, not {}", request.method()),
            );
        }
        let Some(PeerIdentity(peer)) = request.extensions().get::<PeerIdentity>() else {
            return self.refuse(
                StatusCode::UNAUTHORIZED,
                "no-client-certificate",
                "the watch needs a mesh certificate: connect with the sidecar's identity".into(),
            );
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return self.refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "too-many-watchers",
                format!("{MAX_WATCHERS} watch streams are open; try again later"),
            );
        };
        let (lines, queue) = mpsc::channel(QUEUE);
        let stream = Stream {
            state: self.store.subscribe(),
            lines,
            stop: self.stop.clone(),
            metrics: self.metrics.clone(),
            peer: peer.to_string(),
            _permit: permit,
        };
        tokio::spawn(stream.feed());
        let mut response = Response::new(QueueBody(queue).boxed_unsync());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(CONTENT_TYPE),
        );
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        response
    }

    fn refuse(&self, status: StatusCode, reason: &str, message: String) -> Response<ApiBody> {
        self.metrics.refused.with_label_values(&[reason]).inc();
        json_error(status, reason, message)
    }
}

/// One open stream: follows the store and queues its lines.
struct Stream {
    state: watch::Receiver<Arc<MeshState>>,
    lines: mpsc::Sender<Bytes>,
    stop: watch::Receiver<bool>,
    metrics: WatchMetrics,
    peer: String,
    _permit: OwnedSemaphorePermit,
}

impl Stream {
    async fn feed(mut self) {
        self.metrics.open.inc();
        let mut sent = self.state.borrow_and_update().clone();
        tracing::info!(peer = %self.peer, version = sent.version, "watch stream opened");
        let mut delivered = self.send("snapshot", sent.snapshot_line()).await;
        let start = tokio::time::Instant::now() + HEARTBEAT_INTERVAL;
        let mut heartbeat = tokio::time::interval_at(start, HEARTBEAT_INTERVAL);
        while delivered {
            let (kind, line) = tokio::select! {
                changed = self.state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let latest = self.state.borrow_and_update().clone();
                    if latest.version == sent.version {
                        continue;
                    }
                    let message = change(&sent, &latest);
                    sent = latest;
                    heartbeat.reset();
                    message
                }
                _ = heartbeat.tick() => match encode_line(&WatchMessage::Heartbeat { version: sent.version }) {
                    Ok(line) => ("heartbeat", Bytes::from(line)),
                    Err(_) => continue,
                },
                _ = self.lines.closed() => break,
                _ = self.stop.wait_for(|stop| *stop) => break,
            };
            delivered = self.send(kind, line).await;
        }
        self.metrics.open.dec();
        tracing::info!(peer = %self.peer, version = sent.version, "watch stream closed");
    }

    /// Queues one line; false when the reader is gone or took nothing for [`SEND_TIMEOUT`].
    async fn send(&self, kind: &str, line: Bytes) -> bool {
        match tokio::time::timeout(SEND_TIMEOUT, self.lines.send(line)).await {
            Ok(Ok(())) => {
                self.metrics.messages.with_label_values(&[kind]).inc();
                true
            }
            Ok(Err(_)) => false,
            Err(_) => {
                tracing::warn!(peer = %self.peer, "watch stream reader stalled for {SEND_TIMEOUT:?}; closing it");
                false
            }
        }
    }
}

/// The message that takes a reader from `sent` to `latest`: a delta when one can say it within the message
/// size limit, else a snapshot.
fn change(sent: &MeshState, latest: &MeshState) -> (&'static str, Bytes) {
    let delta = Delta::between(&sent.mesh, sent.version, &latest.mesh, latest.version)
        .and_then(|delta| encode_line(&WatchMessage::Delta(delta)).ok())
        .filter(|line| line.len() <= MAX_MESSAGE_BYTES);
    match delta {
        Some(line) => ("delta", Bytes::from(line)),
        None => ("snapshot", latest.snapshot_line()),
    }
}

/// A response body fed line by line from a stream's queue; it ends when the feeding task does.
struct QueueBody(mpsc::Receiver<Bytes>);

impl Body for QueueBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}
