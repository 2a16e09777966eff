"""Every metric named by a dashboard query is exported by a real, running proxy or control plane.

Starts `target/debug/meshlet proxy` with its listeners on 127.0.0.1, sends traffic through it (a plain
explicit-proxy request, a CONNECT tunnel, a request to a closed port), starts `target/debug/meshlet-control
serve --mode local` and makes one failing issuance request, then scrapes both `/metrics`. When a binary cannot
serve yet, its test is skipped with the reason, except under CI=true, where it fails.
"""

import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chart import ROOT
from test_dashboards import metric_names, queries, substitute

IN_CI = os.environ.get("CI") == "true"


def unavailable(reason):
    if IN_CI:
        pytest.fail(reason)
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(package, name):
    path = ROOT / "target" / "debug" / name
    if not path.exists():
        subprocess.run(["cargo", "build", "-q", "-p", package, "--bin", name], cwd=ROOT, capture_output=True)
    if not path.exists():
        unavailable(f"{path} does not exist and `cargo build -p {package} --bin {name}` did not produce it")
    return path


def wait_ready(process, url, what, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            unavailable(f"{what} exited with {process.returncode} before it was ready: {output.strip()[:300]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    unavailable(f"{what} was not ready at {url} within {seconds}s")


def scrape(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


class Origin(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from the origin\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def proxy_metrics(origin):
    meshlet = binary("meshlet", "meshlet")
    outbound, inbound, admin = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [str(meshlet), "proxy", "--outbound-addr", f"127.0.0.1:{outbound}", "--inbound-addr", f"127.0.0.1:{inbound}",
         "--admin-addr", f"127.0.0.1:{admin}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    try:
        wait_ready(process, f"http://127.0.0.1:{admin}/ready", "meshlet proxy")
        proxy = f"http://127.0.0.1:{outbound}"
        closed = free_port()
        for args in (["-x", proxy, f"http://127.0.0.1:{origin}/"],
                     ["-p", "-x", proxy, f"http://127.0.0.1:{origin}/"],
                     ["-x", proxy, f"http://127.0.0.1:{closed}/"]):
            subprocess.run(["curl", "-s", "-o", "/dev/null", "--max-time", "10", *args], check=False)
        ok = subprocess.run(["curl", "-s", "--max-time", "10", "-x", proxy, f"http://127.0.0.1:{origin}/"],
                            capture_output=True, text=True)
        assert ok.stdout == "hello from the origin\n", "the request through the proxy must reach the origin"
        yield scrape(f"http://127.0.0.1:{admin}/metrics")
    finally:
        process.terminate()
        process.wait(timeout=40)


@pytest.fixture
def control_plane_metrics(tmp_path):
    control = binary("meshlet-control", "meshlet-control")
    api, admin = free_port(), free_port()
    tokens = tmp_path / "join-tokens.yaml"
    tokens.write_text("- token: dashboards-test\n  identity: spiffe://cluster.local/ns/default/sa/x\n")
    process = subprocess.Popen(
        [str(control), "serve", "--mode", "local", "--data-dir", str(tmp_path / "ca"), "--api-addr", f"127.0.0.1:{api}",
         "--admin-addr", f"127.0.0.1:{admin}", "--join-tokens", str(tokens)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    try:
        wait_ready(process, f"http://127.0.0.1:{admin}/ready", "meshlet-control serve")
        # One rejected issuance, so the error counter has a sample.
        request = urllib.request.Request(
            f"https://127.0.0.1:{api}/v1/certificates", method="POST",
            data=json.dumps({"identity": "spiffe://cluster.local/ns/default/sa/x", "csr_pem": "not a csr"}).encode(),
            headers={"content-type": "application/json", "authorization": "Bearer not-a-token"},
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        try:
            urllib.request.urlopen(request, timeout=5, context=insecure)
        except urllib.error.HTTPError as rejected:
            assert 400 <= rejected.code < 500
        yield scrape(f"http://127.0.0.1:{admin}/metrics")
    finally:
        process.terminate()
        process.wait(timeout=40)


def dashboard_metrics():
    """{metric name: [where it is used]} over every dashboard query."""
    used = {}
    for name, title, expr in queries():
        for metric in metric_names(substitute(expr)):
            used.setdefault(metric, []).append(f"{name}: {title}")
    return used


def missing_from(exported, wanted):
    return {metric: places for metric, places in dashboard_metrics().items() if wanted(metric) and metric not in exported}


def test_proxy_exports_every_proxy_metric_of_the_dashboards(proxy_metrics):
    missing = missing_from(proxy_metrics, lambda m: not m.startswith("meshlet_control_"))
    assert not missing, f"used by dashboards, not exported by meshlet proxy: {json.dumps(missing, indent=2)}"


def test_control_plane_exports_every_control_plane_metric_of_the_dashboards(control_plane_metrics):
    # The control plane's panels use its own metrics and the standard process metrics.
    wanted = lambda m: m.startswith(("meshlet_control_", "process_"))  # noqa: E731
    missing = missing_from(control_plane_metrics, wanted)
    assert not missing, f"used by dashboards, not exported by meshlet-control: {json.dumps(missing, indent=2)}"
