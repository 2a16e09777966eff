//! `meshlet inject` end to end: the real binary on multi-document manifests of every workload kind, from a
//! file and from stdin, gives the same pods as the library function the webhook uses.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use meshlet::inject::{inject_pod, InjectConfig, INIT_CONTAINER, PROXY_CONTAINER};
use serde::Deserialize;
use serde_json::Value;

const WORKLOADS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: solo, annotations: {meshlet.io/proxy-cpu-request: 1x}}
spec:
  containers: [{name: app, image: busybox}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}, annotations: {meshlet.io/opaque-ports: "5433"}}
    spec:
      containers: [{name: db, image: postgres, ports: [{containerPort: 5433}]}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}, annotations: {meshlet.io/inject: disabled}}
    spec:
      containers: [{name: agent, image: agent}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: once, image: busybox}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: untouched}
data: {key: value}
"#;

fn meshlet(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshlet"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshlet");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .expect("write stdin");
    drop(input);
    child.wait_with_output().expect("meshlet output")
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).expect("valid YAML"))
        .collect()
}

fn container_names(pod_spec: &Value, field: &str) -> Vec<String> {
    pod_spec[field]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn inject_from_stdin_injects_every_workload_and_warns_on_stderr() {
    let output = meshlet(&["inject", "-"], Some(WORKLOADS));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(
        stderr.trim(),
        "warning: Pod/solo: annotation meshlet.io/proxy-cpu-request: ignoring value \"1x\": \"1x\" is not a \
         Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)"
    );
    let docs = documents(&String::from_utf8(output.stdout).unwrap());
    assert_eq!(docs.len(), 5);
    let meshed = [INIT_CONTAINER, PROXY_CONTAINER];
    assert_eq!(container_names(&docs[0]["spec"], "initContainers"), meshed);
    assert_eq!(
        container_names(&docs[1]["spec"]["template"]["spec"], "initContainers"),
        meshed
    );
    assert!(
        docs[2]["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none(),
        "disabled stays untouched"
    );
    assert_eq!(
        container_names(&docs[3]["spec"]["template"]["spec"], "initContainers"),
        meshed
    );
    assert_eq!(docs[4], documents(WORKLOADS)[4]);

    let proxy = &docs[1]["spec"]["template"]["spec"]["initContainers"][1];
    let opaque = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "MESHLET_OPAQUE_PORTS")
        .unwrap();
    assert!(opaque["value"]
        .as_str()
        .unwrap()
        .split(',')
        .any(|p| p == "5433"));
}

#[test]
fn the_cli_and_the_library_give_the_same_pod() {
    let dir = std::env::temp_dir().join(format!("meshlet-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("workloads.yaml");
    std::fs::write(&file, WORKLOADS).unwrap();
    let output = meshlet(&["inject", file.to_str().unwrap()], None);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(output.status.success());
    let docs = documents(&String::from_utf8(output.stdout).unwrap());

    let original = &documents(WORKLOADS)[3]["spec"]["template"];
    let library = inject_pod(original, &InjectConfig::default()).unwrap();
    assert_eq!(docs[3]["spec"]["template"], library.pod);
}

#[test]
fn a_bad_config_file_names_the_field() {
    let dir = std::env::temp_dir().join(format!("meshlet-inject-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("inject.yaml");
    std::fs::write(&config, "proxyImage: x\nproxyImag: typo\n").unwrap();
    let output = meshlet(
        &["inject", "--config", config.to_str().unwrap(), "-"],
        Some(WORKLOADS),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("proxyImag"), "{stderr}");
    assert!(stderr.contains("inject.yaml"), "{stderr}");
}

#[test]
fn bad_yaml_fails_naming_the_document() {
    let output = meshlet(
        &["inject", "-"],
        Some("kind: ConfigMap\n---\nkind: [unclosed\n"),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("document 1 is not valid YAML"), "{stderr}");
}
