//! The lookup tables the data path reads for every connection, built from a [`MeshConfig`], and the
//! per-service state that must outlive configuration updates.
//!
//! Why keep state across updates? The control plane pushes a new state whenever anything in the mesh
//! changes, possibly every second. Rebuilding every service's policies each time would close its circuit
//! breakers, refill its retry budget, forget its endpoints' latency and, worst, empty its de-duplication
//! table, so that a replayed POST would run twice. [`Mesh::replace`] therefore hands each service's
//! [`ServicePolicies`] to the next table when the service is still there: policy edits go through
//! [`crate::policy::SharedPolicy::replace`], endpoint changes through [`crate::balance::Endpoints::update`],
//! which keeps the state of the endpoints that stay. Only services that disappeared lose their state.
//!
//! Policy state is kept per *backend*: a service and the port its endpoints listen on. A multi-port service
//! (an HTTP port and a metrics port) has one balancer per port, so a request is never balanced onto an
//! endpoint of another port.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use super::{InboundMode, MeshConfig, PortProtocol, ServiceConfig};
use crate::policy::idempotency::{DedupStore, MemoryStore};
use crate::policy::{DestinationPolicy, PolicyMetrics};
use crate::tls::{AllowList, SpiffeId};

/// A meshed destination as the outbound side needs it.
#[derive(Debug, Clone)]
pub struct MeshedEndpoint {
    /// The service it belongs to.
    pub service: Arc<str>,
    /// The identity it must prove: its own when the endpoint names one, else its service's.
    pub identity: SpiffeId,
    /// Where to open the mTLS connection.
    pub dial: SocketAddr,
}

/// The inbound rules of the service an application address belongs to.
#[derive(Debug, Clone, Default)]
pub struct InboundPolicy {
    /// The service, when the address is known.
    pub service: Option<Arc<str>>,
    /// Plaintext accepted or not.
    pub mode: InboundMode,
    /// Who may call.
    pub allow: Option<AllowList>,
}

impl InboundPolicy {
    /// Whether a caller with this identity (`None`: plaintext) may call.
    pub fn admits(&self, peer: Option<&SpiffeId>) -> bool {
        match (&self.allow, peer) {
            (None, Some(_)) => true,
            (None, None) => self.mode == InboundMode::Permissive,
            (Some(allow), Some(id)) => allow.allows(id),
            (Some(_), None) => false,
        }
    }
}

/// The resilience state of one backend (a service's endpoints on one port): its stacks' shared state and
/// the service's de-dup store.
#[derive(Clone)]
pub struct ServicePolicies {
    /// Limits, retry budget, breakers and balancer of the service's callers.
    pub destination: DestinationPolicy,
    /// Where the service's own sidecar remembers idempotency keys.
    pub dedup: Arc<dyn DedupStore>,
}

impl std::fmt::Debug for ServicePolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePolicies")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

/// A virtual address and port of a service (a ClusterIP): where its connections and requests go.
#[derive(Debug, Clone)]
pub struct VirtualPort {
    /// The service.
    pub service: Arc<str>,
    /// What the port carries, when the configuration says.
    pub protocol: Option<PortProtocol>,
    /// The balancer and policies over the endpoints on the port's `target_port`. A service without a
    /// policy of its own gets the mesh-wide defaults, so that it is balanced and its failing endpoints are
    /// ejected like any other.
    pub policies: Arc<ServicePolicies>,
    /// Whether some endpoint behind the port has a sidecar (for the `tls` metric label).
    pub meshed: bool,
    /// The service's identity (for the metric label; each endpoint is verified against its own).
    pub identity: SpiffeId,
}

/// What keeps its state across updates: a service and its endpoints' port.
type BackendKey = (Arc<str>, u16);

/// Lookup tables built from a [`MeshConfig`].
#[derive(Default)]
pub struct MeshTable {
    outbound: HashMap<SocketAddr, MeshedEndpoint>,
    inbound: HashMap<SocketAddr, Arc<InboundPolicy>>,
    default_inbound: Arc<InboundPolicy>,
    /// Endpoint address → the policies of its backend, for services listed in the policy file.
    policies: HashMap<SocketAddr, Arc<ServicePolicies>>,
    virtuals: HashMap<SocketAddr, VirtualPort>,
    /// Protocol hints by virtual `address:port` and by endpoint address.
    protocols: HashMap<SocketAddr, PortProtocol>,
    /// Every backend's state, handed to the next table.
    backends: HashMap<BackendKey, Arc<ServicePolicies>>,
    /// Each service's de-dup store, handed to the next table.
    stores: HashMap<Arc<str>, Arc<dyn DedupStore>>,
}

impl std::fmt::Debug for MeshTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTable")
            .field("outbound", &self.outbound)
            .field("virtuals", &self.virtuals)
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

impl MeshTable {
    /// Indexes a configuration by endpoint address; `metrics` and `shared_store` are given to policies.
    pub fn new(
        config: &MeshConfig,
        metrics: &PolicyMetrics,
        shared_store: Option<&Arc<dyn DedupStore>>,
    ) -> Self {
        Self::build(config, metrics, shared_store, None)
    }

    /// Like [`MeshTable::new`], keeping the state of `previous`'s backends that still exist.
    fn build(
        config: &MeshConfig,
        metrics: &PolicyMetrics,
        shared_store: Option<&Arc<dyn DedupStore>>,
        previous: Option<&MeshTable>,
    ) -> Self {
        let mut table = MeshTable::default();
        for service in &config.services {
            let name: Arc<str> = service.name.as_str().into();
            table.index_endpoints(service, &name);
            let listed = config.policy.services.contains_key(&service.name);
            let ports = backend_ports(service, listed);
            if ports.is_empty() {
                continue;
            }
            let resolved = config.policy.resolve(&service.name);
            let dedup = match (shared_store, previous.and_then(|p| p.stores.get(&name))) {
                (Some(store), _) => store.clone(),
                (None, Some(kept)) => kept.clone(),
                (None, None) => {
                    let idem = &resolved.default.idempotency;
                    Arc::new(MemoryStore::new(
                        &service.name,
                        idem.max_entries,
                        idem.max_bytes,
                        metrics.clone(),
                    ))
                }
            };
            table.stores.insert(name.clone(), dedup.clone());
            for port in &ports {
                let addrs: Vec<SocketAddr> = service
                    .endpoints
                    .iter()
                    .map(|e| e.address)
                    .filter(|a| a.port() == *port)
                    .collect();
                let key = (name.clone(), *port);
                let policies = match previous.and_then(|p| p.backends.get(&key)) {
                    Some(kept) => {
                        let destination = &kept.destination;
                        if *destination.policy.current() != resolved {
                            destination.policy.replace(resolved.clone());
                        }
                        if destination.endpoints.addrs() != addrs {
                            destination.endpoints.update(&addrs);
                        }
                        kept.clone()
                    }
                    None => {
                        let label = match ports.len() {
                            1 => service.name.clone(),
                            _ => format!("{}:{port}", service.name),
                        };
                        Arc::new(ServicePolicies {
                            destination: DestinationPolicy::new(
                                &label,
                                resolved.clone(),
                                &addrs,
                                metrics,
                            ),
                            dedup: dedup.clone(),
                        })
                    }
                };
                if listed {
                    for addr in &addrs {
                        table
                            .policies
                            .entry(*addr)
                            .or_insert_with(|| policies.clone());
                    }
                }
                table.backends.insert(key, policies);
            }
            table.index_ports(service, &name);
        }
        table
    }

    /// Outbound (meshed endpoints, with their identity), inbound rules and protocol hints by endpoint
    /// address.
    fn index_endpoints(&mut self, service: &ServiceConfig, name: &Arc<str>) {
        let policy = Arc::new(InboundPolicy {
            service: Some(name.clone()),
            mode: service.inbound.mode,
            allow: service.inbound.allow.clone(),
        });
        for endpoint in &service.endpoints {
            if endpoint.meshed {
                let identity = endpoint.identity.as_ref().unwrap_or(&service.identity);
                self.outbound
                    .entry(endpoint.address)
                    .or_insert_with(|| MeshedEndpoint {
                        service: name.clone(),
                        identity: identity.clone(),
                        dial: endpoint.sidecar.unwrap_or(endpoint.address),
                    });
            }
            self.inbound
                .entry(endpoint.address)
                .or_insert_with(|| policy.clone());
        }
        // Hints apply to pod-IP destinations too (headless services), and to the endpoints' own sidecars.
        for port in &service.ports {
            let Some(protocol) = port.protocol else {
                continue;
            };
            for endpoint in &service.endpoints {
                if endpoint.address.port() == port.target() {
                    self.protocols.entry(endpoint.address).or_insert(protocol);
                }
            }
        }
    }

    /// Virtual ports (their backends must be built) and their protocol hints.
    fn index_ports(&mut self, service: &ServiceConfig, name: &Arc<str>) {
        for port in &service.ports {
            let target = port.target();
            let Some(policies) = self.backends.get(&(name.clone(), target)).cloned() else {
                continue;
            };
            let meshed = service
                .endpoints
                .iter()
                .any(|e| e.meshed && e.address.port() == target);
            for ip in &service.addresses {
                let vip = SocketAddr::new(*ip, port.port);
                if let Some(protocol) = port.protocol {
                    self.protocols.insert(vip, protocol);
                }
                self.virtuals.insert(
                    vip,
                    VirtualPort {
                        service: name.clone(),
                        protocol: port.protocol,
                        policies: policies.clone(),
                        meshed,
                        identity: service.identity.clone(),
                    },
                );
            }
        }
    }

    /// The meshed endpoint at `dst`, or `None` for a destination to reach plain (unknown to the mesh, or
    /// an endpoint without sidecar).
    pub fn outbound(&self, dst: SocketAddr) -> Option<&MeshedEndpoint> {
        self.outbound.get(&dst)
    }

    /// The service port behind the virtual address `dst`, if it is one.
    pub fn virtual_port(&self, dst: SocketAddr) -> Option<&VirtualPort> {
        self.virtuals.get(&dst)
    }

    /// The protocol the configuration declares for `dst` (a virtual address and port, or an endpoint).
    pub fn protocol(&self, dst: SocketAddr) -> Option<PortProtocol> {
        self.protocols.get(&dst).copied()
    }

    /// The resilience policies of the service `addr` belongs to, if it has any.
    pub fn policies(&self, addr: SocketAddr) -> Option<&Arc<ServicePolicies>> {
        self.policies.get(&addr)
    }

    /// The inbound rules for the application address `app`.
    pub fn inbound(&self, app: SocketAddr) -> Arc<InboundPolicy> {
        self.inbound
            .get(&app)
            .cloned()
            .unwrap_or_else(|| self.default_inbound.clone())
    }
}

/// The endpoint ports of `service` that need a balancer: every endpoint port of a service with a policy,
/// and the target port of every port reachable on a virtual address.
fn backend_ports(service: &ServiceConfig, listed: bool) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    if listed {
        ports.extend(service.endpoints.iter().map(|e| e.address.port()));
    }
    if !service.addresses.is_empty() {
        ports.extend(service.ports.iter().map(|p| p.target()));
    }
    ports
}

/// The current mesh table, replaced as a whole when the configuration changes.
pub struct Mesh {
    current: RwLock<Arc<MeshTable>>,
    /// The configuration in force, so that an unchanged one is recognised; the lock also serialises
    /// concurrent replacements.
    config: Mutex<MeshConfig>,
    metrics: PolicyMetrics,
    shared_store: Option<Arc<dyn DedupStore>>,
}

impl Mesh {
    /// A mesh with this configuration; `shared_store` (Redis) replaces per-service in-memory de-dup stores.
    pub fn new(
        config: &MeshConfig,
        metrics: PolicyMetrics,
        shared_store: Option<Arc<dyn DedupStore>>,
    ) -> Self {
        let table = MeshTable::new(config, &metrics, shared_store.as_ref());
        Mesh {
            current: RwLock::new(Arc::new(table)),
            config: Mutex::new(config.clone()),
            metrics,
            shared_store,
        }
    }

    /// The table in force now.
    pub fn table(&self) -> Arc<MeshTable> {
        match self.current.read() {
            Ok(table) => table.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts a new configuration in force for the next lookups. Services that remain keep their breakers,
    /// retry budget, limits, balancer state and de-dup records; an unchanged configuration changes nothing.
    /// Returns whether anything changed.
    pub fn replace(&self, config: &MeshConfig) -> bool {
        let mut in_force = match self.config.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if *in_force == *config {
            return false;
        }
        let previous = self.table();
        let table = Arc::new(MeshTable::build(
            config,
            &self.metrics,
            self.shared_store.as_ref(),
            Some(&previous),
        ));
        match self.current.write() {
            Ok(mut current) => *current = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
        *in_force = config.clone();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
services:
  - name: payment
    identity: spiffe://cluster.local/ns/shop/sa/payment
    addresses: [10.96.0.10]
    ports:
      - {port: 80, target_port: 8080, protocol: http}
      - {port: 6379, protocol: opaque}
    endpoints:
      - address: 10.0.0.1:8080
      - address: 10.0.0.2:8080
        identity: spiffe://cluster.local/ns/shop/sa/payment-canary
      - address: 10.0.0.3:8080
        meshed: false
      - address: 10.0.0.1:6379
  - name: inventory
    identity: spiffe://cluster.local/ns/shop/sa/inventory
    endpoints:
      - address: 10.0.1.1:8080
policy:
  services:
    payment:
      timeouts: {request: 2s}
    inventory:
      timeouts: {request: 3s}
"#;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn mesh(yaml: &str) -> Mesh {
        Mesh::new(
            &MeshConfig::from_yaml(yaml).unwrap(),
            PolicyMetrics::unregistered(),
            None,
        )
    }

    fn request_timeout(p: &ServicePolicies) -> std::time::Duration {
        p.destination.policy.current().default.timeouts.request
    }

    #[test]
    fn virtual_ports_lead_to_their_target_ports_endpoints() {
        let table = mesh(YAML).table();
        let http = table.virtual_port(addr("10.96.0.10:80")).unwrap();
        assert_eq!(&*http.service, "payment");
        assert_eq!(http.protocol, Some(PortProtocol::Http));
        assert_eq!(
            http.policies.destination.endpoints.addrs(),
            vec![
                addr("10.0.0.1:8080"),
                addr("10.0.0.2:8080"),
                addr("10.0.0.3:8080")
            ]
        );
        let redis = table.virtual_port(addr("10.96.0.10:6379")).unwrap();
        assert_eq!(
            redis.policies.destination.endpoints.addrs(),
            vec![addr("10.0.0.1:6379")]
        );
        assert!(table.virtual_port(addr("10.96.0.10:8080")).is_none());
        assert_eq!(
            table.protocol(addr("10.96.0.10:6379")),
            Some(PortProtocol::Opaque)
        );
        assert_eq!(
            table.protocol(addr("10.0.0.1:6379")),
            Some(PortProtocol::Opaque)
        );
        assert_eq!(table.protocol(addr("10.0.1.1:8080")), None);
        // The direct pod-IP path balances only over endpoints of the same port.
        let direct = table.policies(addr("10.0.0.1:8080")).unwrap();
        assert!(Arc::ptr_eq(direct, &http.policies));
    }

    #[test]
    fn endpoints_prove_their_own_identity_and_unmeshed_ones_are_plain() {
        let table = mesh(YAML).table();
        let own = table.outbound(addr("10.0.0.1:8080")).unwrap();
        assert_eq!(
            own.identity.as_str(),
            "spiffe://cluster.local/ns/shop/sa/payment"
        );
        let canary = table.outbound(addr("10.0.0.2:8080")).unwrap();
        assert_eq!(
            canary.identity.as_str(),
            "spiffe://cluster.local/ns/shop/sa/payment-canary"
        );
        assert!(table.outbound(addr("10.0.0.3:8080")).is_none());
    }

    #[test]
    fn an_unchanged_config_is_a_no_op() {
        let mesh = mesh(YAML);
        let before = mesh.table();
        assert!(!mesh.replace(&MeshConfig::from_yaml(YAML).unwrap()));
        assert!(Arc::ptr_eq(&before, &mesh.table()));
    }

    #[test]
    fn services_that_stay_keep_their_state_and_take_edits() {
        let mesh = mesh(YAML);
        let before = mesh.table();
        let payment = before.policies(addr("10.0.0.1:8080")).unwrap().clone();
        let inventory = before.policies(addr("10.0.1.1:8080")).unwrap().clone();

        // Another service's policy edit: payment's state object is the same.
        let edited = YAML.replace("request: 3s", "request: 4s");
        assert!(mesh.replace(&MeshConfig::from_yaml(&edited).unwrap()));
        let after = mesh.table();
        let payment_after = after.policies(addr("10.0.0.1:8080")).unwrap();
        assert!(Arc::ptr_eq(&payment, payment_after));
        assert!(Arc::ptr_eq(&payment.dedup, &payment_after.dedup));
        // The edited service keeps its state too, with the new policy in force.
        let inventory_after = after.policies(addr("10.0.1.1:8080")).unwrap();
        assert!(Arc::ptr_eq(&inventory, inventory_after));
        assert_eq!(
            request_timeout(&inventory),
            std::time::Duration::from_secs(4)
        );

        // Endpoint changes update the balancer in place.
        let scaled = edited.replace(
            "      - address: 10.0.1.1:8080\n",
            "      - address: 10.0.1.1:8080\n      - address: 10.0.1.2:8080\n",
        );
        mesh.replace(&MeshConfig::from_yaml(&scaled).unwrap());
        let scaled_table = mesh.table();
        let grown = scaled_table.policies(addr("10.0.1.2:8080")).unwrap();
        assert!(Arc::ptr_eq(&inventory, grown));
        assert_eq!(
            inventory.destination.endpoints.addrs(),
            vec![addr("10.0.1.1:8080"), addr("10.0.1.2:8080")]
        );
    }

    #[test]
    fn services_that_disappear_lose_their_state() {
        let mesh = mesh(YAML);
        let inventory = mesh
            .table()
            .policies(addr("10.0.1.1:8080"))
            .unwrap()
            .clone();
        let mut config = MeshConfig::from_yaml(YAML).unwrap();
        let removed = config.clone();
        config.services.retain(|s| s.name != "inventory");
        mesh.replace(&config);
        assert!(mesh.table().policies(addr("10.0.1.1:8080")).is_none());
        mesh.replace(&removed);
        let back = mesh.table();
        let fresh = back.policies(addr("10.0.1.1:8080")).unwrap();
        assert!(!Arc::ptr_eq(&inventory, fresh));
    }

    #[test]
    fn a_virtual_service_without_policy_is_balanced_with_the_defaults() {
        let yaml = "services:\n  - name: web\n    identity: spiffe://x/ns/a/sa/web\n    addresses: [10.96.0.20]\n    ports: [{port: 80, target_port: 8080}]\n    endpoints: [{address: '10.0.2.1:8080', meshed: false}, {address: '10.0.2.2:8080', meshed: false}]\n";
        let table = mesh(yaml).table();
        let web = table.virtual_port(addr("10.96.0.20:80")).unwrap();
        assert!(!web.meshed);
        assert_eq!(web.policies.destination.endpoints.addrs().len(), 2);
        assert_eq!(
            request_timeout(&web.policies),
            crate::policy::Policy::default().timeouts.request
        );
        // Without a policy of its own, direct requests to its endpoints stay plain pass-through.
        assert!(table.policies(addr("10.0.2.1:8080")).is_none());
    }

    #[test]
    fn headless_services_keep_their_protocol_hints() {
        let yaml = "services:\n  - name: db\n    identity: spiffe://x/ns/a/sa/db\n    ports: [{port: 5432, protocol: opaque}]\n    endpoints: [{address: '10.0.5.1:5432'}, {address: '10.0.5.1:9187'}]\n";
        let table = mesh(yaml).table();
        assert_eq!(
            table.protocol(addr("10.0.5.1:5432")),
            Some(PortProtocol::Opaque)
        );
        assert_eq!(table.protocol(addr("10.0.5.1:9187")), None);
        assert!(table.outbound(addr("10.0.5.1:5432")).is_some());
    }

    #[test]
    fn virtual_address_errors_name_the_service_and_address() {
        let no_ports =
            "services:\n  - {name: a, identity: 'spiffe://x/ns/a/sa/a', addresses: [10.96.0.1]}\n";
        let err = MeshConfig::from_yaml(no_ports).unwrap_err().to_string();
        assert!(
            err.contains("services[a].ports") && err.contains("10.96.0.1"),
            "{err}"
        );
        let twice = "services:\n  - {name: a, identity: 'spiffe://x/ns/a/sa/a', addresses: [10.96.0.1], ports: [{port: 80}]}\n  - {name: b, identity: 'spiffe://x/ns/a/sa/b', addresses: [10.96.0.1], ports: [{port: 80}]}\n";
        let err = MeshConfig::from_yaml(twice).unwrap_err().to_string();
        assert!(
            err.contains("10.96.0.1:80") && err.contains("both a and b"),
            "{err}"
        );
    }
}
