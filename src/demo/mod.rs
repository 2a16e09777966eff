//! `meshlet demo`: a small shop running as a local mesh on loopback, no cluster needed.
//!
//! Every service is a "pod" with its own loopback address (127.0.N.1), so each sidecar can use the
//! standard ports (15001 outbound, 15006 inbound, 15020 admin) and the app its usual 8080. Apps reach each
//! other through their own sidecar in explicit-proxy mode, the way an app with `HTTP_PROXY` would.

mod control;
pub mod shop;
pub mod summary;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::config::parse_duration;
use crate::proxy::pool::{Pool, PoolSettings};
use shop::{Directory, Service};

/// Settings of `meshlet demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, env = "MESHLET_DEMO_DURATION", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,

    /// Orders placed per second by the load generator.
    #[arg(long, env = "MESHLET_DEMO_RATE", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub rate: u32,

    /// Share of payment calls that fail (0 to 1).
    #[arg(long, env = "MESHLET_DEMO_PAYMENT_FAILURE_RATE", default_value_t = 0.2, value_parser = parse_rate)]
    pub payment_failure_rate: f64,

    /// How often the live table is printed.
    #[arg(long, env = "MESHLET_DEMO_INTERVAL", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub interval: Duration,
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err("expected a share between 0 and 1, e.g. 0.3".to_string()),
    }
}

/// A pod of the demo: a name, an address, and (for apps) the service it runs.
pub(crate) struct Pod {
    name: &'static str,
    ip: IpAddr,
    service: Option<Service>,
}

const APP_PORT: u16 = 8080;

fn pods() -> Vec<Pod> {
    let pod = |name, n, service| Pod {
        name,
        ip: IpAddr::V4(Ipv4Addr::new(127, 0, n, 1)),
        service,
    };
    vec![
        pod("loadgen", 1, None),
        pod("order", 2, Some(Service::Order)),
        pod("inventory", 3, Some(Service::Inventory)),
        pod("payment", 4, Some(Service::Payment)),
    ]
}

/// Runs the demo until Ctrl-C or `--duration`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let exe =
        std::env::current_exe().context("cannot find the meshlet binary to start sidecars")?;
    let pods = pods();
    let workdir = std::env::temp_dir().join(format!("meshlet-demo-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let result = run_mesh(&args, &exe, &pods, &workdir).await;
    let _ = std::fs::remove_dir_all(&workdir);
    result
}

async fn run_mesh(args: &DemoArgs, exe: &Path, pods: &[Pod], workdir: &Path) -> anyhow::Result<()> {
    let mut children = Vec::new();
    let control = match exe
        .parent()
        .map(|dir| dir.join("meshlet-control"))
        .filter(|p| p.exists())
    {
        Some(binary) => {
            let cp = control::start(&binary, pods, workdir).await?;
            println!("control plane: local mode, issuing a certificate to every sidecar (all traffic between sidecars is mTLS)");
            children.push(cp.child);
            Some(cp.sidecar_flags)
        }
        None => {
            println!(
                "meshlet-control was not found beside {}: running without identity (plaintext).",
                exe.display()
            );
            println!("  build both binaries with `cargo build --release --workspace` (./scripts/demo does) for mTLS.");
            None
        }
    };
    let mesh_file = workdir.join("mesh.yaml");
    std::fs::write(&mesh_file, control::mesh_yaml(pods, APP_PORT))
        .context("writing the demo mesh file")?;
    let mut result = Ok(());
    for pod in pods {
        let identity = control.as_ref().map(|flags| flags(pod));
        match start_sidecar(exe, pod, identity, &mesh_file) {
            Ok(child) => children.push(child),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        result = run_shop(args, pods).await;
    }
    for child in children.iter_mut().rev() {
        stop(child).await;
    }
    result
}

async fn run_shop(args: &DemoArgs, pods: &[Pod]) -> anyhow::Result<()> {
    for pod in pods {
        wait_ready(SocketAddr::new(pod.ip, 15020), pod.name).await?;
    }
    let addr = |name: &str| {
        pods.iter()
            .find(|p| p.name == name)
            .map(|p| SocketAddr::new(p.ip, APP_PORT))
    };
    let (Some(order), Some(inventory), Some(payment)) =
        (addr("order"), addr("inventory"), addr("payment"))
    else {
        bail!("demo pods are missing a service");
    };
    let pool = Pool::new(PoolSettings {
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(30),
        max_idle_per_destination: 64,
    });
    let ledger = Arc::new(shop::Ledger::default());
    for pod in pods {
        let Some(service) = pod.service else { continue };
        let app = SocketAddr::new(pod.ip, APP_PORT);
        let listener = tokio::net::TcpListener::bind(app)
            .await
            .with_context(|| format!("binding the {} app to {app}", pod.name))?;
        let directory = Arc::new(Directory {
            sidecar: SocketAddr::new(pod.ip, 15001),
            pool: pool.clone(),
            inventory,
            payment,
            payment_failure_rate: args.payment_failure_rate,
            ledger: ledger.clone(),
        });
        tokio::spawn(shop::serve(service, listener, directory));
    }

    println!(
        "meshlet demo: a shop of {} pods on loopback, each behind its own sidecar",
        pods.len()
    );
    for pod in pods {
        println!(
            "  {:<10} app http://{}:{APP_PORT}  sidecar admin http://{}:15020/metrics",
            pod.name, pod.ip, pod.ip
        );
    }
    println!(
        "  traffic: loadgen places {} orders/s; order calls inventory, then payment. Ctrl-C stops.",
        args.rate
    );
    println!(
        "  payment fails {:.0}% of calls (half after charging, answering late); order's sidecar retries with an injected Idempotency-Key and payment's sidecar de-duplicates.\n",
        args.payment_failure_rate * 100.0
    );

    let loadgen_sidecar = SocketAddr::new(pods[0].ip, 15001);
    let client = Arc::new(Directory {
        sidecar: loadgen_sidecar,
        pool,
        inventory,
        payment,
        payment_failure_rate: args.payment_failure_rate,
        ledger: ledger.clone(),
    });
    let placed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let generator = tokio::spawn(generate_load(
        client,
        order,
        args.rate,
        placed.clone(),
        failed.clone(),
    ));

    let stop = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(stop);
    let mut previous = Vec::new();
    let mut tick = tokio::time::interval(args.interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                previous = print_summary(pods, &previous, args.interval.as_secs_f64(), &placed, &failed, &ledger).await;
            }
        }
    }
    generator.abort();
    let (charged, twice) = ledger.totals();
    println!("\npayment ledger: {charged} orders charged, {twice} charged twice");
    println!(
        "stopping: {} orders placed, {} failed",
        placed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn generate_load(
    client: Arc<Directory>,
    order: SocketAddr,
    rate: u32,
    placed: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let client = client.clone();
        let (placed, failed) = (placed.clone(), failed.clone());
        tokio::spawn(async move {
            match client
                .call(
                    Method::POST,
                    order,
                    "/orders",
                    r#"{"sku":"tea","qty":1}"#.into(),
                )
                .await
            {
                Ok((status, _)) if status.is_success() => placed.fetch_add(1, Ordering::Relaxed),
                _ => failed.fetch_add(1, Ordering::Relaxed),
            };
        });
    }
}

type Snapshot = Vec<(String, String, summary::Edge)>;

async fn print_summary(
    pods: &[Pod],
    previous: &Snapshot,
    interval: f64,
    placed: &AtomicU64,
    failed: &AtomicU64,
    ledger: &shop::Ledger,
) -> Snapshot {
    let mut now = Vec::new();
    for pod in pods {
        let Ok(text) = fetch_metrics(SocketAddr::new(pod.ip, 15020)).await else {
            continue;
        };
        let samples = summary::parse(&text);
        for (dst, mut edge) in summary::outbound_edges(&samples) {
            let to = pods
                .iter()
                .find(|p| dst == SocketAddr::new(p.ip, APP_PORT).to_string())
                .map_or(dst.clone(), |p| p.name.to_string());
            // Policy metrics are labelled with the destination service's name.
            edge.retries = samples
                .iter()
                .filter(|s| {
                    s.name == "meshlet_retries_total" && s.labels.get("destination") == Some(&to)
                })
                .map(|s| s.value)
                .sum();
            now.push((pod.name.to_string(), to, edge));
        }
    }
    let rows: Snapshot = now
        .iter()
        .map(|(from, to, edge)| {
            let before = previous
                .iter()
                .find(|(f, t, _)| f == from && t == to)
                .map(|(_, _, e)| e.clone())
                .unwrap_or_default();
            (from.clone(), to.clone(), edge.since(&before))
        })
        .collect();
    let (charged, twice) = ledger.totals();
    println!(
        "--- last {:.0}s · orders placed {} · failed {} · payment ledger: {} orders charged, {} charged twice",
        interval,
        placed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        charged,
        twice
    );
    print!("{}", summary::render(&rows, interval));
    now
}

fn start_sidecar(
    exe: &Path,
    pod: &Pod,
    identity: Option<Vec<String>>,
    mesh_file: &Path,
) -> anyhow::Result<Child> {
    let at = |port: u16| SocketAddr::new(pod.ip, port).to_string();
    Command::new(exe)
        .arg("proxy")
        .args([
            "--outbound-addr",
            &at(15001),
            "--inbound-addr",
            &at(15006),
            "--admin-addr",
            &at(15020),
        ])
        .args([
            "--drain-delay",
            "0s",
            "--drain-timeout",
            "2s",
            "--log",
            "warn",
        ])
        .arg("--mesh-config")
        .arg(mesh_file)
        .args(identity.unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {} sidecar", pod.name))
}

async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn wait_ready(admin: SocketAddr, name: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if let Ok(rsp) = admin_get(admin, "/ready").await {
            if rsp.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the {name} sidecar did not become ready at http://{admin}/ready (is another demo running?)")
}

async fn fetch_metrics(admin: SocketAddr) -> anyhow::Result<String> {
    let rsp = admin_get(admin, "/metrics").await?;
    Ok(rsp
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(admin),
    )
    .await??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
