"""Memory of the HTTP series state at 1,000 services x 50 routes (DESIGN.md §5: ≤ 60 MB RSS).

The real aggregation code (HttpProbe.on_batch) is fed synthetic exchange records in a fresh
Python process, so the figure is the agent's user space with that many series and nothing else
loaded by the benchmark. Services come from a resolver that names pid N "svc-N" (the synthetic
pids are not real processes). Run twice: with the default label budget (series beyond it fold
into http_route="other", as in production) and with the budget raised so all 50,000 route
series are kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from bench.harness import REPO_ROOT
from bench.report import Row

CHILD = textwrap.dedent("""
    import json, os, socket, sys
    import numpy as np
    from probewire.config import config_from_mapping
    from probewire.enrich.service import ServiceResolver
    from probewire.probes.base import ProbeContext
    from probewire.probes.http import HTTP_EXCHANGE, HttpProbe

    services, routes, budget = (int(a) for a in sys.argv[1:4])

    class Synthetic(ServiceResolver):
        def name_for(self, pid): return f"svc-{pid}"
        def name_for_port(self, pid, port): return f"svc-{pid}"

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    cfg = config_from_mapping({"probes": {"http": {"max_series_per_metric": budget}}})
    probe = HttpProbe(ProbeContext(cfg, Synthetic(())))
    before = rss_mb()
    n = services * routes
    rec = np.zeros(n, HTTP_EXCHANGE)
    idx = np.arange(n)
    rec["kind"], rec["role"], rec["method"], rec["status"] = 1, 1, 1, 200
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
    held = rss_mb()
    families = list(probe.collect())
    series = sum(len(f.samples) for f in families)
    print(json.dumps({"rss_mb": held, "scrape_mb": rss_mb(), "before_mb": before,
                      "samples": series, "active": probe.server_budget.active_series}))
""")


def _measure(services: int, routes: int, budget: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(services), str(routes), str(budget)],
        capture_output=True, text=True, check=True, timeout=900, cwd=REPO_ROOT,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
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
        peak.note = f"{int(m['samples'])} samples in one /metrics collection"
        rows += [held, peak]
    return rows
