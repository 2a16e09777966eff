//! Kubernetes mode's source of truth: reflectors on Services, EndpointSlices and Pods, turned into the
//! mesh state ([`MeshConfig`]) that the distribution streams to sidecars.
//!
//! Why rebuild the whole mesh on each change instead of patching it: a cluster's objects change in bursts
//! (a rollout touches a Pod, two slices and the same Pod again within milliseconds), so changes are
//! debounced and the mesh is recomputed from the reflectors' stores, which is obviously consistent and cheap
//! at the sizes one control plane serves. The receiver only sees a new value when the mesh really changed.
//!
//! - [`annotations`]: the `meshlet.io/*` Service annotations → policy, inbound rules, opaque ports;
//! - [`translate`]: objects → [`MeshConfig`], with the last good policy of each Service;
//! - [`events`]: refused annotations → a Kubernetes Event on the Service and a log line.

pub mod annotations;
pub mod events;
pub mod translate;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource};
use meshlet::discovery::MeshConfig;
use meshlet::policy::config::PolicyOverrides;
use meshlet::policy::PolicyFile;
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use events::Reports;
use translate::Translator;

/// Default wait after a change before the mesh is rebuilt, so a burst of changes makes one update.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// What Kubernetes mode needs to know besides the cluster.
#[derive(Debug, Clone)]
pub struct K8sSettings {
    /// Trust domain of the identities (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
    pub trust_domain: String,
    /// Namespaces to watch; empty: every namespace.
    pub namespaces: Vec<String>,
    /// Mesh-wide policy defaults, below each Service's annotations.
    pub defaults: PolicyOverrides,
    /// Wait after a change before rebuilding ([`DEFAULT_DEBOUNCE`]).
    pub debounce: Duration,
}

impl K8sSettings {
    /// Every namespace, no mesh-wide defaults beyond the built-in ones, the default debounce.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        K8sSettings {
            trust_domain: trust_domain.into(),
            namespaces: Vec::new(),
            defaults: PolicyOverrides::default(),
            debounce: DEFAULT_DEBOUNCE,
        }
    }
}

/// Watches the cluster and keeps the returned receiver at the mesh it describes.
///
/// The receiver holds an empty [`MeshConfig`] until Services, EndpointSlices and Pods have all been
/// listed once; from then on every change is reflected after `settings.debounce`, and only real changes
/// wake receivers. Watches that fail are retried with kube's default backoff, keeping the last state
/// meanwhile. Everything stops when the last receiver is dropped. Must be called inside a Tokio runtime.
pub fn spawn(client: kube::Client, settings: K8sSettings) -> watch::Receiver<MeshConfig> {
    let (sender, receiver) = watch::channel(MeshConfig::default());
    let mut settings = settings;
    let check = PolicyFile {
        defaults: settings.defaults.clone(),
        ..PolicyFile::default()
    };
    if let Err(e) = check.validate() {
        tracing::error!(error = %e, "mesh-wide policy defaults refused; the built-in defaults apply");
        settings.defaults = PolicyOverrides::default();
    }
    tokio::spawn(run(client, settings, sender));
    receiver
}

/// The stores of one kind, one per watched namespace (or one for the whole cluster).
struct Stores<K: Resource<DynamicType = ()> + 'static>(Vec<Store<K>>);

impl<K: Resource<DynamicType = ()> + Clone + 'static> Stores<K> {
    async fn ready(&self) -> bool {
        for store in &self.0 {
            if store.wait_until_ready().await.is_err() {
                return false;
            }
        }
        true
    }

    fn state(&self) -> Vec<Arc<K>> {
        self.0.iter().flat_map(|s| s.state()).collect()
    }
}

/// Starts the reflectors of one kind: each event updates its store and wakes the rebuild.
fn reflect<K, F>(
    tasks: &mut JoinSet<()>,
    client: &kube::Client,
    namespaces: &[String],
    changed: &Arc<Notify>,
    strip: F,
) -> Stores<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
    F: Fn(&mut K) + Clone + Send + 'static,
{
    let apis: Vec<Api<K>> = if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let mut stores = Vec::new();
    for api in apis {
        let (reader, writer) = reflector::store();
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(strip.clone())
            .reflect(writer);
        let changed = changed.clone();
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => changed.notify_one(),
                    Err(e) => tracing::warn!(kind = %K::kind(&()), error = %e, "Kubernetes watch failed; retrying"),
                }
            }
        });
        stores.push(reader);
    }
    Stores(stores)
}

/// Keeps only what translation reads, so the stores stay small in big clusters.
fn strip_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.owner_references = None;
    if let Some(annotations) = &mut pod.metadata.annotations {
        annotations.retain(|k, _| k == meshlet::inject::annotations::INJECTED);
    }
    if let Some(labels) = &mut pod.metadata.labels {
        labels.retain(|k, _| k == meshlet::inject::annotations::MESHED_LABEL);
    }
    if let Some(spec) = &mut pod.spec {
        *spec = k8s_openapi::api::core::v1::PodSpec {
            service_account_name: spec.service_account_name.take(),
            ..Default::default()
        };
    }
    pod.status = None;
}

fn strip_service(service: &mut Service) {
    service.metadata.managed_fields = None;
    if let Some(all) = &mut service.metadata.annotations {
        all.retain(|k, _| k.starts_with(annotations::PREFIX));
    }
    service.status = None;
}

fn strip_slice(slice: &mut EndpointSlice) {
    slice.metadata.managed_fields = None;
}

async fn run(client: kube::Client, settings: K8sSettings, sender: watch::Sender<MeshConfig>) {
    let changed = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    let ns = &settings.namespaces;
    let services = reflect(&mut tasks, &client, ns, &changed, strip_service);
    let slices = reflect(&mut tasks, &client, ns, &changed, strip_slice);
    let pods = reflect(&mut tasks, &client, ns, &changed, strip_pod);
    let reports = Reports::new(client);
    let mut translator = Translator::new(settings.trust_domain.clone(), settings.defaults.clone());

    let listed = async { services.ready().await && slices.ready().await && pods.ready().await };
    tokio::select! {
        all = listed => if !all { return },
        _ = sender.closed() => return,
    }
    tracing::info!(namespaces = ?settings.namespaces, "Kubernetes objects listed; discovery running");
    loop {
        let (mesh, rejections) =
            translator.translate(&services.state(), &slices.state(), &pods.state());
        for rejection in rejections {
            reports.report(rejection);
        }
        let count = mesh.services.len();
        let updated = sender.send_if_modified(|current| {
            if *current == mesh {
                return false;
            }
            *current = mesh;
            true
        });
        if updated {
            tracing::debug!(services = count, "mesh updated from Kubernetes");
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = sender.closed() => return,
        }
        tokio::time::sleep(settings.debounce).await;
    }
}
