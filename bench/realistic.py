"""A realistic service: nginx as a reverse proxy in front of a Python upstream that does about
0.5 ms of CPU work per request, without the agent, with its default probes, and with OTLP
traces exported to a real receiver, in one run with interleaved repeats.

    sudo .venv/bin/python -m bench.realistic [--quick]

The service. Debian's nginx (one worker, tests/support/servers.py's configuration: /api/ is
proxied over HTTP/1.1 with a keep-alive pool of 16 connections) in front of gunicorn (2 gthread
workers x 4 threads) serving bench/realistic_app.py, whose loop is calibrated to 0.5 ms of
thread CPU time per request. wrk's Lua script mixes four routes and sizes: 50% GET
/api/users/<id> (~0.2 KB, 2% of ids answer 404), 25% GET /api/orders?page=<n> (~4 KB),
10% GET /api/catalog/<category> (~30 KB), 15% POST /api/cart (50-400 B bodies, 201).

Two load shapes, each a closed loop of 16 connections from one wrk thread: keep-alive, and a
new connection per request (every request says `Connection: close`, so nginx closes after
answering and wrk connects again; nginx keeps its pool to the upstream, as deployed). wrk's
latency starts when a request is written, so the connect is in the throughput, not the p99.

Pinning on 2 CPUs: the service (nginx and gunicorn, masters and workers) on CPU 0, the load
generator (wrk) and the OTLP receiver on CPU 1, so neither the load nor the collector takes CPU
from the service. The agent is not pinned: it competes as it would in production, and the
kernel work of its probes runs on CPU 0 inside the service's own syscalls. The receiver
(tests/support/otlp_receiver.py over gRPC, decoding and discarding) runs in its own process,
so its CPU is not counted as the agent's.

Each round runs the three configurations in a rotated order (a fresh agent each), and each
configuration both shapes (alternating which goes first). Rows: throughput and p99 with no
agent; throughput and p99 ratios (default probes / no agent, OTLP traces / no agent) per shape;
with traces on, spans dropped in each run (probewire_otlp_spans_total{result="dropped"}), the
event → span p99 (from probewire_export_latency_seconds, every span kind) and spans exported
per request; the agent's CPU per 1,000 requests and against the service's CPU. The targets are
issue 18's. Numbers need a quiet machine: the agent traces every process on the host, so other
traffic on a shared machine costs it CPU and adds spans.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.export_latency import RECEIVER
from bench.harness import (
    NCPU,
    NGINX_CPU,
    REPO_ROOT,
    WRK_CPU,
    AgentProc,
    Samples,
    Server,
    WrkResult,
    _descendants,
    cpu_seconds,
    free_port,
    nginx,
    parse_wrk,
    pin,
    running_agent,
    spawn,
    stop_process,
    total,
    wait_port,
    wait_stable,
)
from bench.report import Row, render

SHAPES = ("keepalive", "close")
SHAPE_LABEL = {"keepalive": "keep-alive", "close": "new connections"}
MODES = ("none", "default", "otlp")
MODE_LABEL = {"default": "default probes", "otlp": "OTLP traces"}
CONNECTIONS = 16
GUNICORN_WORKERS = 2
GUNICORN_THREADS = 4

# wrk's per-request generator. `close` asks nginx to close after each answer; wrk then
# reconnects (wrk's response_complete when the response is not keep-alive).
WRK_SCRIPT = """
local close = {close}
math.randomseed({seed})
local categories = {{"books", "garden", "toys", "music", "tools"}}
local bodies = {{}}
for i = 1, 8 do
  bodies[i] = '{{"sku":"SKU-' .. string.format("%06d", i * 37) .. '","qty":' .. i ..
              ',"note":"' .. string.rep("n", 45 * i) .. '"}}'
end
local function headers(extra)
  local h = {{}}
  if close then h["Connection"] = "close" end
  if extra then for k, v in pairs(extra) do h[k] = v end end
  return h
end
request = function()
  local r = math.random(100)
  if r <= 50 then
    return wrk.format("GET", "/api/users/" .. math.random(1020), headers())
  elseif r <= 75 then
    return wrk.format("GET", "/api/orders?page=" .. math.random(0, 50), headers())
  elseif r <= 85 then
    return wrk.format("GET", "/api/catalog/" .. categories[math.random(#categories)], headers())
  end
  return wrk.format("POST", "/api/cart", headers({{["Content-Type"] = "application/json"}}),
                    bodies[math.random(#bodies)])
end
"""


@dataclass
class Settings:
    rounds: int
    duration_s: int


def settings(quick: bool) -> Settings:
    # quick: 2 rounds x 3 configurations x 2 shapes x 3 s of load, 4 agent start-ups;
    # full: 5 x 3 x 2 x 10 s, 10 start-ups (about 6 min when the agent starts in ~2 s).
    return Settings(rounds=2, duration_s=3) if quick else Settings(rounds=5, duration_s=10)


# ---------------------------------------------------------------------------------------------
# the service


@contextlib.contextmanager
def gunicorn(port: int | None = None) -> Iterator[Server]:
    """gunicorn serving bench/realistic_app.py (calibrated once in the master: --preload)."""
    if importlib.util.find_spec("gunicorn") is None:
        raise RuntimeError("gunicorn is not installed: it is a dev dependency (make setup)")
    port = port or free_port()
    proc = spawn([sys.executable, "-m", "gunicorn", "--preload",
                  "--workers", str(GUNICORN_WORKERS), "--worker-class", "gthread",
                  "--threads", str(GUNICORN_THREADS), "--keep-alive", "75",
                  "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
                  "--chdir", str(REPO_ROOT), "bench.realistic_app:app"],
                 stdin=subprocess.DEVNULL)
    try:
        wait_port(port, timeout_s=30.0)
        yield Server(port, proc)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def service() -> Iterator[tuple[Server, Server]]:
    """(nginx, gunicorn), both pinned to the service CPU; nginx proxies /api/ to gunicorn."""
    with gunicorn() as up, nginx(upstream_port=up.port, workers=1, access_log=False) as ng:
        if NCPU > 1:
            pin(up.process.pid, NGINX_CPU)
            pin(ng.process.pid, NGINX_CPU)
        yield ng, up


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants (nginx's or gunicorn's workers)."""
    out = 0.0
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            out += cpu_seconds(p)
    return out


def work_sample_ms(url: str, requests: int) -> float:
    """Median thread CPU time of the upstream's loop (its X-Work-Ns answer header), in ms."""
    works = []
    for _ in range(requests):
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()
            works.append(int(resp.headers["X-Work-Ns"]) / 1e6)
    return statistics.median(works)


# ---------------------------------------------------------------------------------------------
# load


def wrk_script(directory: Path, shape: str) -> Path:
    path = directory / f"realistic-{shape}.lua"
    path.write_text(WRK_SCRIPT.format(close="true" if shape == "close" else "false",
                                      seed=random.randrange(1 << 30)))
    return path


def run_load(url: str, script: Path, duration_s: int) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration_s}s", "--latency", "-s",
            str(script), url]
    if NCPU > 1:
        argv = ["taskset", "-c", str(WRK_CPU), *argv]
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=duration_s + 30)
    finally:
        stop_process(proc)
    return parse_wrk(out.decode())


def socket_errors(w: WrkResult) -> str:
    """wrk's socket errors (its Non-2xx count is expected: the mix asks for missing users)."""
    for line in w.raw.splitlines():
        if line.strip().startswith("Socket errors:"):
            return line.strip()
    return ""


# ---------------------------------------------------------------------------------------------
# the agent's OTLP figures


def otlp_config(port: int) -> str:
    # Metrics over OTLP off: the rows judge the span path, and a 15 s metric export landing in
    # some runs and not others would only add noise.
    return (f"export: {{otlp: {{enabled: true, endpoint: 'http://127.0.0.1:{port}', "
            f"metrics: false}}}}\n")


def span_count(s: Samples) -> float:
    return float(total(s, "probewire_otlp_spans_total"))


def latency_quantile_ms(before: Samples, after: Samples, q: float = 0.99) -> float:
    """The upper bound (ms) of the probewire_export_latency_seconds bucket holding quantile q of
    the spans exported between two scrapes. 0.05 s is a bucket bound, so a p99 ≤ 50 ms verdict
    on this bound is exact."""
    name = "probewire_export_latency_seconds_bucket"

    def buckets(s: Samples) -> dict[float, float]:
        return {float(dict(lbls)["le"]): v for (n, lbls), v in s.items() if n == name}

    b0, b1 = buckets(before), buckets(after)
    bounds = sorted(b1)
    cumulative = [b1[le] - b0.get(le, 0.0) for le in bounds]
    if not cumulative or cumulative[-1] <= 0:
        return math.nan
    for le, c in zip(bounds, cumulative, strict=True):
        if c >= q * cumulative[-1]:
            return 1e3 * le
    return math.inf


@contextlib.contextmanager
def otlp_receiver_process() -> Iterator[int]:
    """The gRPC receiver of tests/support/otlp_receiver.py in its own process; yields its port."""
    port = free_port()
    proc = spawn([sys.executable, "-c", RECEIVER.format(tests=str(REPO_ROOT / "tests"),
                                                        port=port)],
                 stdin=subprocess.DEVNULL)
    try:
        wait_port(port, timeout_s=30.0)
        if NCPU > 1:
            pin(proc.pid, WRK_CPU)
        yield port
    finally:
        stop_process(proc)


@contextlib.contextmanager
def agent_for(mode: str, receiver_port: int) -> Iterator[AgentProc | None]:
    if mode == "none":
        yield None
    else:
        with running_agent("default" if mode == "default" else otlp_config(receiver_port)
                           ) as agent:
            yield agent


# ---------------------------------------------------------------------------------------------


class Rows:
    """The table's rows, grouped by load shape."""

    def __init__(self, duration_s: int) -> None:
        self.work = Row("realistic: upstream CPU work per request", "ms",
                        target="about 0.5 ms (issue 18)", goal=("between", 0.4), goal_hi=0.6,
                        note="thread CPU time of the calibrated loop (X-Work-Ns), median of "
                             "sequential requests before each round")
        self.upstream_cpu = Row("realistic: upstream CPU per request, all (no agent)", "ms",
                                note="Δ(utime+stime) of gunicorn's processes / requests: the "
                                     "loop plus gunicorn's and the app's own Python")
        self.shape: dict[str, dict[str, Row]] = {}
        for shape in SHAPES:
            sl = SHAPE_LABEL[shape]
            p = f"realistic, {sl}"
            self.shape[shape] = {
                "rps": Row(f"{p}: no agent throughput", "req/s",
                           note=f"wrk -t1 -c{CONNECTIONS} -d{duration_s}s, route mix"),
                "p99": Row(f"{p}: no agent p99 latency", "ms"),
                "tput_default": Row(f"{p} (default probes): throughput ratio", "x no agent",
                                    target="≥ 0.98x", goal=(">=", 0.98)),
                "p99_default": Row(f"{p} (default probes): p99 ratio", "x no agent",
                                   target="≤ 1.03x", goal=("<=", 1.03)),
                "tput_otlp": Row(f"{p} (OTLP traces): throughput ratio", "x no agent",
                                 target="≥ 0.95x", goal=(">=", 0.95)),
                "p99_otlp": Row(f"{p} (OTLP traces): p99 ratio", "x no agent"),
                "dropped": Row(f"{p} (OTLP traces): spans dropped per run", "spans",
                               target="0", goal=("==", 0.0), judge="all",
                               note='Δprobewire_otlp_spans_total{result="dropped"} over the '
                                    "run and until the span counters settle"),
                "span_p99": Row(f"{p} (OTLP traces): event → span p99", "ms",
                                target="≤ 50 ms", goal=("<=", 50.0), judge="max",
                                note="upper bound of the probewire_export_latency_seconds "
                                     "bucket holding the run's p99 (all span kinds)"),
                "spans_per_req": Row(f"{p} (OTLP traces): spans exported per request",
                                     "spans",
                                     note="4 expected (wrk's client, nginx's server and its "
                                          "client call upstream, gunicorn's server); other "
                                          "traffic on the host adds"),
                "cpu1k_default": Row(f"{p} (default probes): agent CPU per 1k requests",
                                     "ms CPU",
                                     note="Δ(utime+stime) of the agent over the run and the "
                                          "scrape after it (a scrape merges the kernel's "
                                          "counts)"),
                "cpu1k_otlp": Row(f"{p} (OTLP traces): agent CPU per 1k requests", "ms CPU",
                                  note="until the span counters settle, with the /metrics "
                                       "scrapes (every 0.5 s) that wait for it"),
                "ring_per_req": Row(f"{p} (default probes): exchanges sent to user space "
                                    "per request", "exchanges",
                                    note='Δprobewire_http_exchanges_total{via="ring"} / '
                                         "requests: the rest are counted in kernel maps (a "
                                         "route's first exchanges cross; an id in a path "
                                         "makes no new route)"),
                "cpu_share": Row(f"{p} (default probes): agent CPU / service CPU", "%",
                                 note="Δagent CPU / Δ(nginx + gunicorn CPU) over the run: "
                                      "the field's \"< 2% CPU\" figure (the probes' kernel "
                                      "time runs in the service's syscalls and counts as "
                                      "the service's)"),
            }

    def all(self) -> list[Row]:
        out = [self.work, self.upstream_cpu]
        for shape in SHAPES:
            out += list(self.shape[shape].values())
        return out


@dataclass
class Measured:
    wrk: WrkResult
    agent_cpu_s: float = 0.0
    service_cpu_s: float = 0.0
    upstream_cpu_s: float = 0.0
    before: Samples | None = None
    after: Samples | None = None


def measure(agent: AgentProc | None, spans: bool, ng: Server, up: Server, url: str,
            script: Path, duration_s: int) -> Measured:
    before = agent.scrape() if agent else None
    a0 = agent.cpu_s() if agent else 0.0
    n0, u0 = tree_cpu_s(ng.process.pid), tree_cpu_s(up.process.pid)
    w = run_load(url, script, duration_s)
    after = None
    if agent is not None:
        if spans:
            # Spans of the run's last exchanges leave after it; wait (bounded) for the counters
            # to settle so this run's drops, latencies and export CPU are all counted in it.
            wait_stable(lambda: span_count(agent.scrape()), interval_s=0.5, timeout_s=10.0)
        after = agent.scrape()  # before reading the CPU: a scrape merges counts
    n1, u1 = tree_cpu_s(ng.process.pid), tree_cpu_s(up.process.pid)
    a1 = agent.cpu_s() if agent else 0.0
    return Measured(w, a1 - a0, (n1 - n0) + (u1 - u0), u1 - u0, before, after)


def run(quick: bool) -> list[Row]:
    cfg = settings(quick)
    rows = Rows(cfg.duration_s)
    with tempfile.TemporaryDirectory(prefix="pw-realistic-") as tmp, \
            otlp_receiver_process() as rx_port, service() as (ng, up):
        scripts = {shape: wrk_script(Path(tmp), shape) for shape in SHAPES}
        base_url = f"{ng.url}/"
        for shape in SHAPES:  # warm-up (the upstream pool, caches), not recorded
            run_load(base_url, scripts[shape], 1)
        for r in range(cfg.rounds):
            rows.work.add(work_sample_ms(f"{ng.url}/api/users/1", 20))
            order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
            shapes = SHAPES if r % 2 == 0 else SHAPES[::-1]
            results: dict[tuple[str, str], Measured] = {}
            for mode in order:
                with agent_for(mode, rx_port) as agent:
                    if agent is not None:
                        # Start-up work done, and with traces the gRPC channel opened.
                        for _ in range(10):
                            with urllib.request.urlopen(f"{ng.url}/api/users/2", timeout=10
                                                        ) as resp:
                                resp.read()
                        time.sleep(0.5)
                    for shape in shapes:
                        results[(mode, shape)] = measure(agent, mode == "otlp", ng, up, base_url,
                                                         scripts[shape], cfg.duration_s)
            for shape in SHAPES:
                _record(rows, shape, results)
    return rows.all()


def _record(rows: Rows, shape: str, results: dict[tuple[str, str], Measured]) -> None:
    out = rows.shape[shape]
    base = results[("none", shape)]
    out["rps"].add(base.wrk.rps)
    out["p99"].add(base.wrk.p99_ms)
    if base.wrk.requests:
        rows.upstream_cpu.add(1e3 * base.upstream_cpu_s / base.wrk.requests)
    for mode in ("default", "otlp"):
        m = results[(mode, shape)]
        out[f"tput_{mode}"].add(m.wrk.rps / base.wrk.rps)
        out[f"p99_{mode}"].add(m.wrk.p99_ms / base.wrk.p99_ms)
        if m.wrk.requests:
            out[f"cpu1k_{mode}"].add(1e3 * m.agent_cpu_s / (m.wrk.requests / 1000.0))
        errors = socket_errors(m.wrk) or socket_errors(base.wrk)
        if errors:
            out[f"tput_{mode}"].note = f"wrk: {errors}"
    d = results[("default", shape)]
    if d.before is not None and d.after is not None and d.wrk.requests:
        out["ring_per_req"].add((total(d.after, "probewire_http_exchanges_total", via="ring")
                                 - total(d.before, "probewire_http_exchanges_total", via="ring"))
                                / d.wrk.requests)
    if d.service_cpu_s > 0:
        out["cpu_share"].add(100.0 * d.agent_cpu_s / d.service_cpu_s)
    o = results[("otlp", shape)]
    assert o.before is not None and o.after is not None
    out["dropped"].add(total(o.after, "probewire_otlp_spans_total", result="dropped")
                       - total(o.before, "probewire_otlp_spans_total", result="dropped"))
    out["span_p99"].add(latency_quantile_ms(o.before, o.after))
    if o.wrk.requests:
        ok = (total(o.after, "probewire_otlp_spans_total", result="success")
              - total(o.before, "probewire_otlp_spans_total", result="success"))
        out["spans_per_req"].add(ok / o.wrk.requests)
    failed = (total(o.after, "probewire_otlp_spans_total", result="failure")
              - total(o.before, "probewire_otlp_spans_total", result="failure"))
    if failed:
        out["dropped"].note += f"; {failed:.0f} spans failed to export in a run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(render(run(args.quick), "realistic service: nginx → gunicorn, 0.5 ms per request"))


if __name__ == "__main__":
    main()
