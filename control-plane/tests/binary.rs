//! The `meshlet-control` binary: flags and environment, start-up errors, readiness, SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_meshlet-control");

#[test]
fn bad_values_are_reported_with_flag_and_value() {
    let output = Command::new(BIN)
        .args(["serve", "--cert-ttl", "fortnight"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--cert-ttl") && stderr.contains("fortnight"),
        "{stderr}"
    );

    let output = Command::new(BIN)
        .args(["serve", "--mode", "cluster"])
        .env("MESHLET_CONTROL_TRUST_DOMAIN", "Not A Domain")
        .env("MESHLET_CONTROL_ISSUER_DIR", "/nonexistent")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--trust-domain") && stderr.contains("Not A Domain"),
        "{stderr}"
    );
}

#[tokio::test]
async fn serves_until_sigterm_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write_join_tokens(
        dir.path(),
        "- token: t\n  identity: spiffe://cluster.local/ns/shop/sa/web\n",
    );
    let child = Command::new(BIN)
        .arg("serve")
        .env("MESHLET_CONTROL_API_ADDR", "127.0.0.1:0")
        .env("MESHLET_CONTROL_ADMIN_ADDR", "127.0.0.1:0")
        .env("MESHLET_CONTROL_DATA_DIR", dir.path().join("ca"))
        .env("MESHLET_CONTROL_JOIN_TOKENS", &tokens)
        .env("MESHLET_CONTROL_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(Some(child));
    let stderr = child.0.as_mut().unwrap().stderr.take().unwrap();
    // The JSON "ready" line says where the listeners ended up; the rest of the log is drained so the
    // child never blocks on a full pipe.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["fields"]["message"] == "control plane ready" {
                let addr = |key: &str| {
                    event["fields"][key]
                        .as_str()
                        .unwrap_or_default()
                        .parse::<SocketAddr>()
                };
                let anchors = event["fields"]["trust_anchors"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let _ = ready_tx.send((addr("admin_addr"), addr("api_addr"), anchors));
            }
        }
    });
    let (admin_addr, api_addr, anchors_path) = tokio::task::spawn_blocking(move || ready_rx.recv())
        .await
        .unwrap()
        .expect("meshlet-control exited without becoming ready");
    let (admin_addr, api_addr) = (admin_addr.unwrap(), api_addr.unwrap());
    assert_eq!(
        std::path::Path::new(&anchors_path),
        dir.path().join("ca").join("ca.crt")
    );

    assert_eq!(admin_get(admin_addr, "/ready").await.0, 200);
    let bundle = std::fs::read_to_string(&anchors_path).unwrap();
    let (key, request) = request_for("spiffe://cluster.local/ns/shop/sa/web");
    let issued = issue(api_addr, &bundle, Some("t"), &request).await.issued();
    check_leaf(
        &issued,
        "spiffe://cluster.local/ns/shop/sa/web",
        &key,
        std::time::Duration::from_secs(24 * 3600),
    );

    let mut process = child.0.take().unwrap();
    let pid = process.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || process.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
}

/// Kills the child if the test fails before it is stopped on purpose, so no server outlives the test.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
