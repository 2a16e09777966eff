//! The discovery watch endpoint over a real mTLS HTTP/2 connection on loopback, through the sidecar's own
//! channel (`meshlet::control_plane::ControlPlaneClient`): a snapshot first, a delta per edit of the mesh
//! file, a refusal without a mesh certificate, and the stream's end when the control plane shuts down.

mod common;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use meshlet::control_plane::ControlPlaneClient;
use meshlet::discovery::protocol::{WatchMessage, WATCH_PATH};
use meshlet::discovery::watch::LineBuffer;
use meshlet::discovery::MeshConfig;
use meshlet::tls::IdentityStore;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn mesh_yaml(timeout: &str) -> String {
    format!(
        "services:
  - {{name: web, identity: '{WEB}', endpoints: [{{address: '10.0.0.1:8080'}}]}}
  - {{name: payment, identity: 'spiffe://cluster.local/ns/shop/sa/payment', endpoints: [{{address: '10.0.0.2:8080'}}]}}
policy:
  services:
    payment: {{timeouts: {{request: {timeout}}}}}
"
    )
}

/// Reads messages off a watch body.
struct Reader {
    body: Incoming,
    lines: LineBuffer,
    pending: std::collections::VecDeque<WatchMessage>,
}

impl Reader {
    /// The next message, or `None` when the stream ended.
    async fn next(&mut self) -> Option<WatchMessage> {
        loop {
            if let Some(message) = self.pending.pop_front() {
                return Some(message);
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("a message or the end within the heartbeat interval");
            let data = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                _ => return None,
            };
            for line in self.lines.push(&data).unwrap() {
                self.pending
                    .push_back(serde_json::from_slice(&line).expect("a protocol message"));
            }
        }
    }
}

#[tokio::test]
async fn the_watch_streams_a_snapshot_then_deltas_to_callers_with_a_mesh_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = common::write_join_tokens(
        dir.path(),
        &format!("- token: web-token\n  identity: {WEB}\n"),
    );
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh_yaml("2s")).unwrap();
    let mut config = meshlet_control::Config::local_loopback(dir.path().join("ca"), tokens);
    config.mesh_file = Some(mesh_file.clone());
    let control = meshlet_control::start(config).await.unwrap();
    let settings = common::sidecar_settings(&control, WEB, "web-token");

    // No certificate: unauthenticated, as on every other mTLS endpoint, with a JSON problem.
    let anonymous = ControlPlaneClient::new(&settings, IdentityStore::new()).unwrap();
    let refused = anonymous.get(WATCH_PATH).await.unwrap();
    assert_eq!(refused.status(), 401);
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["reason"], "no-client-certificate");

    let channel = common::certified_channel(&settings).await;
    let response = channel.get(WATCH_PATH).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut reader = Reader {
        body: response.into_body(),
        lines: LineBuffer::new(1 << 20),
        pending: Default::default(),
    };
    let Some(WatchMessage::Snapshot { version, mesh }) = reader.next().await else {
        panic!("the stream starts with a snapshot");
    };
    assert_eq!(mesh, MeshConfig::from_yaml(&mesh_yaml("2s")).unwrap());

    // An edit of one service's policy arrives as a delta carrying only that policy.
    let edited = Instant::now();
    std::fs::write(&mesh_file, mesh_yaml("750ms")).unwrap();
    let delta = loop {
        match reader.next().await {
            Some(WatchMessage::Delta(delta)) => break delta,
            Some(WatchMessage::Heartbeat { .. }) => continue,
            other => panic!("expected a delta, got {other:?}"),
        }
    };
    eprintln!("delta received {:?} after the edit", edited.elapsed());
    assert_eq!((delta.base, delta.version), (version, version + 1));
    assert!(delta.upsert.is_empty() && delta.remove.is_empty());
    assert_eq!(
        delta.upsert_policies.keys().collect::<Vec<_>>(),
        ["payment"]
    );
    assert_eq!(
        delta.apply(&mesh),
        MeshConfig::from_yaml(&mesh_yaml("750ms")).unwrap()
    );

    // Shutdown ends the stream, so sidecars go looking for the next control plane.
    control.shutdown().await;
    assert_eq!(reader.next().await, None);
}
