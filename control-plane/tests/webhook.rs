//! The admission webhook as the kube-apiserver calls it: `POST /inject` over the control plane's HTTPS API
//! with a real AdmissionReview, answered with an allowed review carrying a JSONPatch that injects the
//! sidecar, and unchanged (no patch) for a pod that opted out.

mod common;

use base64::Engine;
use meshlet_control::Config;
use serde_json::Value;

async fn review(fixture: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let tokens = common::write_join_tokens(dir.path(), "[]\n");
    let control = meshlet_control::start(Config::local_loopback(dir.path().join("ca"), tokens))
        .await
        .unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/k8s/fixtures/admission/"
    );
    let body = std::fs::read(format!("{path}{fixture}")).unwrap();
    let (status, answer) = common::post_raw_to(
        control.api_addr(),
        "localhost",
        control.trust_bundle_pem(),
        None,
        "/inject",
        body,
    )
    .await;
    assert_eq!(status, 200);
    control.shutdown().await;
    serde_json::from_slice(&answer).unwrap()
}

#[tokio::test]
async fn injects_an_opted_in_pod_over_https() {
    let answer = review("payment-annotated.json").await;
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    let text = patch.to_string();
    assert!(
        text.contains("meshlet-init") && text.contains("meshlet-proxy"),
        "{text}"
    );
}

#[tokio::test]
async fn leaves_an_opted_out_pod_alone() {
    let answer = review("disabled.json").await;
    let response = &answer["response"];
    assert_eq!(response["allowed"], true);
    assert!(
        response.get("patch").is_none_or(Value::is_null),
        "{response}"
    );
}
