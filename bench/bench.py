#!/usr/bin/env python3
"""keygate load benchmark: direct client -> upstream vs client -> keygate
(injection + audit on) -> upstream, on loopback, in one run.

Started by bench/run.sh (which builds the release binaries); see
bench/README.md. Needs: oha, nginx, openssl, curl (and mitmdump with
--mitmproxy). Writes bench/results/latest.{md,json} (or --out DIR).
"""

import argparse
import resource
import base64
import json
import os
import re
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "api.bench.test"
SECRET = "sk-bench-0123456789abcdef"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = 1024 * 1024


def log(*a):
    print("bench:", *a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    """Runs a command; on failure, exits naming it with its output."""
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n"
                         f"{out.stdout[-1000:]}{out.stderr[-2000:]}")
    return out


# ---------------------------------------------------------------- processes


def cpu_seconds(pid):
    """utime + stime of a process (all threads), in seconds."""
    user, system = cpu_split(pid)
    return user + system


def cpu_split(pid):
    """(utime, stime) of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def thread_cpu(pid):
    """CPU seconds per thread name (tokio-rt-worker, sqlx-sqlite-worker...)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[comm] = out.get(comm, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def mem_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(pid):
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def wait_for(path, pattern, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            text = Path(path).read_text()
            m = re.search(pattern, text, re.M)
            if m:
                return m
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {pattern!r} in {path}:\n" + Path(path).read_text())


def wait_port(port, proc, what, out, timeout=10):
    """Waits until 127.0.0.1:port accepts; fails with the process's output if
    it exits or the port stays closed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    state = "exited" if proc.poll() is not None else f"not listening on {port} after {timeout} s"
    raise SystemExit(f"{what} did not start ({state}):\n" + Path(out).read_text()[-2000:])


@dataclass
class Proxy:
    """A proxy oha can go through: keygate, or a peer (mitmproxy)."""
    key: str  # prefix of its per-request CPU key: kg_cpu_us_per_req...
    pid: int
    addr: str  # host:port
    ca: Path  # CA the client trusts for the intercepted TLS
    oha_args: list = field(default_factory=list)


class World:
    """Certificates, nginx, the streaming upstream and keygate, in a temp dir."""

    def __init__(self, bindir, work):
        self.bindir = Path(bindir)
        self.work = Path(work)
        self.procs = []
        self.keygate_args = []
        self.keygate_wrap = []  # e.g. valgrind --tool=callgrind ...
        self.proxies = {}  # name -> Proxy
        self.paced_load = self.bindir / "paced-load"  # crates/test-support

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()

    def certs(self):
        w = self.work
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=keygate bench CA",
             "-keyout", w / "ca.key", "-out", w / "ca.pem"])
        run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", f"/CN={HOST}", "-keyout", w / "leaf.key", "-out", w / "leaf.csr"])
        (w / "ext.cnf").write_text(
            f"subjectAltName=DNS:{HOST}\nextendedKeyUsage=serverAuth\n"
            "basicConstraints=CA:FALSE\n")
        run(["openssl", "x509", "-req", "-in", w / "leaf.csr", "-CA", w / "ca.pem",
             "-CAkey", w / "ca.key", "-CAcreateserial", "-days", "2",
             "-extfile", w / "ext.cnf", "-out", w / "leaf.pem"])
        self.ca = w / "ca.pem"

    def nginx(self, http2=True):
        w = self.work
        self.h2 = " http2" if http2 else ""
        self.nginx_port = free_port()
        body = json.dumps({"id": "bench", "object": "chat.completion",
                           "pad": "x" * 940})[:1024]
        body = body + " " * (1024 - len(body))
        assert len(body) == 1024
        for d in ("tmp", "logs"):
            (w / d).mkdir(exist_ok=True)
        conf = f"""
worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/logs/error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {w}/tmp;
  proxy_temp_path {w}/tmp;
  fastcgi_temp_path {w}/tmp;
  uwsgi_temp_path {w}/tmp;
  scgi_temp_path {w}/tmp;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  http2_max_requests 10000000;
  server {{
    listen 127.0.0.1:{self.nginx_port} ssl{self.h2};
    server_name {HOST};
    ssl_certificate {w}/leaf.pem;
    ssl_certificate_key {w}/leaf.key;
    # nginx before 1.23.4 (Debian 12 ships 1.22) leaves TLS 1.3 off unless
    # asked; the APIs agents call all speak it.
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    location / {{
      default_type application/json;
      return 200 '{body}';
    }}
  }}
}}
"""
        (w / "nginx.conf").write_text(conf)
        p = subprocess.Popen(["nginx", "-p", str(w), "-c", str(w / "nginx.conf")],
                             stdout=subprocess.DEVNULL, stderr=open(w / "nginx.out", "w"))
        self.procs.append(p)
        wait_port(self.nginx_port, p, "nginx", w / "nginx.out")

    def upstream_cpu(self):
        """CPU seconds of nginx (master and workers)."""
        master = self.procs[0].pid
        pids = [master]
        try:
            pids += [int(p) for p in
                     Path(f"/proc/{master}/task/{master}/children").read_text().split()]
        except OSError:
            pass
        total = 0.0
        for p in pids:
            try:
                total += cpu_seconds(p)
            except OSError:
                pass
        return total

    def stream_upstream(self):
        exe = self.bindir / "stream-upstream"
        if not exe.exists():
            self.stream = None
            return
        out = self.work / "stream.out"
        p = subprocess.Popen([str(exe), HOST], stdout=open(out, "w"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        m = wait_for(out, r"tls=(\S+) plain=(\S+) ca=(\S+)\n")
        self.stream = {"tls": m.group(1), "ca": m.group(3)}

    def keygate(self):
        w = self.work
        env = dict(os.environ, KEYGATE_DATA_DIR=str(w / "data"))
        for k in ("KEYGATE_MASTER_KEY", "KEYGATE_MASTER_KEY_FILE", "KEYGATE_DATABASE_URL",
                  "KEYGATE_LOG"):
            env.pop(k, None)
        self.env = env
        args = [str(self.bindir / "keygate"), "serve", "--proxy-listen", "127.0.0.1:0",
                "--admin-listen", "127.0.0.1:0", "--upstream-ca", str(self.ca),
                "--allow-net", "127.0.0.0/8",
                "--resolve", f"{HOST}:443=127.0.0.1:{self.nginx_port}"]
        args = self.keygate_wrap + args + self.keygate_args
        if self.stream:
            args += ["--upstream-ca", self.stream["ca"],
                     "--resolve", f"{HOST}:8443={self.stream['tls']}"]
        out = w / "keygate.log"
        p = subprocess.Popen(args, env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        self.kg = p
        m = wait_for(out, r"^keygate: proxy on http://(\S+) +admin API on http://(\S+)\n",
                     timeout=120 if self.keygate_wrap else 30)
        self.proxy, admin = m.group(1), m.group(2)
        env["KEYGATE_ADMIN_URL"] = f"http://{admin}"
        kg = str(self.bindir / "keygate")
        run([kg, "secret", "add", "bench", "--host", HOST, "--path", "/v1/*"],
            input=SECRET, env=env)
        if self.stream:
            run([kg, "secret", "add", "bench-stream", "--host", f"{HOST}:8443", "--path", "/sse"],
                input=SECRET, env=env)
        grants = ["--grant", "bench"] + (["--grant", "bench-stream"] if self.stream else [])
        token = run([kg, "agent", "create", "bench"] + grants, env=env).stdout.strip()
        self.token = token
        self.kg_ca = w / "data" / "ca.pem"
        auth = base64.b64encode(f"agent:{token}".encode()).decode()
        self.proxies["keygate"] = Proxy(
            "kg", p.pid, self.proxy, self.kg_ca,
            ["--proxy-header", f"Proxy-Authorization: Basic {auth}"])

    def mitmproxy(self):
        """mitmdump with bench/mitm_inject.py, doing what keygate's "bench"
        secret does (Authorization: Bearer on api.bench.test /v1/*, --resolve
        to nginx, nginx's CA trusted upstream); its own CA in the temp dir."""
        w = self.work
        port = free_port()
        conf = w / "mitmproxy"
        args = [shutil.which("mitmdump"), "--listen-host", "127.0.0.1",
                "--listen-port", str(port), "-s", str(Path(__file__).with_name("mitm_inject.py")),
                "--set", f"confdir={conf}", "--set", f"ssl_verify_upstream_trusted_ca={self.ca}",
                "--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
                "--set", f"inject_host={HOST}", "--set", f"inject_secret={SECRET}",
                "--set", f"inject_resolve={HOST}:443=127.0.0.1:{self.nginx_port}"]
        out = w / "mitmdump.log"
        p = subprocess.Popen(args, stdout=open(out, "w"), stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        self.procs.append(p)
        wait_port(port, p, "mitmdump", out, timeout=30)
        version = run([args[0], "--version"]).stdout.split("\n")[0].split()[-1]
        self.proxies["mitmproxy"] = Proxy("mitm", p.pid, f"127.0.0.1:{port}",
                                          conf / "mitmproxy-ca-cert.pem")
        return {"version": version}

    def hudsucker(self, exe, wrap=()):
        """bench/peers/hudsucker (hudsucker's interceptor plus the same
        injection and --resolve, nothing else); the bench CA signs its leaves."""
        w = self.work
        self._peer("hudsucker", "hsk", "hudsucker-peer", wrap, lambda port: [
            str(exe), f"127.0.0.1:{port}", str(w / "ca.pem"), str(w / "ca.key"),
            str(self.ca), f"{HOST}:443=127.0.0.1:{self.nginx_port}", HOST, SECRET])
        return {"version": "0.24 (bench/peers/hudsucker)"}

    def floor(self, exe, wrap=()):
        """tls-pipe (crates/test-support): CONNECT, TLS in with nginx's own
        leaf (the bench CA), TLS out to nginx, bytes copied both ways; no HTTP,
        no injection. The floor of any TLS-intercepting proxy."""
        w = self.work
        self._peer("floor", "flr", "tls-pipe", wrap, lambda port: [
            str(exe), f"127.0.0.1:{port}", str(w / "leaf.pem"), str(w / "leaf.key"),
            str(self.ca), HOST, f"127.0.0.1:{self.nginx_port}"])
        return {"version": "tls-pipe (crates/test-support)"}

    def h1_model(self, exe, wrap=()):
        """tls-pipe with a header to inject: HTTP/1.1 only, each request head
        parsed and rewritten with the real key, bodies forwarded by length;
        a model of the cheapest HTTP/1.1 fast path (no auth, matching, audit)."""
        w = self.work
        self._peer("h1-model", "h1m", "tls-pipe-h1", wrap, lambda port: [
            str(exe), f"127.0.0.1:{port}", str(w / "leaf.pem"), str(w / "leaf.key"),
            str(self.ca), HOST, f"127.0.0.1:{self.nginx_port}",
            f"Authorization: Bearer {SECRET}"])
        return {"version": "tls-pipe HEADER (crates/test-support)", "http1_only": True}

    def _peer(self, name, key, what, wrap, argv):
        """Starts a peer proxy of ours (argv(port) is its command line; wrap,
        e.g. valgrind, goes in front), waits for its port and registers it
        under `name`; its leaves are signed by the bench CA."""
        port = free_port()
        out = self.work / f"{what}.log"
        p = subprocess.Popen([*wrap, *argv(port)], stdout=open(out, "w"),
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        wait_port(port, p, what, out, timeout=60 if wrap else 10)
        self.proxies[name] = Proxy(key, p.pid, f"127.0.0.1:{port}", self.ca)

    def audit_count(self):
        out = subprocess.run([str(self.bindir / "keygate"), "audit", "--json", "--limit", "1"],
                             env=self.env, capture_output=True, text=True)
        return out.stdout.strip()


# ---------------------------------------------------------------- load


def oha_cmd(world, px, url, conc, seconds, http2, keepalive, rate, requests):
    """oha's command line for one run (px: the proxy, None for direct)."""
    cmd = ["oha", "--no-tui", "--output-format", "json", "-c", str(conc),
           "-H", "Authorization: Bearer placeholder"]
    if requests:
        cmd += ["-n", str(requests)]
    else:
        cmd += ["-z", f"{seconds}s"]
    if http2:
        cmd += ["--http2"]
    if not keepalive:
        cmd += ["--disable-keepalive"]
    if rate:
        cmd += ["-q", str(rate)]
    if px:
        cmd += ["--no-pre-lookup", "-x", f"http://{px.addr}", "--cacert", str(px.ca)]
        cmd += px.oha_args
    else:
        cmd += ["--connect-to", f"{HOST}:443:127.0.0.1:{world.nginx_port}",
                "--cacert", str(world.ca)]
    return cmd + [url]


def paced_cmd(world, px, url, conc, seconds, rate):
    """paced-load's command line (crates/test-support): HTTP/1.1 keep-alive,
    requests evenly spaced at `rate` per second over `conc` connections."""
    cmd = [str(world.paced_load), "--url", url, "--rate", str(rate), "--seconds", str(seconds),
           "--connections", str(conc), "-H", "Authorization: Bearer placeholder"]
    if px:
        cmd += ["--proxy", px.addr, "--cacert", str(px.ca)]
        # the Proxy-Authorization value oha is given as a --proxy-header
        for a in px.oha_args:
            name, _, value = a.partition(":")
            if name.strip().lower() == "proxy-authorization":
                cmd += ["--proxy-auth", value.strip()]
    else:
        cmd += ["--connect-to", f"127.0.0.1:{world.nginx_port}", "--cacert", str(world.ca)]
    return cmd


def oha(world, via, conc, seconds, http2=False, keepalive=True, rate=None,
        requests=None, paced=False):
    """via: None (direct to nginx) or a name in world.proxies. paced: the
    requests leave evenly spaced at `rate` (paced-load, HTTP/1.1 only)
    instead of in oha's -q bursts."""
    url = f"https://{HOST}/v1/chat/completions"
    px = world.proxies[via] if via else None
    if paced:
        cmd = paced_cmd(world, px, url, conc, seconds, rate)
    else:
        cmd = oha_cmd(world, px, url, conc, seconds, http2, keepalive, rate, requests)
    pid = (px or world.proxies["keygate"]).pid
    perf = None
    strace = None
    tag = f"c{conc}{'-h2' if http2 else ''}{'' if keepalive else '-cold'}{f'-q{rate}' if rate else ''}"
    if via and getattr(world, "strace_dir", None):
        world.strace_dir.mkdir(parents=True, exist_ok=True)
        # keygate's file keeps its old name; a peer's is named after it.
        name = f"strace-{tag}.txt" if via == "keygate" else f"strace-{via}-{tag}.txt"
        strace_out = world.strace_dir / name
        strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(strace_out)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached to every thread before the load starts
    if via and getattr(world, "perf_dir", None):
        world.perf_dir.mkdir(parents=True, exist_ok=True)
        # keygate's file keeps its old name; a peer's is named after it.
        name = f"perf-{tag}.data" if via == "keygate" else f"perf-{via}-{tag}.data"
        perf = subprocess.Popen(["perf", "record", "-q", "-F", os.environ.get("PERF_FREQ", "2999"), "--call-graph", os.environ.get("PERF_CALLGRAPH", "fp"), "-p", str(pid),
                                 "-o", str(world.perf_dir / name)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
    up0 = world.upstream_cpu()
    (usr0, sys0), threads0 = cpu_split(pid), thread_cpu(pid)
    cpu0 = usr0 + sys0
    t0 = time.time()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=(seconds or 30) * 4 + 60)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.time() - t0
    (usr1, sys1), threads1 = cpu_split(pid), thread_cpu(pid)
    cpu1 = usr1 + sys1
    up1 = world.upstream_cpu()
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait(30)
    if strace:
        strace.send_signal(signal.SIGINT)
        strace.wait(30)
    if out.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({out.returncode}): {out.stderr}\n{' '.join(cmd)}")
    data = json.loads(out.stdout)
    if paced:
        data = oha_shape(data)
    codes = data.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    total = sum(codes.values())
    # Requests cut off by the end of a -z run are not failures.
    errors = sum(v for k, v in data.get("errorDistribution", {}).items()
                 if "deadline" not in k)
    pct = data.get("latencyPercentiles", {})
    res = {
        "requests": total,
        "ok": ok,
        "errors": errors,
        "non_2xx": total - ok,
        "rps": data["summary"].get("requestsPerSec") or 0.0,
        "p50_us": (pct.get("p50") or 0) * 1e6,
        "p99_us": (pct.get("p99") or 0) * 1e6,
        "wall_s": wall,
    }
    if paced:
        # how late paced-load handed requests to a connection (its own jitter)
        res["lag_p99_us"] = data["paced"]["lag_p99_us"]
        res["p999_us"] = data["paced"]["p999_us"]
    if total:
        # Calibration: what the (C, event-driven) upstream spends per request.
        res["upstream_cpu_us_per_req"] = (up1 - up0) * 1e6 / total
        # ... and the load generator (oha, a child of this script).
        client = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        res["client_cpu_us_per_req"] = client * 1e6 / total
    if px and total:
        res[f"{px.key}_cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / total
        # The share of it spent in the kernel (system calls, loopback TCP).
        if cpu1 > cpu0:
            res[f"{px.key}_kernel_share"] = (sys1 - sys0) / (cpu1 - cpu0)
    if strace and total:
        calls = strace_calls(strace_out)
        res[f"{px.key}_syscalls_per_req"] = {k: v / total for k, v in calls.items()}
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
        print(f"bench: strace {via} {tag}: syscalls per request: "
              + ", ".join(f"{k} {v / total:.2f}" for k, v in top), file=sys.stderr)
    if via == "keygate" and total:
        # The audit writer (SQLite, its own thread) apart from the proxy.
        audit = sum(v - threads0.get(k, 0.0) for k, v in threads1.items() if k.startswith(("sqlx", "keygate-audit")))
        res["kg_audit_cpu_us_per_req"] = audit * 1e6 / total
        res["kg_proxy_cpu_us_per_req"] = res["kg_cpu_us_per_req"] - res["kg_audit_cpu_us_per_req"]
    return res


def oha_shape(p):
    """paced-load's report in the shape of oha's JSON (what oha() reads)."""
    if p.get("errors"):
        log(f"paced-load: {p['errors']} errors, first: {p.get('first_error')}")
    return {
        "statusCodeDistribution": {"200": p["ok"], "500": p["non_2xx"]},
        "errorDistribution": {p.get("first_error") or "error": p["errors"]} if p["errors"] else {},
        "latencyPercentiles": {"p50": p["p50_us"] / 1e6, "p99": p["p99_us"] / 1e6},
        "summary": {"requestsPerSec": p["rps"]},
        "paced": p,
    }


def strace_calls(path):
    """{syscall: calls} from the summary table `strace -c` writes."""
    calls = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return calls
    for line in lines:
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(f) >= 5 and f[3].isdigit() and f[-1] != "total":
            calls[f[-1]] = int(f[3])
    return calls


def median_result(runs):
    """One result from alternating rounds: per-metric median (request and
    error counts summed); the rounds themselves are kept."""
    if len(runs) == 1:
        return runs[0]
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs if k in r]
        out[k] = sum(vals) if k in ("requests", "ok", "errors", "non_2xx") \
            else statistics.median(vals)
    out["rounds"] = runs
    return out


def measure(world, vias, rounds, **kw):
    """Runs direct, then each proxy in `vias`, `rounds` times over
    (alternating, so that a drift of the machine hits all alike); returns
    {None: direct, via: result} with per-round ratios and added p50 for each
    via, and their medians."""
    runs = {v: [] for v in [None, *vias]}
    per_round = {v: [] for v in vias}
    for _ in range(rounds):
        d = oha(world, None, **kw)
        runs[None].append(d)
        for v in vias:
            try:
                x = oha(world, v, **kw)
            except SystemExit as e:
                if v == "keygate":
                    raise
                log(f"via {v}: skipped: {e}")
                continue
            runs[v].append(x)
            per_round[v].append(vs_direct(d, x))
    out = {None: median_result(runs[None])}
    for v in vias:
        if not runs[v]:
            out[v] = {"skipped": "failed"}
            continue
        x = out[v] = median_result(runs[v])
        ratios = [r for r, _ in per_round[v] if r is not None]
        x["ratio"] = statistics.median(ratios) if ratios else None
        x["added_p50_us"] = statistics.median(a for _, a in per_round[v])
        x["ratio_rounds"] = ratios
    return out


def keygate_row(row, got):
    """Fills a scenario row from measure(): the direct and keygate results,
    with keygate's ratio, added p50 and per-round ratios on the row."""
    row["direct"], row["keygate"] = got[None], got["keygate"]
    for key in ("ratio", "added_p50_us", "ratio_rounds"):
        row[key] = row["keygate"].pop(key)


def vs_direct(direct, proxied):
    """(req/s ratio to the direct run, added p50 µs)."""
    ratio = proxied["rps"] / direct["rps"] if direct["rps"] else None
    return ratio, proxied["p50_us"] - direct["p50_us"]


def sse_ttfb(world, via_keygate, n):
    """Median/max time to first SSE event (curl time_starttransfer is the first
    body byte), stream held open by the upstream for 1 s after the event."""
    if not world.stream or n <= 0:
        return None
    host, port = world.stream["tls"].rsplit(":", 1)
    url = f"https://{HOST}:8443/sse?events=1&hold_ms=300"
    times = []
    for _ in range(n):
        cmd = ["curl", "-sS", "-N", "--max-time", "10", "-o", "/dev/null", "-w",
               "%{time_starttransfer} %{time_appconnect}", "-H", "Authorization: Bearer placeholder"]
        if via_keygate:
            cmd += ["--proxy", f"http://agent:{world.token}@{world.proxy}",
                    "--cacert", str(world.kg_ca)]
        else:
            cmd += ["--connect-to", f"{HOST}:8443:{host}:{port}", "--cacert", world.stream["ca"]]
        out = subprocess.run(cmd + [url], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
        if out.returncode not in (0, 28):
            raise SystemExit(f"curl failed: {out.stderr}")
        start, app = (float(x) for x in out.stdout.split())
        times.append((start - app) * 1e6)
    times.sort()
    return {"requests": n, "p50_us": times[len(times) // 2], "max_us": times[-1]}


async def _open_tunnels(world, n, conc=64):
    import asyncio
    import ssl
    ctx = ssl.create_default_context(cafile=str(world.kg_ca))
    ctx.set_alpn_protocols(["http/1.1"])
    host, port = world.proxy.rsplit(":", 1)
    auth = base64.b64encode(f"agent:{world.token}".encode()).decode()
    held, errors = [], 0
    sem = asyncio.Semaphore(conc)

    async def one():
        nonlocal errors
        async with sem:
            try:
                r, w = await asyncio.open_connection(host, int(port))
                w.write(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n"
                        f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
                head = await r.readuntil(b"\r\n\r\n")
                if b" 200" not in head.split(b"\r\n")[0]:
                    raise OSError(head[:40])
                await w.start_tls(ctx, server_hostname=HOST)
                held.append(w)
            except Exception:
                errors += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return held, errors


def idle_tunnels(world, n):
    """Opens n tunnels (CONNECT + TLS handshake, no request) and holds them:
    keygate's RSS per idle tunnel and errors."""
    import asyncio
    pid = world.kg.pid
    rss0 = mem_kib(pid, "VmRSS")

    async def go():
        t0 = time.time()
        held, errors = await _open_tunnels(world, n)
        await asyncio.sleep(0.5)
        rss1 = mem_kib(pid, "VmRSS")
        res = {"tunnels": n, "held": len(held), "errors": errors,
               "open_s": time.time() - t0,
               "rss_before_mib": rss0 / 1024, "rss_held_mib": rss1 / 1024,
               "kib_per_tunnel": (rss1 - rss0) / max(1, len(held))}
        for w in held:
            w.close()
        return res

    return asyncio.run(go())


# ---------------------------------------------------------------- report


# ---------------------------------------------------------------- callgrind

# Where a function's instructions are counted, by the first matching
# fragment of its (demangled) name. Inlined code counts where it was inlined:
# a hyper or http function inlined into keygate's forwarding counts as ours.
GROUPS = [
    ("keygate (our code)", ("keygate_",)),
    # SHA-256 in steady state is the audit chain (TLS 1.3 records use AES-GCM;
    # the token hash runs once per CONNECT). Under valgrind aws-lc takes its
    # AVX path, not SHA-NI, so this is an upper bound.
    ("audit: SQLite, rusqlite, chain SHA-256, JSON", ("sqlite3", "sqlx", "rusqlite", "walChecksum",
                                                      "walIndex", "pcache", "Btree", "btree",
                                                      "Vdbe", "vdbe", "balance_nonroot", "sha256",
                                                      "serde", "Page", "page", "Cell", "cell",
                                                      "releaseMemArray", "allocateCursor",
                                                      "moveToRoot")),
    ("TLS (rustls, aws-lc)", ("rustls", "aws_lc", "aesni", "ecp_nistz", "sha512_block", "gcm",
                              "bn_", "x25519", "ChaCha", "poly1305")),
    ("HTTP (hyper, h2, http, httparse)", ("hyper", "h2::", "http::", "httparse", "want::",
                                          "http_body", "tracing::span")),
    ("runtime (tokio, mio, futures)", ("tokio", "mio::", "futures", "<mio", "pthread_mutex",
                                       "Timespec")),
    ("malloc / free", ("malloc", "free", "_int_", "realloc", "memalign", "tcache",
                       "unlink_chunk", "__rust_alloc", "__rust_dealloc", "__rdl_", "alloc::alloc",
                       "finish_grow")),
    ("memcpy / memmove / memcmp", ("memcpy", "memmove", "memset", "memcmp", "strlen")),
]


def callgrind_group(name):
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def callgrind_self_cost(path):
    """Self cost (Ir) per function from a callgrind out file: cost lines
    under fn=, except the line after calls= (that one is the callee's
    inclusive cost)."""
    names = {}
    cost = {}
    fn = None
    after_calls = False
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("fn="):
                m = re.match(r"fn=\((\d+)\)(?: (.*))?", line)
                if m:
                    if m.group(2) is not None:
                        names[m.group(1)] = m.group(2)
                    fn = names.get(m.group(1), m.group(1))
                else:
                    fn = line[3:]
                continue
            m = re.match(r"c?fn=\((\d+)\) (.*)", line)
            if m:  # cfn= defines names too
                names[m.group(1)] = m.group(2)
                continue
            if line.startswith("calls="):
                after_calls = True
                continue
            if fn and line[:1] in "0123456789+-*":
                if after_calls:
                    after_calls = False
                    continue
                # position, then the events in order (Ir first; with
                # --cache-sim the miss counts follow, trailing zeros left out)
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    cost[fn] = cost.get(fn, 0) + int(parts[1])
    return cost


def callgrind_summary(path):
    """The dump's whole-thread totals by event name (its `events:` and
    `summary:` lines)."""
    events, summary = [], []
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("summary:"):
                summary = [int(v) for v in line.split()[1:]]
    return dict(zip(events, summary + [0] * (len(events) - len(summary))))


def callgrind_profile(bindir, requests, http2, out_dir, peer=None, cache_sim=False,
                      upstream_http2=True):
    """keygate (or peer: (name, binary), a World method's name) under
    callgrind: instructions (user space only, repeatable for the same binary
    and inputs) per keep-alive request, by component; with cache_sim also
    the simulated L1 misses per request of each thread."""
    if not shutil.which("valgrind"):
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    work = tempfile.mkdtemp(prefix="keygate-callgrind-")
    outfile = Path(work) / "callgrind.out"
    world = World(bindir, work)
    wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={outfile}",
            "--dump-instr=no", "--collect-atstart=yes", "--separate-threads=yes"]
    if cache_sim:
        wrap.append("--cache-sim=yes")
    via = peer[0] if peer else "keygate"
    try:
        world.certs()
        world.nginx(http2=upstream_http2)
        world.stream = None
        if peer:
            world.keygate()  # oha() reads keygate's pid when no peer is named
            getattr(world, peer[0].replace("-", "_"))(peer[1], wrap)
        else:
            world.keygate_wrap = wrap
            world.keygate()
        pid = world.proxies[via].pid
        # warm-up: leaf minted, upstream pool filled, audit table created
        oha(world, via, 1, 0, http2=http2, requests=50)
        run(["callgrind_control", "--zero", str(pid)])
        oha(world, via, 1, 0, http2=http2, requests=requests)
        run(["callgrind_control", "--dump", str(pid)])
        # One file per thread (--separate-threads): callgrind.out.1-NN.
        dumps = sorted(Path(work).glob("callgrind.out.1-*"))
        if not dumps:
            raise SystemExit(f"callgrind wrote no dump in {work}")
        self_cost = {}
        threads = {}  # role -> instructions
        misses = {}  # role -> {event: count}, with --cache-sim
        for i, dump in enumerate(dumps):
            cost = callgrind_self_cost(dump)
            role = callgrind_thread_role(cost)
            threads[role] = threads.get(role, 0) + sum(cost.values())
            if cache_sim:
                m = misses.setdefault(role, {})
                for ev, v in callgrind_summary(dump).items():
                    if ev in ("I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw"):
                        m[ev] = m.get(ev, 0) + v
            for name, ir in cost.items():
                self_cost[name] = self_cost.get(name, 0) + ir
            shutil.copy(dump, Path(out_dir) / f"{callgrind_tag(http2, peer)}.out-{i + 1:02}")
    finally:
        world.close()
        shutil.rmtree(work, ignore_errors=True)
    total = sum(self_cost.values())
    groups = {}
    for name, ir in self_cost.items():
        g = callgrind_group(name)
        groups[g] = groups.get(g, 0) + ir
    top = sorted(((ir, name) for name, ir in self_cost.items()), reverse=True)
    return {"proxy": via, "requests": requests, "http2": http2, "total_ir": total,
            "ir_per_req": total / requests,
            "threads": {r: v / requests for r, v in sorted(threads.items(), key=lambda x: -x[1])},
            "groups": {g: v / requests for g, v in sorted(groups.items(), key=lambda x: -x[1])},
            "top": [(n[:140], ir / requests) for ir, n in top[:25]],
            "misses_per_req": {r: {ev: v / requests for ev, v in m.items()}
                               for r, m in misses.items()}}


def callgrind_thread_role(cost):
    """What a thread of the profile is, from the functions it ran: keygate's
    SQLite audit writer, or the request path (runtime workers, and any
    other thread)."""
    # By SQLite's interpreter: with fat LTO keygate's own writer functions
    # may be inlined away, SQLite's C is not.
    if any("write_sqlite" in name or "sqlite3VdbeExec" in name for name in cost):
        return "audit writer thread (keygate-audit)"
    return "request path (runtime workers, other threads)"


def callgrind_tag(http2, peer):
    return "callgrind" + (f"-{peer[0]}" if peer else "") + ("-h2" if http2 else "")


def callgrind_markdown(prof):
    proto = "HTTP/2" if prof["http2"] else "HTTP/1.1"
    md = [f"{prof['proxy']} instructions per {proto} keep-alive request (callgrind, c=1, "
          f"{prof['requests']} requests, user space only): **{fmt(prof['ir_per_req'])}**", "",
          "| component | instructions / request | share |", "|---|---:|---:|"]
    for g, v in prof["groups"].items():
        md.append(f"| {g} | {fmt(v)} | {100 * v / prof['ir_per_req']:.1f} % |")
    md += ["", "| thread | instructions / request | share |", "|---|---:|---:|"]
    for r, v in prof["threads"].items():
        md.append(f"| {r} | {fmt(v)} | {100 * v / prof['ir_per_req']:.1f} % |")
    if prof.get("misses_per_req"):
        md += ["", "Simulated cache misses per request (valgrind's model of this CPU's "
               "L1 caches; LL is the last level):", "",
               "| thread | L1i misses | L1d read misses | L1d write misses | LL misses |",
               "|---|---:|---:|---:|---:|"]
        for r, m in prof["misses_per_req"].items():
            ll = m.get("ILmr", 0) + m.get("DLmr", 0) + m.get("DLmw", 0)
            md.append(f"| {r} | {fmt(m.get('I1mr', 0))} | {fmt(m.get('D1mr', 0))} "
                      f"| {fmt(m.get('D1mw', 0))} | {fmt(ll)} |")
    md += ["", "| top functions (self) | instructions / request |", "|---|---:|"]
    for name, v in prof["top"]:
        md.append(f"| `{name.replace('|', '/')}` | {fmt(v)} |")
    return md + [""]


def fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}{unit}"
        return f"{v:.1f}{unit}"
    return f"{v}{unit}"


def pct(share):
    return "–" if share is None else f"{share * 100:.0f} %"


def peer_table(results, proxies):
    """keygate next to the peers (keep-alive and HTTP/2 scenarios), against
    the same direct runs."""
    rows = []
    for r in results["scenarios"]:
        if "skipped" in r or not any(v in r for v in results["peers"]):
            continue
        legs = [("keygate", dict(r["keygate"], ratio=r["ratio"], added_p50_us=r["added_p50_us"]))]
        legs += [(v, r[v]) for v in results["peers"] if v in r]
        for via, x in legs:
            if "skipped" in x:
                rows.append(f"| {r['scenario']} | {via} | skipped | | | | | | |")
                continue
            rows.append(
                f"| {r['scenario']} | {via} | {fmt(x['rps'])} | {x['ratio']:.3f} × "
                f"| {fmt(x['added_p50_us'])} | {fmt(x['p99_us'])} "
                f"| {fmt(x.get(proxies[via].key + '_cpu_us_per_req'))} "
                f"| {pct(x.get(proxies[via].key + '_kernel_share'))} "
                f"| {x['errors'] + x['non_2xx']} |")
    md = ["Peers, against the same direct runs (" +
          ", ".join(f"{k} {v['version']}" for k, v in results["peers"].items()) + "):", ""]
    if rows:
        md += ["| scenario | proxy | req/s | ratio | added p50 µs | p99 µs "
               "| proxy CPU µs/req | of it in the kernel | errors |",
               "|---|---|---:|---:|---:|---:|---:|---:|---:|"] + rows + [""]
    else:
        md += ["no keep-alive or HTTP/2 scenario was run (--only).", ""]
    for via, info in results["peers"].items():
        md.append(f"{via} RSS: idle {info['idle_rss_mib']:.1f} MiB, peak under load "
                  f"{info['peak_rss_mib']:.1f} MiB, after {info['rss_after_mib']:.1f} MiB.")
    md.append("")
    return md


def sleep_overshoot(n=2000, us=200):
    """How late a thread wakes from a short sleep on this machine, idle
    (p50/p99/max µs): on a VM whose vCPUs halt when idle this alone can
    reach a millisecond, and every p99 here includes such wake-ups."""
    late = []
    for _ in range(n):
        t = time.perf_counter()
        time.sleep(us / 1e6)
        late.append((time.perf_counter() - t) * 1e6 - us)
    late.sort()
    return {"p50": late[n // 2], "p99": late[n * 99 // 100], "max": late[-1]}


def cpu_bound_lines(results):
    """For the saturated keep-alive c=32 rows: with every core busy, the
    ratio a proxy can reach is about (client + upstream) / (client +
    upstream + proxy) CPU per request; shown next to the measured ratio."""
    lines = []
    for r in results["scenarios"]:
        if "skipped" in r or "c=32" not in r["scenario"] or "half" in r["scenario"]:
            continue
        d, k = r["direct"], r["keygate"]
        c, n, kg = d.get("client_cpu_us_per_req"), d.get("upstream_cpu_us_per_req"), k.get("kg_cpu_us_per_req")
        if not (c and n and kg):
            continue
        est = (c + n) / (c + n + kg)
        lines.append(f"{r['scenario']}: client {fmt(c)} + nginx {fmt(n)} µs/req direct; keygate "
                     f"{fmt(kg)} µs/req → CPU-bound ratio ≈ {est:.2f} × (measured {r['ratio']:.2f} ×); "
                     f"0.6 × would need keygate ≤ {fmt((c + n) * (1 / 0.6 - 1))} µs/req.")
    return lines


def busy_lines(results, proxies):
    """For the c=32 rows: how many cores the client, nginx and the proxy
    kept busy together (CPU per request × requests per second), stored as
    each leg's `cores_busy` and returned as lines. A ratio below the
    CPU-bound estimate with cores left idle means the requests waited on
    each other (a single-threaded stage, batching), not on CPU."""
    lines = []
    cores = results["machine"]["cpus"]
    for r in results["scenarios"]:
        if "skipped" in r or "c=32" not in r["scenario"] or "half" in r["scenario"]:
            continue
        legs = [("direct", r["direct"]), ("keygate", r["keygate"])]
        legs += [(v, r[v]) for v in results.get("peers", {}) if v in r and "skipped" not in r[v]]
        shown = []
        for via, x in legs:
            parts = [x.get("client_cpu_us_per_req"), x.get("upstream_cpu_us_per_req")]
            if via != "direct":
                parts.append(x.get(proxies[via].key + "_cpu_us_per_req"))
            if None in parts:
                continue
            cpu = sum(parts)
            x["cores_busy"] = cpu * x["rps"] / 1e6
            shown.append(f"{via} {x['cores_busy']:.2f} ({fmt(cpu)} µs/req)")
        if shown:
            lines.append(f"{r['scenario']}, cores busy of {cores} (client + nginx + proxy CPU "
                         f"× req/s): " + ", ".join(shown) + ".")
    return lines


MB = 1_000_000 / 1024 / 1024  # MiB per MB: issue 5 states memory in MB


def target_checks(results):
    """Issue 5's targets against this run: (target, measured, verdict) with
    verdict "met", "missed" or "not measured" (a scenario left out by
    --only, --tunnels or --sse)."""
    rows = {r["scenario"]: r for r in results["scenarios"] if "skipped" not in r}
    half = next((r for name, r in rows.items() if name.endswith("(half of max)")), None)
    paced = next((r for name, r in rows.items() if name.endswith("evenly paced")), None)
    out = []

    def check(target, value, ok, shown, missing="not measured"):
        if value is None:
            out.append((target, missing, "not measured"))
        else:
            out.append((target, shown, "met" if ok(value) else "missed"))

    for name in ("HTTP/1.1 keep-alive c=32", "HTTP/2 c=32"):
        r = rows.get(name)
        v = r["ratio"] if r else None
        check(f"{name}: ≥ 0.6 × direct", v, lambda x: x >= 0.6, v is not None and f"{v:.2f} ×")
    for name in ("HTTP/1.1 keep-alive c=1", "HTTP/2 c=1"):
        r = rows.get(name)
        v = r["added_p50_us"] if r else None
        check(f"{name}: added p50 ≤ 30 µs", v, lambda x: x <= 30, v is not None and f"{fmt(v)} µs")
    # The verdict is oha's run's; an evenly paced run (--paced) is shown
    # beside it (README "Half load, evenly paced").
    def p99s(r):
        return f"{r['keygate']['p99_us'] / 1000:.2f} ms (direct {r['direct']['p99_us'] / 1000:.2f} ms)"
    v = half["keygate"]["p99_us"] if half else None
    shown = v is not None and p99s(half) + (f"; evenly paced: {p99s(paced)}" if paced else "")
    check("p99 < 1 ms at half of max load", v, lambda x: x < 1000, shown)
    r = rows.get("HTTP/1.1 keep-alive c=32")
    v = r["keygate"].get("kg_cpu_us_per_req") if r else None
    check("keygate CPU ≤ 15 µs per keep-alive request (h1 c=32)", v, lambda x: x <= 15,
          v is not None and f"{fmt(v)} µs")
    r = rows.get("cold (new CONNECT+TLS) c=1")
    v = r["added_p50_us"] if r else None
    check("cold request ≤ 0.5 ms added (c=1)", v, lambda x: x <= 500, v is not None and f"{fmt(v)} µs")
    v = results.get("kg_idle_rss_mib")
    check("idle RSS ≤ 25 MB", v, lambda x: x <= 25 * MB, v is not None and f"{v:.1f} MiB")
    v = results.get("kg_peak_rss_mib") if "HTTP/1.1 keep-alive c=32" in rows else None
    check("peak RSS ≤ 40 MB under the c=32 runs", v, lambda x: x <= 40 * MB,
          v is not None and f"{v:.1f} MiB")
    t = results.get("idle_tunnels")
    v = t["kib_per_tunnel"] if t else None
    check("≤ 64 KiB per idle tunnel", v, lambda x: x <= 64, v is not None and f"{v:.1f} KiB")
    v = t if t and t["tunnels"] >= 10000 else None
    check("10 000 concurrent tunnels without errors", v,
          lambda x: x["held"] == x["tunnels"] and x["errors"] == 0,
          v is not None and f"{v['held']} of {v['tunnels']} held, {v['errors']} errors",
          missing=t and f"not measured ({t['tunnels']} tunnels in this run; "
                        "`--tunnels 10000` with `ulimit -n 20000`)" or "not measured")
    return out


def target_lines(results):
    lines = ["Issue 5 targets in this run:", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in target_checks(results)]
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="directory with keygate (+ stream-upstream)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--cold-requests", type=int, default=300)
    ap.add_argument("--sse", type=int, default=20, help="SSE TTFB samples")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quick", action="store_true", help="1 s runs (CI smoke)")
    ap.add_argument("--paced", action="store_true",
                    help="also run the half-load scenario with paced-load (crates/test-support): "
                         "the same rate evenly spaced, latency from each request's scheduled time")
    ap.add_argument("--upstream-http1", action="store_true",
                    help="nginx offers HTTP/1.1 only (default: h2 and HTTP/1.1)")
    ap.add_argument("--keygate-arg", action="append", default=[],
                    help="extra argument for `keygate serve` (repeatable), e.g. --keygate-arg=--workers=1")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each scenario N times, direct and proxied alternating; report "
                         "medians and the spread of the per-round ratios")
    ap.add_argument("--only", default="", help="run scenarios whose name contains this")
    ap.add_argument("--perf", default="",
                    help="directory: record a perf profile of keygate during each "
                         "through-keygate run (perf-<scenario>.data), and of each peer "
                         "during its runs (perf-<peer>-<scenario>.data)")
    ap.add_argument("--strace", default="", metavar="DIR",
                    help="directory: count the system calls (strace -c -f) of keygate and of each "
                         "peer during its runs and report them per request (strace-<scenario>.txt, "
                         "strace-<peer>-<scenario>.txt); strace slows a process several-fold, so "
                         "that run's timings are not its own")
    ap.add_argument("--tunnels", type=int, default=2000,
                    help="idle tunnels to open and hold at the end (0: skip)")
    ap.add_argument("--callgrind", type=int, default=0, metavar="N",
                    help="instead of the scenarios: N keep-alive requests (c=1) through keygate "
                         "(or, with --hudsucker or --floor, through that peer) under valgrind's "
                         "callgrind, reported as instructions per request by component (repeatable: no "
                         "timing noise)")
    ap.add_argument("--callgrind-http2", action="store_true",
                    help="with --callgrind: HTTP/2 inside the tunnel")
    ap.add_argument("--cache-sim", action="store_true",
                    help="with --callgrind: also simulate the caches (valgrind --cache-sim=yes) "
                         "and report L1 instruction and data misses per request")
    ap.add_argument("--hudsucker", default="", metavar="BIN",
                    help="also measure a bare hudsucker interceptor (bench/peers/hudsucker, built "
                         "with cargo build --release --manifest-path "
                         "bench/peers/hudsucker/Cargo.toml) in the keep-alive and HTTP/2 scenarios")
    ap.add_argument("--floor", default="", metavar="BIN",
                    help="also measure tls-pipe (target/release/tls-pipe, built with cargo build "
                         "--release --bin tls-pipe): a TLS-terminating byte pipe with no HTTP, "
                         "the floor of any intercepting proxy, in the keep-alive and HTTP/2 "
                         "scenarios")
    ap.add_argument("--h1-model", default="", metavar="BIN",
                    help="also measure tls-pipe with a header to inject (the same binary as "
                         "--floor): HTTP/1.1 heads parsed and rewritten, bodies forwarded by "
                         "length; a model of the cheapest HTTP/1.1 fast path, in the HTTP/1.1 "
                         "keep-alive scenarios")
    ap.add_argument("--mitmproxy", action="store_true",
                    help="also measure mitmproxy (mitmdump + bench/mitm_inject.py) in the "
                         "keep-alive and HTTP/2 scenarios")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.callgrind:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        peer = (("hudsucker", args.hudsucker) if args.hudsucker
                else ("floor", args.floor) if args.floor
                else ("h1-model", args.h1_model) if args.h1_model else None)
        prof = callgrind_profile(args.bin, args.callgrind, args.callgrind_http2, out, peer,
                                 args.cache_sim, upstream_http2=not args.upstream_http1)
        tag = callgrind_tag(args.callgrind_http2, peer)
        (out / f"{tag}.json").write_text(json.dumps(prof, indent=2) + "\n")
        md = callgrind_markdown(prof)
        (out / f"{tag}.md").write_text("\n".join(md))
        print("\n".join(md))
        return
    secs = 1.0 if args.quick else args.seconds
    if args.quick:
        args.cold_requests = min(args.cold_requests, 50)
        args.sse = min(args.sse, 5)
        args.tunnels = min(args.tunnels, 500)
    for tool in ("oha", "nginx", "openssl", "curl"):
        if not shutil.which(tool):
            raise SystemExit(f"bench needs {tool} on PATH (see bench/README.md)")
    if args.hudsucker and not Path(args.hudsucker).is_file():
        raise SystemExit(f"--hudsucker {args.hudsucker}: no such file (see bench/README.md)")
    for flag, path in (("--floor", args.floor), ("--h1-model", args.h1_model)):
        if path and not Path(path).is_file():
            raise SystemExit(f"{flag} {path}: no such file (see bench/README.md)")
    if args.mitmproxy and not shutil.which("mitmdump"):
        raise SystemExit("--mitmproxy needs mitmdump on PATH: pip install mitmproxy "
                         "(see bench/README.md)")
    work = tempfile.mkdtemp(prefix="keygate-bench-")
    world = World(args.bin, work)
    world.perf_dir = Path(args.perf) if args.perf else None
    world.strace_dir = Path(args.strace) if args.strace else None
    world.keygate_args = args.keygate_arg
    results = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                           "sleep_overshoot_us": sleep_overshoot()},
               "seconds": secs, "rounds": args.rounds, "scenarios": []}
    try:
        world.certs()
        world.nginx(http2=not args.upstream_http1)
        world.stream_upstream()
        world.keygate()
        peers = {}  # name -> version, RSS
        if args.mitmproxy:
            peers["mitmproxy"] = world.mitmproxy()
        if args.hudsucker:
            peers["hudsucker"] = world.hudsucker(args.hudsucker)
        if args.floor:
            peers["floor"] = world.floor(args.floor)
        if args.h1_model:
            peers["h1-model"] = world.h1_model(args.h1_model)
        if peers:
            results["peers"] = peers
        time.sleep(0.3)
        pid = world.kg.pid
        results["kg_idle_rss_mib"] = mem_kib(pid, "VmRSS") / 1024
        log(f"keygate pid {pid} idle RSS {results['kg_idle_rss_mib']:.1f} MiB")
        for via, info in peers.items():
            info["idle_rss_mib"] = mem_kib(world.proxies[via].pid, "VmRSS") / 1024
            log(f"{via} {info['version']} pid {world.proxies[via].pid} "
                f"idle RSS {info['idle_rss_mib']:.1f} MiB")
        # warm-up (leaf minting, pools)
        for via in ["keygate", *peers, None]:
            oha(world, via, 4, 0.5)
        for px in world.proxies.values():
            reset_peak(px.pid)

        scenarios = [  # name, oha arguments, also through the peers
            ("HTTP/1.1 keep-alive c=1", dict(conc=1, seconds=secs), True),
            ("HTTP/1.1 keep-alive c=32", dict(conc=32, seconds=secs), True),
            ("HTTP/2 c=1", dict(conc=1, seconds=secs, http2=True), True),
            ("HTTP/2 c=32", dict(conc=32, seconds=secs, http2=True), True),
            ("cold (new CONNECT+TLS) c=1",
             dict(conc=1, seconds=secs * 4, keepalive=False, requests=args.cold_requests), False),
            ("cold (new CONNECT+TLS) c=8",
             dict(conc=8, seconds=secs * 4, keepalive=False, requests=args.cold_requests * 2),
             False),
        ]
        for name, kw, with_peers in scenarios:
            if args.only and args.only not in name:
                continue
            row = {"scenario": name}
            vias = ["keygate", *(v for v, info in peers.items() if with_peers and not (
                info.get("http1_only") and not name.startswith("HTTP/1.1")))]
            try:
                got = measure(world, vias, args.rounds, **kw)
            except SystemExit as e:
                log(f"{name}: skipped: {e}")
                row["skipped"] = str(e)[:300]
                results["scenarios"].append(row)
                continue
            keygate_row(row, got)
            d, k = row["direct"], row["keygate"]
            log(f"{name}: direct {d['rps']:.0f} req/s, keygate {k['rps']:.0f} req/s "
                f"(x{row['ratio']:.2f}), +{row['added_p50_us']:.0f} us p50, "
                f"{k.get('kg_cpu_us_per_req', 0):.1f} us CPU/req")
            for via in vias[1:]:
                x = row[via] = got[via]
                if "skipped" in x:
                    continue
                log(f"{name}: {via} {x['rps']:.0f} req/s (x{x['ratio']:.2f}), "
                    f"+{x['added_p50_us']:.0f} us p50, "
                    f"{x.get(world.proxies[via].key + '_cpu_us_per_req', 0):.1f} us CPU/req")
            results["scenarios"].append(row)
        # p99 at half of keygate's max keep-alive load
        kmax = next((r for r in results["scenarios"]
                     if r["scenario"] == "HTTP/1.1 keep-alive c=32" and "keygate" in r), None)
        if kmax:
            rate = max(1, int(kmax["keygate"]["rps"] / 2))
            row = {"scenario": f"HTTP/1.1 c=32 at {rate} req/s (half of max)"}
            got = measure(world, ["keygate"], args.rounds, conc=32, seconds=secs, rate=rate)
            keygate_row(row, got)
            results["scenarios"].append(row)
            # The same load with the requests evenly spaced (oha's -q sends
            # them in bursts on 1 ms timer ticks; README "half load").
            if args.paced and world.paced_load.exists():
                row = {"scenario": f"HTTP/1.1 c=32 at {rate} req/s (half of max), evenly paced"}
                got = measure(world, ["keygate"], args.rounds, conc=32, seconds=secs, rate=rate,
                              paced=True)
                keygate_row(row, got)
                d, k = row["direct"], row["keygate"]
                log(f"{row['scenario']}: p99 direct {d['p99_us']:.0f} us, keygate "
                    f"{k['p99_us']:.0f} us (pacing lag p99 {d['lag_p99_us']:.0f} / "
                    f"{k['lag_p99_us']:.0f} us)")
                results["scenarios"].append(row)
            elif args.paced:
                log(f"{world.paced_load} not built: no evenly paced half-load run")
        sse = {"direct": sse_ttfb(world, False, args.sse), "keygate": sse_ttfb(world, True, args.sse)}
        if sse["direct"]:
            results["sse_ttfb"] = sse
        results["kg_peak_rss_mib"] = mem_kib(pid, "VmHWM") / 1024
        results["kg_rss_after_mib"] = mem_kib(pid, "VmRSS") / 1024
        for via, info in peers.items():
            info["peak_rss_mib"] = mem_kib(world.proxies[via].pid, "VmHWM") / 1024
            info["rss_after_mib"] = mem_kib(world.proxies[via].pid, "VmRSS") / 1024
        if args.tunnels > 0:
            results["idle_tunnels"] = idle_tunnels(world, args.tunnels)
            log("idle tunnels:", results["idle_tunnels"])
        results["audit_last"] = world.audit_count()[:400]
    finally:
        world.close()
        shutil.rmtree(work, ignore_errors=True)

    results["targets"] = [{"target": t, "measured": m, "verdict": v}
                          for t, m, v in target_checks(results)]
    busy = busy_lines(results, world.proxies)  # before the JSON: it stores cores_busy
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    md = []
    if args.rounds > 1:
        md += [f"Medians of {args.rounds} alternating rounds per scenario (direct, keygate, "
               "direct, …); the ratio's range over the rounds in brackets.", ""]
    md += ["| scenario | direct req/s | keygate req/s | ratio | direct p50 µs | keygate p50 µs "
          "| added p50 µs | keygate p99 µs | keygate CPU µs/req (of which audit) | nginx CPU µs/req direct | errors |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["scenarios"]:
        if "skipped" in r:
            md.append(f"| {r['scenario']} | skipped | | | | | | | | | |")
            continue
        d, k = r["direct"], r["keygate"]
        spread = r.get("ratio_rounds") or []
        ratio = f"{r['ratio']:.2f} ×" + (f" ({min(spread):.2f}–{max(spread):.2f})"
                                         if len(spread) > 1 else "")
        md.append(
            f"| {r['scenario']} | {fmt(d['rps'])} | {fmt(k['rps'])} | {ratio} "
            f"| {fmt(d['p50_us'])} | {fmt(k['p50_us'])} | {fmt(r['added_p50_us'])} "
            f"| {fmt(k['p99_us'])} | {fmt(k.get('kg_cpu_us_per_req'))} "
            f"({fmt(k.get('kg_audit_cpu_us_per_req'))}) | {fmt(d.get('upstream_cpu_us_per_req'))} "
            f"| {d['errors'] + d['non_2xx']} / {k['errors'] + k['non_2xx']} |")
    md.append("")
    bound = cpu_bound_lines(results) + busy
    if bound:
        md += bound + [""]
    j = results["machine"]["sleep_overshoot_us"]
    md += [f"Timer wake-up on the idle machine before the run (2,000 sleeps of 200 µs): late by "
           f"p50 {fmt(j['p50'])} µs, p99 {fmt(j['p99'])} µs, max {fmt(j['max'])} µs. A p99 "
           "latency under load cannot be much below what one wake-up costs here.", ""]
    if "sse_ttfb" in results:
        s = results["sse_ttfb"]
        md.append(f"SSE time to first event (after TLS, {s['direct']['requests']} samples): "
                  f"direct p50 {fmt(s['direct']['p50_us'])} µs, keygate p50 "
                  f"{fmt(s['keygate']['p50_us'])} µs (max {fmt(s['keygate']['max_us'])} µs).")
    md.append(f"keygate RSS: idle {results['kg_idle_rss_mib']:.1f} MiB, peak under load "
              f"{results['kg_peak_rss_mib']:.1f} MiB, after {results['kg_rss_after_mib']:.1f} MiB.")
    if "idle_tunnels" in results:
        t = results["idle_tunnels"]
        md.append(f"Idle tunnels (CONNECT + TLS, held open): {t['held']} of {t['tunnels']} held, "
                  f"{t['errors']} errors, keygate RSS {t['rss_before_mib']:.1f} → "
                  f"{t['rss_held_mib']:.1f} MiB = {t['kib_per_tunnel']:.1f} KiB per tunnel.")
    md.append("")
    md += target_lines(results) + [""]
    if peers:
        md += peer_table(results, world.proxies)
    (out / "latest.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
