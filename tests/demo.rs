//! `meshlet demo` runs the whole shop as a local mesh: a minute with payment failing 30% of the time, checked
//! against payment's own ledger, the orders' outcomes and the notifications; and SIGTERM stops every child
//! process it started.
//!
//! The demo uses fixed loopback addresses and ports, so each test holds `/tmp/meshlet-demo.lock` (the lock
//! `flock /tmp/meshlet-demo.lock` takes) while it runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The demo needs the control plane beside the proxy binary (for identities and mTLS).
fn require_control_plane() {
    let control = Path::new(common::MESHLET).with_file_name("meshlet-control");
    assert!(
        control.exists(),
        "{} is missing: build it with `cargo build -p meshlet-control` (scripts/test builds the whole workspace before testing)",
        control.display()
    );
}

/// Whether the event path can run; under CI it must.
fn have_redis() -> bool {
    if common::have("redis-server") {
        return true;
    }
    common::skip_or_fail(
        "redis-server is not installed (apt-get install redis-server): event path not checked",
    );
    false
}

fn report_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "meshlet-demo-test-{name}-{}.json",
        std::process::id()
    ))
}

fn read_report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no report at {}: {e}", path.display()));
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&text).expect("the report is JSON")
}

/// Every process the demo started is gone: none of its pids, and nothing with its work directory in its
/// command line (what `pgrep -f meshlet` would find of this demo).
fn assert_nothing_left(report: &Value, demo_pid: u32) {
    let children: Vec<u64> = report["children"]
        .as_array()
        .expect("children")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(children.len() >= 8, "children: {children:?}");
    for pid in &children {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            status.is_empty() || status.contains("State:\tZ"),
            "child {pid} is still running:\n{status}"
        );
    }
    let pgrep = Command::new("pgrep")
        .args(["-f", &format!("meshlet-demo-{demo_pid}/")])
        .output()
        .expect("run pgrep");
    assert!(
        pgrep.stdout.is_empty(),
        "left behind: {}",
        String::from_utf8_lossy(&pgrep.stdout)
    );
}

/// The rows of every table the demo printed: (from, to, rest of the line).
fn table_rows(stdout: &str) -> Vec<(String, String, String)> {
    stdout
        .lines()
        .filter(|l| !l.starts_with("FROM") && !l.starts_with("---") && !l.starts_with(' '))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (from, to) = (parts.next()?, parts.next()?);
            let rest: Vec<&str> = parts.collect();
            // A table row: the third column is requests/s or `tcp`.
            let third = rest.first()?;
            (*third == "tcp" || third.parse::<f64>().is_ok())
                .then(|| (from.to_string(), to.to_string(), rest.join(" ")))
        })
        .collect()
}

#[test]
fn a_minute_of_the_shop_with_payment_failing_30_percent_charges_no_order_twice() {
    require_control_plane();
    let redis = have_redis();
    let _lock = common::FileLock::exclusive(common::DEMO_LOCK);
    let report_file = report_path("minute");
    let started = Instant::now();
    let child = Command::new(common::MESHLET)
        .args([
            "demo",
            "--duration",
            "60s",
            "--payment-failure-rate",
            "0.3",
            "--rate",
            "10",
            "--interval",
            "10s",
            "--report",
        ])
        .arg(&report_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start meshlet demo");
    let demo_pid = child.id();
    let out = child.wait_with_output().expect("run meshlet demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("demo ran {:?}:\n{stdout}", started.elapsed());
    let report = read_report(&report_file);

    // Payment's own ledger against order's book.
    let ledger: BTreeMap<u64, (u64, u64)> = report["ledger"]
        .as_array()
        .expect("ledger")
        .iter()
        .map(|e| {
            (
                e["order"].as_u64().unwrap(),
                (
                    e["charges"].as_u64().unwrap(),
                    e["refunds"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    let charged_twice: Vec<_> = ledger.iter().filter(|(_, (c, _))| *c > 1).collect();
    assert!(charged_twice.is_empty(), "charged twice: {charged_twice:?}");
    let mut states: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for order in report["orders"].as_array().expect("orders") {
        states
            .entry(order["state"].as_str().unwrap().to_string())
            .or_default()
            .push(order["order"].as_u64().unwrap());
    }
    let of = |state: &str| states.get(state).cloned().unwrap_or_default();
    let net = |order: &u64| ledger.get(order).map_or(0, |(c, r)| *c as i64 - *r as i64);
    let (placed, cancelled) = (of("placed"), of("cancelled"));
    let left_charged: Vec<_> = cancelled.iter().filter(|o| net(o) != 0).collect();
    assert!(
        left_charged.is_empty(),
        "cancelled but charged: {left_charged:?}"
    );
    let not_charged: Vec<_> = placed.iter().filter(|o| net(o) != 1).collect();
    assert!(
        not_charged.is_empty(),
        "placed but not charged once: {not_charged:?}"
    );
    assert!(
        of("pending").is_empty() && of("compensation_failed").is_empty(),
        "{states:?}"
    );

    // Orders succeed and fail; the compensations ran, including for charges whose answer was lost.
    assert!(placed.len() >= 250, "only {} orders placed", placed.len());
    assert!(
        cancelled.len() >= 10,
        "only {} orders cancelled",
        cancelled.len()
    );
    let compensations = &report["compensations"];
    assert!(
        compensations["voids_processed"].as_u64().unwrap() >= 1,
        "{compensations}"
    );
    assert_eq!(
        compensations["stock_released"].as_u64().unwrap(),
        cancelled.len() as u64,
        "every cancelled order's stock is released: {compensations}"
    );
    let refunded = ledger.values().filter(|(c, r)| *c > 0 && *r > 0).count();
    assert!(
        refunded >= 1,
        "no lost charge was refunded: {}",
        report["payment_failures"]
    );
    let checkouts = &report["checkouts"];
    let sent = checkouts["sent"].as_u64().unwrap();
    assert!(
        checkouts["failed"].as_u64().unwrap() * 100 <= sent,
        "more than 1% of checkouts failed outright: {checkouts}"
    );

    // Every placed order was notified through redis.
    if redis {
        let notified: BTreeSet<u64> = report["events"]["notified"]
            .as_array()
            .expect("events")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        let missing: Vec<_> = placed.iter().filter(|o| !notified.contains(o)).collect();
        assert!(
            missing.is_empty(),
            "placed without a notification: {missing:?}"
        );
    }

    // The table printed every edge, HTTP over mTLS, the event path as opaque TCP to a strict sidecar.
    let rows = table_rows(&stdout);
    let mut edges = vec![
        ("loadgen", "api-gateway"),
        ("api-gateway", "order"),
        ("api-gateway", "customer"),
        ("api-gateway", "shipping"),
        ("order", "inventory"),
        ("order", "payment"),
    ];
    if redis {
        edges.extend([("order", "redis"), ("notifier", "redis")]);
    }
    for (from, to) in &edges {
        let row = rows
            .iter()
            .find(|(f, t, _)| f == from && t == to)
            .unwrap_or_else(|| panic!("edge {from} -> {to} missing from:\n{stdout}"));
        if *to == "redis" {
            assert!(
                row.2.starts_with("tcp") && row.2.ends_with("strict"),
                "{row:?}"
            );
        } else {
            assert!(row.2.ends_with("100%"), "not all mTLS: {row:?}");
        }
    }
    assert!(
        rows.iter().any(|(f, t, rest)| f == "order"
            && t == "payment"
            && rest.split_whitespace().nth(7).is_some_and(|r| r != "0")),
        "order's sidecar never retried payment:\n{stdout}"
    );
    for url in [
        "http://127.0.5.1:15020/metrics",
        "mesh.yaml",
        "services.payment.retries",
    ] {
        assert!(stdout.contains(url), "{url} not printed:\n{stdout}");
    }
    assert_nothing_left(&report, demo_pid);
}

#[test]
fn sigterm_stops_the_demo_and_every_process_it_started() {
    require_control_plane();
    let _lock = common::FileLock::exclusive(common::DEMO_LOCK);
    let report_file = report_path("sigterm");
    let mut child = Command::new(common::MESHLET)
        .args(["demo", "--interval", "2s", "--report"])
        .arg(&report_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start meshlet demo");
    let demo_pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the demo ended early:\n{seen}"))
            .expect("read demo output");
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("--- last") {
            break;
        }
        assert!(Instant::now() < deadline, "no table within 60s:\n{seen}");
    }
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(demo_pid as i32, libc::SIGTERM) };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait for the demo");
    let rest = rest.join("\n");
    assert!(status.success(), "{status}:\n{seen}{rest}");
    assert!(rest.contains("SIGTERM: stopping"), "{rest}");
    assert!(rest.contains(", 0 charged twice"), "{rest}");
    let report = read_report(&report_file);
    assert_nothing_left(&report, demo_pid);
}
