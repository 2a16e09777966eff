"""Every metric named by a dashboard query is exported by a real, running proxy or control plane.

The proxy side is a small mesh on 127.0.0.1: `target/debug/meshlet-control serve --mode local` issuing
certificates from join tokens, and two `target/debug/meshlet proxy` sidecars (`client` and `server`) reading a
mesh file that lists the test origin as the service `origin` behind the server sidecar, with a policy: retries
on a tight budget, a per-try timeout, a breaker that opens after two failures, idempotency keys injected by the
client and enforced by the server. Through the client sidecar the test sends plain traffic to an origin outside
the mesh (an explicit-proxy request, a CONNECT tunnel, a request to a closed port) and mTLS traffic to the
origin, which misbehaves on some paths (`/unavailable` answers 503, `/slow` outlives the per-try timeout), so
retries, exhausted budgets, timeouts, breaker states and transitions and de-duplication all produce series.
Then it scrapes both sidecars' `/metrics`. The control plane is checked on its own `/metrics` after one failing
issuance request. When a binary cannot serve yet, its test is skipped with the reason, except under CI=true,
where it fails. Every process is stopped at the end, within bounded waits.
"""

import contextlib
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
TRUST_DOMAIN = "cluster.local"
# How long the origin's /slow path takes; the mesh policy's per-try timeout is shorter.
SLOW_SECONDS = 1.0
# How long the test keeps sending misbehaving traffic until every dashboard metric has a series.
TRAFFIC_SECONDS = 30


def unavailable(reason):
    if IN_CI:
        pytest.fail(reason)
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def identity(namespace, service_account):
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def binary(package, name):
    path = ROOT / "target" / "debug" / name
    if not path.exists():
        subprocess.run(["cargo", "build", "-q", "-p", package, "--bin", name], cwd=ROOT, capture_output=True)
    if not path.exists():
        unavailable(f"{path} does not exist and `cargo build -p {package} --bin {name}` did not produce it")
    return path


@contextlib.contextmanager
def running(args, admin, what, log):
    """Runs `args` (its output in the file `log`) until the block ends; the block starts once `/ready` on the
    admin port answers 200."""
    with open(log, "w") as output:
        process = subprocess.Popen([str(a) for a in args], stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "RUST_BACKTRACE": "0"})
    try:
        wait_ready(process, f"http://127.0.0.1:{admin}/ready", what, log)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_ready(process, url, what, log, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log.read_text().strip()[-600:]
            unavailable(f"{what} exited with {process.returncode} before it was ready: {output}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    unavailable(f"{what} was not ready at {url} within {seconds}s: {log.read_text().strip()[-600:]}")


def scrape(admin):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def curl(*args):
    """The body curl received (empty on failure), bounded in time."""
    done = subprocess.run(["curl", "-s", "--max-time", "10", *args], capture_output=True, text=True, check=False)
    return done.stdout


class Origin(BaseHTTPRequestHandler):
    """200 with a greeting; `/unavailable` answers 503; `/slow` answers 200 after SLOW_SECONDS."""

    def answer(self):
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(min(length, 1 << 16))
        status, body = 200, b"hello from the origin\n"
        if self.path == "/unavailable":
            status, body = 503, b"unavailable\n"
        elif self.path == "/slow":
            time.sleep(SLOW_SECONDS)
        try:
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the caller gave up (per-try timeout)

    do_GET = answer
    do_POST = answer

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving_origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def control_plane(directory, workloads):
    """A local-mode meshlet-control with a join token `token-<ns>-<sa>` per workload; yields (api port, admin
    port, trust anchors file)."""
    control = binary("meshlet-control", "meshlet-control")
    api, admin = free_port(), free_port()
    tokens = directory / "join-tokens.yaml"
    tokens.write_text("".join(f"- token: token-{ns}-{sa}\n  identity: {identity(ns, sa)}\n" for ns, sa in workloads))
    args = [control, "serve", "--mode", "local", "--trust-domain", TRUST_DOMAIN, "--data-dir", directory / "ca",
            "--api-addr", f"127.0.0.1:{api}", "--admin-addr", f"127.0.0.1:{admin}", "--join-tokens", tokens]
    with running(args, admin, "meshlet-control serve", directory / "control.log"):
        yield api, admin, directory / "ca" / "ca.crt"


@contextlib.contextmanager
def sidecar(directory, cp, mesh, namespace, service_account, inbound):
    """A meshlet proxy with the identity namespace/service_account; yields (outbound port, admin port)."""
    meshlet = binary("meshlet", "meshlet")
    api, _, anchors = cp
    outbound, admin = free_port(), free_port()
    args = [meshlet, "proxy", "--outbound-addr", f"127.0.0.1:{outbound}", "--inbound-addr", f"127.0.0.1:{inbound}",
            "--admin-addr", f"127.0.0.1:{admin}", "--drain-delay", "0s",
            "--control-plane-addr", f"127.0.0.1:{api}", "--control-plane-name", "localhost",
            "--trust-anchors", anchors, "--trust-domain", TRUST_DOMAIN, "--namespace", namespace,
            "--service-account", service_account, "--join-token", f"token-{namespace}-{service_account}",
            "--mesh-config", mesh]
    with running(args, admin, f"meshlet proxy ({namespace}/{service_account})",
                 directory / f"proxy-{service_account}.log"):
        yield outbound, admin


def mesh_file(directory, origin, server_inbound):
    """The mesh: the service `origin` behind the server sidecar, with a policy that fails fast and visibly."""
    path = directory / "mesh.yaml"
    path.write_text(f"""services:
  - name: origin
    identity: {identity("test", "origin")}
    endpoints:
      - {{address: '127.0.0.1:{origin}', sidecar: '127.0.0.1:{server_inbound}'}}
policy:
  services:
    origin:
      timeouts: {{request: 5s, per_try: 300ms}}
      retries:
        max_attempts: 3
        backoff: {{base: 10ms, max: 20ms}}
        budget: {{ratio: 0.0, min_per_second: 1, window: 1s}}
      breaker: {{consecutive_failures: 2, base_ejection: 1s, max_ejection: 2s}}
      idempotency: {{inject: true, enforce: true}}
""")
    return path


def dashboard_metrics():
    """{metric name: [where it is used]} over every dashboard query."""
    used = {}
    for name, title, expr in queries():
        for metric in metric_names(substitute(expr)):
            used.setdefault(metric, []).append(f"{name}: {title}")
    return used


def missing_from(exported, wanted):
    return {metric: places for metric, places in dashboard_metrics().items() if wanted(metric) and metric not in exported}


def proxy_metric(metric):
    return not metric.startswith("meshlet_control_")


@pytest.fixture
def proxy_metrics(tmp_path):
    workloads = [("test", "client"), ("test", "origin")]
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(serving_origin())
        origin = stack.enter_context(serving_origin())
        server_inbound = free_port()
        mesh = mesh_file(tmp_path, origin, server_inbound)
        cp = stack.enter_context(control_plane(tmp_path, workloads))
        _, server_admin = stack.enter_context(sidecar(tmp_path, cp, mesh, "test", "origin", server_inbound))
        outbound, client_admin = stack.enter_context(sidecar(tmp_path, cp, mesh, "test", "client", free_port()))
        proxy = f"http://127.0.0.1:{outbound}"

        # Outside the mesh: plain HTTP, a CONNECT tunnel, a refused connection.
        assert curl("-x", proxy, f"http://127.0.0.1:{plain}/") == "hello from the origin\n", \
            "a request through the client sidecar must reach the origin outside the mesh"
        curl("-p", "-x", proxy, f"http://127.0.0.1:{plain}/")
        curl("-x", proxy, f"http://127.0.0.1:{free_port()}/")

        # Inside the mesh (mTLS to the server sidecar), before the breaker has a reason to open.
        assert curl("-x", proxy, f"http://127.0.0.1:{origin}/") == "hello from the origin\n", \
            "a request through both sidecars must reach the meshed origin"

        # Misbehaviour until every policy metric has a series (the retry budget allows one retry a second,
        # the breaker opens after two failures and half-opens after a second).
        deadline = time.monotonic() + TRAFFIC_SECONDS
        while True:
            curl("-x", proxy, "-d", "{}", f"http://127.0.0.1:{origin}/charge")
            curl("-x", proxy, f"http://127.0.0.1:{origin}/slow")
            curl("-x", proxy, f"http://127.0.0.1:{origin}/unavailable")
            curl("-x", proxy, f"http://127.0.0.1:{origin}/unavailable")
            exported = scrape(client_admin) | scrape(server_admin)
            if not missing_from(exported, proxy_metric) or time.monotonic() > deadline:
                break
        yield exported


@pytest.fixture
def control_plane_metrics(tmp_path):
    with control_plane(tmp_path, [("default", "x")]) as (api, admin, _):
        # One rejected issuance, so the error counter has a sample.
        request = urllib.request.Request(
            f"https://127.0.0.1:{api}/v1/certificates", method="POST",
            data=json.dumps({"identity": identity("default", "x"), "csr_pem": "not a csr"}).encode(),
            headers={"content-type": "application/json", "authorization": "Bearer not-a-token"},
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        try:
            urllib.request.urlopen(request, timeout=5, context=insecure)
        except urllib.error.HTTPError as rejected:
            assert 400 <= rejected.code < 500
        yield scrape(admin)


def test_proxy_exports_every_proxy_metric_of_the_dashboards(proxy_metrics):
    missing = missing_from(proxy_metrics, proxy_metric)
    assert not missing, f"used by dashboards, not exported by meshlet proxy: {json.dumps(missing, indent=2)}"


def test_control_plane_exports_every_control_plane_metric_of_the_dashboards(control_plane_metrics):
    # The control plane's panels use its own metrics and the standard process metrics.
    wanted = lambda m: m.startswith(("meshlet_control_", "process_"))  # noqa: E731
    missing = missing_from(control_plane_metrics, wanted)
    assert not missing, f"used by dashboards, not exported by meshlet-control: {json.dumps(missing, indent=2)}"
