"""`python -m bench [--quick] [--only NAME[,NAME...]]`: run the benchmarks, print one table.

Benchmarks (in this order): overhead (nginx under wrk with/without the agent, with kernel
aggregation and with every exchange a record; also agent CPU, RSS under load, kernel ns/event per
program, user-space records per CPU-second), fidelity, startup (start-up time and idle RSS),
latency (event → exported), peers (bpftrace; bcc's tcplife/tcpretrans beside probewire's tcp
family), export_latency (event → OTLP span), series_memory (RSS at 1,000 services x 50 routes),
userspace (L7Probe.on_batch per record, in-process), ring_flood (a kernel program floods a
ring; the real RingReader and on_batch on one core: records per CPU-second, nothing lost),
http2 (HTTP/2 exchanges parsed per agent CPU-second, h2load against nginx over TLS), baseline
(the HTTP hooks' kernel cost against the build before the L7 capture layer, in turns),
saturation (the saturation family's kernel ns per run against a trivial counter on each of its
hooks, and `perf bench sched pipe` throughput with the family on and off),
security (thousands of /bin/true per second without the agent, with security off, with no
rules, with the default rules: ns per exec and throughput ratio),
custom (a custom probe's cost per call next to bpftrace's uprobe count() on the same function;
start-up with 5 custom probes),
soak (RSS plateau and slope of the agent under distinct-path churn across 20 services:
BENCH_SOAK_MINUTES / BENCH_SOAK_CONNECTIONS set its length), faults (the fault matrix:
each row the losses nobody counted; BENCH_FAULTS=name,... runs some rows),
fleet (RSS and CPU with 500 containers' cgroups and 5,000 pods replayed through the API),
realistic (nginx proxying to a gunicorn upstream doing 0.5 ms of CPU work per request, keep-alive
and new connections: throughput/p99 ratios with default probes and with OTLP traces, spans
dropped, event → span p99, agent CPU per 1k requests).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from bench import (
    baseline,
    custom,
    export_latency,
    faults,
    fidelity,
    fleet,
    http2,
    latency,
    overhead,
    peers,
    realistic,
    ring_flood,
    saturation,
    security,
    series_memory,
    soak,
    startup,
    userspace,
)
from bench.harness import REPO_ROOT, _kill_leftovers, foreign_bpf_holders
from bench.report import Row, render

BENCHMARKS: dict[str, Callable[[bool], list[Row]]] = {
    "overhead": overhead.run,
    "fidelity": fidelity.run,
    "startup": startup.run,
    "latency": latency.run,
    "peers": peers.run,
    "export_latency": export_latency.run,
    "series_memory": series_memory.run,
    "userspace": userspace.run,
    "ring_flood": ring_flood.run,
    "http2": http2.run,
    "baseline": baseline.run,
    "saturation": saturation.run,
    "security": security.run,
    "custom": custom.run,
    "soak": soak.run,
    "faults": faults.run,
    "fleet": fleet.run,
    "realistic": realistic.run,
}
RESULTS = REPO_ROOT / "bench" / "results" / "latest.md"


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind through every finally: stop the agent, nginx, wrk


def _header(quick: bool, names: list[str], elapsed_s: float, foreign: list[str]) -> str:
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    return (f"## probewire bench ({'quick' if quick else 'default'}) — "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}, commit {commit or '?'}, "
            f"Linux {platform.release()}, {os.cpu_count()} CPUs, "
            f"benchmarks: {', '.join(names)}, {elapsed_s:.0f} s\n\n"
            f"Other processes holding BPF programs during the run (they trace our traffic "
            f"too and skew overhead/fidelity): {', '.join(foreign) or 'none seen'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter repeats (< 3 min)")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help=f"where to write the table (default {RESULTS.relative_to(REPO_ROOT)})")
    ap.add_argument("--only", action="append", default=[],
                    help=f"run only these (comma-separated, repeatable): {', '.join(BENCHMARKS)}")
    args = ap.parse_args(argv)
    names = [n.strip() for o in args.only for n in o.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if os.geteuid() != 0:
        print("bench: the agent loads BPF programs; run as root (sudo make bench)",
              file=sys.stderr)
        return 3
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    rows: list[Row] = []
    foreign = set(foreign_bpf_holders())
    failed = False
    t0 = time.monotonic()
    try:
        for name in names:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            t = time.monotonic()
            try:
                rows += BENCHMARKS[name](args.quick)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one broken benchmark must not lose the others' figures
                traceback.print_exc()
                rows.append(Row(name, "", status="error",
                                note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                                if str(exc) else type(exc).__name__))
                failed = True
            foreign.update(foreign_bpf_holders())
            print(f"bench: {name} done in {time.monotonic() - t:.0f} s", file=sys.stderr,
                  flush=True)
    except KeyboardInterrupt:
        _kill_leftovers()
        print("bench: interrupted; processes stopped", file=sys.stderr)
        return 130
    table = render(rows, _header(args.quick, names, time.monotonic() - t0, sorted(foreign)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
