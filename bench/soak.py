"""Soak: RSS of the agent under churn (DESIGN.md §5: ≤ 60 MB idle; a plateau ≤ 100 MB with zero
slope in the second half of a 30-minute soak of 1 M connections carrying 1 M distinct paths
across 20 services).

nginx answers on 20 ports, each port a service (port rules); the load generator opens one
connection per request at the rate that spreads the connections over the soak, each with a
distinct path in the id shapes of issue 14 (hex, ord_123a4, emails, dates, generated file
names, plain names), one in ten on stable routes. RSS is sampled every `sample_s`; the
plateau is the highest sample of the second half, the slope a least-squares fit over it. The
counts are checked too: every answered request is recorded or counted as dropped.

Length: `python -m bench --only soak` runs 30 min with 1 M connections; `--quick` 20 s with 10 k;
`BENCH_SOAK_MINUTES=5 BENCH_SOAK_CONNECTIONS=200000 python -m bench --only soak`
any other length (RSS sampled every minute from 10 minutes on, else every tenth of the soak).
"""

from __future__ import annotations

import os
import time

from bench.harness import running_agent, wait_stable
from bench.report import Row
from bench.stress import (
    agent_config,
    counts,
    finish_load,
    multi_port_nginx,
    rss_mb,
    settle,
    slope_mb_per_min,
    start_load,
    uncounted,
    userspace_entries,
)

SERVICES = 20


def soak(minutes: float, connections: int) -> list[Row]:
    duration_s = minutes * 60.0
    sample_s = 60.0 if minutes >= 10 else max(duration_s / 10, 1.0)
    rate = max(int(connections / duration_s), 1)
    scale = f"{connections:,} connections / {minutes:.3g} min, {SERVICES} services"
    with multi_port_nginx(SERVICES) as ng, \
            running_agent(agent_config(ng.ports), timeout_s=60) as agent:
        idle = wait_stable(lambda: round(rss_mb(agent.pid), 1), interval_s=1.0, timeout_s=20)
        before = counts(agent, SERVICES)
        load = start_load(ng.ports, connections, concurrency=32, rate=rate)
        t0 = time.monotonic()
        points: list[tuple[float, float]] = []
        peaks: dict[str, float] = {}
        next_at = t0 + sample_s
        while load.poll() is None and time.monotonic() - t0 < duration_s * 3 + 60:
            time.sleep(max(min(next_at - time.monotonic(), 1.0), 0.0))
            if time.monotonic() < next_at:
                continue
            next_at += sample_s
            points.append((time.monotonic() - t0, rss_mb(agent.pid)))
            for name, n in userspace_entries(agent).items():
                peaks[name] = max(peaks.get(name, 0.0), n)
        points.append((time.monotonic() - t0, rss_mb(agent.pid)))  # as the load ends
        result = finish_load(load, timeout_s=30)
        delta = settle(agent, SERVICES) - before
        after = rss_mb(agent.pid)
    half = [p for p in points if p[0] >= points[-1][0] / 2] if points else []
    rows = []
    r = Row("soak: agent RSS idle (20 services configured)", "MB", target="≤ 60 MB",
            goal=("<=", 60.0))
    r.add(idle)
    rows.append(r)
    r = Row(f"soak: RSS plateau, second half ({scale})", "MB", target="≤ 100 MB",
            goal=("<=", 100.0),
            note=f"highest of {len(half)} samples every {sample_s:g} s; RSS at the end "
                 f"{after:.1f} MB; user-space peaks: "
                 + ", ".join(f"{k} {int(v):,}" for k, v in sorted(peaks.items())))
    for _, v in half:
        r.add(v)
    r.judge = "max"
    rows.append(r)
    r = Row(f"soak: RSS slope, second half ({scale})", "MB/min", target="zero slope (≤ 0.1)",
            goal=("<=", 0.1), note="least squares over the second half's samples")
    r.add(slope_mb_per_min(half))
    rows.append(r)
    r = Row("soak: answered requests neither recorded nor counted as dropped", "requests",
            target="0 (every loss counted)", goal=("==", 0.0), judge="all",
            note=f"sent {result.sent:,}, answered {result.ok:,} ({result.errors} client errors) "
                 f"in {result.seconds:.0f} s; recorded {delta.recorded:,.0f}, dropped "
                 f"{delta.dropped:,.0f}")
    r.add(uncounted(result.ok, delta))
    rows.append(r)
    return rows


def run(quick: bool) -> list[Row]:
    minutes = float(os.environ.get("BENCH_SOAK_MINUTES", 1 / 3 if quick else 30))
    connections = int(os.environ.get("BENCH_SOAK_CONNECTIONS",
                                     10_000 if quick else 1_000_000))
    return soak(minutes, connections)
