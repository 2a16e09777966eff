//! Rewriting the application's HTTP probes so they pass through the proxy's admin port.
//!
//! Why rewrite rather than exempt the probe ports: the kubelet probes the pod IP in plaintext, which a
//! service in strict mTLS mode refuses, and exempting the port (skip-inbound-ports) would also let every
//! other plaintext caller reach the application on it. So, as Istio does, each `httpGet` probe is pointed
//! at the admin port (`/app-health/<container>/<livez|readyz|startupz>` on 15020), which is never
//! redirected, and the original target is handed to the proxy in `MESHLET_APP_PROBES`; the proxy's admin
//! server calls the application on `127.0.0.1:<port><path>` and answers with its status.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::values::PortRange;
use super::ADMIN_PORT;

/// Environment variable of the proxy container holding the rewritten probes: a JSON object from admin
/// path (`/app-health/<container>/<livez|readyz|startupz>`) to [`ProbeTarget`]; read it with
/// [`app_probes`].
pub const APP_PROBES_ENV: &str = "MESHLET_APP_PROBES";

/// Where the proxy's admin server sends one rewritten probe: the application's original `httpGet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeTarget {
    /// Application port (named ports are resolved at injection).
    pub port: u16,
    /// Original path, `/` when the probe had none.
    pub path: String,
    /// `HTTP` or `HTTPS` (HTTPS: the proxy does not verify the application's certificate, as the
    /// kubelet does not).
    pub scheme: String,
    /// The probe's extra request headers, sent unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<Value>,
}

/// Parses the value of [`APP_PROBES_ENV`] (the admin server's side of the contract).
pub fn app_probes(value: &str) -> Result<BTreeMap<String, ProbeTarget>, serde_json::Error> {
    serde_json::from_str(value)
}

/// The probe fields of a container and the name each gets in the admin path.
const PROBES: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// Rewrites the `httpGet` probes of one application container in place. Returns the rewritten targets
/// keyed by admin path, and warnings for probes that cannot be rewritten (they are left as they were).
pub fn rewrite_container_probes(
    container: &mut Value,
    skip_inbound: &[PortRange],
    targets: &mut BTreeMap<String, ProbeTarget>,
    warnings: &mut Vec<String>,
) {
    let name = container
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let ports = container.get("ports").cloned().unwrap_or(Value::Null);
    for (field, kind) in PROBES {
        let Some(probe) = container.get_mut(field).and_then(Value::as_object_mut) else {
            continue;
        };
        if probe.contains_key("grpc") {
            warnings.push(format!(
                "container {name}: the gRPC {field} is not rewritten; it fails when the service is in strict mTLS \
                 mode unless its port is listed in meshlet.io/skip-inbound-ports"
            ));
            continue;
        }
        let Some(http_get) = probe.get("httpGet").and_then(Value::as_object) else {
            continue;
        };
        if http_get
            .get("host")
            .and_then(Value::as_str)
            .is_some_and(|h| !h.is_empty())
        {
            // The kubelet probes another host: the pod's proxy is not on that path.
            continue;
        }
        let Some(port) = resolve_port(http_get.get("port"), &ports) else {
            warnings.push(format!(
                "container {name}: {field} port {} is not a port of the container; probe not rewritten",
                http_get.get("port").unwrap_or(&Value::Null)
            ));
            continue;
        };
        if skip_inbound.iter().any(|r| r.contains(port)) {
            continue;
        }
        let admin_path = format!("/app-health/{name}/{kind}");
        let target = ProbeTarget {
            port,
            path: http_get
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("/")
                .to_owned(),
            scheme: http_get
                .get("scheme")
                .and_then(Value::as_str)
                .unwrap_or("HTTP")
                .to_owned(),
            headers: http_get
                .get("httpHeaders")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        };
        probe.insert(
            "httpGet".into(),
            json!({ "path": admin_path, "port": ADMIN_PORT, "scheme": "HTTP" }),
        );
        targets.insert(admin_path, target);
    }
}

/// A probe port is a number or the name of one of the container's ports.
fn resolve_port(port: Option<&Value>, container_ports: &Value) -> Option<u16> {
    match port? {
        Value::Number(n) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0),
        Value::String(name) => container_ports
            .as_array()?
            .iter()
            .filter_map(Value::as_object)
            .find(|p: &&Map<String, Value>| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| p.get("containerPort"))
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(
        container: &mut Value,
        skip: &[PortRange],
    ) -> (BTreeMap<String, ProbeTarget>, Vec<String>) {
        let mut targets = BTreeMap::new();
        let mut warnings = Vec::new();
        rewrite_container_probes(container, skip, &mut targets, &mut warnings);
        (targets, warnings)
    }

    #[test]
    fn http_probes_go_through_the_admin_port() {
        let mut c = json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 3},
            "readinessProbe": {"httpGet": {"port": 8080, "scheme": "HTTPS",
                               "httpHeaders": [{"name": "X-Probe", "value": "1"}]}},
            "startupProbe": {"tcpSocket": {"port": 8080}}
        });
        let (targets, warnings) = rewrite(&mut c, &[]);
        assert!(warnings.is_empty());
        assert_eq!(
            c["livenessProbe"]["httpGet"],
            json!({"path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP"})
        );
        assert_eq!(c["livenessProbe"]["periodSeconds"], 3);
        assert_eq!(c["startupProbe"], json!({"tcpSocket": {"port": 8080}}));
        let live = &targets["/app-health/web/livez"];
        assert_eq!(
            (live.port, live.path.as_str(), live.scheme.as_str()),
            (8080, "/healthz", "HTTP")
        );
        let round_trip = app_probes(&serde_json::to_string(&targets).unwrap()).unwrap();
        assert_eq!(round_trip, targets);
        let ready = &targets["/app-health/web/readyz"];
        assert_eq!(
            (
                ready.path.as_str(),
                ready.scheme.as_str(),
                ready.headers.len()
            ),
            ("/", "HTTPS", 1)
        );
    }

    #[test]
    fn unknown_named_ports_warn_and_skipped_ports_stay() {
        let mut c = json!({
            "name": "web",
            "livenessProbe": {"httpGet": {"path": "/", "port": "nope"}},
            "readinessProbe": {"httpGet": {"path": "/", "port": 9000}},
            "startupProbe": {"grpc": {"port": 9000}}
        });
        let before = c.clone();
        let (targets, warnings) = rewrite(
            &mut c,
            &[PortRange {
                first: 9000,
                last: 9000,
            }],
        );
        assert_eq!(c, before);
        assert!(targets.is_empty());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("\"nope\""));
    }
}
