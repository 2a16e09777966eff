//! `POST /v1/telemetry` over the real mTLS channel a sidecar uses: the caller must prove the report's source
//! with its certificate, a repeated or older report changes nothing, and the totals show in `/api/v1/stat`.

mod common;

use bytes::Bytes;
use http_body_util::BodyExt;
use meshlet::control_plane::ControlPlaneClient;
use meshlet::telemetry::api::StatResponse;
use meshlet::telemetry::report::{Counts, Edge, Report, REPORT_VERSION, TELEMETRY_PATH};
use meshlet::tls::IdentityStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn report(source: &str, sequence: u64, ok: u64) -> Report {
    let bounds = meshlet::metrics::LATENCY_BUCKETS.to_vec();
    let mut counts = Counts::with_buckets(bounds.len() + 1);
    counts.mtls.success = ok;
    counts.latency_buckets[4] = ok;
    Report {
        version: REPORT_VERSION,
        instance: "0193d6c2-5f0e-7c61-a7e5-3f4b2d1c9e80".into(),
        sequence,
        source: source.into(),
        latency_bounds_seconds: bounds,
        edges: vec![Edge {
            destination: "payment".into(),
            counts,
        }],
    }
}

async fn post(channel: &ControlPlaneClient, body: Vec<u8>) -> (u16, serde_json::Value) {
    let answer = channel
        .post_json(TELEMETRY_PATH, Bytes::from(body))
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

async fn web_total(control: &meshlet_control::ControlPlane) -> u64 {
    let mut tcp = tokio::net::TcpStream::connect(control.admin_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET /api/v1/stat?by=edge HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (_, body) = raw.split_once("\r\n\r\n").unwrap();
    let stat: StatResponse = serde_json::from_str(body).unwrap();
    stat.rows
        .iter()
        .find(|r| r.name == "web -> payment")
        .map_or(0, |r| r.total_requests)
}

#[tokio::test]
async fn reports_need_the_sources_certificate_and_are_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = common::write_join_tokens(
        dir.path(),
        &format!("- token: web-token\n  identity: {WEB}\n"),
    );
    let config = meshlet_control::Config::local_loopback(dir.path().join("ca"), tokens);
    let control = meshlet_control::start(config).await.unwrap();
    let settings = common::sidecar_settings(&control, WEB, "web-token");
    let json = |r: &Report| serde_json::to_vec(r).unwrap();

    // Without a certificate: refused.
    let anonymous = ControlPlaneClient::new(&settings, IdentityStore::new()).unwrap();
    let (status, _) = post(&anonymous, json(&report(WEB, 1, 5))).await;
    assert_eq!(status, 401);

    let channel = common::certified_channel(&settings).await;
    // Another workload's name as source: forbidden.
    let other = "spiffe://cluster.local/ns/shop/sa/payment";
    let (status, answer) = post(&channel, json(&report(other, 1, 5))).await;
    assert_eq!(
        (status, answer["reason"].as_str()),
        (403, Some("wrong-source"))
    );
    // Not a report.
    let (status, answer) = post(&channel, b"{\"version\":1}".to_vec()).await;
    assert_eq!(
        (status, answer["reason"].as_str()),
        (400, Some("malformed-report"))
    );

    let (status, answer) = post(&channel, json(&report(WEB, 2, 5))).await;
    assert_eq!((status, answer["outcome"].as_str()), (200, Some("applied")));
    // The same report again (its answer was lost) and an older one: nothing changes.
    let (_, answer) = post(&channel, json(&report(WEB, 2, 5))).await;
    assert_eq!(answer["outcome"], "stale");
    let (_, answer) = post(&channel, json(&report(WEB, 1, 3))).await;
    assert_eq!(answer["outcome"], "stale");
    assert_eq!(web_total(&control).await, 5);
    let (_, answer) = post(&channel, json(&report(WEB, 3, 9))).await;
    assert_eq!(answer["outcome"], "applied");
    assert_eq!(web_total(&control).await, 9);
    control.shutdown().await;
}
