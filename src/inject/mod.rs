//! Sidecar injection: the one mutation that turns an application pod into a meshed pod.
//!
//! The control plane's admission webhook and the offline `meshlet inject` command both call
//! [`inject_pod`], so a pod looks the same whichever way it was meshed. It works on `serde_json::Value`
//! rather than typed Kubernetes objects because the proxy crate stays free of kube/k8s-openapi, and
//! because a pass-through of unknown fields is exactly what a mutating webhook must do.
//!
//! A meshed pod gets:
//! - `meshlet-init`, an init container running `meshlet init` as root with NET_ADMIN and NET_RAW only,
//!   which installs the iptables redirect (all traffic except the proxy's own, uid 2102, goes through
//!   the proxy);
//! - `meshlet-proxy`, the sidecar: on Kubernetes ≥ 1.29 a native sidecar (an init container with
//!   `restartPolicy: Always` right after `meshlet-init`, with a startup probe on `/ready`, so the
//!   application and its other init containers start once the proxy is ready and Jobs complete); on older
//!   clusters the first regular container, whose `postStart` hook (`meshlet wait-ready`) holds the
//!   next containers until the proxy is ready;
//! - the projected ServiceAccount token (audience `meshlet`) and the trust anchors it needs to obtain
//!   its identity from the control plane;
//! - the application's HTTP probes rewritten through the admin port (see [`probes`]).
//!
//! Bad annotation values never stop the injection: each is reported as a warning naming the annotation
//! and the value (admission warnings from the webhook, stderr from `meshlet inject`), and the mesh-wide
//! default is used instead.

mod config;
mod containers;
mod manifest;
pub mod probes;
pub mod values;
mod yaml;

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

pub use config::{InjectConfig, IptablesMode, ProxyResources};
use containers::{init_container, proxy_container, PodSettings};
pub use manifest::{inject_manifest, inject_yaml, InjectedManifests};

/// The `meshlet.io/*` annotations read at injection (the policy annotations on Services are read by
/// the control plane; see docs/annotations.md).
pub mod annotations {
    /// `enabled` or `disabled`, as a namespace label, pod label or pod annotation; `disabled` on the
    /// pod wins.
    pub const INJECT: &str = "meshlet.io/inject";
    /// Set by the injector; its presence makes a second injection a no-op.
    pub const INJECTED: &str = "meshlet.io/injected";
    /// CPU request of the proxy container (Kubernetes quantity).
    pub const PROXY_CPU_REQUEST: &str = "meshlet.io/proxy-cpu-request";
    /// CPU limit of the proxy container.
    pub const PROXY_CPU_LIMIT: &str = "meshlet.io/proxy-cpu-limit";
    /// Memory request of the proxy container.
    pub const PROXY_MEMORY_REQUEST: &str = "meshlet.io/proxy-memory-request";
    /// Memory limit of the proxy container.
    pub const PROXY_MEMORY_LIMIT: &str = "meshlet.io/proxy-memory-limit";
    /// Inbound ports that bypass the proxy (`8080,9000-9010`).
    pub const SKIP_INBOUND_PORTS: &str = "meshlet.io/skip-inbound-ports";
    /// Outbound destination ports that bypass the proxy.
    pub const SKIP_OUTBOUND_PORTS: &str = "meshlet.io/skip-outbound-ports";
    /// Ports proxied as opaque TCP without protocol detection, added to the mesh-wide list.
    pub const OPAQUE_PORTS: &str = "meshlet.io/opaque-ports";
    /// `true`/`false`: run the proxy as a native sidecar, overriding the mesh-wide setting.
    pub const NATIVE_SIDECAR: &str = "meshlet.io/native-sidecar";
    /// `true`/`false`: rewrite the application's HTTP probes through the proxy's admin port.
    pub const REWRITE_APP_PROBES: &str = "meshlet.io/rewrite-app-probes";
    /// Label added to injected pods, so a PodMonitor can select every meshed pod.
    pub const MESHED_LABEL: &str = "meshlet.io/meshed";
}

/// Name of the sidecar container.
pub const PROXY_CONTAINER: &str = "meshlet-proxy";
/// Name of the init container that installs the traffic redirect.
pub const INIT_CONTAINER: &str = "meshlet-init";
/// The proxy runs as this uid; the redirect exempts its traffic so it does not loop.
pub const PROXY_UID: u32 = 2102;
/// Proxy listener ports (see `meshlet proxy --help`).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound listener port.
pub const INBOUND_PORT: u16 = 15006;
/// Admin port: `/ready`, `/live`, `/metrics`, and the rewritten application probes.
pub const ADMIN_PORT: u16 = 15020;
/// Where the projected ServiceAccount token volume is mounted; the token is the file `token` inside.
pub const TOKEN_DIR: &str = "/var/run/secrets/meshlet.io";
/// Where the trust-anchor ConfigMap is mounted; the bundle is the file `ca.crt` inside.
pub const TRUST_ANCHORS_DIR: &str = "/var/run/meshlet.io/trust-anchors";

/// Why an injection could not even start.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The object has no pod spec where one must be.
    #[error("{0} is not a pod: it has no spec object")]
    NotAPod(String),
    /// `meshlet inject` input that is not YAML.
    #[error("document {index} is not valid YAML: {source}")]
    Yaml {
        /// Zero-based position of the document in the stream.
        index: usize,
        /// The parser's error.
        source: serde_yaml::Error,
    },
    /// The injection settings file could not be read.
    #[error("cannot read inject config {path}: {source}")]
    ReadConfig {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The injection settings file has a bad key or value.
    #[error("invalid inject config {path}: {source}")]
    ParseConfig {
        /// The file.
        path: String,
        /// The parser's error, naming the field.
        source: serde_yaml::Error,
    },
}

/// What the injector did with one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The init and proxy containers were added.
    Injected,
    /// The pod already had them: nothing changed.
    AlreadyInjected,
    /// `meshlet.io/inject: disabled` on the pod: nothing changed.
    Disabled,
    /// `hostNetwork: true`: the redirect would capture the node's traffic, so nothing changed.
    HostNetwork,
}

/// The result of [`inject_pod`].
#[derive(Debug, Clone)]
pub struct Injection {
    /// The pod (or pod template) after injection; equal to the input unless `outcome` is `Injected`.
    pub pod: Value,
    /// What happened.
    pub outcome: Outcome,
    /// One line per ignored annotation value or unrewritable probe, naming it.
    pub warnings: Vec<String>,
}

/// Injects the mesh into a pod or a pod template (`metadata` + `spec`). Pure: the same input and
/// settings always give the same output, and injecting the result again changes nothing.
pub fn inject_pod(pod: &Value, config: &InjectConfig) -> Result<Injection, InjectError> {
    let unchanged = |outcome, warnings| Injection {
        pod: pod.clone(),
        outcome,
        warnings,
    };
    let spec = pod
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| InjectError::NotAPod(describe(pod)))?;
    let empty = Map::new();
    let metadata = pod.get("metadata").and_then(Value::as_object);
    let annotations = string_map(metadata, "annotations").unwrap_or(&empty);
    let labels = string_map(metadata, "labels").unwrap_or(&empty);

    let mut warnings = Vec::new();
    let opt = [labels, annotations].map(|m| m.get(annotations::INJECT).and_then(Value::as_str));
    if opt.contains(&Some("disabled")) {
        return Ok(unchanged(Outcome::Disabled, warnings));
    }
    if already_injected(annotations, spec) {
        return Ok(unchanged(Outcome::AlreadyInjected, warnings));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        warnings.push(
            "hostNetwork pods are not injected: the redirect would capture the node's traffic"
                .into(),
        );
        return Ok(unchanged(Outcome::HostNetwork, warnings));
    }
    for value in opt.into_iter().flatten().filter(|v| *v != "enabled") {
        warnings.push(bad_annotation(
            annotations::INJECT,
            value,
            "expected enabled or disabled",
        ));
    }

    let settings = PodSettings::read(annotations, config, &mut warnings);
    let mut pod = pod.clone();
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Err(InjectError::NotAPod(describe(&pod)));
    };

    let mut probe_targets = BTreeMap::new();
    if settings.rewrite_app_probes {
        if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
            for container in containers.iter_mut() {
                probes::rewrite_container_probes(
                    container,
                    &settings.skip_inbound,
                    &mut probe_targets,
                    &mut warnings,
                );
            }
        }
    }
    let first_app_container = spec
        .get("containers")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);

    let init = init_container(config, &settings);
    let proxy = proxy_container(config, &settings, &probe_targets);
    if settings.native_sidecar {
        let init_containers = array_entry(spec, "initContainers");
        init_containers.insert(0, init);
        init_containers.insert(1, proxy);
    } else {
        array_entry(spec, "initContainers").insert(0, init);
        array_entry(spec, "containers").insert(0, proxy);
    }
    let volumes = array_entry(spec, "volumes");
    volumes.push(json!({
        "name": "meshlet-token",
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": config.token_audience,
            "expirationSeconds": config.token_expiration_seconds,
            "path": "token",
        }}]},
    }));
    volumes.push(json!({
        "name": "meshlet-trust-anchors",
        "configMap": {"name": config.trust_anchors_config_map},
    }));

    let metadata = object_entry(pod_object(&mut pod), "metadata");
    let annotations = object_entry(metadata, "annotations");
    annotations.insert(annotations::INJECTED.into(), json!("true"));
    if let Some(app) = first_app_container {
        annotations
            .entry("kubectl.kubernetes.io/default-container")
            .or_insert_with(|| json!(app));
    }
    object_entry(metadata, "labels").insert(annotations::MESHED_LABEL.into(), json!("true"));

    Ok(Injection {
        pod,
        outcome: Outcome::Injected,
        warnings,
    })
}

fn already_injected(annotations: &Map<String, Value>, spec: &Map<String, Value>) -> bool {
    let has_proxy = |field: &str| {
        spec.get(field)
            .and_then(Value::as_array)
            .is_some_and(|containers| {
                containers
                    .iter()
                    .any(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_CONTAINER))
            })
    };
    annotations.contains_key(annotations::INJECTED)
        || has_proxy("containers")
        || has_proxy("initContainers")
}

fn bad_annotation(name: &str, value: &str, reason: &str) -> String {
    format!("annotation {name}: ignoring value {value:?}: {reason}")
}

fn string_map<'a>(
    metadata: Option<&'a Map<String, Value>>,
    field: &str,
) -> Option<&'a Map<String, Value>> {
    metadata?.get(field)?.as_object()
}

/// `kind/name` (or `generateName`) for messages.
fn describe(object: &Value) -> String {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let metadata = object.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    format!("{kind}/{name}")
}

fn pod_object(pod: &mut Value) -> &mut Map<String, Value> {
    if !pod.is_object() {
        *pod = Value::Object(Map::new());
    }
    match pod {
        Value::Object(map) => map,
        _ => unreachable!("replaced by an object above"),
    }
}

/// The object at `map[key]`, created (or replaced, if it is not an object) as needed.
fn object_entry<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let entry = map.entry(key).or_insert_with(|| json!({}));
    pod_object(entry)
}

/// The array at `map[key]`, created (or replaced, if it is not an array) as needed.
fn array_entry<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Vec<Value> {
    let entry = map.entry(key).or_insert_with(|| json!([]));
    if !entry.is_array() {
        *entry = json!([]);
    }
    match entry {
        Value::Array(items) => items,
        _ => unreachable!("replaced by an array above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "annotations": annotations},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]}
        })
    }

    fn proxy(pod: &Value) -> &Value {
        let spec = &pod["spec"];
        spec["initContainers"]
            .as_array()
            .into_iter()
            .chain(spec["containers"].as_array())
            .flatten()
            .find(|c| c["name"] == PROXY_CONTAINER)
            .expect("proxy container")
    }

    #[test]
    fn native_sidecar_follows_the_init_container() {
        let out = inject_pod(&pod(json!({})), &InjectConfig::default()).unwrap();
        assert_eq!(out.outcome, Outcome::Injected);
        let init = out.pod["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init[0]["name"], INIT_CONTAINER);
        assert_eq!(init[1]["name"], PROXY_CONTAINER);
        assert_eq!(init[1]["restartPolicy"], "Always");
        assert_eq!(
            init[0]["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        assert_eq!(
            out.pod["metadata"]["annotations"][annotations::INJECTED],
            "true"
        );
    }

    #[test]
    fn regular_sidecar_is_first_and_holds_the_app() {
        let out = inject_pod(
            &pod(json!({annotations::NATIVE_SIDECAR: "false"})),
            &InjectConfig::default(),
        )
        .unwrap();
        let containers = out.pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers[0]["name"], PROXY_CONTAINER);
        assert!(containers[0]["lifecycle"]["postStart"]["exec"].is_object());
        assert_eq!(
            out.pod["spec"]["initContainers"].as_array().unwrap().len(),
            1
        );
    }

    #[test]
    fn disabled_host_network_and_injected_pods_are_left_alone() {
        let config = InjectConfig::default();
        let disabled = pod(json!({annotations::INJECT: "disabled"}));
        assert_eq!(
            inject_pod(&disabled, &config).unwrap().outcome,
            Outcome::Disabled
        );
        let mut host = pod(json!({}));
        host["spec"]["hostNetwork"] = json!(true);
        let out = inject_pod(&host, &config).unwrap();
        assert_eq!((out.outcome, &out.pod), (Outcome::HostNetwork, &host));
        let once = inject_pod(&pod(json!({})), &config).unwrap().pod;
        let twice = inject_pod(&once, &config).unwrap();
        assert_eq!(
            (twice.outcome, &twice.pod),
            (Outcome::AlreadyInjected, &once)
        );
    }

    #[test]
    fn annotations_override_defaults_and_bad_values_warn() {
        let out = inject_pod(
            &pod(json!({
                annotations::PROXY_CPU_REQUEST: "2",
                annotations::PROXY_CPU_LIMIT: "1",
                annotations::PROXY_MEMORY_LIMIT: "1Gi",
                annotations::PROXY_MEMORY_REQUEST: "lots",
                annotations::OPAQUE_PORTS: "9000-9001",
                annotations::SKIP_OUTBOUND_PORTS: "5432,99999",
            })),
            &InjectConfig::default(),
        )
        .unwrap();
        let proxy = proxy(&out.pod);
        assert_eq!(
            proxy["resources"],
            json!({"requests": {"memory": "32Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
        );
        let env: BTreeMap<&str, &Value> = proxy["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["name"].as_str()?, &e["value"])))
            .collect();
        assert_eq!(
            env["MESHLET_OPAQUE_PORTS"],
            "25,587,3306,4222,4444,5432,6379,9000,9001,9300,11211,27017"
        );
        assert_eq!(out.warnings.len(), 3, "{:?}", out.warnings);
        assert!(out
            .warnings
            .iter()
            .any(|w| w.contains("meshlet.io/proxy-memory-request") && w.contains("\"lots\"")));
        assert!(out
            .warnings
            .iter()
            .any(|w| w.contains("meshlet.io/skip-outbound-ports") && w.contains("99999")));
        assert!(out
            .warnings
            .iter()
            .any(|w| w.contains("meshlet.io/proxy-cpu-request") && w.contains("above")));
    }

    #[test]
    fn not_a_pod_is_an_error() {
        let err = inject_pod(
            &json!({"kind": "Pod", "metadata": {"name": "x"}}),
            &InjectConfig::default(),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "Pod/x is not a pod: it has no spec object");
    }
}
