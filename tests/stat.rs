//! `meshlet stat` against a running `meshlet demo`: the sidecars report to the demo's control plane and the
//! table lists the demo's edges with traffic and a success rate. The demo uses fixed addresses, so it runs
//! under `flock /tmp/meshlet-demo.lock` like every other user of the demo.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The running demo. On drop it is left to finish its `--duration` (then it stops its sidecars and control
/// plane itself; a signal would orphan them), and killed only if it hangs.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stat(args: &[&str]) -> std::process::Output {
    Command::new(MESHLET)
        .arg("stat")
        .args(args)
        .output()
        .expect("run meshlet stat")
}

/// The cells of the table row whose first column is `name`.
fn row<'a>(table: &'a str, name: &str) -> Option<Vec<&'a str>> {
    let line = table.lines().find(|l| l.starts_with(name))?;
    Some(line[name.len()..].split_whitespace().collect())
}

#[test]
fn stat_shows_the_demo_edges() {
    assert!(
        std::path::Path::new(MESHLET)
            .with_file_name("meshlet-control")
            .exists(),
        "meshlet-control is not built beside meshlet (run `cargo build -p meshlet-control`); without it the demo has no control plane to report to"
    );
    let lock = FileLock::exclusive(DEMO_LOCK);
    let mut child = Command::new(MESHLET)
        .args(["demo", "--duration", "40s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run meshlet demo");
    let stdout = child.stdout.take().unwrap();
    let demo = Running(child);
    // Once it names its control plane in its banner, the control plane is up and the sidecars have it.
    let (started, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = started.send(line);
        }
    });
    let banner_deadline = Instant::now() + Duration::from_secs(60);
    let mut banner = String::new();
    loop {
        let left = banner_deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the demo never named its control plane:\n{banner}"));
        assert!(
            !line.contains("meshlet-control was not found"),
            "the demo runs without a control plane: {line}"
        );
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("control plane:") {
            break;
        }
    }

    let deadline = Instant::now() + Duration::from_secs(35);
    let mut last = String::new();
    let table = loop {
        assert!(
            Instant::now() < deadline,
            "no reported traffic on order → payment:\n{last}"
        );
        std::thread::sleep(Duration::from_secs(1));
        let out = stat(&["--by", "edge", "--window", "30s"]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            continue;
        }
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        let rps = row(&table, "order → payment").and_then(|cells| cells[1].parse::<f64>().ok());
        if rps.is_some_and(|rps| rps > 0.0) {
            break table;
        }
    };
    let payment = row(&table, "order → payment").unwrap();
    println!("{table}");
    assert!(
        table.starts_with("SOURCE → DESTINATION") && table.contains(" SUCCESS "),
        "{table}"
    );
    assert!(payment[0].ends_with('%'), "success rate: {table}");
    // SUCCESS RPS P50 P95 P99 RETRIES TIMEOUTS MTLS TOTAL
    assert!(payment[5].parse::<u64>().is_ok(), "retries: {table}");
    assert_eq!(payment[7], "100.00%", "sidecars talk mTLS: {table}");
    assert!(payment[8].parse::<u64>().unwrap() > 0, "total: {table}");
    for edge in [
        "loadgen → api-gateway",
        "api-gateway → order",
        "order → inventory",
    ] {
        assert!(row(&table, edge).is_some(), "{edge} missing:\n{table}");
    }
    let by_service = stat(&["--window", "30s"]);
    let services = String::from_utf8_lossy(&by_service.stdout);
    assert!(by_service.status.success(), "{services}");
    assert!(row(&services, "payment").is_some(), "{services}");
    let json = stat(&["-o", "json", "--by", "edge"]);
    let parsed: meshlet::telemetry::api::StatResponse =
        serde_json::from_slice(&json.stdout).expect("meshlet stat -o json prints the API's JSON");
    assert!(parsed.totals.total_requests > 0);
    drop(demo);
    drop(lock);
}

#[test]
fn an_unreachable_control_plane_is_named() {
    let addr = format!("http://127.0.0.1:{}", free_port());
    let out = stat(&["--control-plane-admin", &addr]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&addr), "{stderr}");
    let out = stat(&["--control-plane-admin", "http://x/y"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--control-plane-admin"));
}
