//! The sidecar injector's mutating admission webhook (`POST /inject` on the control plane's HTTPS API).
//!
//! The API server sends an AdmissionReview v1 for every pod created in a namespace (or with a pod label)
//! that opted in; [`review`] answers with the same mutation `meshlet inject` applies offline
//! ([`meshlet::inject::inject_pod`]), as a JSONPatch computed as the difference between the original pod
//! and the injected one, so whatever the injector changes the patch follows. Objects are compared key by
//! key, and a changed list (containers, init containers, volumes) is replaced whole: the patch then reads
//! as what happened ("replace /spec/initContainers") instead of a field-by-field morphing of the
//! application's first init container into ours. Bad annotation values become admission warnings, which
//! `kubectl` prints to the user who created the workload.
//!
//! The webhook never refuses a pod: when it cannot inject it says why in a warning and allows the pod
//! unchanged, so a meshlet problem does not block deployments (the `failurePolicy` of the
//! MutatingWebhookConfiguration decides what happens when the webhook is unreachable).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use meshlet::inject::{inject_pod, InjectConfig, Outcome};
use serde_json::{json, Value};

/// Most warnings returned in one response; the API server truncates long lists anyway.
const MAX_WARNINGS: usize = 32;

/// Answers an AdmissionReview v1 request body with an AdmissionReview v1 response body.
///
/// A body that is not an AdmissionReview gets a response allowing the (unknown) request with a warning
/// saying why; the API server only sends well-formed reviews, so that is for stray callers.
pub fn review(body: &[u8], config: &InjectConfig) -> Vec<u8> {
    let response = match serde_json::from_slice::<Value>(body) {
        Ok(request) => review_value(&request, config),
        Err(e) => respond(
            "",
            vec![format!("meshlet: request body is not JSON: {e}")],
            None,
        ),
    };
    serde_json::to_vec(&response).unwrap_or_default()
}

/// [`review`] on parsed JSON: AdmissionReview in, AdmissionReview out.
pub fn review_value(review: &Value, config: &InjectConfig) -> Value {
    let request = &review["request"];
    let uid = request["uid"].as_str().unwrap_or_default();
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return respond(
            uid,
            vec!["meshlet: expected an admission.k8s.io/v1 AdmissionReview".into()],
            None,
        );
    }
    let is_pod = request["kind"]["kind"] == "Pod"
        && request["kind"]["group"]
            .as_str()
            .unwrap_or_default()
            .is_empty();
    let operation = request["operation"].as_str().unwrap_or_default();
    if !is_pod || operation != "CREATE" || request.get("subResource").is_some_and(|s| !s.is_null())
    {
        return respond(uid, Vec::new(), None);
    }
    let pod = &request["object"];
    match inject_pod(pod, config) {
        Ok(injection) => {
            let mut warnings: Vec<String> = injection
                .warnings
                .into_iter()
                .map(|w| format!("meshlet: {w}"))
                .collect();
            warnings.truncate(MAX_WARNINGS);
            let patch = match injection.outcome {
                Outcome::Injected => Some(diff(pod, &injection.pod)),
                Outcome::AlreadyInjected | Outcome::Disabled | Outcome::HostNetwork => None,
            };
            respond(uid, warnings, patch.filter(|ops| !ops.is_empty()))
        }
        Err(e) => respond(uid, vec![format!("meshlet: not injected: {e}")], None),
    }
}

/// JSONPatch operations turning `from` into `to`: objects are compared per key, anything else (lists
/// included) that differs is replaced whole.
fn diff(from: &Value, to: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    diff_into(&mut ops, String::new(), from, to);
    ops
}

fn diff_into(ops: &mut Vec<Value>, path: String, from: &Value, to: &Value) {
    match (from, to) {
        (Value::Object(from), Value::Object(to)) => {
            for key in from.keys().filter(|key| !to.contains_key(*key)) {
                ops.push(json!({"op": "remove", "path": child(&path, key)}));
            }
            for (key, new) in to {
                match from.get(key) {
                    Some(old) if old == new => {}
                    Some(old) => diff_into(ops, child(&path, key), old, new),
                    None => ops.push(json!({"op": "add", "path": child(&path, key), "value": new})),
                }
            }
        }
        _ if from != to => ops.push(json!({"op": "replace", "path": path, "value": to})),
        _ => {}
    }
}

/// `path/key` as a JSON Pointer (RFC 6901: `~` and `/` in keys escaped, as in `meshlet.io~1injected`).
fn child(path: &str, key: &str) -> String {
    format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"))
}

fn respond(uid: &str, warnings: Vec<String>, patch: Option<Vec<Value>>) -> Value {
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(patch) = patch {
        let encoded = BASE64.encode(serde_json::to_vec(&patch).unwrap_or_default());
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(encoded);
    }
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission_review(pod: Value, operation: &str) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod,
                "dryRun": false
            }
        })
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-5d9c-", "namespace": "shop", "annotations": annotations},
            "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}
        })
    }

    fn decoded_patch(response: &Value) -> json_patch::Patch {
        let encoded = response["response"]["patch"].as_str().expect("a patch");
        serde_json::from_slice(&BASE64.decode(encoded).unwrap()).unwrap()
    }

    #[test]
    fn the_patch_turns_the_pod_into_the_injected_pod() {
        let config = InjectConfig::default();
        let original = pod(json!({"meshlet.io/proxy-cpu-limit": "a lot"}));
        let body = serde_json::to_vec(&admission_review(original.clone(), "CREATE")).unwrap();
        let response: Value = serde_json::from_slice(&review(&body, &config)).unwrap();
        assert_eq!(
            response["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(response["response"]["allowed"], true);
        assert_eq!(response["response"]["patchType"], "JSONPatch");
        let warnings = response["response"]["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0]
            .as_str()
            .unwrap()
            .contains("meshlet.io/proxy-cpu-limit"));

        let mut patched = original.clone();
        json_patch::patch(&mut patched, &decoded_patch(&response)).unwrap();
        assert_eq!(patched, inject_pod(&original, &config).unwrap().pod);

        let again = review_value(&admission_review(patched, "CREATE"), &config);
        assert!(
            again["response"].get("patch").is_none(),
            "second injection changes nothing"
        );
    }

    #[test]
    fn lists_are_replaced_whole_and_keys_escaped() {
        let config = InjectConfig::default();
        let mut original = pod(json!({"team": "a"}));
        original["spec"]["initContainers"] = json!([{"name": "migrate", "image": "busybox"}]);
        let response = review_value(&admission_review(original, "CREATE"), &config);
        let ops: Vec<Value> =
            serde_json::from_value(serde_json::to_value(decoded_patch(&response)).unwrap())
                .unwrap();
        let paths: Vec<(&str, &str)> = ops
            .iter()
            .map(|op| (op["op"].as_str().unwrap(), op["path"].as_str().unwrap()))
            .collect();
        assert!(
            paths.contains(&("replace", "/spec/initContainers")),
            "{paths:?}"
        );
        assert!(
            paths.contains(&("add", "/metadata/annotations/meshlet.io~1injected")),
            "{paths:?}"
        );
        assert!(paths.contains(&("add", "/spec/volumes")), "{paths:?}");
        assert!(
            paths
                .iter()
                .all(|(_, path)| !path.contains("/initContainers/")),
            "{paths:?}"
        );
    }

    #[test]
    fn other_operations_and_kinds_pass_unchanged() {
        let config = InjectConfig::default();
        let update = review_value(&admission_review(pod(json!({})), "UPDATE"), &config);
        assert!(update["response"].get("patch").is_none());
        let mut deployment = admission_review(pod(json!({})), "CREATE");
        deployment["request"]["kind"] =
            json!({"group": "apps", "version": "v1", "kind": "Deployment"});
        assert!(review_value(&deployment, &config)["response"]
            .get("patch")
            .is_none());
        let disabled = review_value(
            &admission_review(pod(json!({"meshlet.io/inject": "disabled"})), "CREATE"),
            &config,
        );
        assert_eq!(disabled["response"]["allowed"], true);
        assert!(disabled["response"].get("patch").is_none());
    }

    #[test]
    fn garbage_is_allowed_with_a_reason() {
        let response: Value =
            serde_json::from_slice(&review(b"{not json", &InjectConfig::default())).unwrap();
        assert_eq!(response["response"]["allowed"], true);
        assert!(response["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("not JSON"));
        let not_a_pod = admission_review(json!({"kind": "Pod"}), "CREATE");
        let response = review_value(&not_a_pod, &InjectConfig::default());
        assert!(response["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("not injected"));
    }

    /// Every AdmissionReview in tests/k8s/fixtures/admission (or `MESHLET_WEBHOOK_FIXTURES`): the patch
    /// applies and a second review of the patched pod changes nothing. With `MESHLET_WEBHOOK_OUT` set, the
    /// responses are written there (`<name>.response.json`, `<name>.second.json`) for tests/k8s to validate
    /// the patched pods against the Kubernetes schemas.
    #[test]
    fn admission_fixtures() {
        use std::path::PathBuf;

        let fixtures = std::env::var_os("MESHLET_WEBHOOK_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/k8s/fixtures/admission")
            });
        let out = std::env::var_os("MESHLET_WEBHOOK_OUT").map(PathBuf::from);
        let config = match std::env::var_os("MESHLET_INJECT_CONFIG") {
            Some(path) => InjectConfig::from_yaml_file(path.as_ref()).unwrap(),
            None => InjectConfig::default(),
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&fixtures)
            .unwrap_or_else(|e| panic!("{}: {e}", fixtures.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        paths.sort();
        assert!(
            paths.len() >= 3,
            "fixtures missing in {}",
            fixtures.display()
        );
        for path in paths {
            let request: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let response = review_value(&request, &config);
            assert_eq!(response["response"]["uid"], request["request"]["uid"]);
            let mut pod = request["request"]["object"].clone();
            if response["response"].get("patch").is_some() {
                json_patch::patch(&mut pod, &decoded_patch(&response)).unwrap();
            }
            let mut again = request.clone();
            again["request"]["object"] = pod;
            let second = review_value(&again, &config);
            assert!(
                second["response"].get("patch").is_none(),
                "{}: second injection patched",
                path.display()
            );
            if let Some(out) = &out {
                let stem = path.file_stem().unwrap().to_string_lossy();
                let write = |suffix: &str, value: &Value| {
                    std::fs::write(
                        out.join(format!("{stem}.{suffix}.json")),
                        serde_json::to_vec_pretty(value).unwrap(),
                    )
                    .unwrap()
                };
                write("response", &response);
                write("second", &second);
            }
        }
    }
}
