"""deploy/k8s: the plain manifests match a fresh render of the chart, every file validates strictly against
Kubernetes 1.29 and 1.33, and every meshlet.io annotation the shop uses is documented."""

import re

import pytest
import yaml

from chart import DEPLOY, ROOT, load_yaml_file, mask_generated, render_plain, validate

MANIFESTS = sorted(p for p in DEPLOY.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def test_plain_manifests_match_the_chart():
    committed = load_yaml_file(DEPLOY / "meshlet.yaml")
    fresh = [doc for doc in yaml.safe_load_all(render_plain()) if doc]
    assert mask_generated(committed) == mask_generated(fresh), "deploy/k8s/meshlet.yaml is stale: run deploy/k8s/render.sh"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path):
    docs = load_yaml_file(path)
    assert docs
    for doc in docs:
        validate(doc)


def test_shop_is_complete_and_annotated():
    docs = load_yaml_file(DEPLOY / "shop.yaml")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for service in ("api-gateway", "order", "inventory", "payment", "customer", "shipping", "notifier", "redis"):
        for kind in ("Deployment", "Service", "ServiceAccount"):
            assert (kind, service) in names, f"{kind}/{service} missing"
    namespaces = load_yaml_file(DEPLOY / "00-namespaces.yaml")
    shop = [n for n in namespaces if n["metadata"]["name"] == "shop"][0]
    assert shop["metadata"]["labels"]["meshlet.io/inject"] == "enabled"
    payment = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "payment"][0]
    assert payment["metadata"]["annotations"]["meshlet.io/idempotency-enforce"] == "true"


def test_every_annotation_used_is_documented():
    documented = set(re.findall(r"`(meshlet\.io/[a-z0-9-]+)`", (ROOT / "docs" / "annotations.md").read_text()))
    used = set()
    for path in MANIFESTS:
        used |= set(re.findall(r"(meshlet\.io/[a-z0-9-]+)", path.read_text()))
    assert used <= documented, f"undocumented: {sorted(used - documented)}"


def test_the_injected_shop_validates():
    """What the webhook would make of the shop's pods (through `meshlet inject`) is still valid Kubernetes."""
    import subprocess

    meshlet = ROOT / "target" / "debug" / "meshlet"
    if not meshlet.exists():
        subprocess.run(["cargo", "build", "-q", "--bin", "meshlet"], cwd=ROOT, check=True)
    result = subprocess.run([str(meshlet), "inject", str(DEPLOY / "shop.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "the shop's annotations are all valid"
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 8
    for doc in docs:
        validate(doc)
    for deployment in deployments:
        names = [c["name"] for c in deployment["spec"]["template"]["spec"]["initContainers"]]
        assert names == ["meshlet-init", "meshlet-proxy"]
