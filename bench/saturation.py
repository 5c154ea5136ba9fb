"""The saturation family's cost: kernel ns per run of each of its programs beside a trivial
counter on the same hook (bench/saturation.bpf.c, bpftrace's `count()` as a tp_btf program),
in the same run under the same load; and a context-switch-heavy workload's throughput (`perf
bench sched pipe`, two tasks ping-ponging through pipes) with the family on and off.

Loads: the pipe ping-pong (sched_switch, sched_wakeup), a fork loop (sched_wakeup_new),
O_DIRECT reads of a loop device (block_rq_*), loopback connections (inet_sock_set_state,
consume_skb, kfree_skb). mark_victim needs an OOM kill and is not driven here.

    PYTHONPATH=src python -m bench.saturation [--quick]
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.harness import AGENT_CONFIGS, compile_bpf, running_agent
from bench.report import Row, render
from probewire.agent import Agent
from probewire.config import config_from_mapping
from probewire.runtime.bpf import BpfObject, Link, destroy_links, enable_stats

SOURCE = Path(__file__).with_name("saturation.bpf.c")
# The family alone (the other families' hooks would only add noise to its figures).
ONLY_SATURATION = {"probes": {"tcp": {"enabled": False}, "l7": {"enabled": False},
                              "process": {"enabled": False}}, "bpf_stats": "off"}
AGENT_CONFIGS["saturation_off"] = "probes: {saturation: {enabled: false}}\n"
PIPE_LOOPS = 200_000


@contextlib.contextmanager
def trivial_counters(tmp: Path) -> Iterator[BpfObject]:
    obj = BpfObject(compile_bpf(SOURCE, tmp / "saturation_counters.bpf.o"))
    links: list[Link] = []
    try:
        obj.load()
        links = [p.attach() for p in obj.programs.values()]
        yield obj
    finally:
        destroy_links(links)
        obj.close()


def perf_pipe_ops(loops: int) -> float:
    """`perf bench sched pipe`: ping-pong round trips per second."""
    out = subprocess.run(["perf", "bench", "sched", "pipe", "-l", str(loops)],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"([\d.]+)\s+ops/sec", out)
    if not m:
        raise RuntimeError(f"unexpected perf output:\n{out}")
    return float(m.group(1))


def _forks(n: int) -> None:
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


def _connections(n: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port)) as c:
                conn, _ = srv.accept()
                c.sendall(b"x" * 100)
                conn.recv(100)
                conn.close()


def _block_reads(seconds: float, tmp: Path) -> None:
    img = tmp / "bench-loop.img"
    with img.open("wb") as f:
        f.truncate(16 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            end = time.monotonic() + seconds
            off = 0
            while time.monotonic() < end:
                os.preadv(fd, [buf], off)
                off = (off + 4096) % (16 << 20)
        finally:
            os.close(fd)
            buf.close()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _kernel_rows(quick: bool) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pw-bench-sat-") as tmp_s:
        tmp = Path(tmp_s)
        agent = Agent(config_from_mapping(ONLY_SATURATION))
        agent.start()
        try:
            with trivial_counters(tmp) as counters:
                stats = enable_stats()
                try:
                    ours0 = {s.hook: (s.program, s.run_time_ns, s.run_cnt)
                             for s in agent.status()}
                    theirs0 = {p.name: p.stats() for p in counters.programs.values()}
                    loads = [threading.Thread(target=_block_reads,
                                              args=(1.0 if quick else 3.0, tmp))]
                    for t in loads:
                        t.start()
                    perf_pipe_ops(PIPE_LOOPS // (4 if quick else 1))
                    _forks(200 if quick else 1000)
                    _connections(200 if quick else 1000)
                    for t in loads:
                        t.join()
                    ours1 = {s.hook: (s.program, s.run_time_ns, s.run_cnt)
                             for s in agent.status()}
                    theirs1 = {p.name: p.stats() for p in counters.programs.values()}
                finally:
                    stats.close()
        finally:
            agent.stop()
    for hook, (program, t1, n1) in sorted(ours1.items()):
        _, t0, n0 = ours0[hook]
        base0, base1 = theirs0[f"count_{hook}"], theirs1[f"count_{hook}"]
        runs, base_runs = n1 - n0, base1.run_cnt - base0.run_cnt
        row = Row(f"saturation kernel cost {program} / trivial counter", "x counter",
                  target="≤ 2x", goal=("<=", 2.0))
        if runs <= 0 or base_runs <= 0:
            row.status = "no data"
            row.note = "hook did not fire under the bench's loads"
            rows.append(row)
            continue
        ours_ns = (t1 - t0) / runs
        base_ns = (base1.run_time_ns - base0.run_time_ns) / base_runs
        row.add(ours_ns / base_ns)
        row.note = (f"{ours_ns:.0f} ns vs {base_ns:.0f} ns per run over {runs:,} runs "
                    "(BPF stats, same load, same run)")
        rows.append(row)
    return rows


def _throughput_rows(quick: bool) -> list[Row]:
    rounds = 2 if quick else 5
    loops = PIPE_LOOPS // (4 if quick else 1)
    ratio = Row("perf bench sched pipe: throughput, saturation on / off", "x off",
                target="≥ 0.98x", goal=(">=", 0.98),
                note=f"{loops:,} round trips per run; the agent with default probes vs with "
                     "probes.saturation.enabled false, interleaved")
    off_ops = Row("perf bench sched pipe: round trips/s, saturation off", "ops/s")
    for r in range(rounds):
        result: dict[str, float] = {}
        for mode in (("default", "saturation_off") if r % 2 else ("saturation_off", "default")):
            with running_agent(mode):
                time.sleep(0.5)
                result[mode] = perf_pipe_ops(loops)
        ratio.add(result["default"] / result["saturation_off"])
        off_ops.add(result["saturation_off"])
    return [ratio, off_ops]


def run(quick: bool) -> list[Row]:
    if shutil.which("perf") is None:
        return [Row("saturation bench", "", status="not installed",
                    note="perf (Debian package linux-perf) drives the context switches")]
    return [*_kernel_rows(quick), *_throughput_rows(quick)]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(render(run(quick), f"## saturation bench ({'quick' if quick else 'default'})"))

