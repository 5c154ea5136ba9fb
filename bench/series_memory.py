"""Memory of the HTTP series state at 1,000 services x 50 routes (DESIGN.md §5: ≤ 60 MB RSS).

The real aggregation code (L7Probe.on_batch) is fed synthetic exchange records in a fresh
Python process, so the figure is the agent's user space with that many series and nothing else
loaded by the benchmark. Services come from a resolver that names pid N "svc-N" (the synthetic
pids are not real processes). Run twice: with the default label budget (series beyond it fold
into http_route="other", as in production) and with the budget raised so all 50,000 route
series are kept.

Then the two readers the agent runs on that state, each measured as the peak RSS while it runs
(VmHWM, reset before): one /metrics scrape as Prometheus asks for it (render_text, gzip), and the
UI history sampling it for one rate window (snapshot.take + History.add every 5 s, 13 times).
The heap settings are the agent's (limit_heap_retention), so freed memory returns as it would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

from bench.harness import REPO_ROOT
from bench.report import Row

CHILD = textwrap.dedent("""
    import gc, json, os, socket, sys, time
    import numpy as np
    from prometheus_client.registry import CollectorRegistry
    from probewire.config import config_from_mapping
    from probewire.enrich.service import ServiceResolver
    from probewire.export.prometheus import render_text
    from probewire.probes.base import ProbeContext
    from probewire.l7.records import HTTP_EXCHANGE
    from probewire.probes.l7 import L7Probe
    from probewire.runtime.bpf import limit_heap_retention
    from probewire.serve.history import History
    from probewire.serve.http import gzip_chunks
    from probewire.serve.snapshot import take

    services, routes, budget = (int(a) for a in sys.argv[1:4])

    class Synthetic(ServiceResolver):
        def name_for(self, pid): return f"svc-{pid}"
        def name_for_port(self, pid, port): return f"svc-{pid}"

    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def rss_mb():
        return status_mb("VmRSS")

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS

    limit_heap_retention()
    cfg = config_from_mapping({"probes": {"l7": {"max_series_per_metric": budget}}})
    probe = L7Probe(ProbeContext(cfg, Synthetic(())))
    before = rss_mb()
    n = services * routes
    rec = np.zeros(n, HTTP_EXCHANGE)
    idx = np.arange(n)
    rec["kind"], rec["role"], rec["method"], rec["status"], rec["proto"] = 1, 1, 1, 200, 1
    rec["tgid"] = 1000 + idx // routes
    rec["family"] = socket.AF_INET
    rec["start_ns"], rec["end_ns"] = 1_000, 2_000_000
    rec["lport"], rec["rport"] = 8080, 40000
    rec["laddr"][:, :4] = [127, 0, 0, 1]
    rec["raddr"][:, :4] = [127, 0, 0, 1]
    for i in range(n):
        # Letters only, so the route templating keeps every path distinct.
        r = i % routes
        head = f"GET /r{chr(97 + r % 26)}{chr(97 + r // 26)} HTTP/1.1\\r\\n\\r\\n".encode()
        rec["req_head"][i, : len(head)] = np.frombuffer(head, np.uint8)
        rec["req_head_len"][i] = len(head)
    rec["req_bytes"] = 40
    resp = b"HTTP/1.1 200 OK\\r\\n\\r\\n"
    rec["resp_head"][:, : len(resp)] = np.frombuffer(resp, np.uint8)
    rec["resp_head_len"] = rec["resp_first_write"] = len(resp)
    rec["resp_bytes"] = len(resp) + 100
    for start in range(0, n, 128):
        probe.on_batch(rec[start:start + 128])
    del rec
    gc.collect()
    held = rss_mb()

    class Probe:
        def collect(self):
            return probe.collect()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Probe())
    lines = [0]

    def counted(chunks):
        for c in chunks:
            lines[0] += c.count(b"\\n") - c.count(b"# HELP ") - c.count(b"# TYPE ")
            yield c

    reset_peak()
    t0 = time.perf_counter()
    page = gzip_chunks(counted(render_text(registry.collect())))
    render_s = time.perf_counter() - t0
    scrape_peak, page_bytes = status_mb("VmHWM"), sum(map(len, page))
    del page
    after_scrape = rss_mb()
    reset_peak()
    history = History(5.0, started_at=0.0)
    for i in range(13):
        snap = take(registry)
        snap.taken_at = 5.0 * (i + 1)
        history.add(snap)
        del snap
    ui_peak = status_mb("VmHWM")
    # Warm renders (a running agent's scrapes after its first), timed where they are quick.
    warm = []
    if n <= 20000:
        for _ in range(5):
            t0 = time.perf_counter()
            gzip_chunks(render_text(registry.collect()))
            warm.append(time.perf_counter() - t0)
    print(json.dumps({"rss_mb": held, "before_mb": before, "scrape_mb": scrape_peak,
                      "warm_render_s": warm,
                      "after_scrape_mb": after_scrape, "render_s": render_s,
                      "page_bytes": page_bytes, "samples": lines[0], "ui_mb": ui_peak,
                      "active": probe.server_budget.active_series}))
""")


def _measure(services: int, routes: int, budget: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(services), str(routes), str(budget)],
        capture_output=True, text=True, check=True, timeout=900, cwd=REPO_ROOT,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(quick: bool) -> list[Row]:
    services, routes = (200, 50) if quick else (1000, 50)
    scale = f"{services} services x {routes} routes"
    rows = []
    for label, budget in (("default label budget", 2000),
                          ("budget raised, all kept", services * routes + 10)):
        m = _measure(services, routes, budget)
        held = Row(f"agent RSS holding HTTP series of {scale} ({label})", "MB",
                   target="≤ 60 MB", goal=("<=", 60.0))
        held.add(m["rss_mb"])
        held.note = (f"{int(m['active'])} server label sets (beyond the budget: "
                     f"http_route=other); RSS {m['before_mb']:.1f} MB before feeding; "
                     "user space only (no BPF objects loaded)")
        peak = Row(f"agent RSS while rendering them for a scrape ({label})", "MB")
        peak.add(m["scrape_mb"])
        peak.note = (f"peak; {int(m['samples'])} samples rendered in {m['render_s']:.2f} s, "
                     f"{m['page_bytes'] / 1e6:.1f} MB gzipped; RSS "
                     f"{m['after_scrape_mb']:.1f} MB after it")
        ui = Row(f"agent RSS while the UI history samples them ({label})", "MB")
        ui.add(m["ui_mb"])
        ui.note = "peak over one 60 s rate window of 5 s samples"
        rows += [held, peak, ui]
    # DESIGN's render target is stated at 10,000 series: a page of about that many samples
    # (200 label sets of the server metrics), rendered and gzipped as a scrape is.
    m = _measure(4, 50, 2000)
    render = Row("/metrics render + gzip, scaled to 10,000 samples", "ms",
                 target="≤ 50 ms at 10,000 series", goal=("<=", 50.0))
    for seconds in m["warm_render_s"]:
        render.add(seconds * 1e3 * 10_000 / m["samples"])
    render.note = (f"{int(m['samples'])} samples (4 services x 50 routes), "
                   f"{m['page_bytes'] / 1e3:.0f} kB gzipped; the 5 renders after the first (a "
                   f"running agent's scrapes; the first, cold: {m['render_s'] * 1e3:.1f} ms); "
                   "user space only")
    rows.append(render)
    return rows
