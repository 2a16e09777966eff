"""The Helm chart: lint, render through Helm's engine with default and non-default values, validate every
object against the Kubernetes 1.29 and 1.33 schemas in strict mode, and check what the chart promises."""

import base64
import os
import pathlib
import subprocess

import helm_python as helm
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from chart import CHART, ROOT, objects, render, validate

NON_DEFAULT_VALUES = {
    "existing-secrets": {
        "identity": {"issuer": {"mode": "existingSecret", "existingSecret": "my-issuer"},
                     "trustAnchorsPEM": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                     "meshedNamespaces": ["shop", "payments"]},
        "webhook": {"failurePolicy": "Fail", "timeoutSeconds": 5,
                    "certs": {"mode": "existingSecret", "existingSecret": "my-api-tls", "caBundle": "Zm9v"}},
        "controlPlane": {"replicas": 3, "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
                         "nodeSelector": {"kubernetes.io/os": "linux"}},
        "proxy": {"nativeSidecar": "false", "resources": {"cpuLimit": "1"}},
    },
    "cert-manager-and-monitors": {
        "fullnameOverride": "mesh",
        "webhook": {"certs": {"mode": "certManager"}},
        "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                    "serviceMonitor": {"enabled": True}},
        "grafana": {"dashboards": {"namespace": "monitoring", "annotations": {"grafana_folder": "meshlet"}}},
        "commonLabels": {"team": "platform"},
    },
    "no-webhook-no-dashboards": {
        "webhook": {"enabled": False},
        "grafana": {"dashboards": {"enabled": False}},
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "existing"},
    },
}


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def default_docs():
    return objects(render())


def test_lint_is_clean_with_default_and_non_default_values():
    for values in [None, *NON_DEFAULT_VALUES.values()]:
        for kube_version in ("v1.29.0", "v1.33.0"):
            report = helm.lint(str(CHART), values, strict=True, namespace="meshlet", kube_version=kube_version)
            problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
            assert not problems, problems


@pytest.mark.parametrize("case", [None, *NON_DEFAULT_VALUES])
def test_every_rendered_object_validates(case):
    docs = objects(render(NON_DEFAULT_VALUES.get(case)))
    assert len(docs) >= 5
    for doc in docs:
        validate(doc)
        labels = doc["metadata"]["labels"]
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                      "app.kubernetes.io/version", "helm.sh/chart"):
            assert label in labels, f"{doc['kind']}/{doc['metadata']['name']} lacks {label}"


def test_control_plane_deployment(default_docs):
    deployment = one(default_docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[:3] == ["serve", "--mode", "cluster"]
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags["--api-addr"] == "0.0.0.0:8443" and flags["--admin-addr"] == "0.0.0.0:9990"
    assert flags["--issuer-dir"] == "/var/run/meshlet/issuer"
    assert flags["--api-cert-dir"] == "/var/run/meshlet/api-tls"
    assert flags["--token-audience"] == "meshlet"
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["runAsNonRoot"] is True
    assert security["capabilities"] == {"drop": ["ALL"]} and security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["replicas"] == 2
    budget = one(default_docs, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert not by_kind(objects(render({"controlPlane": {"replicas": 1}})), "PodDisruptionBudget")
    assert container["resources"]["requests"]
    service = one(default_docs, "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"api": 8443, "admin": 9990}


def test_rbac_is_least_privilege(default_docs):
    rules = {
        (group, resource): sorted(rule["verbs"])
        for rule in one(default_docs, "ClusterRole")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("", "services"): ["list", "watch"],
        ("", "pods"): ["list", "watch"],
        ("discovery.k8s.io", "endpointslices"): ["list", "watch"],
        ("authentication.k8s.io", "tokenreviews"): ["create"],
        ("events.k8s.io", "events"): ["create", "patch"],
    }
    binding = one(default_docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "meshlet-control", "namespace": "meshlet"}]


def pem_certs(text):
    return x509.load_pem_x509_certificates(text.encode())


def test_generated_certificates_chain_and_agree(default_docs):
    secrets = {s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
               for s in by_kind(default_docs, "Secret")}
    issuer = secrets["meshlet-identity-issuer"]
    assert set(issuer) == {"tls.crt", "tls.key", "ca.crt"}
    assert "BEGIN PRIVATE KEY" in issuer["tls.key"], "issuer key must be PKCS#8"
    (ca,) = pem_certs(issuer["ca.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    api = secrets["meshlet-control-tls"]
    assert "BEGIN PRIVATE KEY" in api["tls.key"]
    (serving,) = pem_certs(api["tls.crt"])
    serving.verify_directly_issued_by(ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "meshlet-control.meshlet.svc" in names

    webhook = one(default_docs, "MutatingWebhookConfiguration")
    for hook in webhook["webhooks"]:
        assert base64.b64decode(hook["clientConfig"]["caBundle"]).decode() == issuer["ca.crt"]
        assert hook["clientConfig"]["service"] == {"name": "meshlet-control", "namespace": "meshlet",
                                                   "path": "/inject", "port": 8443}
    anchors = [c for c in by_kind(default_docs, "ConfigMap") if c["metadata"]["name"] == "meshlet-trust-anchors"]
    der = serialization.Encoding.DER
    assert [c.public_bytes(der) for c in pem_certs(anchors[0]["data"]["ca.crt"])] == [ca.public_bytes(der)]


def test_webhook_selectors_and_failure_policy(default_docs):
    webhook = one(default_docs, "MutatingWebhookConfiguration")
    hooks = {h["name"]: h for h in webhook["webhooks"]}
    assert set(hooks) == {"namespace.inject.meshlet.io", "pod.inject.meshlet.io"}
    for hook in hooks.values():
        assert hook["failurePolicy"] == "Ignore"
        assert hook["rules"][0]["resources"] == ["pods"] and hook["rules"][0]["operations"] == ["CREATE"]
        excluded = hook["namespaceSelector"]["matchExpressions"][0]
        assert excluded["key"] == "kubernetes.io/metadata.name" and "kube-system" in excluded["values"]
        assert "meshlet" in excluded["values"], "the control plane's own namespace is never injected"
    ns_hook = hooks["namespace.inject.meshlet.io"]
    assert {"key": "meshlet.io/inject", "operator": "In", "values": ["enabled"]} in ns_hook["namespaceSelector"]["matchExpressions"]
    assert ns_hook["objectSelector"]["matchExpressions"] == [{"key": "meshlet.io/inject", "operator": "NotIn", "values": ["disabled"]}]
    pod_hook = hooks["pod.inject.meshlet.io"]
    assert pod_hook["objectSelector"]["matchExpressions"] == [{"key": "meshlet.io/inject", "operator": "In", "values": ["enabled"]}]

    fail = objects(render(NON_DEFAULT_VALUES["existing-secrets"]))
    webhook = one(fail, "MutatingWebhookConfiguration")
    assert {h["failurePolicy"] for h in webhook["webhooks"]} == {"Fail"}
    assert {h["clientConfig"]["caBundle"] for h in webhook["webhooks"]} == {"Zm9v"}
    assert not by_kind(fail, "Secret"), "provided secrets are not generated"
    volumes = {v["name"]: v for v in one(fail, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["issuer"]["secret"]["secretName"] == "my-issuer"
    assert volumes["api-tls"]["secret"]["secretName"] == "my-api-tls"
    anchors = {c["metadata"]["namespace"] for c in by_kind(fail, "ConfigMap") if c["metadata"]["name"] == "meshlet-trust-anchors"}
    assert anchors == {"meshlet", "shop", "payments"}


def test_cert_manager_mode_injects_the_ca():
    docs = objects(render(NON_DEFAULT_VALUES["cert-manager-and-monitors"]))
    webhook = one(docs, "MutatingWebhookConfiguration")
    assert webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "meshlet/mesh-control-tls"
    assert all("caBundle" not in h["clientConfig"] for h in webhook["webhooks"])
    certificate = one(docs, "Certificate")
    assert certificate["spec"]["secretName"] == "mesh-control-tls"
    assert certificate["spec"]["privateKey"]["encoding"] == "PKCS8"
    assert one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"] == {"meshlet.io/meshed": "true"}
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "admin"


def test_monitors_are_off_by_default(default_docs):
    assert not by_kind(default_docs, "PodMonitor") and not by_kind(default_docs, "ServiceMonitor")


def test_dashboards_are_labelled_for_the_grafana_sidecar(default_docs):
    dashboards = [c for c in by_kind(default_docs, "ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]]
    assert {next(iter(c["data"])) for c in dashboards} == {"mesh-overview.json", "service-detail.json", "proxy-resources.json"}
    assert {c["metadata"]["labels"]["grafana_dashboard"] for c in dashboards} == {"1"}


def test_native_sidecar_follows_the_setting():
    def inject_config(values):
        config = [c for c in objects(render(values)) if c["metadata"]["name"].endswith("-config")][0]
        return yaml.safe_load(config["data"]["inject.yaml"])

    assert inject_config(None)["nativeSidecar"] is True
    assert inject_config({"proxy": {"nativeSidecar": "false"}})["nativeSidecar"] is False
    with pytest.raises(helm.HelmError, match="nativeSidecar"):
        render({"proxy": {"nativeSidecar": "maybe"}})


@pytest.mark.parametrize("values, where", [
    ({"webhook": {"failurePolicy": "Sometimes"}}, "/webhook/failurePolicy"),
    ({"controlPlane": {"replica": 2}}, "replica"),
    ({"identity": {"issuer": {"mode": "vault"}}}, "/identity/issuer/mode"),
    ({"proxy": {"opaquePorts": "redis"}}, "/proxy/opaquePorts"),
    ({"policy": {"timeouts": {"request": "soon"}}}, "/policy/timeouts/request"),
])
def test_values_schema_names_the_bad_value(values, where):
    with pytest.raises(helm.HelmError) as error:
        render(values)
    assert where in str(error.value)


def test_every_value_is_documented():
    """Each leaf of values.yaml has a comment right above it, or sits inside a map whose key has one."""
    documented = []  # (indent, documented) of the enclosing keys
    previous = ""
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "- ")) and ":" in stripped:
            indent = len(line) - len(line.lstrip())
            while documented and documented[-1][0] >= indent:
                documented.pop()
            here = previous.startswith("#") or any(d for _, d in documented)
            is_parent = stripped.endswith(":")
            assert is_parent or here, f"values.yaml:{number} {stripped!r} is undocumented"
            documented.append((indent, previous.startswith("#")))
        if stripped:
            previous = stripped


def test_mesh_defaults_are_accepted_by_meshlet_inject(default_docs, tmp_path):
    """The chart's inject.yaml must parse with meshlet's InjectConfig (unknown keys are refused)."""
    binary = ROOT / "target" / "debug" / "meshlet"
    if not binary.exists():
        subprocess.run(["cargo", "build", "-q", "--bin", "meshlet"], cwd=ROOT, check=True)
    config = [c for c in default_docs if c["kind"] == "ConfigMap" and c["metadata"]["name"] == "meshlet-config"][0]
    path = tmp_path / "inject.yaml"
    path.write_text(config["data"]["inject.yaml"])
    pod = tmp_path / "pod.yaml"
    pod.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: busybox}]\n")
    out = subprocess.run([str(binary), "inject", "--config", str(path), str(pod)], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stderr
    injected = yaml.safe_load(out.stdout)
    proxy = injected["spec"]["initContainers"][1]
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env["MESHLET_CONTROL_PLANE_ADDR"] == "meshlet-control.meshlet.svc:8443"
    assert proxy["image"] == "ghcr.io/meshlet/meshlet:0.1.0"
    validate(injected)


def test_names_follow_the_release_and_namespace():
    docs = objects(render(name="prod", namespace="infra"))
    for doc in docs:
        validate(doc)
    service = one(docs, "Service")
    assert service["metadata"]["name"] == "prod-meshlet-control"
    config = [c for c in docs if c["kind"] == "ConfigMap" and c["metadata"]["name"] == "prod-meshlet-config"][0]
    inject = yaml.safe_load(config["data"]["inject.yaml"])
    assert inject["controlPlaneAddr"] == "prod-meshlet-control.infra.svc:8443"
    assert inject["controlPlaneName"] == "prod-meshlet-control.infra.svc"
    serving = [s for s in by_kind(docs, "Secret") if s["metadata"]["name"] == "prod-meshlet-control-tls"][0]
    (cert,) = pem_certs(base64.b64decode(serving["data"]["tls.crt"]).decode())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert inject["controlPlaneName"] in names
    webhook = one(docs, "MutatingWebhookConfiguration")
    assert webhook["webhooks"][0]["clientConfig"]["service"]["name"] == "prod-meshlet-control"
