"""The injector on real AdmissionReview objects (tests/k8s/fixtures/admission): the webhook's JSONPatch, applied
with python-jsonpatch, gives a pod that validates against Kubernetes 1.29 and 1.33, has the init and proxy
containers, honours each annotation and is unchanged when injected twice; `meshlet inject` on a Deployment
gives the same pod as the webhook.

The webhook runs as the Rust test `webhook::tests::admission_fixtures` (control-plane/src/webhook.rs), which
writes its responses to MESHLET_WEBHOOK_OUT."""

import base64
import copy
import json
import os
import shutil
import subprocess

import jsonpatch
import pytest
import yaml

from chart import ROOT, validate

FIXTURES = ROOT / "tests" / "k8s" / "fixtures"


def derived_review(template, namespace):
    """The AdmissionReview the API server would send for a pod of this Deployment template."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": copy.deepcopy(template["metadata"]),
           "spec": copy.deepcopy(template["spec"])}
    pod["metadata"]["namespace"] = namespace
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "00000000-0000-4000-8000-000000000001",
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": namespace, "operation": "CREATE", "object": pod},
    }


@pytest.fixture(scope="module")
def deployment():
    return [d for d in yaml.safe_load_all((FIXTURES / "deployment.yaml").read_text()) if d][0]


@pytest.fixture(scope="module")
def webhook(tmp_path_factory, deployment):
    """{fixture name: (request, response, second response)} from the real webhook code."""
    inputs = tmp_path_factory.mktemp("admission-in")
    outputs = tmp_path_factory.mktemp("admission-out")
    for path in (FIXTURES / "admission").glob("*.json"):
        shutil.copy(path, inputs / path.name)
    (inputs / "deployment-template.json").write_text(json.dumps(derived_review(deployment["spec"]["template"], "shop")))
    env = {**os.environ, "MESHLET_WEBHOOK_FIXTURES": str(inputs), "MESHLET_WEBHOOK_OUT": str(outputs)}
    run = subprocess.run(
        ["cargo", "test", "-q", "-p", "meshlet-control", "--lib", "webhook::tests::admission_fixtures", "--", "--exact"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = {}
    for path in inputs.glob("*.json"):
        name = path.stem
        results[name] = tuple(
            json.loads(p.read_text())
            for p in (path, outputs / f"{name}.response.json", outputs / f"{name}.second.json")
        )
    return results


def meshlet_binary():
    meshlet = ROOT / "target" / "debug" / "meshlet"
    if not meshlet.exists():
        subprocess.run(["cargo", "build", "-q", "--bin", "meshlet"], cwd=ROOT, check=True)
    return meshlet


def patched(request, response):
    pod = copy.deepcopy(request["request"]["object"])
    if "patch" not in response["response"]:
        return pod
    assert response["response"]["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["response"]["patch"]))
    return jsonpatch.apply_patch(pod, patch)


def containers(pod):
    spec = pod["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_every_response_is_well_formed_and_idempotent(webhook):
    assert len(webhook) >= 6
    for name, (request, response, second) in webhook.items():
        assert response["apiVersion"] == "admission.k8s.io/v1" and response["kind"] == "AdmissionReview"
        assert response["response"]["uid"] == request["request"]["uid"]
        assert response["response"]["allowed"] is True
        assert "patch" not in second["response"], f"{name}: the second injection changed the pod"


def test_patched_pods_validate_and_are_meshed(webhook):
    for name, (request, response, _) in webhook.items():
        pod = patched(request, response)
        validate(pod)
        if name == "disabled":
            continue
        names = containers(pod)
        assert "meshlet-init" in names and "meshlet-proxy" in names, name
        assert pod["metadata"]["annotations"]["meshlet.io/injected"] == "true"
        assert pod["metadata"]["labels"]["meshlet.io/meshed"] == "true"
        init = names["meshlet-init"]
        assert pod["spec"]["initContainers"][0]["name"] == "meshlet-init", "the redirect is installed first"
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
        assert init["securityContext"]["runAsUser"] == 0
        assert init["args"][:3] == ["init", "--proxy-uid", "2102"]
        proxy = names["meshlet-proxy"]
        assert proxy["securityContext"]["runAsUser"] == 2102 and proxy["securityContext"]["runAsNonRoot"] is True
        assert {p["containerPort"] for p in proxy["ports"]} == {15006, 15020}
        assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15020}
        assert proxy["livenessProbe"]["httpGet"] == {"path": "/live", "port": 15020}
        env = env_of(proxy)
        assert env["MESHLET_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["MESHLET_POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["MESHLET_POD_SERVICE_ACCOUNT"] == {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}
        assert env["MESHLET_POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["MESHLET_CONTROL_PLANE_ADDR"] == "meshlet-control.meshlet.svc:8443"
        assert env["MESHLET_TRUST_ANCHORS"] == "/var/run/meshlet.io/trust-anchors/ca.crt"
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        token = volumes["meshlet-token"]["projected"]["sources"][0]["serviceAccountToken"]
        assert token["audience"] == "meshlet" and token["path"] == "token"
        mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
        assert mounts["meshlet-token"] == "/var/run/secrets/meshlet.io"
        assert volumes["meshlet-trust-anchors"]["configMap"]["name"] == "meshlet-trust-anchors"


def test_native_sidecar_by_default(webhook):
    request, response, _ = webhook["job-with-init"]
    pod = patched(request, response)
    order = [c["name"] for c in pod["spec"]["initContainers"]]
    assert order == ["meshlet-init", "meshlet-proxy", "migrate"], "the proxy runs before the app's init containers"
    proxy = pod["spec"]["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"] == {"path": "/ready", "port": 15020}
    assert [c["name"] for c in pod["spec"]["containers"]] == ["report"]


def test_annotations_are_honoured(webhook):
    request, response, _ = webhook["payment-annotated"]
    assert "warnings" not in response["response"]
    pod = patched(request, response)
    names = containers(pod)
    proxy = names["meshlet-proxy"]
    assert proxy["resources"] == {"requests": {"cpu": "150m", "memory": "48Mi"},
                                  "limits": {"cpu": "500m", "memory": "192Mi"}}
    args = names["meshlet-init"]["args"]
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags["--skip-inbound-ports"] == "9100"
    assert flags["--skip-outbound-ports"] == "5432,8125-8126"
    opaque = env_of(proxy)["MESHLET_OPAQUE_PORTS"].split(",")
    assert {"7000", "7001", "6379", "5432"} <= set(opaque)

    app = names["payment"]
    assert app["livenessProbe"]["httpGet"] == {"path": "/app-health/payment/livez", "port": 15020, "scheme": "HTTP"}
    assert app["readinessProbe"]["httpGet"] == {"path": "/app-health/payment/readyz", "port": 15020, "scheme": "HTTP"}
    assert app["livenessProbe"]["periodSeconds"] == 10, "probe timing is kept"
    targets = json.loads(env_of(proxy)["MESHLET_APP_PROBES"])
    assert targets == {
        "/app-health/payment/livez": {"port": 8080, "path": "/healthz", "scheme": "HTTP"},
        "/app-health/payment/readyz": {"port": 8080, "path": "/ready", "scheme": "HTTP",
                                       "headers": [{"name": "X-Probe", "value": "kubelet"}]},
    }
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "payment"


def test_bad_annotations_warn_and_the_rest_is_injected(webhook):
    request, response, _ = webhook["bad-annotations"]
    warnings = response["response"]["warnings"]
    for annotation, value in [("meshlet.io/proxy-cpu-limit", "lots"), ("meshlet.io/skip-inbound-ports", "http"),
                              ("meshlet.io/opaque-ports", "99999"), ("meshlet.io/native-sidecar", "maybe"),
                              ("meshlet.io/inject", "yes-please"), ("meshlet.io/proxy-memory-request", "1Gi")]:
        assert any(annotation in w and f'"{value}"' in w for w in warnings), f"no warning for {annotation}={value}: {warnings}"
    pod = patched(request, response)
    proxy = containers(pod)["meshlet-proxy"]
    assert proxy["resources"] == {"requests": {"cpu": "100m"}, "limits": {"memory": "256Mi"}}
    assert proxy.get("restartPolicy") == "Always", "a bad native-sidecar value keeps the default"


def test_regular_sidecar_holds_the_app_and_grpc_probes_warn(webhook):
    request, response, _ = webhook["legacy-sidecar-grpc-probe"]
    pod = patched(request, response)
    assert [c["name"] for c in pod["spec"]["containers"]] == ["meshlet-proxy", "shipping"]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["meshlet-init"]
    proxy = pod["spec"]["containers"][0]
    assert proxy["lifecycle"]["postStart"]["exec"]["command"][:2] == ["meshlet", "wait-ready"]
    assert "restartPolicy" not in proxy
    app = pod["spec"]["containers"][1]
    assert app["livenessProbe"] == request["request"]["object"]["spec"]["containers"][0]["livenessProbe"]
    assert app["startupProbe"]["httpGet"]["path"] == "/app-health/shipping/startupz"
    assert any("gRPC livenessProbe" in w for w in response["response"]["warnings"])


def test_disabled_pod_is_not_patched(webhook):
    request, response, _ = webhook["disabled"]
    assert "patch" not in response["response"]


def test_meshlet_inject_matches_the_webhook(webhook, deployment, tmp_path):
    meshlet = meshlet_binary()
    result = subprocess.run([str(meshlet), "inject", str(FIXTURES / "deployment.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    for doc in docs:
        validate(doc)
    template = docs[0]["spec"]["template"]

    request, response, _ = webhook["deployment-template"]
    pod = patched(request, response)
    assert template["spec"] == pod["spec"]
    assert template["metadata"]["annotations"] == pod["metadata"]["annotations"]
    assert template["metadata"]["labels"] == pod["metadata"]["labels"]

    again = subprocess.run([str(meshlet), "inject", "-"], input=result.stdout, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == result.stdout, "meshlet inject twice changes nothing"


def test_meshlet_init_accepts_the_injected_arguments(webhook):
    """Every injected init container's arguments parse in `meshlet init` (checked with --dry-run, which
    prints the rules and changes nothing), and the rules honour the skip annotations."""
    meshlet = meshlet_binary()
    for name, (request, response, _) in webhook.items():
        if name == "disabled":
            continue
        init = containers(patched(request, response))["meshlet-init"]
        result = subprocess.run([str(meshlet), *init["args"], "--dry-run"], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {init['args']}: {result.stderr}"
        assert "REDIRECT --to-ports 15006" in result.stdout and "--uid-owner 2102" in result.stdout
        if name == "payment-annotated":
            assert "--dport 9100 -j RETURN" in result.stdout
            assert "--dport 8125:8126 -j RETURN" in result.stdout


def test_the_proxy_accepts_the_environment_the_injector_writes(webhook, tmp_path):
    """`meshlet proxy` started with the injected container's env (the downward-API values filled in, files and
    addresses moved to this machine) parses every setting and serves /live."""
    import socket
    import time
    import urllib.request

    from chart import objects, render

    request, response, _ = webhook["payment-annotated"]
    proxy = containers(patched(request, response))["meshlet-proxy"]
    anchors = [c for c in objects(render()) if c["metadata"]["name"] == "meshlet-trust-anchors"][0]
    (tmp_path / "ca.crt").write_text(anchors["data"]["ca.crt"])
    (tmp_path / "token").write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl\n")

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    downward = {"metadata.name": "payment-5d9c7b6f8-x2x9z", "metadata.namespace": "shop",
                "spec.serviceAccountName": "payment", "status.podIP": "127.0.0.1"}
    env = {"PATH": os.environ.get("PATH", ""), "RUST_BACKTRACE": "0"}
    for entry in proxy["env"]:
        env[entry["name"]] = entry["value"] if "value" in entry else downward[entry["valueFrom"]["fieldRef"]["fieldPath"]]
    env["MESHLET_TRUST_ANCHORS"] = str(tmp_path / "ca.crt")
    env["MESHLET_TOKEN_FILE"] = str(tmp_path / "token")
    env["MESHLET_CONTROL_PLANE_ADDR"] = f"127.0.0.1:{free_port()}"
    admin = free_port()
    env.update(MESHLET_OUTBOUND_ADDR=f"127.0.0.1:{free_port()}", MESHLET_INBOUND_ADDR=f"127.0.0.1:{free_port()}",
               MESHLET_ADMIN_ADDR=f"127.0.0.1:{admin}")

    meshlet = meshlet_binary()
    process = subprocess.Popen([str(meshlet), *proxy["args"]], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline and status is None:
            assert process.poll() is None, f"meshlet proxy refused the injected env: {process.stdout.read()[:500]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/live", timeout=1) as live:
                    status = live.status
            except OSError:
                time.sleep(0.1)
        assert status == 200
    finally:
        process.terminate()
        process.wait(timeout=40)
