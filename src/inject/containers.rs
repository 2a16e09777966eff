//! The injected containers and the per-pod settings they are built from.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::probes::ProbeTarget;
use super::values::{expand_ports, format_port_list, parse_port_list, parse_quantity, PortRange};
use super::{annotations, bad_annotation, InjectConfig, ProxyResources};
use super::{
    ADMIN_PORT, INBOUND_PORT, INIT_CONTAINER, OUTBOUND_PORT, PROXY_CONTAINER, PROXY_UID, TOKEN_DIR,
    TRUST_ANCHORS_DIR,
};

/// The per-pod settings: mesh-wide defaults overridden by valid annotations.
pub(super) struct PodSettings {
    resources: Value,
    /// Inbound ports that bypass the proxy (probes on them need no rewriting).
    pub(super) skip_inbound: Vec<PortRange>,
    skip_outbound: Vec<PortRange>,
    opaque_ports: Vec<u16>,
    /// Proxy as a native sidecar or as the first regular container.
    pub(super) native_sidecar: bool,
    /// Rewrite the application's HTTP probes through the admin port.
    pub(super) rewrite_app_probes: bool,
}

impl PodSettings {
    pub(super) fn read(
        annotations: &Map<String, Value>,
        config: &InjectConfig,
        warnings: &mut Vec<String>,
    ) -> Self {
        let get = |name: &str| annotations.get(name).and_then(Value::as_str);
        let mut ports = |name: &str| match get(name).map(|v| (v, parse_port_list(v))) {
            None => Vec::new(),
            Some((_, Ok(ranges))) => ranges,
            Some((value, Err(reason))) => {
                warnings.push(bad_annotation(name, value, &reason));
                Vec::new()
            }
        };
        let skip_inbound = ports(annotations::SKIP_INBOUND_PORTS);
        let skip_outbound = ports(annotations::SKIP_OUTBOUND_PORTS);
        let opaque = ports(annotations::OPAQUE_PORTS);

        let mesh_opaque = parse_port_list(&config.opaque_ports).unwrap_or_default();
        let all_opaque: Vec<PortRange> = mesh_opaque.iter().chain(&opaque).copied().collect();
        let opaque_ports = match expand_ports(&all_opaque) {
            Ok(ports) => ports,
            Err(reason) => {
                let value = get(annotations::OPAQUE_PORTS).unwrap_or_default();
                warnings.push(bad_annotation(annotations::OPAQUE_PORTS, value, &reason));
                expand_ports(&mesh_opaque).unwrap_or_default()
            }
        };

        let mut flag = |name: &str, default: bool| match get(name) {
            None => default,
            Some("true") => true,
            Some("false") => false,
            Some(value) => {
                warnings.push(bad_annotation(name, value, "expected true or false"));
                default
            }
        };
        let native_sidecar = flag(annotations::NATIVE_SIDECAR, config.native_sidecar);
        let rewrite_app_probes = flag(annotations::REWRITE_APP_PROBES, config.rewrite_app_probes);

        PodSettings {
            resources: resources(annotations, &config.proxy_resources, warnings),
            skip_inbound,
            skip_outbound,
            opaque_ports,
            native_sidecar,
            rewrite_app_probes,
        }
    }
}

/// The proxy's `resources`: each annotation that is a valid quantity overrides the default, and a
/// request above its limit is dropped (the API server would reject the pod).
fn resources(
    annotations: &Map<String, Value>,
    defaults: &ProxyResources,
    warnings: &mut Vec<String>,
) -> Value {
    let mut pick = |name: &str, default: &Option<String>| -> Option<(String, f64)> {
        if let Some(value) = annotations.get(name).and_then(Value::as_str) {
            match parse_quantity(value) {
                Ok(amount) => return Some((value.to_owned(), amount)),
                Err(reason) => warnings.push(bad_annotation(name, value, &reason)),
            }
        }
        let value = default.clone()?;
        let amount = parse_quantity(&value).ok()?;
        Some((value, amount))
    };
    let cpu = (
        pick(annotations::PROXY_CPU_REQUEST, &defaults.cpu_request),
        pick(annotations::PROXY_CPU_LIMIT, &defaults.cpu_limit),
    );
    let memory = (
        pick(annotations::PROXY_MEMORY_REQUEST, &defaults.memory_request),
        pick(annotations::PROXY_MEMORY_LIMIT, &defaults.memory_limit),
    );
    let mut requests = Map::new();
    let mut limits = Map::new();
    for (resource, (request, limit), annotation) in [
        ("cpu", cpu, annotations::PROXY_CPU_REQUEST),
        ("memory", memory, annotations::PROXY_MEMORY_REQUEST),
    ] {
        let request = match (request, &limit) {
            (Some((value, amount)), Some((limit_value, limit_amount)))
                if amount > *limit_amount =>
            {
                warnings.push(bad_annotation(
                    annotation,
                    &value,
                    &format!("above the {resource} limit {limit_value}; request left unset"),
                ));
                None
            }
            (request, _) => request,
        };
        if let Some((value, _)) = request {
            requests.insert(resource.into(), json!(value));
        }
        if let Some((value, _)) = limit {
            limits.insert(resource.into(), json!(value));
        }
    }
    let mut resources = Map::new();
    if !requests.is_empty() {
        resources.insert("requests".into(), Value::Object(requests));
    }
    if !limits.is_empty() {
        resources.insert("limits".into(), Value::Object(limits));
    }
    Value::Object(resources)
}

pub(super) fn init_container(config: &InjectConfig, settings: &PodSettings) -> Value {
    // `meshlet init` never redirects the proxy's own ports (admin included), so only the pod's go here.
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--admin-port".into(),
        ADMIN_PORT.to_string(),
        "--iptables-mode".into(),
        config.iptables_mode.as_str().into(),
    ];
    for (flag, ports) in [
        ("--skip-inbound-ports", &settings.skip_inbound),
        ("--skip-outbound-ports", &settings.skip_outbound),
    ] {
        if !ports.is_empty() {
            args.push(flag.into());
            args.push(format_port_list(ports));
        }
    }
    json!({
        "name": INIT_CONTAINER,
        "image": config.proxy_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            // iptables writes its lock file under /run.
            "readOnlyRootFilesystem": false,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
    })
}

pub(super) fn proxy_container(
    config: &InjectConfig,
    settings: &PodSettings,
    probe_targets: &BTreeMap<String, ProbeTarget>,
) -> Value {
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let opaque_ports = settings
        .opaque_ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut env = vec![
        json!({"name": "MESHLET_POD_NAME", "valueFrom": field("metadata.name")}),
        json!({"name": "MESHLET_POD_NAMESPACE", "valueFrom": field("metadata.namespace")}),
        json!({"name": "MESHLET_POD_SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")}),
        json!({"name": "MESHLET_POD_IP", "valueFrom": field("status.podIP")}),
        json!({"name": "MESHLET_CONTROL_PLANE_ADDR", "value": config.control_plane_addr}),
        json!({"name": "MESHLET_CONTROL_PLANE_NAME", "value": config.control_plane_name}),
        json!({"name": "MESHLET_TRUST_DOMAIN", "value": config.trust_domain}),
        json!({"name": "MESHLET_TRUST_ANCHORS", "value": format!("{TRUST_ANCHORS_DIR}/ca.crt")}),
        json!({"name": "MESHLET_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token")}),
        json!({"name": "MESHLET_OPAQUE_PORTS", "value": opaque_ports}),
        json!({"name": "MESHLET_LOG", "value": config.log_level}),
        json!({"name": "MESHLET_LOG_FORMAT", "value": config.log_format}),
    ];
    if !probe_targets.is_empty() {
        let targets = serde_json::to_string(probe_targets).unwrap_or_default();
        env.push(json!({"name": super::probes::APP_PROBES_ENV, "value": targets}));
    }
    let admin_get = |path: &str| json!({"httpGet": {"path": path, "port": ADMIN_PORT}});
    let mut container = json!({
        "name": PROXY_CONTAINER,
        "image": config.proxy_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": ["proxy"],
        "ports": [
            {"name": "meshlet-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP"},
            {"name": "meshlet-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "env": env,
        "resources": settings.resources,
        "readinessProbe": merge(admin_get("/ready"), json!({"periodSeconds": 2, "failureThreshold": 3})),
        "livenessProbe": merge(admin_get("/live"), json!({"periodSeconds": 10, "failureThreshold": 3})),
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "meshlet-token", "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": "meshlet-trust-anchors", "mountPath": TRUST_ANCHORS_DIR, "readOnly": true},
        ],
    });
    let extra = if settings.native_sidecar {
        // The kubelet starts the next init container (and then the app) once this probe passes.
        json!({
            "restartPolicy": "Always",
            "startupProbe": merge(admin_get("/ready"), json!({"periodSeconds": 1, "failureThreshold": 120})),
        })
    } else {
        // The kubelet starts the next container only after this hook returns.
        json!({"lifecycle": {"postStart": {"exec": {"command": ["meshlet", "wait-ready", "--timeout", "120s"]}}}})
    };
    merge(container.take(), extra)
}

/// Shallow merge of two JSON objects (`extra` wins).
fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(base_map), Value::Object(extra_map)) = (base.as_object_mut(), extra) {
        base_map.extend(extra_map);
    }
    base
}
