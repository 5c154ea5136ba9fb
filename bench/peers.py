"""Peers: bpftrace counting the same syscall tracepoints into a map, in rounds interleaved with no
agent and with probewire's default probes under the same wrk load (throughput, p99 and each
tool's kernel ns per run from BPF stats, side by side); and
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
from collections.abc import Callable, Iterator
from pathlib import Path

from bench import bcc
from bench.harness import (
    Samples,
    WrkResult,
    cpu_seconds,
    pinned_nginx,
    rss_mb,
    run_wrk,
    running_agent,
    spawn,
    stop_process,
)
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


# The agent with its default probes and BPF stats on for the whole run (the default config
# samples them one second in five): its per-program figures then cover every run of wrk.
AGENT_STATS_ON = "bpf_stats: on\n"
MODES = ("none", "probewire", "bpftrace")
Reader = Callable[[], tuple[float, float, float]]


def _l7_stats(s: Samples) -> tuple[float, float]:
    """(run time ns, runs) summed over the l7 family's programs in one scrape."""
    t = n = 0.0
    for (name, lbls), v in s.items():
        if dict(lbls).get("probe") != "l7":
            continue
        if name == "probewire_bpf_run_time_seconds_total":
            t += 1e9 * v
        elif name == "probewire_bpf_run_count_total":
            n += v
    return t, n


@contextlib.contextmanager
def _measured(mode: str, exe: str) -> Iterator[tuple[int, Reader]]:
    """Runs `mode`; yields its pid (0 for none) and a reader of (cpu seconds, kernel run time
    ns, runs) so far."""
    if mode == "none":
        yield 0, lambda: (0.0, 0.0, 0.0)
    elif mode == "probewire":
        with running_agent(AGENT_STATS_ON) as agent:
            time.sleep(0.5)  # let start-up work finish before measuring

            def read() -> tuple[float, float, float]:
                t, n = _l7_stats(agent.scrape())  # scrape first: a scrape merges counts
                return agent.cpu_s(), t, n
            yield agent.pid, read
    else:
        with running_bpftrace(exe) as (pid, _):
            def read_bt() -> tuple[float, float, float]:
                t, n = bcc.prog_stats(pid)
                return cpu_seconds(pid), float(t), float(n)
            yield pid, read_bt


def _bpftrace(quick: bool) -> list[Row]:
    """Interleaved rounds of no agent, probewire (default probes) and bpftrace counting the same
    tracepoints, under one nginx + wrk load; BPF stats on for both tools in their rounds."""
    exe = shutil.which("bpftrace") or ("/usr/bin/bpftrace"
                                       if Path("/usr/bin/bpftrace").exists() else None)
    names = ("bpftrace: throughput ratio", "bpftrace: p99 ratio", "bpftrace: start-up",
             "bpftrace: RSS under load", "bpftrace: CPU",
             "HTTP hooks kernel ns/run: probewire l7", "HTTP hooks kernel ns/run: bpftrace count()",
             "HTTP hooks kernel ns/run: probewire ÷ bpftrace",
             "vs bpftrace: throughput ratio, probewire ÷ bpftrace",
             "vs bpftrace: p99 ratio, probewire ÷ bpftrace")
    if exe is None:
        return [Row(n, "", status="not installed", note="Debian package bpftrace")
                for n in names]
    rounds, d = (2, 3) if quick else (5, 10)
    stats_note = "BPF stats on in both tools' rounds"
    tput = Row(names[0], "x no agent", note="same syscall tracepoints counted into a map")
    p99 = Row(names[1], "x no agent")
    start = Row(names[2], "s", note="spawn → BEGIN printed (after attach)")
    rss = Row(names[3], "MB")
    cpu = Row(names[4], "% of a core")
    pw_ns = Row(names[5], "ns", note="run-weighted mean over the l7 family's programs on "
                "L7Probe.hooks (tail calls charged to the hooked program), from its /metrics")
    bt_ns = Row(names[6], "ns", note="bpftrace's programs on the same tracepoints, "
                "fdinfo run_time_ns/run_cnt")
    ns_ratio = Row(names[7], "x", target="≤ 2x", goal=("<=", 2.0),
                   note="per round, each tool's mean ns per run under the same load")
    vs_tput = Row(names[8], "x", target="≥ 1.0x", goal=(">=", 1.0),
                  note=f"wrk req/s with probewire's default probes ÷ with bpftrace; {stats_note}")
    vs_p99 = Row(names[9], "x", target="≤ 1.0x", goal=("<=", 1.0),
                 note=f"wrk p99 with probewire ÷ with bpftrace; {stats_note}")
    with bcc.bpf_stats(), pinned_nginx(access_log=False) as ng:
        url = f"{ng.url}/static/index.html"
        run_wrk(url, 1)
        for r in range(rounds):
            order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
            wrk: dict[str, WrkResult] = {}
            ns: dict[str, float] = {}
            for mode in order:
                t_start = time.monotonic()
                with _measured(mode, exe) as (pid, read):
                    if mode == "bpftrace":
                        start.add(time.monotonic() - t_start)
                    c0, t0, n0 = read()
                    w = wrk[mode] = run_wrk(url, d)
                    c1, t1, n1 = read()
                    if n1 > n0:
                        ns[mode] = (t1 - t0) / (n1 - n0)
                    if mode == "bpftrace":
                        cpu.add(100.0 * (c1 - c0) / w.duration_s)
                        rss.add(rss_mb(pid))
            base = wrk["none"]
            tput.add(wrk["bpftrace"].rps / base.rps)
            p99.add(wrk["bpftrace"].p99_ms / base.p99_ms)
            vs_tput.add(wrk["probewire"].rps / wrk["bpftrace"].rps)
            vs_p99.add(wrk["probewire"].p99_ms / wrk["bpftrace"].p99_ms)
            if "probewire" in ns:
                pw_ns.add(ns["probewire"])
            if "bpftrace" in ns:
                bt_ns.add(ns["bpftrace"])
            if "probewire" in ns and "bpftrace" in ns:
                ns_ratio.add(ns["probewire"] / ns["bpftrace"])
    return [tput, p99, start, rss, cpu, pw_ns, bt_ns, ns_ratio, vs_tput, vs_p99]
