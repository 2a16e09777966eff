//! The discovery watch protocol, shared by the control plane (which sends) and the sidecar (which follows):
//! newline-delimited JSON messages on one long-lived HTTP/2 response (`GET /v1/mesh/watch`).
//!
//! Why JSON lines over HTTP/2 rather than gRPC: the sidecar already speaks HTTP/2 and JSON, so the watch
//! costs no code generation, no protobuf runtime and no extra build time, and an operator can read the
//! stream with `curl`. The mesh schema is [`MeshConfig`] itself, so the wire and the YAML file never drift.
//!
//! A stream starts with a [`WatchMessage::Snapshot`] (the whole mesh), then carries a
//! [`WatchMessage::Delta`] per change (services and per-service policies upserted or removed by name),
//! and a [`WatchMessage::Heartbeat`] every [`HEARTBEAT_INTERVAL`] so a silent, dead stream is noticed.
//! Each state has a version; a delta names the version it applies to (`base`), and a follower that is not
//! at `base` drops the stream and resyncs from a fresh snapshot. See `docs/control-plane-protocol.md`.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{MeshConfig, ServiceConfig};
use crate::policy::config::{PolicyOverrides, ServiceConfig as ServicePolicyConfig};

/// Where sidecars open the watch on the control plane's API listener.
pub const WATCH_PATH: &str = "/v1/mesh/watch";

/// Largest message (one line, newline excluded) either side accepts: a mesh whose snapshot is larger is
/// refused by the control plane's store, and a longer line ends the stream on the sidecar.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// How often the control plane sends a heartbeat on an otherwise quiet stream.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// The content type of the stream.
pub const CONTENT_TYPE: &str = "application/x-ndjson";

/// One line of the watch stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WatchMessage {
    /// The whole mesh at `version`: the first message of every stream, and a fallback when a change cannot be
    /// expressed as a delta.
    Snapshot {
        /// The state's version.
        version: u64,
        /// The state.
        mesh: MeshConfig,
    },
    /// The change from version `base` to `version`.
    Delta(Delta),
    /// Nothing changed; the stream is alive and the control plane is at `version`.
    Heartbeat {
        /// The version the control plane is at.
        version: u64,
    },
    /// A message type this sidecar does not know (a newer control plane): ignored.
    #[serde(other)]
    Unknown,
}

/// What changed between two versions, by service name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// The version this delta produces.
    pub version: u64,
    /// The version it applies to.
    pub base: u64,
    /// Services added or changed, each whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert: Vec<ServiceConfig>,
    /// Names of services removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    /// Per-service policies added or changed, each whole.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upsert_policies: BTreeMap<String, ServicePolicyConfig>,
    /// Names of per-service policies removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_policies: Vec<String>,
    /// The mesh-wide policy defaults, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_defaults: Option<PolicyOverrides>,
}

impl Delta {
    /// The change from `old` (at `base`) to `new` (at `version`); `None` when a state lists two services of
    /// the same name, which a by-name delta cannot express (send a snapshot instead).
    pub fn between(old: &MeshConfig, base: u64, new: &MeshConfig, version: u64) -> Option<Delta> {
        if !unique_names(old) || !unique_names(new) {
            return None;
        }
        let before: BTreeMap<&str, &ServiceConfig> =
            old.services.iter().map(|s| (s.name.as_str(), s)).collect();
        let after: HashSet<&str> = new.services.iter().map(|s| s.name.as_str()).collect();
        let upsert = new
            .services
            .iter()
            .filter(|s| before.get(s.name.as_str()) != Some(s))
            .cloned()
            .collect();
        let remove = before
            .keys()
            .filter(|name| !after.contains(*name))
            .map(|name| name.to_string())
            .collect();
        let (old_policy, new_policy) = (&old.policy.services, &new.policy.services);
        let upsert_policies = new_policy
            .iter()
            .filter(|(name, policy)| old_policy.get(*name) != Some(policy))
            .map(|(name, policy)| (name.clone(), policy.clone()))
            .collect();
        let remove_policies = old_policy
            .keys()
            .filter(|name| !new_policy.contains_key(*name))
            .cloned()
            .collect();
        let policy_defaults =
            (old.policy.defaults != new.policy.defaults).then(|| new.policy.defaults.clone());
        Some(Delta {
            version,
            base,
            upsert,
            remove,
            upsert_policies,
            remove_policies,
            policy_defaults,
        })
    }

    /// `mesh` with this change applied (services keep their order; new ones are appended).
    pub fn apply(&self, mesh: &MeshConfig) -> MeshConfig {
        let mut next = mesh.clone();
        next.services.retain(|s| !self.remove.contains(&s.name));
        for service in &self.upsert {
            match next.services.iter_mut().find(|s| s.name == service.name) {
                Some(slot) => *slot = service.clone(),
                None => next.services.push(service.clone()),
            }
        }
        for name in &self.remove_policies {
            next.policy.services.remove(name);
        }
        for (name, policy) in &self.upsert_policies {
            next.policy.services.insert(name.clone(), policy.clone());
        }
        if let Some(defaults) = &self.policy_defaults {
            next.policy.defaults = defaults.clone();
        }
        next
    }
}

fn unique_names(mesh: &MeshConfig) -> bool {
    let mut seen = HashSet::new();
    mesh.services.iter().all(|s| seen.insert(s.name.as_str()))
}

/// One message as a line of the stream (JSON and a newline).
pub fn encode_line(message: &WatchMessage) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(yaml: &str) -> MeshConfig {
        MeshConfig::from_yaml(yaml).unwrap()
    }

    const OLD: &str = r#"
services:
  - {name: a, identity: "spiffe://cluster.local/ns/x/sa/a", endpoints: [{address: "10.0.0.1:80"}]}
  - {name: b, identity: "spiffe://cluster.local/ns/x/sa/b", endpoints: [{address: "10.0.0.2:80"}]}
  - {name: c, identity: "spiffe://cluster.local/ns/x/sa/c", endpoints: [{address: "10.0.0.3:80"}]}
policy:
  services:
    a: {timeouts: {request: 2s}}
    b: {timeouts: {request: 2s}}
"#;

    const NEW: &str = r#"
services:
  - {name: a, identity: "spiffe://cluster.local/ns/x/sa/a", endpoints: [{address: "10.0.0.1:80"}]}
  - {name: b, identity: "spiffe://cluster.local/ns/x/sa/b", endpoints: [{address: "10.0.0.9:80"}]}
  - {name: d, identity: "spiffe://cluster.local/ns/x/sa/d", endpoints: [{address: "10.0.0.4:80"}]}
policy:
  defaults: {timeouts: {connect: 500ms}}
  services:
    a: {timeouts: {request: 3s, per_try: 1s}}
    d: {retries: {max_attempts: 1}}
"#;

    #[test]
    fn a_delta_carries_only_what_changed_and_rebuilds_the_new_state() {
        let (old, new) = (mesh(OLD), mesh(NEW));
        let delta = Delta::between(&old, 7, &new, 8).unwrap();
        let names: Vec<&str> = delta.upsert.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b", "d"]);
        assert_eq!(delta.remove, ["c"]);
        assert_eq!(delta.upsert_policies.keys().collect::<Vec<_>>(), ["a", "d"]);
        assert_eq!(delta.remove_policies, ["b"]);
        assert!(delta.policy_defaults.is_some());
        assert_eq!(delta.apply(&old), new);
        // Nothing changed: an empty delta.
        let same = Delta::between(&new, 8, &new, 9).unwrap();
        assert!(same.upsert.is_empty() && same.remove.is_empty() && same.policy_defaults.is_none());
    }

    #[test]
    fn duplicate_names_fall_back_to_a_snapshot() {
        let mut twice = mesh(OLD);
        let mut copy = twice.services[0].clone();
        copy.endpoints.clear();
        twice.services.push(copy);
        assert!(Delta::between(&mesh(OLD), 1, &twice, 2).is_none());
    }

    #[test]
    fn messages_round_trip_through_json_lines() {
        let (old, new) = (mesh(OLD), mesh(NEW));
        for message in [
            WatchMessage::Snapshot {
                version: 3,
                mesh: new.clone(),
            },
            WatchMessage::Delta(Delta::between(&old, 3, &new, 4).unwrap()),
            WatchMessage::Heartbeat { version: 4 },
        ] {
            let line = encode_line(&message).unwrap();
            assert_eq!(line.last(), Some(&b'\n'));
            assert!(!line[..line.len() - 1].contains(&b'\n'));
            let back: WatchMessage = serde_json::from_slice(&line).unwrap();
            assert_eq!(back, message);
        }
        let future: WatchMessage =
            serde_json::from_str(r#"{"type":"gossip","version":1}"#).unwrap();
        assert_eq!(future, WatchMessage::Unknown);
    }
}
