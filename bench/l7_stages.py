"""Where the l7 family's kernel time per run goes: the capture path cut after each stage.

bpf/l7.bpf.c is built once per stage with L7_STAGE=n (bpf/l7/dispatch.h): each build returns
after stage n, so the cost a stage adds is the difference between its build and the one before.
Each build runs in the agent (its other probes off) under the same nginx + wrk keep-alive load,
with BPF stats on; bpftrace counting the same tracepoints (`@[probe] = count()`, bench/peers.py)
runs for the whole bench beside it, so every figure has its reference from the same wrk run.
Builds are interleaved in rounds (the order rotated each round), and each figure is shown as
min/median/max over the rounds: ns on this shared machine are noisy, the ratios less so.

    PYTHONPATH=. .venv/bin/python -m bench.l7_stages [--rounds N] [--seconds S] [--stages a,b]
    PYTHONPATH=. .venv/bin/python -m bench.l7_stages --stages full@HEAD~1,full   # before/after

Stages (cumulative): exit = the per-syscall exit program alone (ret > 0, its scratch slot), no
tail call; filter = + the tail call into the capture program and its pid filter; sock = +
pt_regs and fd -> socket; tls = + the in-an-SSL-call check; conn = + the connection's lookup;
state = + classification, the parser's tail call and its state lookup; parse = + HTTP's state
machine (heads copied, no response bounds, nothing counted); bounds = + the response head's
bounds; hash = + at an exchange's end its peer and path hash; full = the agent's build (+ the
route lookup, the aggregation key and its count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from bench import bcc, harness
from bench.harness import REPO_ROOT, compile_bpf, pinned_nginx, run_wrk, running_agent
from bench.overhead import _program_stats
from bench.peers import running_bpftrace
from bench.report import Row, render
from support.bpf_build import ARCH

# Values of L7_STAGE (bpf/l7/capture.h), in the order the path runs them.
STAGES = {"exit": 1, "filter": 2, "sock": 3, "tls": 4, "conn": 5, "state": 6, "parse": 7,
          "bounds": 8, "hash": 9, "full": 99}
# The agent with only the l7 family, BPF stats on for every run.
CONFIG = ("bpf_stats: on\nprobes: {tcp: {enabled: false}, process: {enabled: false}}\n")
# The exit programs of the HTTP load's syscalls (nginx: recvfrom, writev, sendfile64; wrk:
# write, read), and close's enter program, shown one by one.
SHOWN = ("l7_exit_read", "l7_exit_recvfrom", "l7_exit_write", "l7_exit_writev",
         "l7_exit_sendfile64", "l7_close")

LAUNCHER = """#!{python}
import sys
from pathlib import Path

import probewire.agent
import probewire.probes.base

_stock = probewire.agent.object_path


def object_path(family: str) -> Path:
    return Path({obj!r}) if family == "l7" else _stock(family)


probewire.agent.object_path = object_path
probewire.probes.base.object_path = object_path
from probewire.cli import main

sys.exit(main())
"""


def bpftrace_stats(pid: int) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) of each of bpftrace's programs, by the tracepoint it is on, with
    the program names l7 gives its own (l7_exit_read: sys_exit_read; l7_close: sys_enter_close)."""
    links = json.loads(subprocess.run(["bpftool", "-j", "perf", "show"], check=True,
                                      capture_output=True, text=True).stdout)
    progs: dict[int, tuple[int, int]] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError, KeyError, ValueError):
            info = dict(ln.split(":\t", 1) for ln in
                        Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines()
                        if ":\t" in ln)
            progs[int(info["prog_id"])] = (int(info["run_time_ns"]), int(info["run_cnt"]))
    out: dict[str, tuple[int, int]] = {}
    for link in links:
        if link.get("pid") != pid or "tracepoint" not in link or link["prog_id"] not in progs:
            continue
        tp = link["tracepoint"]
        name = ("l7_close" if tp == "sys_enter_close"
                else "l7_exit_" + tp.removeprefix("sys_exit_"))
        out[name] = progs[link["prog_id"]]
    return out


def build(tmp: Path, stage: str) -> Path:
    """The l7 object of `stage` (a stage name, or full@<git rev>: the whole path as that
    revision's bpf/ had it), and a probewire launcher that loads it."""
    name, _, rev = stage.partition("@")
    if rev:
        src = tmp / f"rev-{rev}"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", rev, "bpf"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        obj = tmp / f"l7-{rev}.bpf.o"
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-D__TARGET_ARCH_{ARCH}",
                        "-Wall", "-I", str(src / "bpf" / "include"),
                        "-I", str(REPO_ROOT / "bpf" / ".output"), "-I", str(src / "bpf"),
                        "-c", str(src / "bpf" / "l7.bpf.c"), "-o", str(obj)], check=True)
    else:
        obj = compile_bpf(REPO_ROOT / "bpf" / "l7.bpf.c", tmp / f"l7-{name}.bpf.o",
                          {"L7_STAGE": STAGES[name]})
    launcher = tmp / f"probewire-{stage}"
    launcher.write_text(LAUNCHER.format(python=sys.executable, obj=str(obj)))
    launcher.chmod(0o755)
    return launcher


@contextlib.contextmanager
def agent_with(launcher: Path) -> Iterator[harness.AgentProc]:
    with mock.patch.object(harness, "PROBEWIRE", launcher), running_agent(CONFIG) as agent:
        time.sleep(0.5)  # let start-up work finish before measuring
        yield agent


def measure(rounds: int, seconds: int, stages: list[str]) -> dict[str, dict[str, Row]]:
    exe = shutil.which("bpftrace")
    if exe is None:
        raise SystemExit("bpftrace is needed (Debian package bpftrace; scripts/setup.sh)")
    per: dict[str, dict[str, Row]] = {}
    for name in stages:
        per[name] = {
            "l7": Row(f"{name}: l7 ns/run", "ns", note="run-weighted mean, all l7 programs"),
            "bt": Row(f"{name}: bpftrace count() ns/run", "ns", note="same wrk run"),
            "ratio": Row(f"{name}: l7 ÷ bpftrace", "x", target="≤ 2x", goal=("<=", 2.0)),
            **{p: Row(f"{name}: {p} ns/run", "ns") for p in SHOWN},
            **{f"bt:{p}": Row(f"{name}: bpftrace on {p}'s tracepoint ns/run", "ns")
               for p in SHOWN},
            "rps": Row(f"{name}: wrk req/s", "req/s"),
        }
    with tempfile.TemporaryDirectory(prefix="pw-l7-stages-") as tmp_s:
        tmp = Path(tmp_s)
        launchers = {name: build(tmp, name) for name in stages}
        with bcc.bpf_stats(), pinned_nginx(access_log=False) as ng, \
                running_bpftrace(exe) as (bt_pid, _):
            url = f"{ng.url}/static/index.html"
            run_wrk(url, 1)
            for r in range(rounds):
                order = stages[r % len(stages):] + stages[: r % len(stages)]
                for name in order:
                    rows = per[name]
                    with agent_with(launchers[name]) as agent:
                        s0, b0 = _program_stats(agent.scrape()), bcc.prog_stats(bt_pid)
                        p0 = bpftrace_stats(bt_pid)
                        w = run_wrk(url, seconds)
                        s1, b1 = _program_stats(agent.scrape()), bcc.prog_stats(bt_pid)
                        p1 = bpftrace_stats(bt_pid)
                    rows["rps"].add(w.rps)
                    t = n = 0.0
                    for (probe, prog), (t1, n1) in s1.items():
                        t0, n0 = s0.get((probe, prog), (0.0, 0.0))
                        if probe != "l7" or n1 <= n0:
                            continue
                        t += 1e9 * (t1 - t0)
                        n += n1 - n0
                        if prog in rows:
                            rows[prog].add(1e9 * (t1 - t0) / (n1 - n0))
                    for prog, (t1, n1) in p1.items():
                        t0, n0 = p0.get(prog, (0, 0))
                        if f"bt:{prog}" in rows and n1 > n0:
                            rows[f"bt:{prog}"].add((t1 - t0) / (n1 - n0))
                    bt = (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
                    rows["bt"].add(bt)
                    if n:
                        rows["l7"].add(t / n)
                        rows["ratio"].add(t / n / bt)
                    print(f"round {r} {name:6s} l7 {t / max(n, 1):7.0f} ns  bpftrace "
                          f"{bt:5.0f} ns  ratio {t / max(n, 1) / bt:5.2f}", file=sys.stderr,
                          flush=True)
    return per


def mmm(row: Row) -> str:
    v = row.values
    return f"{min(v):.2f} / {statistics.median(v):.2f} / {max(v):.2f}" if v else "—"


def med(row: Row) -> str:
    return f"{statistics.median(row.values):.0f}" if row.values else "—"


def table(per: dict[str, dict[str, Row]]) -> str:
    """One line a stage: the ratio to bpftrace (min / median / max over rounds), what the
    stage added to the median ratio, and the medians of the ns figures (per program, with
    bpftrace's on the same tracepoint in brackets)."""
    progs = [p.removeprefix("l7_exit_") for p in SHOWN]
    lines = ["| stage | l7 ÷ bpftrace (min / median / max) | added | l7 ns | bpftrace ns | "
             + " | ".join(f"{p} ns (bpftrace)" for p in progs) + " | wrk req/s |",
             "| --- " * (6 + len(progs)) + "|"]
    prev = None
    for name, rows in per.items():
        ratio = rows["ratio"].values
        added = ("" if prev is None or not ratio or not prev
                 else f"{statistics.median(ratio) - statistics.median(prev):+.2f}")
        lines.append(f"| {name} | {mmm(rows['ratio'])} | {added} | {med(rows['l7'])} | "
                     f"{med(rows['bt'])} | "
                     + " | ".join(f"{med(rows[p])} ({med(rows['bt:' + p])})" for p in SHOWN)
                     + f" | {med(rows['rps'])} |")
        prev = ratio
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated, of {', '.join(STAGES)}; full@<git rev> is the "
                    "whole path as that revision had it (before/after, interleaved)")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s.partition("@")[0] not in STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; choose of {', '.join(STAGES)}")
    per = measure(args.rounds, args.seconds, stages)
    print(table(per))
    print()
    print(render([rows["ratio"] for rows in per.values()],
                 f"l7 kernel ns/run ÷ bpftrace count(), by stage ({args.rounds} rounds of "
                 f"{args.seconds} s, nginx + wrk keep-alive)"))


if __name__ == "__main__":
    main()
