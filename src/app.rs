//! Wires the proxy together: binds every listener, starts the admin server, serves, drains.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use prometheus::Registry;
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::ProxyArgs;
use crate::control_plane::ControlPlaneClient;
use crate::discovery::watch::{DiscoveryMetrics, WatchSettings, FIRST_STATE_WAIT};
use crate::discovery::{self, Mesh, MeshConfig};
use crate::drain;
use crate::listener;
use crate::metrics::{Direction, Metrics};
use crate::policy::idempotency::{DedupStore, RedisLimits, RedisStore};
use crate::policy::PolicyMetrics;
use crate::proxy::mesh::MeshClient;
use crate::proxy::pool::{Pool, PoolSettings};
use crate::proxy::{self, Inputs};
use crate::telemetry;
use crate::tls::{self, CertManager};

/// Runs `meshlet proxy` until it is told to stop and has drained.
pub fn run(config: ProxyArgs) -> anyhow::Result<()> {
    init_logging(&config)?;
    let runtime = if config.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers.into())
            .enable_all()
            .build()
    }
    .context("failed to start the runtime")?;
    let result = runtime.block_on(serve(config));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn init_logging(config: &ProxyArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .with_context(|| format!("invalid value '{}' for '--log' (MESHLET_LOG)", config.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = if config.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second initialisation (tests running several proxies in one process) keeps the first subscriber.
    let _ = result;
    Ok(())
}

async fn serve(config: ProxyArgs) -> anyhow::Result<()> {
    // Check what can be checked before binding anything: a bad setting fails start-up with its name.
    let identity = config.identity.settings()?;
    let app_probes = match &config.app_probes {
        Some(json) => crate::inject::probes::app_probes(json).with_context(|| {
            format!("invalid value for MESHLET_APP_PROBES (--app-probes): {json}")
        })?,
        None => Default::default(),
    };
    let mesh_config = match &config.mesh_config {
        Some(path) => MeshConfig::from_file(path)?,
        None => MeshConfig::default(),
    };

    // Bind everything first: a bad or busy address fails start-up, not the first connection.
    let mut outbound = Vec::new();
    for addr in &config.outbound_addrs {
        outbound.push(listener::bind("outbound", *addr)?);
    }
    let mut inbound = Vec::new();
    for addr in &config.inbound_addrs {
        inbound.push(listener::bind("inbound", *addr)?);
    }
    let admin_listener = listener::bind_std("admin", config.admin_addr)?;

    let registry = Registry::new();
    let metrics = Metrics::new(&registry).context("registering metrics")?;
    let telemetry_registry = registry.clone();
    let reporter_metrics =
        telemetry::ReporterMetrics::register(&registry).context("registering telemetry metrics")?;
    let policy_metrics =
        PolicyMetrics::register(&registry).context("registering policy metrics")?;
    let state = Arc::new(AdminState {
        registry,
        metrics: metrics.clone(),
        ready: false.into(),
        config_json: serde_json::to_string_pretty(&config)?,
        shutdown: Notify::new(),
        app_probes,
    });
    start_admin(admin_listener, state.clone())?;

    // With a control plane, the sidecar gets its certificate first and is ready only once it has one.
    let (mesh_client, tls_server, store, control_plane) = match identity {
        Some(settings) => {
            let own_identity = settings.identity.clone();
            let manager = CertManager::new(settings.clone())?;
            let store = manager.store().clone();
            tokio::spawn(manager.run());
            let server = tls::server_config(&store)?;
            let client = Arc::new(MeshClient::new(store.clone(), config.connect_timeout));
            let control_plane = ControlPlaneClient::new(&settings, store.clone())?;
            (
                Some(client),
                Some(server),
                Some(store),
                Some((control_plane, own_identity)),
            )
        }
        None => (None, None, None, None),
    };

    let shared_store: Option<Arc<dyn DedupStore>> = match &config.dedup_redis_url {
        Some(url) => Some(Arc::new(
            RedisStore::connect(url)
                .await
                .with_context(|| {
                    format!(
                        "invalid value '{url}' for '--dedup-redis-url' (MESHLET_DEDUP_REDIS_URL)"
                    )
                })?
                .with_limits(RedisLimits {
                    max_value_bytes: config.dedup_redis_max_value_bytes as usize,
                    max_ttl: config.dedup_redis_max_ttl,
                }),
        )),
        None => None,
    };
    let mesh = Arc::new(Mesh::new(&mesh_config, policy_metrics, shared_store));
    if let Some(path) = &config.mesh_config {
        discovery::watch_file(path.clone(), mesh.clone());
    }
    // Without a local file, the mesh comes from the control plane's watch (a file is the local override).
    let first_mesh_state = match (&config.mesh_config, &control_plane, &store) {
        (None, Some((channel, _)), Some(store)) => {
            let metrics = DiscoveryMetrics::register(&state.registry)
                .context("registering discovery metrics")?;
            Some(discovery::watch::spawn(
                channel.clone(),
                store.clone(),
                mesh.clone(),
                metrics,
                WatchSettings::default(),
            ))
        }
        _ => None,
    };
    if let (Some((client, own_identity)), Some(store)) = (control_plane, store.clone()) {
        let reporter = telemetry::Reporter::new(own_identity, telemetry_registry, mesh.clone());
        let interval = config.report_interval;
        tokio::spawn(async move {
            store.ready().await;
            telemetry::run(reporter, client, interval, reporter_metrics).await;
        });
    }
    let pool = Pool::new(PoolSettings {
        connect_timeout: config.connect_timeout,
        idle_timeout: config.pool_idle_timeout,
        max_idle_per_destination: config.pool_max_idle_per_destination,
    });
    let inputs = Arc::new(Inputs {
        connection_limit: Arc::new(Semaphore::new(config.max_connections as usize)),
        config,
        metrics,
        pool,
        mesh,
        mesh_client,
        tls_server,
    });

    let (signal, watch) = drain::channel();
    for listener in outbound {
        tokio::spawn(proxy::serve_listener(
            inputs.clone(),
            Direction::Outbound,
            listener,
            watch.clone(),
        ));
    }
    for listener in inbound {
        tokio::spawn(proxy::serve_listener(
            inputs.clone(),
            Direction::Inbound,
            listener,
            watch.clone(),
        ));
    }
    drop(watch);
    let ready_state = state.clone();
    tokio::spawn(async move {
        if let Some(store) = store {
            info!("waiting for the workload certificate");
            store.ready().await;
        }
        if let Some(first) = first_mesh_state {
            first.wait(FIRST_STATE_WAIT).await;
        }
        ready_state.ready.store(true, Ordering::Release);
        info!("meshlet proxy ready");
    });
    info!(
        outbound = ?inputs.config.outbound_addrs,
        inbound = ?inputs.config.inbound_addrs,
        admin = %inputs.config.admin_addr,
        "listeners bound"
    );

    wait_for_shutdown(&state.shutdown).await;
    state.ready.store(false, Ordering::Release);
    let config = &inputs.config;
    info!(drain_delay = ?config.drain_delay, "shutdown requested; still serving during the drain delay");
    tokio::time::sleep(config.drain_delay).await;
    info!(drain_timeout = ?config.drain_timeout, "draining: no new connections, asking clients to close");
    if tokio::time::timeout(config.drain_timeout, signal.drain())
        .await
        .is_err()
    {
        warn!("drain timeout reached with connections still open; closing them");
    } else {
        info!("drained");
    }
    Ok(())
}

/// The admin server gets its own thread and single-threaded runtime.
fn start_admin(listener: std::net::TcpListener, state: Arc<AdminState>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the admin runtime")?;
    std::thread::Builder::new()
        .name("meshlet-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => admin::serve(listener, state).await,
                    Err(e) => warn!(error = %e, "admin listener failed"),
                }
            })
        })
        .context("failed to start the admin thread")?;
    Ok(())
}

async fn wait_for_shutdown(admin: &Notify) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = admin.notified() => {}
            }
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("received SIGTERM"),
        _ = tokio::signal::ctrl_c() => info!("received SIGINT"),
        _ = admin.notified() => {}
    }
}
