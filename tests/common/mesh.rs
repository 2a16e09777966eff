//! A local mesh for end-to-end tests: a real `meshlet-control` issuing certificates, sidecars with
//! identities, and mesh files.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::*;

/// The control-plane binary, built beside `meshlet` by `cargo build --workspace`.
pub fn control_plane_binary() -> Option<PathBuf> {
    let path = Path::new(MESHLET).with_file_name("meshlet-control");
    path.exists().then_some(path)
}

/// A local-mode `meshlet-control` child process, killed on drop.
pub struct ControlPlane {
    pub child: Child,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub trust_anchors: PathBuf,
    pub _dir: TempDir,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "meshlet-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.0.as_os_str().is_empty() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub const TRUST_DOMAIN: &str = "cluster.local";

pub fn identity(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

pub fn start_control_plane(binary: &Path, workloads: &[(&str, &str)]) -> ControlPlane {
    let dir = TempDir::new("cp");
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    ControlPlane::launch(binary, workloads, "1h", api, admin, dir)
}

impl ControlPlane {
    /// Starts `meshlet-control` in local mode with its CA in `dir` (reused if already there).
    pub fn launch(
        binary: &Path,
        workloads: &[(&str, &str)],
        ttl: &str,
        api: SocketAddr,
        admin: SocketAddr,
        dir: TempDir,
    ) -> ControlPlane {
        Self::launch_with(binary, workloads, ttl, api, admin, dir, &[])
    }

    /// Like [`ControlPlane::launch`] with `extra` flags (e.g. `--mesh-file`); the log is appended to
    /// [`ControlPlane::log_file`].
    pub fn launch_with(
        binary: &Path,
        workloads: &[(&str, &str)],
        ttl: &str,
        api: SocketAddr,
        admin: SocketAddr,
        dir: TempDir,
        extra: &[&str],
    ) -> ControlPlane {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.0.join("control-plane.log"))
            .unwrap();
        let tokens: String = workloads
            .iter()
            .map(|(ns, sa)| {
                format!(
                    "- token: token-{ns}-{sa}\n  identity: {}\n",
                    identity(ns, sa)
                )
            })
            .collect();
        let tokens_file = dir.0.join("tokens.yaml");
        std::fs::write(&tokens_file, tokens).unwrap();
        let child = Command::new(binary)
            .args([
                "serve",
                "--mode",
                "local",
                "--trust-domain",
                TRUST_DOMAIN,
                "--cert-ttl",
                ttl,
            ])
            .args([
                "--api-addr",
                &api.to_string(),
                "--admin-addr",
                &admin.to_string(),
            ])
            .arg("--data-dir")
            .arg(dir.0.join("ca"))
            .arg("--join-tokens")
            .arg(&tokens_file)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = raw_request(
                admin,
                b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            );
            if ready.map(|r| r.status == 200).unwrap_or(false) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "control plane did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let trust_anchors = dir.0.join("ca").join("ca.crt");
        assert!(
            trust_anchors.exists(),
            "local CA did not write {}",
            trust_anchors.display()
        );
        ControlPlane {
            child,
            api,
            admin,
            trust_anchors,
            _dir: dir,
        }
    }

    /// Where the control plane's log lines go.
    pub fn log_file(&self) -> PathBuf {
        self._dir.0.join("control-plane.log")
    }

    /// The control plane's own metrics.
    pub fn metrics(&self) -> String {
        let rsp = raw_request(
            self.admin,
            b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        String::from_utf8_lossy(&rsp.body).into_owned()
    }

    /// Certificates issued so far, from the control plane's own metrics.
    pub fn issued(&self) -> f64 {
        let rsp = raw_request(
            self.admin,
            b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        sum_metric(
            &String::from_utf8_lossy(&rsp.body),
            "meshlet_control_certificates_issued_total",
            &[],
        )
    }

    /// Stops the process and hands back its data directory, so a restart reuses the same CA.
    pub fn stop(mut self) -> TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self._dir, TempDir(PathBuf::new()))
    }
}

/// A sidecar with the identity `ns/sa`, the mesh described by `mesh_file`.
pub fn start_sidecar(
    cp: &ControlPlane,
    mesh_file: &Path,
    inbound: SocketAddr,
    ns: &str,
    sa: &str,
) -> Proxy {
    start_sidecar_with(
        cp,
        inbound,
        ns,
        sa,
        &["--mesh-config", mesh_file.to_str().unwrap()],
    )
}

/// A sidecar with the identity `ns/sa` and `extra` flags; without `--mesh-config` it follows the control
/// plane's discovery watch.
pub fn start_sidecar_with(
    cp: &ControlPlane,
    inbound: SocketAddr,
    ns: &str,
    sa: &str,
    extra: &[&str],
) -> Proxy {
    let token = format!("token-{ns}-{sa}");
    let api = cp.api.to_string();
    let mut args = vec![
        "--control-plane-addr",
        &api,
        "--control-plane-name",
        "localhost",
        "--trust-anchors",
        cp.trust_anchors.to_str().unwrap(),
        "--trust-domain",
        TRUST_DOMAIN,
        "--namespace",
        ns,
        "--service-account",
        sa,
        "--join-token",
        &token,
    ];
    args.extend_from_slice(extra);
    Proxy::start_at(inbound, &args)
}

/// Writes a mesh file with one service, `server`, whose endpoints are `apps` behind `server_inbound`.
pub fn mesh_file(
    dir: &TempDir,
    server_identity: &str,
    apps: &[SocketAddr],
    server_inbound: SocketAddr,
) -> PathBuf {
    let endpoints: String = apps
        .iter()
        .map(|a| format!("      - {{address: '{a}', sidecar: '{server_inbound}'}}\n"))
        .collect();
    let path = dir.0.join("mesh.yaml");
    std::fs::write(&path, format!("services:\n  - name: server\n    identity: {server_identity}\n    endpoints:\n{endpoints}")).unwrap();
    path
}

/// A sidecar whose inbound listener nobody dials (a pure client), on free ports.
pub fn start_client_sidecar(cp: &ControlPlane, mesh_file: &Path, ns: &str, sa: &str) -> Proxy {
    let inbound = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    start_sidecar(cp, mesh_file, inbound, ns, sa)
}

/// `GET http://{app}/` through an explicit-proxy outbound listener, off the async runtime.
pub async fn get_through(outbound: SocketAddr, app: SocketAddr) -> RawResponse {
    let req = format!("GET http://{app}/ HTTP/1.1\r\nHost: {app}\r\nConnection: close\r\n\r\n");
    tokio::task::spawn_blocking(move || raw_request(outbound, req.as_bytes()).unwrap())
        .await
        .unwrap()
}
