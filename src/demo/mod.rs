//! `meshlet demo`: a shop running as a local mesh on loopback, no cluster needed.
//!
//! Every service is a "pod" with its own loopback address (127.0.N.1), so each sidecar can use the
//! standard ports (15001 outbound, 15006 inbound, 15020 admin) and the app its usual 8080. Apps reach each
//! other through their own sidecar in explicit-proxy mode, the way an app with `HTTP_PROXY` would; Redis is
//! reached the same way through a `CONNECT` tunnel, which the sidecars carry as opaque TCP over mTLS.
//!
//! The control plane, the sidecars and `redis-server` are child processes in their own process group (so
//! a terminal's Ctrl-C reaches only the demo, which stops them in order) that also get SIGTERM if the demo
//! dies without stopping them.

mod control;
pub mod events;
pub mod loadgen;
pub mod report;
pub mod shop;
pub mod stats;
pub mod summary;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::parse_duration;
use crate::proxy::pool::{Pool, PoolSettings};
use report::Shop;
use shop::{App, Directory};

/// Settings of `meshlet demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Stop after this long (default: run until Ctrl-C or SIGTERM).
    #[arg(long, env = "MESHLET_DEMO_DURATION", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,

    /// Checkouts per second sent by the load generator.
    #[arg(long, env = "MESHLET_DEMO_RATE", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rate: u32,

    /// Share of charges that payment fails (0 to 1): unavailable, declined, slow or lost.
    #[arg(long, env = "MESHLET_DEMO_PAYMENT_FAILURE_RATE", default_value_t = 0.2, value_parser = parse_rate)]
    pub payment_failure_rate: f64,

    /// How often the live table is printed.
    #[arg(long, env = "MESHLET_DEMO_INTERVAL", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub interval: Duration,

    /// At the end, write every order's state, payment's ledger and the notifications as JSON to this file.
    #[arg(long, env = "MESHLET_DEMO_REPORT", value_name = "FILE")]
    pub report: Option<PathBuf>,
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!(
            "{value:?} is not a share between 0 and 1, e.g. 0.3"
        )),
    }
}

/// What runs in a pod beside its sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Only calls out (the load generator, the notifier).
    Client,
    /// An HTTP app of the shop on port 8080.
    Http(Kind),
    /// `redis-server` on port 6379.
    Redis,
}

/// The shop's HTTP apps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Gateway,
    Order,
    Inventory,
    Payment,
    Customer,
    Shipping,
}

/// A pod of the demo: a name (also its service and identity), an address, and what it runs.
pub(crate) struct Pod {
    name: &'static str,
    ip: IpAddr,
    role: Role,
}

const APP_PORT: u16 = 8080;
const REDIS_PORT: u16 = 6379;

impl Pod {
    /// Where its app listens, for pods that serve something.
    fn app_addr(&self) -> Option<SocketAddr> {
        match self.role {
            Role::Client => None,
            Role::Http(_) => Some(SocketAddr::new(self.ip, APP_PORT)),
            Role::Redis => Some(SocketAddr::new(self.ip, REDIS_PORT)),
        }
    }

    fn outbound_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 15001)
    }

    fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 15020)
    }
}

/// The shop's pods; `redis` and `notifier` only with the event path.
pub(crate) fn pods(with_events: bool) -> Vec<Pod> {
    let pod = |name, n, role| Pod {
        name,
        ip: IpAddr::V4(Ipv4Addr::new(127, 0, n, 1)),
        role,
    };
    let mut pods = vec![
        pod("loadgen", 1, Role::Client),
        pod("api-gateway", 2, Role::Http(Kind::Gateway)),
        pod("order", 3, Role::Http(Kind::Order)),
        pod("inventory", 4, Role::Http(Kind::Inventory)),
        pod("payment", 5, Role::Http(Kind::Payment)),
        pod("customer", 6, Role::Http(Kind::Customer)),
        pod("shipping", 7, Role::Http(Kind::Shipping)),
    ];
    if with_events {
        pods.push(pod("redis", 8, Role::Redis));
        pods.push(pod("notifier", 9, Role::Client));
    }
    pods
}

fn pod<'a>(pods: &'a [Pod], name: &str) -> anyhow::Result<&'a Pod> {
    pods.iter()
        .find(|p| p.name == name)
        .with_context(|| format!("the demo has no {name} pod"))
}

/// Runs the demo until Ctrl-C, SIGTERM or `--duration`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(demo(args))
}

/// A child process of the demo.
struct Process {
    name: String,
    child: Child,
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let stop = stop_signal()?;
    let exe =
        std::env::current_exe().context("cannot find the meshlet binary to start sidecars")?;
    let workdir = std::env::temp_dir().join(format!("meshlet-demo-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let mut children = Vec::new();
    let result = run_mesh(&args, &exe, &workdir, &mut children, stop).await;
    for process in children.iter_mut().rev() {
        stop_child(process).await;
    }
    let _ = std::fs::remove_dir_all(&workdir);
    result
}

/// Resolves to the signal's name on the first SIGINT or SIGTERM.
fn stop_signal() -> anyhow::Result<watch::Receiver<Option<&'static str>>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        let _ = tx.send(Some(name));
    });
    Ok(rx)
}

async fn stopped(mut stop: watch::Receiver<Option<&'static str>>) -> &'static str {
    loop {
        if let Some(name) = *stop.borrow_and_update() {
            return name;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn run_mesh(
    args: &DemoArgs,
    exe: &Path,
    workdir: &Path,
    children: &mut Vec<Process>,
    stop: watch::Receiver<Option<&'static str>>,
) -> anyhow::Result<()> {
    let started = tokio::select! {
        started = start_mesh(args, exe, workdir, children) => started?,
        signal = stopped(stop.clone()) => {
            println!("{signal}: stopping while starting up");
            return Ok(());
        }
    };
    let (pods, shop, tasks, strict, mesh_file) = started;
    // The apps stop before their sidecars, so no tunnel or keep-alive connection is left to drain.
    let _stop_apps = AbortOnDrop(tasks);
    print_intro(args, &pods, strict, &mesh_file);

    let load_client = directory(pod(&pods, "loadgen")?, &pods);
    let generator = tokio::spawn(loadgen::run(
        Arc::new(load_client),
        args.rate,
        shop.load.clone(),
    ));
    let began = Instant::now();
    let tcp_mtls = if strict { "strict" } else { "-" };
    let mut edges_seen = BTreeSet::new();
    let mut previous = stats::MeshCounters::default();
    let mut tick = tokio::time::interval(args.interval);
    tick.tick().await;
    let reason = loop {
        let until_end = async {
            match args.duration {
                Some(d) => tokio::time::sleep(d.saturating_sub(began.elapsed())).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = until_end => break "duration reached",
            signal = stopped(stop.clone()) => break signal,
            _ = tick.tick() => {
                previous = print_table(&pods, &previous, args.interval, &shop, tcp_mtls, &mut edges_seen).await;
            }
        }
    };
    generator.abort();
    let seconds = began.elapsed().as_secs_f64();
    println!(
        "\n{reason}: stopping the load; waiting for {} checkouts in flight",
        shop.load.in_flight.load(Ordering::Relaxed)
    );
    drain(&shop).await;
    let since_last = Duration::from_secs_f64(
        (seconds - (seconds / args.interval.as_secs_f64()).floor() * args.interval.as_secs_f64())
            .max(1.0),
    );
    print_table(
        &pods,
        &previous,
        since_last,
        &shop,
        tcp_mtls,
        &mut edges_seen,
    )
    .await;
    let pids = children.iter().filter_map(|p| p.child.id()).collect();
    let report = shop.report(seconds, edges_seen, pids);
    println!("\n{}", report.summary());
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        println!("report: {}", path.display());
    }
    Ok(())
}

/// Everything the running demo needs once it is up: pods, the shop, its app tasks, whether inbound is
/// strict mTLS, the mesh file.
type Started = (Vec<Pod>, Shop, Vec<JoinHandle<()>>, bool, PathBuf);

/// Aborts the shop's tasks when the demo is done with them.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

async fn start_mesh(
    args: &DemoArgs,
    exe: &Path,
    workdir: &Path,
    children: &mut Vec<Process>,
) -> anyhow::Result<Started> {
    let redis_binary = events::redis_server_binary();
    if redis_binary.is_none() {
        println!(
            "redis-server is not installed: the event path (order.created → notifier) is off."
        );
        println!("  install it with `apt-get install redis-server` (Debian/Ubuntu) and run the demo again.");
    }
    let pods = pods(redis_binary.is_some());
    let control_binary = exe
        .parent()
        .map(|dir| dir.join("meshlet-control"))
        .filter(|p| p.exists());
    // With identities, every inbound is strict mTLS.
    let strict = control_binary.is_some();
    let mesh_file = workdir.join("mesh.yaml");
    std::fs::write(&mesh_file, control::mesh_yaml(&pods, strict))
        .context("writing the demo mesh file")?;
    let identity = match control_binary {
        Some(binary) => {
            let cp = control::start(&binary, &pods, workdir, &mesh_file).await?;
            children.push(Process {
                name: "meshlet-control".into(),
                child: cp.child,
            });
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
    if let (Some(binary), Ok(redis)) = (&redis_binary, pod(&pods, "redis")) {
        let addr = redis.app_addr().context("redis has an address")?;
        let child = events::start_redis(binary, addr, workdir).await?;
        children.push(Process {
            name: "redis-server".into(),
            child,
        });
    }
    for pod in &pods {
        let flags = identity.as_ref().map(|flags| flags(pod));
        let child = start_sidecar(exe, pod, flags, &mesh_file)?;
        children.push(Process {
            name: format!("{} sidecar", pod.name),
            child,
        });
    }
    for pod in &pods {
        wait_ready(pod.admin_addr(), pod.name).await?;
    }
    let (shop, tasks) = start_apps(args, &pods).await?;
    Ok((pods, shop, tasks, strict, mesh_file))
}

fn directory(pod: &Pod, pods: &[Pod]) -> Directory {
    let services: HashMap<&'static str, SocketAddr> = pods
        .iter()
        .filter_map(|p| Some((p.name, p.app_addr()?)))
        .collect();
    Directory {
        sidecar: pod.outbound_addr(),
        pool: Pool::new(PoolSettings {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            max_idle_per_destination: 64,
        }),
        services: Arc::new(services),
    }
}

/// Starts every app, the publisher and the notifier.
async fn start_apps(args: &DemoArgs, pods: &[Pod]) -> anyhow::Result<(Shop, Vec<JoinHandle<()>>)> {
    let mut tasks = Vec::new();
    let redis = pods
        .iter()
        .find(|p| p.role == Role::Redis)
        .and_then(Pod::app_addr);
    let event_stats = redis.map(|_| Arc::new(events::EventStats::default()));
    let publisher = match (redis, &event_stats) {
        (Some(redis), Some(stats)) => {
            let (publisher, task) =
                events::start_publisher(pod(pods, "order")?.outbound_addr(), redis, stats.clone());
            tasks.push(task);
            Some(publisher)
        }
        _ => None,
    };
    if let (Some(redis), Some(stats), Ok(notifier)) = (redis, &event_stats, pod(pods, "notifier")) {
        tasks.push(tokio::spawn(events::run_notifier(
            notifier.outbound_addr(),
            redis,
            stats.clone(),
        )));
    }
    let shop = Shop {
        load: Arc::new(loadgen::LoadStats::default()),
        orders: Arc::new(shop::order::Orders::new(publisher)),
        inventory: Arc::new(shop::inventory::Inventory::default()),
        payment: Arc::new(shop::payment::Payment::new(args.payment_failure_rate)),
        events: event_stats,
    };
    for pod in pods {
        let Role::Http(kind) = pod.role else { continue };
        let app = match kind {
            Kind::Gateway => App::Gateway,
            Kind::Order => App::Order(shop.orders.clone()),
            Kind::Inventory => App::Inventory(shop.inventory.clone()),
            Kind::Payment => App::Payment(shop.payment.clone()),
            Kind::Customer => App::Customer,
            Kind::Shipping => App::Shipping,
        };
        let addr = SocketAddr::new(pod.ip, APP_PORT);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the {} app to {addr}", pod.name))?;
        tasks.push(tokio::spawn(shop::serve(
            app,
            listener,
            Arc::new(directory(pod, pods)),
        )));
    }
    Ok((shop, tasks))
}

fn print_intro(args: &DemoArgs, pods: &[Pod], strict: bool, mesh_file: &Path) {
    println!(
        "meshlet demo: the shop, {} pods on loopback, each app behind its own sidecar with its own identity",
        pods.len()
    );
    if strict {
        println!("control plane: meshlet-control, local mode (https://{}, admin http://{}/ready) issued every sidecar's certificate; all traffic between sidecars is mTLS, plaintext is refused (strict)", control::API_ADDR, control::ADMIN_ADDR);
    }
    println!("  {:<12} {:<26} sidecar metrics", "pod", "app");
    for pod in pods {
        let app = match (pod.role, pod.app_addr()) {
            (Role::Redis, Some(a)) => format!("redis://{a}"),
            (_, Some(a)) => format!("http://{a}"),
            (_, None) => "-".into(),
        };
        println!(
            "  {:<12} {:<26} http://{}/metrics",
            pod.name,
            app,
            pod.admin_addr()
        );
    }
    println!(
        "  traffic: loadgen sends {} checkouts/s to api-gateway, which asks order, customer and shipping in parallel;",
        args.rate
    );
    println!("  order runs a saga: reserve (inventory) → charge (payment); on failure: void the payment, release the stock, cancel.");
    if pods.iter().any(|p| p.role == Role::Redis) {
        println!("  events: order publishes order.created to redis, notifier consumes it (opaque TCP through the sidecars, mTLS between them).");
    }
    println!(
        "  payment fails {:.0}% of charges (unavailable, declined, slow, or answered too late); order's sidecar retries with an injected Idempotency-Key and payment's sidecar de-duplicates.",
        args.payment_failure_rate * 100.0
    );
    if strict {
        println!(
            "policy: {} (per service; the control plane watches it and pushes every save to the sidecars within a second)",
            mesh_file.display()
        );
        println!(
            "telemetry: every sidecar reports to the control plane: `meshlet stat` (or http://{}/api/v1/stat?by=edge, http://{}/metrics)",
            control::ADMIN_ADDR,
            control::ADMIN_ADDR
        );
    } else {
        println!(
            "policy: {} (per service; every sidecar re-reads it within a second of a save)",
            mesh_file.display()
        );
    }
    println!("  try: set services.payment.retries.max_attempts to 1 → RETRIES on order → payment drops to 0 and more orders are cancelled;");
    println!("       or services.payment.timeouts.per_try to 1s → slow charges are waited for instead of retried.");
    println!("table: per edge over the last interval; `tcp` rows are opaque TCP: connections open, +opened -closed, and bytes/s both ways.");
    println!("Ctrl-C stops everything.\n");
}

async fn print_table(
    pods: &[Pod],
    previous: &stats::MeshCounters,
    interval: Duration,
    shop: &Shop,
    tcp_mtls: &str,
    edges_seen: &mut BTreeSet<String>,
) -> stats::MeshCounters {
    let now = stats::read_counters(pods).await;
    let delta = now.since(previous);
    for (from, to, _) in &delta.http {
        edges_seen.insert(format!("{from} -> {to}"));
    }
    for (from, to, _) in &delta.tcp {
        edges_seen.insert(format!("{from} -> {to}"));
    }
    println!(
        "--- last {:.0}s · {}",
        interval.as_secs_f64(),
        shop.status_line()
    );
    print!(
        "{}",
        summary::render(&delta.http, &delta.tcp, tcp_mtls, interval.as_secs_f64())
    );
    now
}

/// Waits for the checkouts in flight (their sagas included) and then for the events to be consumed.
async fn drain(shop: &Shop) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while shop.load.in_flight.load(Ordering::Relaxed) > 0
        || shop.orders.in_flight.load(Ordering::Relaxed) > 0
    {
        if Instant::now() > deadline {
            println!("some checkouts did not finish within 30s");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(events) = &shop.events else { return };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let queued = events.queued.load(Ordering::Relaxed);
        let settled =
            events.published.load(Ordering::Relaxed) + events.dropped.load(Ordering::Relaxed);
        if settled >= queued
            && events.received.load(Ordering::Relaxed) >= events.published.load(Ordering::Relaxed)
        {
            return;
        }
        if Instant::now() > deadline {
            println!("some events were not consumed within 5s");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process of the demo: in its own process group (a terminal's Ctrl-C reaches the demo only, which
/// stops its children in order), SIGTERM'd by the kernel if the demo dies first, killed if dropped.
fn child_command(program: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl(2) is async-signal-safe and touches only the new process.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

fn start_sidecar(
    exe: &Path,
    pod: &Pod,
    identity: Option<Vec<String>>,
    mesh_file: &Path,
) -> anyhow::Result<Child> {
    let at = |port: u16| SocketAddr::new(pod.ip, port).to_string();
    child_command(exe)
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
        .args(control::mesh_state_flags(mesh_file, identity.is_some()))
        .args(identity.unwrap_or_default())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting the {} sidecar", pod.name))
}

async fn stop_child(process: &mut Process) {
    if let Some(pid) = process.child.id() {
        // SAFETY: kill(2) on our own child's pid, which `wait` has not reaped yet.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(5), process.child.wait())
        .await
        .is_err()
    {
        eprintln!("{} did not stop within 5s: killing it", process.name);
        let _ = process.child.kill().await;
    }
}

async fn wait_ready(admin: SocketAddr, name: &str) -> anyhow::Result<()> {
    for _ in 0..150 {
        if let Ok(rsp) = admin_get(admin, "/ready").await {
            if rsp.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the {name} sidecar did not become ready at http://{admin}/ready (is another demo running?)")
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
    tokio::time::timeout(
        Duration::from_secs(2),
        (&mut stream).take(4 << 20).read_to_end(&mut buf),
    )
    .await??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
