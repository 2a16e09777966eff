//! The demo's control plane: `meshlet-control` in local mode as a child process (the proxy binary carries no
//! Kubernetes client, so the control plane is never linked into it), a join token per pod, and the mesh file
//! that tells every sidecar which destinations are meshed and what identity each must prove.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use super::{admin_get, Pod};

const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "shop";
const API_ADDR: &str = "127.0.0.1:18443";
const ADMIN_ADDR: &str = "127.0.0.1:19990";

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
    let child = Command::new(binary)
        .args([
            "serve",
            "--mode",
            "local",
            "--trust-domain",
            TRUST_DOMAIN,
            "--cert-ttl",
            "1h",
        ])
        .args(["--api-addr", API_ADDR, "--admin-addr", ADMIN_ADDR])
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--join-tokens")
        .arg(&tokens_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
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

/// The shop's resilience policies: payment is flaky, so order's sidecar retries it with an injected
/// Idempotency-Key and payment's sidecar de-duplicates, so a retried charge is answered, never applied twice.
const POLICY: &str = "policy:
  services:
    payment:
      timeouts: {request: 3s, per_try: 250ms}
      retries: {max_attempts: 4, backoff: {base: 20ms, max: 200ms}}
      idempotency: {inject: true, enforce: true}
    inventory:
      timeouts: {request: 2s, per_try: 500ms}
      retries: {max_attempts: 2}
";

/// The mesh file: every app pod is a service whose one endpoint is its app, reached through its sidecar.
pub(crate) fn mesh_yaml(pods: &[Pod], app_port: u16) -> String {
    let mut yaml = String::from(POLICY);
    yaml.push_str("services:\n");
    for pod in pods.iter().filter(|p| p.service.is_some()) {
        let _ = write!(
            yaml,
            "  - name: {}\n    identity: {}\n    endpoints:\n      - address: '{}'\n        sidecar: '{}'\n    inbound:\n      mode: permissive\n      allow: ['ns/{NAMESPACE}/*']\n",
            pod.name,
            identity(pod),
            SocketAddr::new(pod.ip, app_port),
            SocketAddr::new(pod.ip, 15006),
        );
    }
    yaml
}
