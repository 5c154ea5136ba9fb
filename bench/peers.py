"""Peers: bpftrace counting the same syscall tracepoints into a map, under the same wrk load; and
bcc's tcplife/tcpretrans beside probewire's tcp family (bench/bcc.py).

Absent tools are reported as "not installed" (Debian packages: bpftrace, bpfcc-tools; scripts/
setup.sh installs them); the bench never installs anything.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from bench import bcc
from bench.harness import cpu_seconds, pinned_nginx, rss_mb, run_wrk, spawn, stop_process
from bench.report import Row
from probewire.probes.l7 import L7Probe


def _tracepoint(hook: str) -> str:
    """bpftrace's name of the tracepoint behind one of L7Probe's hooks."""
    category = "syscalls" if hook.startswith("sys_") else "sock"  # inet_sock_set_state
    return f"tracepoint:{category}:{hook}"


# Exactly the tracepoints probewire's l7 family hooks (L7Probe.hooks).
PROGRAM = (
    ",".join(_tracepoint(hook.name) for hook in L7Probe.hooks)
    + " { @[probe] = count(); }\n"
    + 'BEGIN { printf("attached\\n"); }\n'
)


@contextlib.contextmanager
def running_bpftrace(exe: str, timeout_s: float = 60.0) -> Iterator[tuple[int, float]]:
    """bpftrace with the program above; yields (pid, seconds from spawn to attached)."""
    t0 = time.monotonic()
    proc = spawn([exe, "-e", PROGRAM], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        deadline = t0 + timeout_s
        out = b""
        while b"attached" not in out:
            line = proc.stdout.readline()  # bpftrace prints "Attaching N probes..." first
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"bpftrace did not attach: {out.decode()[-500:]}")
            out += line
        yield proc.pid, time.monotonic() - t0
    finally:
        stop_process(proc)


def run(quick: bool) -> list[Row]:
    # bcc has no HTTP RED tool, so it is compared on the tcp job instead.
    http_job = Row("bcc tool (HTTP job)", "", status="not run",
                   note="no bcc HTTP RED tool; bcc is compared on the tcp job (rows bcc ...)")
    bpftrace_rows = _bpftrace(quick)
    try:
        bcc_rows = bcc.run(quick)
    except Exception as exc:  # a broken bcc set-up must not lose the bpftrace figures
        traceback.print_exc()
        bcc_rows = [Row("bcc peers", "", status="error",
                        note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        if str(exc) else type(exc).__name__)]
    return [*bpftrace_rows, http_job, *bcc_rows]


def _bpftrace(quick: bool) -> list[Row]:
    exe = shutil.which("bpftrace") or ("/usr/bin/bpftrace"
                                       if Path("/usr/bin/bpftrace").exists() else None)
    names = ("bpftrace: throughput ratio", "bpftrace: p99 ratio", "bpftrace: start-up",
             "bpftrace: RSS under load", "bpftrace: CPU")
    if exe is None:
        return [Row(n, "", status="not installed", note="Debian package bpftrace")
                for n in names]
    rounds, d = (1, 3) if quick else (3, 10)
    tput = Row(names[0], "x no agent", note="same syscall tracepoints counted into a map")
    p99 = Row(names[1], "x no agent")
    start = Row(names[2], "s", note="spawn → BEGIN printed (after attach)")
    rss = Row(names[3], "MB")
    cpu = Row(names[4], "% of a core")
    with pinned_nginx(access_log=False) as ng:
        url = f"{ng.url}/static/index.html"
        run_wrk(url, 1)
        for _ in range(rounds):
            base = run_wrk(url, d)
            with running_bpftrace(exe) as (pid, startup_s):
                start.add(startup_s)
                c0 = cpu_seconds(pid)
                w = run_wrk(url, d)
                cpu.add(100.0 * (cpu_seconds(pid) - c0) / w.duration_s)
                rss.add(rss_mb(pid))
            tput.add(w.rps / base.rps)
            p99.add(w.p99_ms / base.p99_ms)
    return [tput, p99, start, rss, cpu]
