#!/usr/bin/env bash
# The Kubernetes, Helm and Grafana checks (called by scripts/test after cargo test): installs the pinned
# Python and npm tools, then runs pytest on tests/k8s. Under CI=true a check that cannot run fails.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
npm ci --no-audit --no-fund --loglevel=error
cd ../..
exec python3 -m pytest -q -rs tests/k8s
