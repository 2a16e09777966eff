//! Mesh-wide injection settings, read from the chart's `inject.yaml` (or built in).

use std::path::Path;

use serde::Deserialize;

use super::InjectError;

/// Mesh-wide injection settings: the `inject.yaml` key of the chart's mesh-defaults ConfigMap, or
/// `meshlet inject --config`. Every field has a default so a partial file works.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct InjectConfig {
    /// Image of both injected containers (it holds `meshlet init` and `meshlet proxy`).
    pub proxy_image: String,
    /// `imagePullPolicy` of the injected containers.
    pub image_pull_policy: String,
    /// `host:port` of the control plane's HTTPS API, reached by the sidecar for its certificate.
    pub control_plane_addr: String,
    /// DNS name in the control plane's serving certificate.
    pub control_plane_name: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// ConfigMap (in every meshed namespace) whose `ca.crt` holds the trust anchors.
    pub trust_anchors_config_map: String,
    /// Audience of the projected ServiceAccount token the control plane checks.
    pub token_audience: String,
    /// Lifetime requested for the projected token (the kubelet refreshes it at 80 %).
    pub token_expiration_seconds: u32,
    /// Proxy as a native sidecar (needs Kubernetes ≥ 1.29); the chart sets it from the cluster version.
    pub native_sidecar: bool,
    /// Rewrite HTTP probes through the admin port (see [`probes`]).
    pub rewrite_app_probes: bool,
    /// Default proxy resources; the `meshlet.io/proxy-*` annotations override each one.
    pub proxy_resources: ProxyResources,
    /// Ports always proxied as opaque TCP (`25,3306`); the pod's `meshlet.io/opaque-ports` adds to it.
    pub opaque_ports: String,
    /// iptables back end of `meshlet init`, `nft` or `legacy`: it must match the nodes'.
    pub iptables_mode: IptablesMode,
    /// Proxy log filter (`MESHLET_LOG`).
    pub log_level: String,
    /// Proxy log format, `text` or `json` (`MESHLET_LOG_FORMAT`).
    pub log_format: String,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            proxy_image: concat!("ghcr.io/meshlet/meshlet:", env!("CARGO_PKG_VERSION")).into(),
            image_pull_policy: "IfNotPresent".into(),
            control_plane_addr: "meshlet-control.meshlet.svc:8443".into(),
            control_plane_name: "meshlet-control.meshlet.svc".into(),
            trust_domain: "cluster.local".into(),
            trust_anchors_config_map: "meshlet-trust-anchors".into(),
            token_audience: "meshlet".into(),
            token_expiration_seconds: 3600,
            native_sidecar: true,
            rewrite_app_probes: true,
            proxy_resources: ProxyResources::default(),
            opaque_ports: crate::config::DEFAULT_OPAQUE_PORTS.into(),
            iptables_mode: IptablesMode::Nft,
            log_level: "info".into(),
            log_format: "json".into(),
        }
    }
}

impl InjectConfig {
    /// Reads the settings from a YAML file; an unknown key or a bad value is an error naming it.
    pub fn from_yaml_file(path: &Path) -> Result<Self, InjectError> {
        let text = std::fs::read_to_string(path).map_err(|source| InjectError::ReadConfig {
            path: path.display().to_string(),
            source,
        })?;
        serde_yaml::from_str(&text).map_err(|source| InjectError::ParseConfig {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Requests and limits of the proxy container, as Kubernetes quantities; `None` leaves one unset.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyResources {
    /// CPU request, e.g. `100m`.
    pub cpu_request: Option<String>,
    /// CPU limit.
    pub cpu_limit: Option<String>,
    /// Memory request, e.g. `32Mi`.
    pub memory_request: Option<String>,
    /// Memory limit.
    pub memory_limit: Option<String>,
}

impl Default for ProxyResources {
    fn default() -> Self {
        ProxyResources {
            cpu_request: Some("100m".into()),
            cpu_limit: None,
            memory_request: Some("32Mi".into()),
            memory_limit: Some("256Mi".into()),
        }
    }
}

/// The iptables back end `meshlet init` drives (its `--iptables-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IptablesMode {
    /// `iptables-nft`: nf_tables underneath (most current distributions).
    Nft,
    /// `iptables-legacy`: the old x_tables interface.
    Legacy,
}

impl IptablesMode {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            IptablesMode::Nft => "nft",
            IptablesMode::Legacy => "legacy",
        }
    }
}
