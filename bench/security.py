"""Security's cost on an exec-heavy load: thousands of /bin/true per second (posix_spawn +
waitpid in a small C loop per CPU), without the agent, with the agent and security off, with
security on but no rules (the process tree: fork records), and with the default rules (the
exec hook's checks). Configurations alternate within each round so machine noise spreads
over all of them.

Figures: execs per second and wall ns per exec of the load; the cost per exec against no
agent (ns) and the throughput ratio; the exec program's own kernel time per run (BPF stats,
on for the agent's run: host-wide, so other BPF users pay two clock reads a run meanwhile);
the agent's user-space CPU per exec (decode, tree, rules).

    PYTHONPATH=src python -m bench.security [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bench.harness import NCPU, REPO_ROOT, AgentProc, running_agent, total
from bench.report import Row, render

LOOP_C = r"""
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
extern char **environ;
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    char *child[] = {argv[2], NULL};
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        pid_t pid;
        int status;
        if (posix_spawn(&pid, argv[2], NULL, NULL, child, environ) != 0) return 2;
        if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status)) return 3;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%ld\n", (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec));
    return 0;
}
"""
TARGET = "/bin/true"
# Not under /tmp: the default rules would (rightly) alert on a program run from there.
BUILD = REPO_ROOT / "test-output" / "bench-security"
LOAD_LOOPS = 2
CONFIGS = {
    "no agent": None,
    "security off": "security: {enabled: false}\n",
    "security, no rules": "security: {default_rules: false}\n",
    "default rules": "",
}
# Only the process family: the figure is about execs, not HTTP or TCP.
COMMON = "bpf_stats: on\nprobes: {http: {enabled: false}, tcp: {enabled: false}}\n"
EXEC_PROGRAMS = ("process_exec_btf", "process_exec_tp")


def build_loop() -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    src, exe = BUILD / "execloop.c", BUILD / "execloop"
    src.write_text(LOOP_C)
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is not installed (Debian package gcc)")
    subprocess.run([gcc, "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def run_loop(loop: Path, n: int) -> float:
    """Wall ns per exec of `n` spawn+wait of /bin/true, split over one loop per CPU (each
    pinned): thousands of execs per second on our 2-CPU machines, one loop alone makes ~1.5k."""
    loops = max(1, min(NCPU, LOAD_LOOPS))
    procs = []
    t0 = time.monotonic_ns()
    for cpu in range(loops):
        argv = [str(loop), str(n // loops), TARGET]
        if NCPU > 1 and shutil.which("taskset"):
            argv = ["taskset", "-c", str(cpu), *argv]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
    for proc in procs:
        proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"execloop failed with {proc.returncode}")
    return (time.monotonic_ns() - t0) / (loops * (n // loops))


@contextlib.contextmanager
def maybe_agent(config: str | None) -> Iterator[AgentProc | None]:
    if config is None:
        yield None
        return
    with running_agent(COMMON + config) as agent:
        yield agent


def exec_program_stats(agent: AgentProc) -> tuple[float, float]:
    s = agent.scrape()
    ns = cnt = 0.0
    for prog in EXEC_PROGRAMS:
        ns += total(s, "probewire_bpf_run_time_seconds_total", program=prog) * 1e9
        cnt += total(s, "probewire_bpf_run_count_total", program=prog)
    return ns, cnt


def run(quick: bool) -> list[Row]:
    rounds, n = (1, 2000) if quick else (5, 10000)
    loop = build_loop()
    run_loop(loop, 200)  # warm the page cache and the binary
    rate = {name: Row(f"exec load ({name}): execs per second", "execs/s",
                      note=f"{n} x posix_spawn+waitpid of {TARGET}, a loop per CPU")
            for name in CONFIGS}
    wall: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cost = {name: Row(f"exec cost vs no agent ({name})", "ns/exec",
                      note="wall time per exec minus the no-agent run of the same round")
            for name in CONFIGS if CONFIGS[name] is not None}
    ratio = {name: Row(f"exec throughput ratio ({name} / no agent)", "x")
             for name in CONFIGS if CONFIGS[name] is not None}
    kernel = {name: Row(f"exec hook kernel time ({name})", "ns/run",
                        note="BPF stats of the exec program; the VM's ns are several times "
                             "bare metal (DESIGN §3)")
              for name in CONFIGS if CONFIGS[name] is not None}
    agent_cpu = {name: Row(f"agent user-space CPU per exec ({name})", "µs/exec",
                           note="decode, service names, process tree, rules")
                 for name in CONFIGS if CONFIGS[name] is not None}
    for _ in range(rounds):
        per_round: dict[str, float] = {}
        for name, config in CONFIGS.items():
            with maybe_agent(config) as agent:
                if agent is not None:
                    time.sleep(0.5)  # start-up's own /proc reads and seeds settle
                    ns0, cnt0 = exec_program_stats(agent)
                    cpu0 = agent.cpu_s()
                ns_per_exec = run_loop(loop, n)
                if agent is not None:
                    # Let the reader drain what the loop produced before reading its CPU.
                    time.sleep(0.3)
                    ns1, cnt1 = exec_program_stats(agent)
                    agent_cpu[name].add((agent.cpu_s() - cpu0) * 1e6 / n)
                    if cnt1 > cnt0:
                        kernel[name].add((ns1 - ns0) / (cnt1 - cnt0))
            per_round[name] = ns_per_exec
            wall[name].append(ns_per_exec)
            rate[name].add(1e9 / ns_per_exec)
        base = per_round["no agent"]
        for name in cost:
            cost[name].add(per_round[name] - base)
            ratio[name].add(base / per_round[name])
    rows = list(rate.values())
    for name in cost:
        rows += [cost[name], ratio[name], kernel[name], agent_cpu[name]]
    if wall["no agent"]:
        rows[0].note += f"; median {statistics.median(wall['no agent']):.0f} ns per exec"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.security: the agent loads BPF programs; run as root")
    print(render(run(args.quick), "## security: exec-heavy load"))


if __name__ == "__main__":
    main()
