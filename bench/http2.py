"""HTTP/2 at volume: exchanges parsed per agent CPU-second, h2load against nginx over TLS.

h2load (Debian's nghttp2-client) opens a few TLS connections to nginx and keeps 100 streams in
flight on each; both ends are traced through OpenSSL's uprobes, so every exchange is seen
twice (client and server side). The kernel walks each call's frames and ships headers, not
DATA payloads (bpf/l7/proto_http2.h); user space parses them (l7/protocols/http2.py). The
figure is Δprobewire_l7_exchanges_total{protocol="http2"} over the Δ(utime+stime) of the agent
across the run, with the throughput ratio against the same run without the agent.

    python -m bench --only http2
"""

from __future__ import annotations

import re
import subprocess
import time

from bench.harness import NCPU, NGINX_CPU, pin, running_agent, total
from bench.report import Row
from support.servers import nginx, python_upstream

STREAMS = 100


def _h2load(port: int, requests: int, clients: int) -> tuple[float, int]:
    """(requests per second, requests that succeeded)."""
    out = subprocess.run(["h2load", "-n", str(requests), "-c", str(clients), "-m", str(STREAMS),
                          f"https://127.0.0.1:{port}/static/index.html"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    ok = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    if not rps or not ok:
        raise RuntimeError(f"h2load said:\n{out}")
    return float(rps[1]), int(ok[1])


def run(quick: bool) -> list[Row]:
    rounds, requests, clients = (2, 20_000, 4) if quick else (4, 60_000, 4)
    per_cpu = Row("HTTP/2 exchanges parsed per agent CPU-second (h2load against nginx over TLS)",
                  "exchanges/s",
                  note=f"h2load -c {clients} -m {STREAMS}, both sides traced through OpenSSL; "
                       "Δprobewire_l7_exchanges_total{protocol=http2} / Δ(agent utime+stime)")
    exact = Row("HTTP/2 exchanges parsed / exchanges made (both sides)", "x", target="1.0",
                goal=(">=", 1.0), judge="all",
                note="client and server side each count every request h2load made")
    ratio = Row("HTTP/2 throughput with the agent / without", "x",
                note="h2load req/s, rounds interleaved")
    with python_upstream() as up, nginx(upstream_port=up.port, tls=True, workers=1) as ng:
        if NCPU > 1:
            pin(ng.process.pid, NGINX_CPU)
        _h2load(ng.port, 2000, clients)  # warm-up
        for r in range(rounds):
            results: dict[bool, float] = {}
            for with_agent in ((True, False) if r % 2 == 0 else (False, True)):
                if not with_agent:
                    results[False], _ = _h2load(ng.port, requests, clients)
                    continue
                with running_agent() as agent:
                    time.sleep(0.5)
                    before = agent.scrape()
                    c0 = agent.cpu_s()
                    results[True], done = _h2load(ng.port, requests, clients)
                    want = total(before, "probewire_l7_exchanges_total", protocol="http2") \
                        + 2 * done
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        after = agent.scrape()
                        if total(after, "probewire_l7_exchanges_total", protocol="http2") >= want:
                            break
                        time.sleep(0.2)
                    c1 = agent.cpu_s()
                parsed = (total(after, "probewire_l7_exchanges_total", protocol="http2")
                          - total(before, "probewire_l7_exchanges_total", protocol="http2"))
                if c1 > c0:
                    per_cpu.add(parsed / (c1 - c0))
                exact.add(parsed / (2 * done))
            ratio.add(results[True] / results[False])
    return [per_cpu, exact, ratio]
