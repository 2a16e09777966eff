//! Kubernetes objects → [`MeshConfig`]: what a Service, its EndpointSlices and their Pods mean to the mesh
//! (the rules, for users, are in docs/kubernetes.md#discovery).
//!
//! Translation is a pure function of the three object sets plus one piece of memory, the last good
//! annotations of each Service, so that a bad annotation edit leaves the Service's previous policy in force
//! instead of falling back to the defaults. It is cheap enough to redo from scratch on every (debounced)
//! change, which keeps it free of incremental bookkeeping bugs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort as KubeServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meshlet::discovery::{EndpointConfig, MeshConfig, PortProtocol, ServiceConfig, ServicePort};
use meshlet::inject::annotations::{INJECTED, MESHED_LABEL};
use meshlet::policy::config::PolicyOverrides;
use meshlet::policy::PolicyFile;
use meshlet::tls::SpiffeId;

use super::annotations::{self, AnnotationError, ServiceAnnotations};

/// The label an EndpointSlice carries to name its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The service account of pods that name none.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The policy key and mesh name of a Service: `<name>.<namespace>`, the name callers use in DNS
/// (`payment.shop`), unique in the cluster, and what metrics and `meshlet stat` show.
pub fn service_key(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}")
}

/// A Service whose annotations were refused, to be reported once (Event and log).
#[derive(Debug, Clone)]
pub struct Rejection {
    /// The Service (for the Event's `regarding`).
    pub service: Arc<Service>,
    /// Its policy key.
    pub key: String,
    /// Every refused annotation.
    pub errors: Vec<AnnotationError>,
    /// Whether an earlier good set of annotations stays in force (else: the mesh-wide defaults).
    pub kept_last_good: bool,
}

#[derive(Debug, Default)]
struct Memory {
    /// The last annotations of the Service that parsed, as applied.
    last_good: Option<ServiceAnnotations>,
    /// The `meshlet.io/*` annotations last refused, so the same bad set is reported once.
    last_refused: Option<BTreeMap<String, String>>,
}

/// Builds the mesh from Kubernetes objects and remembers, per Service, the last good annotations.
#[derive(Debug)]
pub struct Translator {
    trust_domain: String,
    defaults: PolicyOverrides,
    memory: HashMap<String, Memory>,
}

impl Translator {
    /// A translator for this trust domain, with these mesh-wide policy defaults.
    pub fn new(trust_domain: impl Into<String>, defaults: PolicyOverrides) -> Self {
        Translator {
            trust_domain: trust_domain.into(),
            defaults,
            memory: HashMap::new(),
        }
    }

    /// The mesh described by these objects, and the Services whose annotations were newly refused.
    pub fn translate(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        pods: &[Arc<Pod>],
    ) -> (MeshConfig, Vec<Rejection>) {
        let pods: HashMap<(&str, &str), &Pod> = pods
            .iter()
            .filter_map(|p| {
                Some((
                    (
                        p.metadata.namespace.as_deref()?,
                        p.metadata.name.as_deref()?,
                    ),
                    &**p,
                ))
            })
            .collect();
        let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in slices {
            let owner = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            if let (Some(ns), Some(owner)) = (slice.metadata.namespace.as_deref(), owner) {
                slices_of
                    .entry((ns, owner.as_str()))
                    .or_default()
                    .push(slice);
            }
        }
        // Slices in name order, so that what the first slice decides does not depend on cache order.
        for owned in slices_of.values_mut() {
            owned.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        }

        let mut config = MeshConfig {
            services: Vec::new(),
            policy: PolicyFile {
                defaults: self.defaults.clone(),
                services: BTreeMap::new(),
            },
        };
        let mut rejections = Vec::new();
        let mut seen = HashSet::new();
        for service in services {
            let (Some(ns), Some(name)) = (
                service.metadata.namespace.as_deref(),
                service.metadata.name.as_deref(),
            ) else {
                continue;
            };
            let external =
                service.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName");
            if external {
                continue;
            }
            let key = service_key(ns, name);
            let annotations = self.annotations_of(&key, service, &mut rejections);
            let slices = slices_of.get(&(ns, name)).map(Vec::as_slice).unwrap_or(&[]);
            let place = Place {
                trust_domain: &self.trust_domain,
                key: &key,
                namespace: ns,
            };
            let Some(built) = build_service(&place, service, slices, &pods, &annotations) else {
                continue;
            };
            config
                .policy
                .services
                .insert(key.clone(), annotations.policy);
            config.services.push(built);
            seen.insert(key);
        }
        self.memory.retain(|key, _| seen.contains(key));
        config.services.sort_by(|a, b| a.name.cmp(&b.name));
        (config, rejections)
    }

    /// This Service's annotations in force: the current ones if they parse, else the last good ones.
    fn annotations_of(
        &mut self,
        key: &str,
        service: &Arc<Service>,
        rejections: &mut Vec<Rejection>,
    ) -> ServiceAnnotations {
        let all = service.metadata.annotations.clone().unwrap_or_default();
        let memory = self.memory.entry(key.to_string()).or_default();
        match annotations::parse(key, &all, &self.trust_domain, &self.defaults) {
            Ok(parsed) => {
                memory.last_refused = None;
                memory.last_good = Some(parsed.clone());
                parsed
            }
            Err(errors) => {
                let ours: BTreeMap<String, String> = all
                    .into_iter()
                    .filter(|(k, _)| k.starts_with(annotations::PREFIX))
                    .collect();
                if memory.last_refused.as_ref() != Some(&ours) {
                    memory.last_refused = Some(ours);
                    rejections.push(Rejection {
                        service: service.clone(),
                        key: key.to_string(),
                        errors,
                        kept_last_good: memory.last_good.is_some(),
                    });
                }
                memory.last_good.clone().unwrap_or_default()
            }
        }
    }
}

/// The Service's virtual addresses: its ClusterIPs; none for a headless Service.
fn spec_addresses(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.iter());
    }
    let mut addresses: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    addresses.dedup();
    addresses
}

/// Kubernetes `appProtocol` → the mesh's protocol hint; unknown values leave detection on.
pub fn protocol_hint(app_protocol: &str) -> Option<PortProtocol> {
    match app_protocol.to_ascii_lowercase().as_str() {
        "http" | "kubernetes.io/http" => Some(PortProtocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(PortProtocol::Http2),
        "grpc" | "kubernetes.io/grpc" => Some(PortProtocol::Grpc),
        "tcp" | "opaque" | "kubernetes.io/tcp" => Some(PortProtocol::Opaque),
        _ => None,
    }
}

fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p.eq_ignore_ascii_case("TCP"))
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p > 0)
}

/// Where a Service sits: what its identities and log lines are made of.
struct Place<'a> {
    trust_domain: &'a str,
    key: &'a str,
    namespace: &'a str,
}

fn build_service(
    place: &Place<'_>,
    service: &Service,
    slices: &[&EndpointSlice],
    pods: &HashMap<(&str, &str), &Pod>,
    annotations: &ServiceAnnotations,
) -> Option<ServiceConfig> {
    let Place {
        trust_domain,
        key,
        namespace,
    } = *place;
    let kube_ports: &[KubeServicePort] = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or(&[]);
    // The TCP ports, each with the name EndpointSlices use for it.
    let tcp: Vec<(&KubeServicePort, u16)> = kube_ports
        .iter()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| Some((p, port_number(p.port)?)))
        .collect();
    let port_name = |p: &KubeServicePort| p.name.clone().unwrap_or_default();

    let mut ports = Vec::new();
    for (kube, port) in &tcp {
        let from_slices = slices
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .find(|sp| {
                sp.name.clone().unwrap_or_default() == port_name(kube)
                    && is_tcp(sp.protocol.as_deref())
            })
            .and_then(|sp| sp.port.and_then(port_number));
        let target = match (&kube.target_port, from_slices) {
            (_, Some(resolved)) => Some(resolved),
            (Some(IntOrString::Int(n)), None) => port_number(*n),
            (None, None) => Some(*port),
            // A named target port no EndpointSlice resolved yet: there is no endpoint to reach.
            (Some(IntOrString::String(_)), None) => None,
        };
        let Some(target) = target else {
            continue;
        };
        let protocol = if annotations.is_opaque(*port) {
            Some(PortProtocol::Opaque)
        } else {
            kube.app_protocol.as_deref().and_then(protocol_hint)
        };
        ports.push(ServicePort {
            port: *port,
            target_port: (target != *port).then_some(target),
            protocol,
        });
    }

    // Ready addresses × the slice's ports that belong to a TCP service port.
    let mut endpoints: Vec<(EndpointConfig, Option<String>)> = Vec::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let slice_ports: Vec<u16> = slice
            .ports
            .iter()
            .flatten()
            .filter(|sp| is_tcp(sp.protocol.as_deref()))
            .filter(|sp| {
                tcp.iter()
                    .any(|(kube, _)| port_name(kube) == sp.name.clone().unwrap_or_default())
            })
            .filter_map(|sp| sp.port.and_then(port_number))
            .collect();
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let ns = r.namespace.as_deref().unwrap_or(namespace);
                    pods.get(&(ns, r.name.as_deref()?)).copied()
                });
            let meshed = pod.is_some_and(is_meshed);
            let account = pod.map(service_account);
            for ip in endpoint
                .addresses
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok())
            {
                for port in &slice_ports {
                    endpoints.push((
                        EndpointConfig {
                            address: SocketAddr::new(ip, *port),
                            sidecar: None,
                            identity: None,
                            meshed,
                        },
                        account.clone(),
                    ));
                }
            }
        }
    }
    endpoints.sort_by_key(|(e, _)| e.address);
    endpoints.dedup_by_key(|(e, _)| e.address);

    let account = most_common(endpoints.iter().filter_map(|(_, sa)| sa.as_deref()))
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
        .to_string();
    let identity = match SpiffeId::new(trust_domain, namespace, &account) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(service = key, service_account = %account, error = %e, "no valid identity for the service; left out of the mesh");
            return None;
        }
    };
    let endpoints = endpoints
        .into_iter()
        .filter_map(|(mut endpoint, sa)| {
            if let Some(sa) = sa.filter(|sa| *sa != account) {
                match SpiffeId::new(trust_domain, namespace, &sa) {
                    Ok(id) => endpoint.identity = Some(id),
                    Err(e) => {
                        tracing::warn!(service = key, endpoint = %endpoint.address, service_account = %sa, error = %e, "endpoint left out: no valid identity");
                        return None;
                    }
                }
            }
            Some(endpoint)
        })
        .collect();
    // A virtual address is useful only with a port to route (a named target port waits for its
    // EndpointSlice), and sidecars refuse a mesh state that lists addresses without ports.
    let addresses = if ports.is_empty() {
        Vec::new()
    } else {
        spec_addresses(service)
    };
    Some(ServiceConfig {
        name: key.to_string(),
        identity,
        addresses,
        ports,
        endpoints,
        inbound: annotations.inbound.clone(),
    })
}

/// Whether the injector meshed this pod (its annotation, or the label it adds).
fn is_meshed(pod: &Pod) -> bool {
    let marked = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .is_some_and(|v| v == "true")
    };
    marked(&pod.metadata.annotations, INJECTED) || marked(&pod.metadata.labels, MESHED_LABEL)
}

fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string())
}

/// The most frequent value; ties go to the alphabetically first, so the result does not depend on order.
fn most_common<'a>(values: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    let best = counts.values().copied().max()?;
    counts.into_iter().find(|(_, n)| *n == best).map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(value: serde_json::Value) -> Arc<Service> {
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn slice(value: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn pod(name: &str, sa: &str, meshed: bool) -> Arc<Pod> {
        let annotations = if meshed {
            json!({"meshlet.io/injected": "true"})
        } else {
            json!({})
        };
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
                "spec": {"serviceAccountName": sa, "containers": []}
            }))
            .unwrap(),
        )
    }

    fn endpoint(ip: &str, pod: &str, ready: bool) -> serde_json::Value {
        json!({"addresses": [ip], "conditions": {"ready": ready},
               "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}})
    }

    fn payment() -> Arc<Service> {
        service(json!({
            "metadata": {"name": "payment", "namespace": "shop",
                         "annotations": {"meshlet.io/timeout-request": "3s"}},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [
                        {"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"},
                        {"name": "grpc", "port": 9090, "targetPort": 9090, "appProtocol": "kubernetes.io/h2c"},
                        {"name": "dns", "port": 53, "protocol": "UDP"}
                     ]}
        }))
    }

    fn payment_slice() -> Arc<EndpointSlice> {
        slice(json!({
            "metadata": {"name": "payment-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "payment"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "grpc", "port": 9090, "protocol": "TCP"},
                      {"name": "dns", "port": 53, "protocol": "UDP"}],
            "endpoints": [endpoint("10.0.0.1", "payment-1", true),
                          endpoint("10.0.0.2", "payment-2", true),
                          endpoint("10.0.0.3", "payment-3", false),
                          endpoint("10.0.0.4", "payment-canary", true)]
        }))
    }

    fn pods() -> Vec<Arc<Pod>> {
        vec![
            pod("payment-1", "payment", true),
            pod("payment-2", "payment", true),
            pod("payment-3", "payment", true),
            pod("payment-canary", "payment-canary", false),
        ]
    }

    fn translator() -> Translator {
        Translator::new("cluster.local", PolicyOverrides::default())
    }

    #[test]
    fn a_cluster_ip_service_with_named_target_ports_and_identities() {
        let (mesh, rejections) = translator().translate(&[payment()], &[payment_slice()], &pods());
        assert!(rejections.is_empty());
        let svc = &mesh.services[0];
        assert_eq!(svc.name, "payment.shop");
        assert_eq!(
            svc.identity.as_str(),
            "spiffe://cluster.local/ns/shop/sa/payment"
        );
        assert_eq!(svc.addresses, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            svc.ports,
            vec![
                ServicePort {
                    port: 80,
                    target_port: Some(8080),
                    protocol: Some(PortProtocol::Http)
                },
                ServicePort {
                    port: 9090,
                    target_port: None,
                    protocol: Some(PortProtocol::Http2)
                },
            ],
            "UDP is left out; named target resolved through the slice"
        );
        let addrs: Vec<String> = svc
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(
            addrs,
            [
                "10.0.0.1:8080",
                "10.0.0.1:9090",
                "10.0.0.2:8080",
                "10.0.0.2:9090",
                "10.0.0.4:8080",
                "10.0.0.4:9090"
            ],
            "the unready endpoint is left out"
        );
        assert!(svc.endpoints[0].meshed && svc.endpoints[0].identity.is_none());
        let canary = &svc.endpoints[4];
        assert!(!canary.meshed);
        assert_eq!(
            canary.identity.as_ref().unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/payment-canary"
        );
        let policy = mesh.policy.resolve("payment.shop");
        assert_eq!(
            policy.default.timeouts.request,
            std::time::Duration::from_secs(3)
        );
    }

    #[test]
    fn headless_services_have_no_virtual_address_and_unmeshed_ones_are_listed() {
        let redis = service(json!({
            "metadata": {"name": "redis", "namespace": "shop",
                         "annotations": {"meshlet.io/opaque-ports": "6379"}},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 6379}]}
        }));
        let redis_slice = slice(json!({
            "metadata": {"name": "redis-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "redis"}},
            "addressType": "IPv4",
            "ports": [{"port": 6379}],
            "endpoints": [{"addresses": ["10.0.1.1"], "targetRef": {"kind": "Pod", "name": "redis-0"}}]
        }));
        let external = service(json!({
            "metadata": {"name": "search", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "search.example.com"}
        }));
        let (mesh, _) = translator().translate(
            &[redis, external],
            &[redis_slice],
            &[pod("redis-0", "", false)],
        );
        assert_eq!(mesh.services.len(), 1, "ExternalName is not in the mesh");
        let redis = &mesh.services[0];
        assert!(redis.addresses.is_empty());
        assert_eq!(
            redis.identity.as_str(),
            "spiffe://cluster.local/ns/shop/sa/default"
        );
        assert_eq!(
            redis.ports,
            vec![ServicePort {
                port: 6379,
                target_port: None,
                protocol: Some(PortProtocol::Opaque)
            }]
        );
        assert_eq!(redis.endpoints.len(), 1);
        assert!(!redis.endpoints[0].meshed, "listed, reached plain");
        assert!(
            mesh.policy.services.contains_key("redis.shop"),
            "callers still apply the client policy"
        );
    }

    #[test]
    fn a_bad_annotation_keeps_the_last_good_policy_and_is_reported_once() {
        let mut translator = translator();
        translator.translate(&[payment()], &[payment_slice()], &pods());
        let mut bad = (*payment()).clone();
        let annotations = bad.metadata.annotations.get_or_insert_default();
        annotations.insert("meshlet.io/timeout-request".into(), "soon".into());
        annotations.insert("meshlet.io/mtls-mode".into(), "strict".into());
        let bad = Arc::new(bad);
        let (mesh, rejections) =
            translator.translate(std::slice::from_ref(&bad), &[payment_slice()], &pods());
        assert_eq!(rejections.len(), 1);
        assert!(rejections[0].kept_last_good);
        assert_eq!(
            rejections[0].errors[0].annotation,
            "meshlet.io/timeout-request"
        );
        assert_eq!(rejections[0].errors[0].value, "soon");
        assert_eq!(
            mesh.policy.resolve("payment.shop").default.timeouts.request,
            std::time::Duration::from_secs(3),
            "last good policy"
        );
        assert_eq!(
            mesh.services[0].inbound.mode,
            meshlet::discovery::InboundMode::Permissive,
            "the whole set waits, strict included"
        );
        let (_, again) = translator.translate(&[bad], &[payment_slice()], &pods());
        assert!(again.is_empty(), "the same bad set is reported once");
    }

    #[test]
    fn a_new_service_with_a_bad_annotation_gets_the_defaults() {
        let svc = service(json!({
            "metadata": {"name": "x", "namespace": "shop", "annotations": {"meshlet.io/retry-max-attempts": "99"}},
            "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}
        }));
        let (mesh, rejections) = translator().translate(&[svc], &[], &[]);
        assert!(!rejections[0].kept_last_good);
        assert_eq!(
            mesh.policy.resolve("x.shop").default.retries.max_attempts,
            3
        );
        assert!(mesh.services[0].endpoints.is_empty());
    }

    #[test]
    fn app_protocols() {
        assert_eq!(protocol_hint("HTTP"), Some(PortProtocol::Http));
        assert_eq!(
            protocol_hint("kubernetes.io/h2c"),
            Some(PortProtocol::Http2)
        );
        assert_eq!(protocol_hint("grpc"), Some(PortProtocol::Grpc));
        assert_eq!(protocol_hint("tcp"), Some(PortProtocol::Opaque));
        assert_eq!(protocol_hint("kubernetes.io/wss"), None);
    }

    #[test]
    fn most_common_is_order_independent() {
        assert_eq!(most_common(["b", "a", "b", "a"].into_iter()), Some("a"));
        assert_eq!(most_common(["b", "a", "b"].into_iter()), Some("b"));
        assert_eq!(most_common(std::iter::empty()), None);
    }
}
