#!/bin/sh
# Renders the Helm chart into deploy/k8s/meshlet.yaml through Helm's own engine (pip install helm-python-sdk),
# with default values except that the namespace `shop` gets the trust-anchor ConfigMap. tests/k8s checks that
# the committed file matches a fresh render (generated keys and certificates aside).
#
# The generated CA and keys in meshlet.yaml are public, since they are committed: use it to try meshlet out,
# and run this script (or `helm install`, which generates fresh ones) for anything else.
set -eu
cd "$(dirname "$0")/../.."
python3 - "$@" <<'PY'
import sys
sys.path.insert(0, "tests/k8s")
from chart import render_plain

with open("deploy/k8s/meshlet.yaml", "w") as out:
    out.write(render_plain())
print("wrote deploy/k8s/meshlet.yaml")
PY
