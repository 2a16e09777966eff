//! `meshlet demo` runs the shop as a local mesh and reports every edge with successful traffic.

mod common;

use std::process::Command;

#[test]
fn demo_runs_the_shop_through_sidecars() {
    let out = Command::new(common::MESHLET)
        .args([
            "demo",
            "--duration",
            "7s",
            "--interval",
            "3s",
            "--rate",
            "10",
        ])
        .output()
        .expect("run meshlet demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for edge in [
        "loadgen    order",
        "order      inventory",
        "order      payment",
    ] {
        assert!(
            stdout.contains(edge),
            "edge {edge:?} missing from:\n{stdout}"
        );
    }
    assert!(stdout.contains("100.0%"), "{stdout}");
    if std::path::Path::new(common::MESHLET)
        .with_file_name("meshlet-control")
        .exists()
    {
        assert!(
            stdout.contains("mTLS") && stdout.contains(" 100%"),
            "sidecars should speak mTLS:\n{stdout}"
        );
    }
    if std::path::Path::new(common::MESHLET)
        .with_file_name("meshlet-control")
        .exists()
    {
        assert!(
            stdout.contains("payment ledger:") && stdout.contains(", 0 charged twice"),
            "{stdout}"
        );
    }
    let last = stdout.lines().last().unwrap_or_default();
    let failed: u64 = last
        .split(", ")
        .nth(1)
        .and_then(|f| f.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    // Orders still in flight when the demo stops may fail; anything more is a broken mesh.
    assert!(failed <= 3, "{last}");
    let placed: u64 = last
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(placed >= 30, "only {placed} orders placed: {last}");
}
