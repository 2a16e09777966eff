//! `meshlet inject`: the pod mutation applied offline to manifests, like `linkerd inject`.
//!
//! Finds the pod template of every workload kind (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
//! ReplicationController, Job, CronJob), walks `List` objects, and leaves every other object as it was.

use serde::Deserialize;
use serde_json::Value;

use super::{describe, inject_pod, InjectConfig, InjectError};

/// How deep `List`s may nest; bounds the recursion on hostile input.
const MAX_LIST_DEPTH: usize = 8;

/// The manifests after injection and the warnings collected on the way.
#[derive(Debug, Clone)]
pub struct InjectedManifests {
    /// All documents, injected where they hold a pod, joined with `---`.
    pub yaml: String,
    /// Warnings, each prefixed with the object they are about (`Deployment/web: ...`).
    pub warnings: Vec<String>,
}

/// Injects every workload in a multi-document YAML stream. Empty documents are dropped, and comments are
/// not kept (the documents go through JSON values).
pub fn inject_yaml(input: &str, config: &InjectConfig) -> Result<InjectedManifests, InjectError> {
    let mut documents = Vec::new();
    let mut warnings = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let object =
            Value::deserialize(document).map_err(|source| InjectError::Yaml { index, source })?;
        if object.is_null() {
            continue;
        }
        let injected = inject_manifest(&object, config, &mut warnings)?;
        documents.push(super::yaml::to_yaml(&injected));
    }
    Ok(InjectedManifests {
        yaml: documents.join("---\n"),
        warnings,
    })
}

/// Injects one Kubernetes object (or every object of a `List`); returns the new object.
pub fn inject_manifest(
    object: &Value,
    config: &InjectConfig,
    warnings: &mut Vec<String>,
) -> Result<Value, InjectError> {
    inject_object(object, config, warnings, 0)
}

fn inject_object(
    object: &Value,
    config: &InjectConfig,
    warnings: &mut Vec<String>,
    depth: usize,
) -> Result<Value, InjectError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let template_path: &[&str] = match kind {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        kind if kind.ends_with("List") && depth < MAX_LIST_DEPTH => {
            let mut list = object.clone();
            if let Some(items) = list.get_mut("items").and_then(Value::as_array_mut) {
                for item in items.iter_mut() {
                    *item = inject_object(item, config, warnings, depth + 1)?;
                }
            }
            return Ok(list);
        }
        _ => return Ok(object.clone()),
    };
    let mut result = object.clone();
    let Some(template) = template_path
        .iter()
        .try_fold(&mut result, |value, key| value.get_mut(*key))
    else {
        return Err(InjectError::NotAPod(describe(object)));
    };
    let injection =
        inject_pod(template, config).map_err(|_| InjectError::NotAPod(describe(object)))?;
    let name = describe(object);
    warnings.extend(
        injection
            .warnings
            .into_iter()
            .map(|w| format!("{name}: {w}")),
    );
    *template = injection.pod;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::{INIT_CONTAINER, PROXY_CONTAINER};

    const MANIFESTS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {meshlet.io/proxy-cpu-limit: lots}
    spec:
      containers: [{name: web, image: nginx}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
---
apiVersion: v1
kind: List
items:
- apiVersion: batch/v1
  kind: CronJob
  metadata: {name: nightly}
  spec:
    schedule: "0 0 * * *"
    jobTemplate:
      spec:
        template:
          spec:
            restartPolicy: OnFailure
            containers: [{name: job, image: busybox}]
"#;

    fn init_names(pod_spec: &Value) -> Vec<&str> {
        pod_spec["initContainers"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn every_workload_in_the_stream_is_injected_once() {
        let config = InjectConfig::default();
        let out = inject_yaml(MANIFESTS, &config).unwrap();
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&out.yaml)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 3, "empty document dropped");
        assert_eq!(
            init_names(&docs[0]["spec"]["template"]["spec"]),
            [INIT_CONTAINER, PROXY_CONTAINER]
        );
        assert!(docs[1]["spec"].get("template").is_none());
        let cron = &docs[2]["items"][0]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(init_names(cron), [INIT_CONTAINER, PROXY_CONTAINER]);
        assert_eq!(out.warnings.len(), 1);
        assert!(
            out.warnings[0].starts_with("Deployment/web: annotation meshlet.io/proxy-cpu-limit")
        );

        let again = inject_yaml(&out.yaml, &config).unwrap();
        assert_eq!(again.yaml, out.yaml);
    }

    #[test]
    fn bad_yaml_names_the_document() {
        let err = inject_yaml("kind: Service\n---\n: [", &InjectConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("document 1 "), "{err}");
    }

    #[test]
    fn a_workload_without_a_template_is_an_error() {
        let err = inject_yaml(
            "kind: Deployment\nmetadata: {name: x}\nspec: {}\n",
            &InjectConfig::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Deployment/x is not a pod: it has no spec object"
        );
    }
}
