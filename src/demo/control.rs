//! The demo's control plane: `meshlet-control` in local mode as a child process (the proxy binary carries no
//! Kubernetes client, so the control plane is never linked into it), a join token per pod, and the mesh file
//! that tells every sidecar which destinations are meshed and what identity each must prove.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::Child;

use super::{admin_get, Pod, Role};

const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "shop";
pub(crate) const API_ADDR: &str = "127.0.0.1:18443";
pub(crate) const ADMIN_ADDR: &str = "127.0.0.1:19990";

/// The identity flags of a pod's sidecar.
pub(crate) type SidecarFlags = Box<dyn Fn(&Pod) -> Vec<String> + Send + Sync>;

/// A running control plane and the identity flags of each pod's sidecar.
pub(crate) struct ControlPlane {
    pub child: Child,
    pub sidecar_flags: SidecarFlags,
}

fn identity(pod: &Pod) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{}", pod.name)
}

fn token(pod: &Pod) -> String {
    format!("demo-join-token-{}", pod.name)
}

/// Starts the control plane with a join token per pod and waits until it is ready.
pub(crate) async fn start(
    binary: &Path,
    pods: &[Pod],
    workdir: &Path,
    mesh_file: &Path,
) -> anyhow::Result<ControlPlane> {
    let mut tokens = String::new();
    for pod in pods {
        let _ = writeln!(
            tokens,
            "- token: {}\n  identity: {}",
            token(pod),
            identity(pod)
        );
    }
    let tokens_file = workdir.join("join-tokens.yaml");
    std::fs::write(&tokens_file, tokens).context("writing the demo join tokens")?;
    let data_dir = workdir.join("ca");
    let child = super::child_command(binary)
        .args([
            "serve",
            "--mode",
            "local",
            "--trust-domain",
            TRUST_DOMAIN,
            "--cert-ttl",
            "1h",
        ])
        .args([
            "--api-addr",
            API_ADDR,
            "--admin-addr",
            ADMIN_ADDR,
            "--log",
            "warn",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--join-tokens")
        .arg(&tokens_file)
        .args(control_plane_mesh_flags(mesh_file))
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let admin: SocketAddr = ADMIN_ADDR.parse()?;
    let mut ready = false;
    for _ in 0..100 {
        if admin_get(admin, "/ready")
            .await
            .is_ok_and(|rsp| rsp.starts_with("HTTP/1.1 200"))
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        bail!("the control plane did not become ready at http://{ADMIN_ADDR}/ready (is another demo running?)");
    }
    let anchors = data_dir.join("ca.crt").display().to_string();
    let sidecar_flags = Box::new(move |pod: &Pod| {
        [
            "--control-plane-addr",
            API_ADDR,
            "--control-plane-name",
            "localhost",
            "--trust-anchors",
            &anchors,
            "--trust-domain",
            TRUST_DOMAIN,
            "--namespace",
            NAMESPACE,
            "--service-account",
            pod.name,
            "--join-token",
            &token(pod),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    });
    Ok(ControlPlane {
        child,
        sidecar_flags,
    })
}

/// What the control plane is told about the mesh file: to watch it and push every change to the sidecars
/// over their discovery watch (within a second, without restarting anything).
pub(crate) fn control_plane_mesh_flags(mesh_file: &Path) -> Vec<OsString> {
    vec!["--mesh-file".into(), mesh_file.into()]
}

/// Where every sidecar gets its mesh state (services, endpoints, identities, policies) from: the control
/// plane's discovery watch when there is a control plane, else (the plaintext fallback) the mesh file
/// itself, re-read by each sidecar when it changes.
pub(crate) fn mesh_state_flags(mesh_file: &Path, with_control_plane: bool) -> Vec<OsString> {
    if with_control_plane {
        Vec::new()
    } else {
        vec!["--mesh-config".into(), mesh_file.into()]
    }
}

/// The shop's per-service resilience policies, keyed by the destination service's name (what its callers'
/// sidecars apply). Payment is flaky, so order's sidecar retries it with an injected Idempotency-Key and
/// payment's sidecar de-duplicates: a retried charge is answered, never applied twice.
const POLICY: &str = "policy:
  defaults:
    timeouts: {request: 10s}
  services:
    order:
      # the saga: up to a 3 s charge, then its compensations
      timeouts: {request: 20s}
      retries: {max_attempts: 1}
      breaker: {consecutive_failures: 20}
    inventory:
      timeouts: {request: 2s, per_try: 500ms}
      retries: {max_attempts: 3}
    payment:
      timeouts: {request: 3s, per_try: 250ms}
      retries: {max_attempts: 4, backoff: {base: 20ms, max: 200ms}}
      idempotency: {inject: true, enforce: true}
      breaker: {consecutive_failures: 5, base_ejection: 1s, max_ejection: 4s}
      routes:
        - method: POST
          path_prefix: /voids
          overrides: {timeouts: {per_try: 1s}}
    customer:
      timeouts: {request: 1s, per_try: 300ms}
    shipping:
      timeouts: {request: 1s, per_try: 300ms}
";

/// The mesh file: every pod that serves something is a service whose one endpoint is its app (or Redis),
/// reached through its sidecar. With identities on, every inbound is strict: plaintext is refused.
pub(crate) fn mesh_yaml(pods: &[Pod], strict: bool) -> String {
    let mode = if strict { "strict" } else { "permissive" };
    let mut yaml = String::from(POLICY);
    yaml.push_str("services:\n");
    for pod in pods {
        let Some(app) = pod.app_addr() else { continue };
        // Redis is opaque TCP (`meshlet/tcp` between the sidecars); the apps speak HTTP/1.1.
        let protocol = match pod.role {
            Role::Redis => "opaque",
            _ => "http",
        };
        let _ = write!(
            yaml,
            "  - name: {}\n    identity: {}\n    ports: [{{port: {}, protocol: {protocol}}}]\n    endpoints:\n      - address: '{app}'\n        sidecar: '{}'\n    inbound:\n      mode: {mode}\n      allow: ['ns/{NAMESPACE}/*']\n",
            pod.name,
            identity(pod),
            app.port(),
            SocketAddr::new(pod.ip, 15006),
        );
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::MeshConfig;

    #[test]
    fn the_mesh_file_is_valid_and_lists_every_serving_pod_with_its_policy() {
        let pods = crate::demo::pods(true);
        let yaml = mesh_yaml(&pods, true);
        let config = MeshConfig::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "api-gateway",
                "order",
                "inventory",
                "payment",
                "customer",
                "shipping",
                "redis"
            ]
        );
        assert!(config.policy.services.contains_key("payment"));
        let redis = &config.services[6];
        assert_eq!(
            redis.ports[0].protocol,
            Some(crate::discovery::PortProtocol::Opaque)
        );
        assert_eq!(redis.ports[0].port, 6379);
        assert_eq!(
            config
                .policy
                .resolve("payment")
                .default
                .retries
                .max_attempts,
            4
        );
    }
}
