"""Grafana dashboards: in sync with their builder, type-checked against Grafana's schema (@grafana/schema +
tsc --strict), every query parses as PromQL (promtool check rules), and every metric a query names is exported
by a running proxy and control plane."""

import importlib.util
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from chart import CHART, ROOT

HERE = ROOT / "tests" / "k8s"
DASHBOARDS = CHART / "dashboards"
NAMES = ("mesh-overview", "service-detail", "proxy-resources")

# Values that stand in for the dashboards' variables when a query is checked outside Grafana.
VARIABLES = {"$__rate_interval": "5m", "$destination": ".*", "$namespace": ".*"}

PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "count_values", "group",
    "rate", "irate", "increase", "delta", "histogram_quantile", "label_replace", "clamp_min", "clamp_max", "abs",
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
}


def load_builder():
    spec = importlib.util.spec_from_file_location("dashboard_builder", DASHBOARDS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards():
    return {name: json.loads((DASHBOARDS / f"{name}.json").read_text()) for name in NAMES}


def queries():
    """(dashboard, panel title, expression) of every panel target."""
    return [
        (name, panel["title"], target["expr"])
        for name, board in dashboards().items()
        for panel in board["panels"]
        for target in panel["targets"]
    ]


def substitute(expr):
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr}"
    return expr


def metric_names(expr):
    """Metric names in a PromQL expression: identifiers outside label matchers, strings, ranges and grouping
    clauses that are not functions, aggregations or keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b", expr)) - PROMQL_WORDS
    return {n for n in names if not re.fullmatch(r"\d+(?:\.\d+)?|[eE]\d+", n)}


def test_dashboards_match_their_builder(tmp_path):
    load_builder().write(tmp_path)
    for name in NAMES:
        assert (tmp_path / f"{name}.json").read_text() == (DASHBOARDS / f"{name}.json").read_text(), \
            f"{name}.json is stale: run python3 charts/meshlet/dashboards/build.py"


def test_dashboards_cover_the_issue():
    titles = {name: [p["title"] for p in board["panels"]] for name, board in dashboards().items()}
    assert any("Success rate" in t for t in titles["mesh-overview"])
    assert any("p50 / p95 / p99" in t for t in titles["mesh-overview"])
    assert any("mTLS" in t for t in titles["mesh-overview"])
    assert any("by status code" in t for t in titles["service-detail"])
    assert any("CPU" in t for t in titles["proxy-resources"]) and any("memory" in t for t in titles["proxy-resources"])
    for board in dashboards().values():
        assert board["schemaVersion"] >= 39
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))


def test_dashboards_type_check_against_grafana_schema(tmp_path):
    if not (HERE / "node_modules" / "@grafana" / "schema").exists():
        if shutil.which("npm") is None:
            pytest.fail("npm is needed to install @grafana/schema and typescript (tests/k8s/package.json)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True)
    generated = HERE / ".generated"
    generated.mkdir(exist_ok=True)
    files = []
    for name, board in dashboards().items():
        path = generated / f"{name.replace('-', '_')}.ts"
        path.write_text(
            "import type { Dashboard } from '@grafana/schema';\n\n"
            f"export const dashboard: Dashboard = {json.dumps(board, indent=2, ensure_ascii=False)};\n"
        )
        files.append(str(path))
    tsc = HERE / "node_modules" / ".bin" / "tsc"
    result = subprocess.run(
        [str(tsc), "--noEmit", "--strict", "--target", "es2022", "--module", "nodenext",
         "--moduleResolution", "nodenext", "--skipLibCheck", *files],
        cwd=HERE, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # The check must be able to fail: a dashboard with a wrongly typed field is refused.
    broken = generated / "broken.ts"
    broken.write_text("import type { Dashboard } from '@grafana/schema';\n"
                      "export const d: Dashboard = { schemaVersion: '41', panels: [] };\n")
    result = subprocess.run([str(tsc), "--noEmit", "--strict", "--module", "nodenext", "--moduleResolution",
                             "nodenext", "--skipLibCheck", str(broken)], cwd=HERE, capture_output=True, text=True)
    broken.unlink()
    assert result.returncode != 0 and "broken.ts(2," in result.stdout and "TS2322" in result.stdout


def test_every_query_parses_as_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool (Debian package prometheus) is required")
    rules = [
        {"record": f"meshlet:dashboard_query:{i}", "expr": substitute(expr),
         "labels": {"dashboard": name}}
        for i, (name, _, expr) in enumerate(queries())
    ]
    assert len(rules) >= 20
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "meshlet-dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": "sum(rate(x[5m])"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True).returncode != 0


def test_metric_name_extraction():
    expr = 'histogram_quantile(0.99, sum by (destination, le) (rate(meshlet_request_duration_seconds_bucket{direction="outbound", destination=~".*"}[5m]))) / on (x) group_left count(up == 1)'
    assert metric_names(expr) == {"meshlet_request_duration_seconds_bucket", "up"}


def test_dashboards_use_only_exported_metrics():
    """Static half of the check: every metric is in the builder's list of exported metrics."""
    exported = load_builder().EXPORTED
    for name, title, expr in queries():
        assert metric_names(substitute(expr)) <= exported, f"{name}: {title}: {expr}"
