"""Event → exported: how long after a request completes it shows on /metrics.

A GET /missing (404) is sent to nginx; /metrics is then polled every 1 ms until the 404 series
of nginx grows. The figure includes one scrape's render time (also reported), so it is an
upper bound. Under load, wrk hammers /static/index.html meanwhile, so the 404 series is only
moved by our probe requests.
"""

from __future__ import annotations

import http.client
import re
import statistics
import subprocess
import time

from bench.harness import (
    get,
    parse_metrics,
    pinned_nginx,
    running_agent,
    spawn,
    stop_process,
    wrk_argv,
)
from bench.report import Row

_404 = re.compile(
    r'^http_server_request_duration_seconds_count\{[^}]*http_response_status_code="404"'
    r'[^}]*service_name="nginx"[^}]*\} (\S+)$', re.M)
POLL_S = 0.001
TIMEOUT_S = 5.0


def _count_404(listen: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    text = get(f"http://{listen}/metrics").decode()
    dt = time.perf_counter() - t0
    return sum(float(v) for v in _404.findall(text)), dt


def _probe_once(port: int, listen: str, scrape_s: list[float]) -> float:
    before, _ = _count_404(listen)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/missing")
        conn.getresponse().read()
        done = time.perf_counter()
    finally:
        conn.close()  # the close ends the exchange for the kernel side too
    deadline = done + TIMEOUT_S
    while time.perf_counter() < deadline:
        n, dt = _count_404(listen)
        scrape_s.append(dt)
        if n > before:
            return time.perf_counter() - done
        time.sleep(POLL_S)
    return float("nan")


def run(quick: bool) -> list[Row]:
    samples = 5 if quick else 30
    idle = Row("event → /metrics, idle", "ms", target="≤ 5 ms idle", goal=("<=", 5.0),
               judge="max", note="GET /missing completes → 404 count grows on /metrics "
                                 "(1 ms polls; includes a scrape)")
    load = Row("event → /metrics, under wrk load", "ms", target="p99 ≤ 1 ms under load",
               goal=("<=", 1.0), judge="max")
    wait_idle = Row("ring batch wait max, idle run", "ms", target="≤ 5 ms idle",
                    goal=("<=", 5.0), note="probewire_ring_batch_wait_max_seconds")
    render = Row("/metrics scrape time", "ms")
    lost = 0
    with running_agent("default") as agent, pinned_nginx(access_log=False) as ng:
        scrape_s: list[float] = []

        def probe_into(row: Row) -> int:
            """Take `samples` probes into row (ms); return how many never showed up (NaN)."""
            missed = 0
            for _ in range(samples):
                v = _probe_once(ng.port, agent.listen, scrape_s)
                if v == v:
                    row.add(1e3 * v)
                else:
                    missed += 1
            return missed

        lost += probe_into(idle)
        s = agent.scrape()
        wait_idle.add(1e3 * s[("probewire_ring_batch_wait_max_seconds", ())])
        wrk = spawn(wrk_argv(f"{ng.url}/static/index.html", 3 * samples + 30),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            lost += probe_into(load)
        finally:
            stop_process(wrk)
        series = len(parse_metrics(get(f"http://{agent.listen}/metrics").decode()))
        render.values = [1e3 * x for x in
                         (min(scrape_s), statistics.median(scrape_s), max(scrape_s))]
        render.note = (f"{series} samples on the page; {len(scrape_s)} scrapes over HTTP; "
                       "DESIGN's 10,000-series target is judged on the row '/metrics render + "
                       "gzip, scaled to 10,000 samples'")
    if lost:
        load.note = f"{lost} probe requests never appeared within {TIMEOUT_S:.0f} s"
    return [idle, load, wait_idle, render]
