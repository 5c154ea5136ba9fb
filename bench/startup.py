"""Start-up (the agent's own load+attach figure and wall time to /healthz) and idle RSS/CPU,
with the RSS split by what backs it (from /proc/PID/smaps)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from bench.harness import running_agent
from bench.report import Row

_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def rss_parts_mb(pid: int) -> dict[str, float]:
    """RSS by backing: BPF maps mapped in (the ring buffers), files (interpreter, shared
    libraries, extension modules), anonymous memory (Python objects, malloc, stacks)."""
    parts = {"bpf": 0, "file": 0, "anon": 0}
    kind = "anon"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _MAPPING.match(line)
        if m:
            name = m.group(1)
            kind = ("bpf" if name.startswith("anon_inode:bpf") else
                    "file" if name.startswith("/") else "anon")
        elif line.startswith("Rss:"):
            parts[kind] += int(line.split()[1])
    return {k: v / 1024.0 for k, v in parts.items()}


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
    parts = {
        "bpf": Row("agent RSS idle: BPF ring buffers mapped", "MB",
                   note="kernel memory, allocated whether mapped or not; counted once"),
        "file": Row("agent RSS idle: files (interpreter, libraries)", "MB",
                    note="shared with other processes using the same files"),
        "anon": Row("agent RSS idle: anonymous (Python objects, malloc, stacks)", "MB"),
    }
    for _ in range(repeats):
        with running_agent("default") as agent:
            wall.add(agent.healthy_after_s)
            attach.add(agent.scrape()[("probewire_startup_seconds", ())])
            c0, t0 = agent.cpu_s(), time.monotonic()
            time.sleep(idle_s)
            cpu.add(100.0 * (agent.cpu_s() - c0) / (time.monotonic() - t0))
            rss.add(agent.rss_mb())
            for kind, mb in rss_parts_mb(agent.pid).items():
                parts[kind].add(mb)
    return [attach, wall, rss, *parts.values(), cpu]
