//! What the sidecar knows about the mesh: which destinations are meshed, the identity each must prove,
//! where its sidecar accepts mTLS, and each service's inbound rules.
//!
//! The same [`MeshConfig`] schema is read from a local YAML file (`--mesh-config`) and, in a cluster, built
//! by the control plane from Kubernetes objects. Destinations not listed are passed through plain.

mod table;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::policy::PolicyFile;
use crate::tls::{AllowList, SpiffeId};

pub mod protocol;
pub mod watch;

pub use table::{InboundPolicy, Mesh, MeshTable, MeshedEndpoint, ServicePolicies, VirtualPort};

/// The mesh as configured: every known service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// Services of the mesh.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// Resilience policies: mesh-wide defaults, and per service (by name) timeouts, retries, idempotency,
    /// circuit breaking and limits. A meshed service listed here gets the policy stack on its callers'
    /// sidecars and de-duplication on its own.
    #[serde(default)]
    pub policy: PolicyFile,
}

/// One service: its endpoints, the identity they run as, and who may call it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name, used in logs and metrics.
    pub name: String,
    /// The SPIFFE identity every endpoint of the service must present (an endpoint may name its own).
    pub identity: SpiffeId,
    /// Virtual addresses callers dial instead of an endpoint (a Kubernetes ClusterIP): a connection to
    /// `<address>:<port>` of one of [`ServiceConfig::ports`] is balanced over the endpoints listening on
    /// that port's `target_port`. Empty: callers dial endpoints directly (headless services, pod IPs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// The service's ports as callers see them, with the endpoints' port behind each and its protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// The service's endpoints.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Rules applied by the service's own sidecars to incoming connections.
    #[serde(default)]
    pub inbound: InboundConfig,
}

/// One endpoint: the application's address, and where its sidecar takes mTLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The application's address, as callers address it (pod IP and port).
    pub address: SocketAddr,
    /// The sidecar's inbound listener, when the pod has no iptables rules to redirect `address` to it
    /// (the local demo). Absent: connect to `address` and let iptables hand the connection to the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SocketAddr>,
    /// The identity this endpoint proves, when it differs from the service's (pods of one Service
    /// running as different service accounts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<SpiffeId>,
    /// Whether the endpoint has a sidecar. `false` (a pod outside the mesh): reached in plaintext, with the
    /// service's client-side policies still applied.
    #[serde(default = "meshed_by_default", skip_serializing_if = "is_true")]
    pub meshed: bool,
}

fn meshed_by_default() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// A port of a service: what callers dial, where the endpoints listen, and what travels on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// The port callers dial on the service's virtual addresses.
    pub port: u16,
    /// The port the endpoints listen on; absent: the same as `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// What the port carries (Kubernetes `appProtocol`, or `meshlet.io/opaque-ports`); absent: detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<PortProtocol>,
}

impl ServicePort {
    /// The endpoints' port behind this one.
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// The protocol hint of a port: skips detection, and `opaque` keeps server-first protocols from waiting
/// for the detection timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// HTTP/1.1 (`appProtocol: http`).
    Http,
    /// HTTP/2 without TLS (`appProtocol: kubernetes.io/h2c`, `http2`).
    Http2,
    /// gRPC (`appProtocol: grpc`): HTTP/2.
    Grpc,
    /// Opaque TCP: no detection, bytes relayed as they are (`appProtocol: tcp`, databases, brokers).
    Opaque,
}

/// Whether plaintext is accepted, and which identities may call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// `permissive` (mTLS and plaintext) or `strict` (mTLS only).
    #[serde(default)]
    pub mode: InboundMode,
    /// Client identities allowed (`spiffe://…` exact, or `ns/<namespace>/*`). Absent: anyone the mode admits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<AllowList>,
}

/// Inbound mTLS mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// mTLS from sidecars and plaintext from unmeshed clients.
    #[default]
    Permissive,
    /// Only mTLS; plaintext connections are closed.
    Strict,
}

/// Why a mesh configuration was refused; the last good one stays in force.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The file could not be read.
    #[error("cannot read mesh config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The YAML does not match the schema; serde's message names the field and the value.
    #[error("invalid mesh config {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// Where and what.
        message: String,
    },
    /// A policy value cannot be applied; every problem is named with its field path and value.
    #[error("invalid mesh config: {0}")]
    Policy(#[from] crate::policy::config::PolicyErrors),
    /// Two services claim the same virtual address and port.
    #[error(
        "invalid mesh config: virtual address {address} is listed by both {first} and {second}"
    )]
    DuplicateVirtual {
        /// The address and port.
        address: SocketAddr,
        /// The first service listing it.
        first: String,
        /// The second service listing it.
        second: String,
    },
    /// A service has virtual addresses but no ports to reach them on.
    #[error("invalid mesh config: services[{service}].addresses is {addresses:?} but services[{service}].ports is empty")]
    AddressesWithoutPorts {
        /// The service.
        service: String,
        /// Its addresses.
        addresses: Vec<IpAddr>,
    },
}

impl MeshConfig {
    /// Reads and checks a YAML mesh configuration.
    pub fn from_file(path: &Path) -> Result<Self, DiscoveryError> {
        let text = std::fs::read_to_string(path).map_err(|source| DiscoveryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|e| match e {
            DiscoveryError::Parse { message, .. } => DiscoveryError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses and checks YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, DiscoveryError> {
        let config: MeshConfig = serde_yaml::from_str(text).map_err(|e| DiscoveryError::Parse {
            path: "-".into(),
            message: e.to_string(),
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), DiscoveryError> {
        self.policy.validate()?;
        let mut virtuals: HashMap<SocketAddr, &str> = HashMap::new();
        for service in &self.services {
            if !service.addresses.is_empty() && service.ports.is_empty() {
                return Err(DiscoveryError::AddressesWithoutPorts {
                    service: service.name.clone(),
                    addresses: service.addresses.clone(),
                });
            }
            for ip in &service.addresses {
                for port in &service.ports {
                    let address = SocketAddr::new(*ip, port.port);
                    if let Some(first) = virtuals.insert(address, &service.name) {
                        return Err(DiscoveryError::DuplicateVirtual {
                            address,
                            first: first.to_string(),
                            second: service.name.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Re-reads the mesh file when it changes; a bad edit is logged with the field and value, and the last
/// good configuration stays in force.
pub fn watch_file(path: std::path::PathBuf, mesh: Arc<Mesh>) {
    tokio::spawn(async move {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut seen = modified(&path);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            let now = modified(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match MeshConfig::from_file(&path) {
                Ok(config) => {
                    mesh.replace(&config);
                    tracing::info!(path = %path.display(), services = config.services.len(), "mesh config reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mesh config change refused; keeping the last good one")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyMetrics;

    const YAML: &str = r#"
services:
  - name: inventory
    identity: spiffe://cluster.local/ns/shop/sa/inventory
    endpoints:
      - address: 127.0.3.1:8080
        sidecar: 127.0.3.1:15006
    inbound:
      mode: strict
      allow: ["ns/shop/*"]
  - name: payment
    identity: spiffe://cluster.local/ns/shop/sa/payment
    endpoints:
      - address: 10.0.0.4:8080
"#;

    #[test]
    fn indexes_endpoints_and_inbound_rules() {
        let metrics = PolicyMetrics::register(&prometheus::Registry::new()).unwrap();
        let table = MeshTable::new(&MeshConfig::from_yaml(YAML).unwrap(), &metrics, None);
        let inventory = table.outbound("127.0.3.1:8080".parse().unwrap()).unwrap();
        assert_eq!(inventory.dial, "127.0.3.1:15006".parse().unwrap());
        assert_eq!(
            inventory.identity.as_str(),
            "spiffe://cluster.local/ns/shop/sa/inventory"
        );
        let payment = table.outbound("10.0.0.4:8080".parse().unwrap()).unwrap();
        assert_eq!(payment.dial, "10.0.0.4:8080".parse().unwrap());
        assert!(table.outbound("10.0.0.9:80".parse().unwrap()).is_none());

        let strict = table.inbound("127.0.3.1:8080".parse().unwrap());
        assert_eq!(strict.mode, InboundMode::Strict);
        let order: SpiffeId = "spiffe://cluster.local/ns/shop/sa/order".parse().unwrap();
        let stranger: SpiffeId = "spiffe://cluster.local/ns/other/sa/x".parse().unwrap();
        assert!(strict.admits(Some(&order)));
        assert!(!strict.admits(Some(&stranger)));
        assert!(!strict.admits(None));
        let open = table.inbound("10.0.0.4:8080".parse().unwrap());
        assert!(open.admits(None) && open.admits(Some(&stranger)));
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let err = MeshConfig::from_yaml("services:\n  - name: a\n    identity: spiffe://x/ns/a/sa/b\n    inbound: {mode: lax}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lax") && err.contains("mode"), "{err}");
        let err = MeshConfig::from_yaml("services:\n  - name: a\n    identity: not-an-id\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not-an-id"), "{err}");
    }

    #[test]
    fn a_pod_behind_two_services_is_dialed_directly_as_the_first() {
        // Common in Kubernetes (a Deployment selected by two Services): not an error. Each service keeps
        // the endpoint for its own virtual address; a direct pod-IP connection follows the first listed.
        let two = "services:\n  - {name: a, identity: 'spiffe://x/ns/a/sa/a', endpoints: [{address: '10.0.0.1:80'}]}\n  - {name: b, identity: 'spiffe://x/ns/a/sa/a', endpoints: [{address: '10.0.0.1:80'}]}\n";
        let config = MeshConfig::from_yaml(two).unwrap();
        let metrics = PolicyMetrics::register(&prometheus::Registry::new()).unwrap();
        let table = MeshTable::new(&config, &metrics, None);
        let endpoint = table.outbound("10.0.0.1:80".parse().unwrap()).unwrap();
        assert_eq!(&*endpoint.service, "a");
        assert_eq!(
            table
                .inbound("10.0.0.1:80".parse().unwrap())
                .service
                .as_deref(),
            Some("a")
        );
    }
}
