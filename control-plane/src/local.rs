//! Local mode's source of the mesh: one YAML file (`--mesh-file`), the same schema as the sidecar's
//! `--mesh-config` ([`MeshConfig`]), watched for changes.
//!
//! The file is polled (its modification time and size every [`POLL_INTERVAL`], its content when they
//! change) rather than watched with inotify: it works the same on every filesystem and with every editor
//! (in-place writes, rename-over, ConfigMap symlink swaps), costs one `stat` per interval, and keeps a
//! change well within the one-second budget for reaching the sidecars.
//!
//! A bad edit is logged with the field and the value, counted in
//! `meshlet_control_mesh_file_reloads_total{result="invalid"}`, and the last good state stays in force. An
//! empty file is taken as a write in progress and skipped. Tools should replace the file atomically (write a
//! temporary file, then rename it over; Kubernetes does this for mounted ConfigMaps): a reader can otherwise
//! catch a partly written file that happens to be valid.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use meshlet::discovery::{DiscoveryError, MeshConfig};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::watch;

/// How often the mesh file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Why the mesh file could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Missing, unreadable or invalid: start-up fails, naming the flag and the path.
    #[error("invalid --mesh-file {path}: {source}", path = .path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// What is wrong with it (names the field and value for a schema error).
        source: DiscoveryError,
    },
    /// The reload counter could not be registered.
    #[error("cannot register the mesh file metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The mesh-wide policy defaults of a mesh file (cluster mode takes only these from it: the services come
/// from the cluster).
pub fn read_policy_defaults(
    path: &Path,
) -> Result<meshlet::policy::config::PolicyOverrides, LocalError> {
    MeshConfig::from_file(path)
        .map(|mesh| mesh.policy.defaults)
        .map_err(|source| LocalError::Load {
            path: path.to_path_buf(),
            source,
        })
}

/// The mesh of local mode: the file's content as a receiver, and the task that keeps it current (absent
/// without `--mesh-file`, whose mesh is empty and never changes).
pub fn open(
    path: Option<&Path>,
    registry: &Registry,
) -> Result<(watch::Receiver<MeshConfig>, Option<MeshFileWatch>), LocalError> {
    let Some(path) = path else {
        let (_, empty) = watch::channel(MeshConfig::default());
        return Ok((empty, None));
    };
    let reloads = IntCounterVec::new(
        Opts::new(
            "meshlet_control_mesh_file_reloads_total",
            "Changes of the --mesh-file seen, by result (applied, invalid).",
        ),
        &["result"],
    )?;
    registry.register(Box::new(reloads.clone()))?;
    let seen = fingerprint(path);
    let mesh = MeshConfig::from_file(path).map_err(|source| LocalError::Load {
        path: path.to_path_buf(),
        source,
    })?;
    tracing::info!(path = %path.display(), services = mesh.services.len(), "mesh file loaded");
    let (sender, receiver) = watch::channel(mesh);
    Ok((
        receiver,
        Some(MeshFileWatch {
            path: path.to_path_buf(),
            seen,
            sender,
            reloads,
        }),
    ))
}

/// Re-reads the mesh file when it changes and hands every good version to the receiver.
pub struct MeshFileWatch {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
    sender: watch::Sender<MeshConfig>,
    reloads: IntCounterVec,
}

impl MeshFileWatch {
    /// Polls until `stop` turns true; dropping the sender then tells the store the source is done.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = tick.tick() => self.check(),
            }
        }
    }

    fn check(&mut self) {
        let now = fingerprint(&self.path);
        if now == self.seen {
            return;
        }
        self.seen = now;
        // An editor that rewrites the file in place empties it first; an empty file is a write in progress,
        // not a request to empty the mesh (that is `services: []`).
        if now.is_some_and(|(_, len)| len == 0) {
            tracing::debug!(path = %self.path.display(), "mesh file is empty; waiting for its content");
            return;
        }
        match MeshConfig::from_file(&self.path) {
            Ok(mesh) => {
                self.reloads.with_label_values(&["applied"]).inc();
                tracing::info!(path = %self.path.display(), services = mesh.services.len(), "mesh file reloaded");
                self.sender.send_replace(mesh);
            }
            Err(error) => {
                self.reloads.with_label_values(&["invalid"]).inc();
                tracing::warn!(
                    path = %self.path.display(),
                    %error,
                    "mesh file change refused; the last good state stays in force"
                );
            }
        }
    }
}

/// Modification time and size, the cheap sign that a file changed (`None`: cannot be read).
fn fingerprint(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> String {
        format!(
            "services:\n  - {{name: {name}, identity: 'spiffe://cluster.local/ns/x/sa/{name}'}}\n"
        )
    }

    fn reloads(registry: &Registry, result: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|family| family.name() == "meshlet_control_mesh_file_reloads_total")
            .flat_map(|family| family.get_metric().iter())
            .filter(|m| m.get_label().iter().any(|l| l.value() == result))
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    #[test]
    fn no_file_is_an_empty_mesh_and_a_missing_file_names_the_flag_and_path() {
        let registry = Registry::new();
        let (mesh, watch) = open(None, &registry).unwrap();
        assert_eq!(*mesh.borrow(), MeshConfig::default());
        assert!(watch.is_none());
        let err = open(Some(Path::new("/nonexistent/mesh.yaml")), &Registry::new())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("--mesh-file") && err.contains("/nonexistent/mesh.yaml"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn edits_are_followed_and_a_bad_edit_keeps_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, service("a")).unwrap();
        let registry = Registry::new();
        let (mut mesh, watch) = open(Some(&path), &registry).unwrap();
        assert_eq!(mesh.borrow_and_update().services[0].name, "a");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(watch.unwrap().run(stopped));

        std::fs::write(&path, service("bb")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), mesh.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(mesh.borrow_and_update().services[0].name, "bb");

        std::fs::write(
            &path,
            "services:\n  - {name: c, identity: 'spiffe://x/ns/a/sa/c', inbound: {mode: lax}}\n",
        )
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while reloads(&registry, "invalid") == 0 {
            assert!(tokio::time::Instant::now() < deadline, "bad edit not seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!mesh.has_changed().unwrap());
        assert_eq!(mesh.borrow().services[0].name, "bb");
        assert_eq!(reloads(&registry, "applied"), 1);

        // An emptied file (an in-place rewrite under way) is neither applied nor an error.
        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(4 * POLL_INTERVAL).await;
        assert!(!mesh.has_changed().unwrap());
        assert_eq!(reloads(&registry, "invalid"), 1);

        stop.send(true).unwrap();
        task.await.unwrap();
        // The sender went with the task: the store's follower sees the source end.
        assert!(mesh.changed().await.is_err());
    }
}
