//! meshlet control plane: the certificate authority that gives every meshed workload its SPIFFE identity.
//!
//! [`start`] brings up the HTTPS API (`POST /v1/certificates`) and the admin endpoint and returns a
//! [`ControlPlane`] handle (bound addresses, trust bundle, shutdown), which is what tests and `meshlet demo`
//! use; [`serve`] is the same plus waiting for SIGTERM/SIGINT, which is what the binary runs.

pub mod ca;
pub mod config;
pub mod credential;
pub mod issue;
pub mod k8s;
pub mod local;
pub mod mesh_watch;
pub mod metrics;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::{Config, ConfigError, Mode};

use ca::{Authority, CaError};
use credential::{Credentials, JoinTokenFileError, JoinTokens, TokenReviewer};
use issue::IssuanceService;
use mesh_watch::WatchService;
use metrics::Metrics;
use server::{AdminRouter, ApiRouter, ServerError};
use store::{Store, StoreMetrics};

/// ALPN protocols of the API: HTTP/2 for long-lived streams, HTTP/1.1 for simple clients.
const API_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Why the control plane could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error(transparent)]
    JoinTokens(#[from] JoinTokenFileError),
    #[error(
        "cannot set up a Kubernetes client for TokenReview (in-cluster config or kubeconfig): {0}"
    )]
    Kube(#[from] kube::Error),
    #[error("cannot build the API's TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("--inject-config: {0}")]
    Inject(#[from] meshlet::inject::InjectError),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen for termination signals: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    MeshFile(#[from] local::LocalError),
    #[error("cannot serve the mesh: {0}")]
    MeshState(#[from] store::StoreError),
}

/// A running control plane.
pub struct ControlPlane {
    api_addr: SocketAddr,
    admin_addr: SocketAddr,
    trust_bundle_pem: String,
    ready: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl ControlPlane {
    /// The bound API address (the real port when the configured one was 0).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Trust anchors, PEM: what sidecars are given as `--trust-anchors`; it also verifies the API's
    /// serving certificate when that is made from the CA.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.trust_bundle_pem
    }

    /// Stops accepting, lets open connections finish (bounded), and returns when every listener is done.
    pub async fn shutdown(mut self) {
        self.ready.store(false, Ordering::Release);
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts the control plane; cluster mode finds its Kubernetes client from the environment (in-cluster
/// service account or kubeconfig).
pub async fn start(config: Config) -> Result<ControlPlane, Error> {
    start_inner(config, None).await
}

/// Starts the control plane in cluster mode with a given Kubernetes client (e.g. one pointed at a test
/// API server); in local mode the client is not used.
pub async fn start_with_kube_client(
    config: Config,
    client: kube::Client,
) -> Result<ControlPlane, Error> {
    start_inner(config, Some(client)).await
}

/// Runs the control plane until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn serve(config: Config) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let control_plane = start(config).await?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = interrupt.recv() => tracing::info!("SIGINT received; shutting down"),
    }
    control_plane.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn start_inner(
    config: Config,
    kube_client: Option<kube::Client>,
) -> Result<ControlPlane, Error> {
    config.validate()?;
    // Listeners first: a taken port is the most common start-up failure and should be reported as such.
    let api_listener = server::bind("--api-addr", config.api_addr).await?;
    let admin_listener = server::bind("--admin-addr", config.admin_addr).await?;
    let api_addr = local_addr("--api-addr", &api_listener, config.api_addr)?;
    let admin_addr = local_addr("--admin-addr", &admin_listener, config.admin_addr)?;

    let metrics = Arc::new(Metrics::new()?);
    let telemetry = telemetry::Telemetry::register(metrics.registry(), Default::default())?;
    let (authority, credentials, kube_client) = load_identity_sources(&config, kube_client).await?;
    let authority = Arc::new(authority);
    let acceptor = api_tls(&config, &authority)?;

    let trust_bundle_pem = authority.trust_bundle_pem().to_string();
    let inject = match &config.inject_config {
        Some(path) => meshlet::inject::InjectConfig::from_yaml_file(path)?,
        None => meshlet::inject::InjectConfig::default(),
    };
    let issuance = IssuanceService::new(
        authority,
        credentials,
        config.trust_domain.clone(),
        config.cert_ttl,
        metrics.clone(),
    );
    let ready = Arc::new(AtomicBool::new(false));
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    // The mesh sidecars watch, numbered by the store: in a cluster what the Kubernetes watchers see, locally
    // the mesh file (or an empty mesh).
    let (mesh_source, mesh_file) = match kube_client {
        Some(client) => (cluster_mesh(&config, client).await?, None),
        None => local::open(config.mesh_file.as_deref(), metrics.registry())?,
    };
    let store = Store::new(
        mesh_source.borrow().clone(),
        StoreMetrics::register(metrics.registry())?,
    )?;
    // Ends at shutdown even while the source lives on (the Kubernetes watchers stop once it is dropped).
    let follow = store.clone().follow(mesh_source);
    let mut stop_following = stopped.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = follow => {}
            _ = stop_following.wait_for(|stop| *stop) => {}
        }
    });
    if let Some(mesh_file) = mesh_file {
        tasks.spawn(mesh_file.run(stopped.clone()));
    }
    let mesh_watch = WatchService::new(store, stopped.clone(), metrics.registry())?;
    tasks.spawn(server::serve(
        "api",
        api_listener,
        Some(acceptor),
        Arc::new(ApiRouter {
            issuance,
            inject: Arc::new(inject),
            watch: Arc::new(mesh_watch),
            telemetry: telemetry.clone(),
        }),
        stopped.clone(),
    ));
    tasks.spawn(server::serve(
        "admin",
        admin_listener,
        None,
        Arc::new(AdminRouter {
            ready: ready.clone(),
            metrics,
            telemetry,
        }),
        stopped,
    ));
    ready.store(true, Ordering::Release);
    tracing::info!(
        mode = ?config.mode,
        %api_addr,
        %admin_addr,
        trust_domain = %config.trust_domain,
        cert_ttl = %humantime::format_duration(config.cert_ttl),
        trust_anchors = %trust_anchors_file(&config).display(),
        "control plane ready"
    );
    Ok(ControlPlane {
        api_addr,
        admin_addr,
        trust_bundle_pem,
        ready,
        stop,
        tasks,
    })
}

/// Cluster mode's mesh: Services, EndpointSlices and Pods through the Kubernetes watchers, with the
/// mesh-wide policy defaults of `--mesh-file` (its `policy.defaults`) when one is given. Waits, bounded by
/// `--discovery-sync-timeout`, for the first complete listing.
async fn cluster_mesh(
    config: &Config,
    client: kube::Client,
) -> Result<watch::Receiver<meshlet::discovery::MeshConfig>, Error> {
    let mut settings = k8s::K8sSettings::new(config.trust_domain.clone());
    settings.namespaces = config.watch_namespaces.clone();
    if let Some(path) = &config.mesh_file {
        settings.defaults = local::read_policy_defaults(path)?;
    }
    let mut mesh = k8s::spawn(client, settings);
    match tokio::time::timeout(config.discovery_sync_timeout, mesh.changed()).await {
        Ok(_) => tracing::info!(
            services = mesh.borrow().services.len(),
            "cluster listed; serving the discovery watch"
        ),
        Err(_) => tracing::warn!(
            after = %humantime::format_duration(config.discovery_sync_timeout),
            "the cluster was not listed in time; serving an empty mesh until it is"
        ),
    }
    Ok(mesh)
}

/// The CA and the credential checker of the configured mode, and in cluster mode the Kubernetes client.
async fn load_identity_sources(
    config: &Config,
    kube_client: Option<kube::Client>,
) -> Result<(Authority, Credentials, Option<kube::Client>), Error> {
    Ok(match config.mode {
        Mode::Local => {
            let data_dir = config.data_dir.as_deref().ok_or(ConfigError::Missing {
                flag: "--data-dir",
                mode: "local",
            })?;
            let tokens_path = config.join_tokens.as_deref().ok_or(ConfigError::Missing {
                flag: "--join-tokens",
                mode: "local",
            })?;
            let authority = Authority::load_or_create_local(data_dir)?;
            let tokens = JoinTokens::load(tokens_path, &config.trust_domain)?;
            if tokens.is_empty() {
                tracing::warn!(file = %tokens_path.display(), "no join tokens configured; every request will be refused");
            }
            (authority, Credentials::JoinTokens(tokens), None)
        }
        Mode::Cluster => {
            let issuer_dir = config.issuer_dir.as_deref().ok_or(ConfigError::Missing {
                flag: "--issuer-dir",
                mode: "cluster",
            })?;
            let authority = Authority::load_dir(issuer_dir)?;
            let client = match kube_client {
                Some(client) => client,
                None => kube::Client::try_default().await?,
            };
            let reviewer = TokenReviewer::new(
                client.clone(),
                config.token_audience.clone(),
                config.trust_domain.clone(),
            );
            (authority, Credentials::TokenReview(reviewer), Some(client))
        }
    })
}

/// The API's TLS 1.3 server configuration: the mounted serving certificate, or one made from the CA.
fn api_tls(config: &Config, authority: &Authority) -> Result<tokio_rustls::TlsAcceptor, Error> {
    let serving = match &config.api_cert_dir {
        Some(dir) => ca::load_serving_dir(dir)?,
        None => authority.sign_serving()?,
    };
    // Sidecars that have a certificate present it (the watch and telemetry endpoints need their identity);
    // callers without one (a sidecar asking for its first certificate, the kube-apiserver) are admitted too.
    let provider = meshlet::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    for anchor in
        meshlet::tls::store::parse_certificates(authority.trust_bundle_pem(), "trust bundle")
            .map_err(|e| rustls::Error::General(e.to_string()))?
    {
        roots.add(anchor)?;
    }
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_single_cert(serving.chain, serving.key)?;
    tls.alpn_protocols = API_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

fn local_addr(
    name: &'static str,
    listener: &tokio::net::TcpListener,
    addr: SocketAddr,
) -> Result<SocketAddr, Error> {
    listener
        .local_addr()
        .map_err(|source| Error::Server(ServerError::Bind { name, addr, source }))
}

/// Where the trust anchors sidecars need (`--trust-anchors`) are on disk, for the start-up log.
fn trust_anchors_file(config: &Config) -> std::path::PathBuf {
    let dir = match config.mode {
        Mode::Local => config.data_dir.as_deref(),
        Mode::Cluster => config.issuer_dir.as_deref(),
    };
    dir.unwrap_or(std::path::Path::new("."))
        .join(ca::TRUST_ANCHOR_FILE)
}
