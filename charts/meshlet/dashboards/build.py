#!/usr/bin/env python3
"""Builds the Grafana dashboards (mesh-overview.json, service-detail.json, proxy-resources.json).

Every panel names the metrics its queries use. A panel is built only when all of them are in EXPORTED, the
metrics the proxy and the control plane really export today, so a dashboard never shows a query that cannot
return data. When the proxy ships a new metric, add its name to EXPORTED and run this script:
the waiting panels appear. `python3 build.py --pending` lists the panels still waiting and for what.

Run from anywhere: python3 charts/meshlet/dashboards/build.py (tests/k8s checks the JSON files are in sync).
"""

import json
import pathlib
import sys

# Metric names exported now (see the proxy's /metrics and the control plane's /metrics).
EXPORTED = {
    "meshlet_requests_total",
    "meshlet_request_duration_seconds_bucket",
    "meshlet_tcp_connections_opened_total",
    "meshlet_tcp_connections_closed_total",
    "meshlet_tcp_open_connections",
    "meshlet_tcp_bytes_total",
    "meshlet_protocol_detected_total",
    "meshlet_proxy_errors_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "meshlet_control_certificates_issued_total",
    "meshlet_control_issuance_errors_total",
    # The resilience policies (src/policy/metrics.rs).
    "meshlet_retries_total",
    "meshlet_retry_budget_exhausted_total",
    "meshlet_timeouts_total",
    "meshlet_breaker_state",
    "meshlet_breaker_transitions_total",
    "meshlet_dedup_total",
}

SCHEMA_VERSION = 41
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
OUT = f'direction="outbound", destination=~"$destination"'
OUT_TLS = OUT + ', tls="true"'
IN = f'direction="inbound", destination=~"$destination"'
PROXY = 'container="meshlet-proxy", namespace=~"$namespace"'


def q(expr, legend, instant=False):
    """One Prometheus query of a panel."""
    return {"expr": expr, "legend": legend, "instant": instant}


def panel(title, kind, queries, metrics, unit="short", description="", width=12, height=8, options=None):
    """A panel; `metrics` are the metric names its queries need (checked against EXPORTED)."""
    return {
        "title": title,
        "kind": kind,
        "queries": queries,
        "metrics": set(metrics),
        "unit": unit,
        "description": description,
        "width": width,
        "height": height,
        "options": options or {},
    }


def success_rate(by, selector):
    ok = f'sum by ({by}) (rate(meshlet_requests_total{{{selector}, status_code!~"5.."}}[{RATE}]))'
    total = f"sum by ({by}) (rate(meshlet_requests_total{{{selector}}}[{RATE}]))"
    return f"{ok} / {total}"


def quantile(phi, by, selector):
    return (
        f"histogram_quantile({phi}, sum by ({by}le) "
        f"(rate(meshlet_request_duration_seconds_bucket{{{selector}}}[{RATE}])))"
    )


def rate(metric, by, selector):
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"


MESH_OVERVIEW = [
    panel("Success rate by service", "timeseries",
          [q(success_rate("destination", OUT), "{{destination}}")],
          ["meshlet_requests_total"], unit="percentunit",
          description="Share of outbound requests to each service that did not end in a 5xx."),
    panel("Requests/s by service", "timeseries",
          [q(rate("meshlet_requests_total", "destination", OUT), "{{destination}}")],
          ["meshlet_requests_total"], unit="reqps"),
    panel("Latency p50 / p95 / p99 by service", "timeseries",
          [q(quantile(phi, "destination, ", OUT), f"p{int(phi * 100)} {{{{destination}}}}") for phi in (0.5, 0.95, 0.99)],
          ["meshlet_request_duration_seconds_bucket"], unit="s"),
    panel("Share of mTLS traffic by service", "timeseries",
          [q(rate("meshlet_requests_total", "destination", OUT_TLS) + " / "
             + rate("meshlet_requests_total", "destination", OUT), "{{destination}}")],
          ["meshlet_requests_total"], unit="percentunit",
          description="Requests carried over meshlet's mutual TLS, from the tls label of meshlet_requests_total."),
    panel("Retries/s by service", "timeseries",
          [q(rate("meshlet_retries_total", "destination", 'destination=~"$destination"'), "{{destination}}")],
          ["meshlet_retries_total"], unit="reqps"),
    panel("Open circuit breakers", "timeseries",
          [q('count by (destination) (meshlet_breaker_state{destination=~"$destination"} == 1)', "{{destination}}")],
          ["meshlet_breaker_state"],
          description="Endpoints currently ejected (breaker open) per service."),
    panel("Retry budget exhausted/s", "timeseries",
          [q(rate("meshlet_retry_budget_exhausted_total", "destination", 'destination=~"$destination"'), "{{destination}}")],
          ["meshlet_retry_budget_exhausted_total"], unit="reqps"),
    panel("Proxy errors/s by reason", "timeseries",
          [q(rate("meshlet_proxy_errors_total", "direction, reason", 'namespace=~"$namespace"'), "{{direction}} {{reason}}")],
          ["meshlet_proxy_errors_total"], unit="reqps",
          description="Answers made by the proxy itself (x-meshlet-error)."),
    panel("Certificates issued/s", "timeseries",
          [q("sum(rate(meshlet_control_certificates_issued_total[$__rate_interval]))", "issued"),
           q("sum by (reason) (rate(meshlet_control_issuance_errors_total[$__rate_interval]))", "error {{reason}}")],
          ["meshlet_control_certificates_issued_total", "meshlet_control_issuance_errors_total"], unit="reqps"),
]

SERVICE_DETAIL = [
    panel("Inbound requests/s by status code", "timeseries",
          [q(rate("meshlet_requests_total", "status_code", IN), "{{status_code}}")],
          ["meshlet_requests_total"], unit="reqps",
          description="Requests the selected service's sidecars received."),
    panel("Outbound requests/s by status code", "timeseries",
          [q(rate("meshlet_requests_total", "status_code", OUT), "{{status_code}}")],
          ["meshlet_requests_total"], unit="reqps",
          description="Requests callers' sidecars sent to the selected service."),
    panel("Inbound requests/s by pod", "timeseries",
          [q(rate("meshlet_requests_total", "pod", IN), "{{pod}}")],
          ["meshlet_requests_total"], unit="reqps"),
    panel("Outbound requests/s by calling pod", "timeseries",
          [q(rate("meshlet_requests_total", "pod", OUT), "{{pod}}")],
          ["meshlet_requests_total"], unit="reqps"),
    panel("Latency p50 / p95 / p99 (outbound)", "timeseries",
          [q(quantile(phi, "", OUT), f"p{int(phi * 100)}") for phi in (0.5, 0.95, 0.99)],
          ["meshlet_request_duration_seconds_bucket"], unit="s"),
    panel("Latency p50 / p95 / p99 (inbound)", "timeseries",
          [q(quantile(phi, "", IN), f"p{int(phi * 100)}") for phi in (0.5, 0.95, 0.99)],
          ["meshlet_request_duration_seconds_bucket"], unit="s"),
    panel("Requests/s by method and mTLS", "timeseries",
          [q(rate("meshlet_requests_total", "method, tls", OUT), "{{method}} tls={{tls}}")],
          ["meshlet_requests_total"], unit="reqps"),
    panel("Protocols detected/s", "timeseries",
          [q(rate("meshlet_protocol_detected_total", "direction, protocol", 'namespace=~"$namespace"'), "{{direction}} {{protocol}}")],
          ["meshlet_protocol_detected_total"], unit="cps"),
    panel("TCP connections opened / closed per second", "timeseries",
          [q(rate("meshlet_tcp_connections_opened_total", "direction", 'destination=~"$destination"'), "opened {{direction}}"),
           q(rate("meshlet_tcp_connections_closed_total", "direction", 'destination=~"$destination"'), "closed {{direction}}")],
          ["meshlet_tcp_connections_opened_total", "meshlet_tcp_connections_closed_total"], unit="cps"),
    panel("TCP throughput", "timeseries",
          [q(rate("meshlet_tcp_bytes_total", "direction, flow", 'destination=~"$destination"'), "{{direction}} {{flow}}")],
          ["meshlet_tcp_bytes_total"], unit="Bps"),
    panel("Timeouts/s by kind", "timeseries",
          [q(rate("meshlet_timeouts_total", "kind", 'destination=~"$destination"'), "{{kind}}")],
          ["meshlet_timeouts_total"], unit="reqps"),
    panel("Retries/s by reason", "timeseries",
          [q(rate("meshlet_retries_total", "reason", 'destination=~"$destination"'), "{{reason}}")],
          ["meshlet_retries_total"], unit="reqps"),
    panel("De-duplication: replays and conflicts", "timeseries",
          [q(rate("meshlet_dedup_total", "outcome", 'destination=~"$destination"'), "{{outcome}}")],
          ["meshlet_dedup_total"], unit="reqps",
          description="Idempotency-Key outcomes at the receiving sidecar: replayed, conflict, mismatch, evicted, stored."),
    panel("Circuit breaker state by endpoint", "timeseries",
          [q('max by (endpoint) (meshlet_breaker_state{destination=~"$destination"})', "{{endpoint}}")],
          ["meshlet_breaker_state"], description="0 closed, 1 open, 2 half-open."),
    panel("Breaker transitions/s", "timeseries",
          [q(rate("meshlet_breaker_transitions_total", "endpoint, to", 'destination=~"$destination"'), "{{endpoint}} → {{to}}")],
          ["meshlet_breaker_transitions_total"], unit="cps"),
]

PROXY_RESOURCES = [
    panel("Proxy CPU by pod", "timeseries",
          [q(rate("process_cpu_seconds_total", "namespace, pod", PROXY), "{{namespace}}/{{pod}}")],
          ["process_cpu_seconds_total"], unit="percentunit",
          description="CPU seconds per second used by each meshlet-proxy container."),
    panel("Proxy memory (RSS) by pod", "timeseries",
          [q(f"sum by (namespace, pod) (process_resident_memory_bytes{{{PROXY}}})", "{{namespace}}/{{pod}}")],
          ["process_resident_memory_bytes"], unit="bytes"),
    panel("Open TCP connections by direction", "timeseries",
          [q(f"sum by (direction) (meshlet_tcp_open_connections{{{PROXY}}})", "{{direction}}")],
          ["meshlet_tcp_open_connections"]),
    panel("Open file descriptors by pod", "timeseries",
          [q(f"sum by (namespace, pod) (process_open_fds{{{PROXY}}})", "{{namespace}}/{{pod}}")],
          ["process_open_fds"]),
    panel("Connections opened/s by direction", "timeseries",
          [q(rate("meshlet_tcp_connections_opened_total", "direction", PROXY), "{{direction}}")],
          ["meshlet_tcp_connections_opened_total"], unit="cps"),
    panel("Top 10 proxies by memory", "table",
          [q(f"topk(10, sum by (namespace, pod) (process_resident_memory_bytes{{{PROXY}}}))", "{{namespace}}/{{pod}}", instant=True)],
          ["process_resident_memory_bytes"], unit="bytes"),
    panel("Control plane CPU", "timeseries",
          [q(rate("process_cpu_seconds_total", "pod", 'container="control-plane"'), "{{pod}}")],
          ["process_cpu_seconds_total"], unit="percentunit"),
    panel("Control plane memory (RSS)", "timeseries",
          [q('sum by (pod) (process_resident_memory_bytes{container="control-plane"})', "{{pod}}")],
          ["process_resident_memory_bytes"], unit="bytes"),
]


def query_variable(name, label, query, multi=True):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": multi,
        "sort": 1,
        "current": {"text": "All", "value": "$__all"},
    }


VARIABLES = [
    {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {"text": "Prometheus", "value": "prometheus"},
    },
    query_variable("namespace", "Namespace", "label_values(meshlet_requests_total, namespace)"),
    query_variable("destination", "Service", "label_values(meshlet_requests_total, destination)"),
]


def grafana_panel(spec, panel_id, x, y):
    targets = [
        {
            "refId": chr(ord("A") + i),
            "datasource": DS,
            "expr": query["expr"],
            "legendFormat": query["legend"],
            "instant": query["instant"],
            "range": not query["instant"],
        }
        for i, query in enumerate(spec["queries"])
    ]
    options = {"legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "lastNotNull"]},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    if spec["kind"] == "table":
        options = {"showHeader": True}
    options.update(spec["options"])
    return {
        "id": panel_id,
        "type": spec["kind"],
        "title": spec["title"],
        "description": spec["description"],
        "datasource": DS,
        "gridPos": {"h": spec["height"], "w": spec["width"], "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": []},
        "options": options,
        "targets": targets,
    }


def dashboard(uid, title, description, specs):
    panels = []
    x = y = 0
    for spec in (s for s in specs if s["metrics"] <= EXPORTED):
        if x + spec["width"] > 24:
            x, y = 0, y + spec["height"]
        panels.append(grafana_panel(spec, len(panels) + 1, x, y))
        x += spec["width"]
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["meshlet"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": VARIABLES},
        "annotations": {"list": []},
        "links": [
            {"title": "meshlet dashboards", "type": "dashboards", "tags": ["meshlet"], "asDropdown": True,
             "icon": "external link", "includeVars": True, "keepTime": True, "targetBlank": False, "tooltip": ""}
        ],
        "panels": panels,
    }


DASHBOARDS = {
    "mesh-overview": ("meshlet-mesh-overview", "meshlet / Mesh overview",
                      "Golden signals of every meshed service as seen by its callers' sidecars.", MESH_OVERVIEW),
    "service-detail": ("meshlet-service-detail", "meshlet / Service detail",
                       "One service: inbound and outbound traffic, status codes, latency, TCP, resilience.", SERVICE_DETAIL),
    "proxy-resources": ("meshlet-proxy-resources", "meshlet / Proxy resources",
                        "CPU, memory, connections and file descriptors of the sidecars and the control plane.", PROXY_RESOURCES),
}


def pending():
    """(dashboard, panel title, missing metric names) of every panel waiting for a metric."""
    return [
        (name, spec["title"], sorted(spec["metrics"] - EXPORTED))
        for name, (_, _, _, specs) in DASHBOARDS.items()
        for spec in specs
        if not spec["metrics"] <= EXPORTED
    ]


def write(directory):
    """Writes every dashboard as <name>.json into `directory`."""
    for name, (uid, title, description, specs) in DASHBOARDS.items():
        text = json.dumps(dashboard(uid, title, description, specs), indent=2, ensure_ascii=False) + "\n"
        (pathlib.Path(directory) / f"{name}.json").write_text(text)


def main():
    if "--pending" in sys.argv:
        for name, title, missing in pending():
            print(f"{name}: {title!r} waits for {', '.join(missing)}")
        return
    write(pathlib.Path(__file__).resolve().parent)


if __name__ == "__main__":
    main()
