"""Start-up (the agent's own load+attach figure and wall time to /healthz) and idle RSS/CPU."""

from __future__ import annotations

import time

from bench.harness import running_agent
from bench.report import Row


def run(quick: bool) -> list[Row]:
    repeats, idle_s = (3, 1.0) if quick else (8, 3.0)
    attach = Row("start-up: load + attach default probes", "s", target="≤ 0.5 s",
                 goal=("<=", 0.5), note="probewire_startup_seconds")
    wall = Row("start-up: process start → /healthz answers", "s",
               note="includes the Python interpreter and imports; polled every 2 ms")
    rss = Row("agent RSS idle (default probes)", "MB", target="≤ 60 MB", goal=("<=", 60.0),
              note="§5 states it at 1,000 services x 50 routes; here idle, no services")
    cpu = Row("agent CPU idle (default probes)", "% of a core",
              note=f"over {idle_s:.0f} s after start-up, no load generated")
    for _ in range(repeats):
        with running_agent("default") as agent:
            wall.add(agent.healthy_after_s)
            attach.add(agent.scrape()[("probewire_startup_seconds", ())])
            c0, t0 = agent.cpu_s(), time.monotonic()
            time.sleep(idle_s)
            cpu.add(100.0 * (agent.cpu_s() - c0) / (time.monotonic() - t0))
            rss.add(agent.rss_mb())
    return [attach, wall, rss, cpu]
