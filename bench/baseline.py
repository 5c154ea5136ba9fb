"""Kernel cost of the HTTP hooks against a fixed baseline build, side by side in one run.

The capture layer (bpf/l7/) replaced the http family's kernel program: this row shows the HTTP
hooks cost no more than they did at BASELINE (the last commit before it, the one the capture
layer issue names). The baseline is built from git history into a temporary worktree (its BPF
objects with its own Makefile, its Python run from that tree with this venv's packages); both
agents then run in turns under the same nginx + wrk load, with BPF stats on, and the row is
the weighted mean kernel ns per run of each agent's syscall-hook programs (tail calls included:
BPF stats charge a tail-called program's time to the program that was hooked).

    python -m bench --only baseline
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.harness import (
    REPO_ROOT,
    AgentProc,
    Samples,
    free_port,
    get,
    parse_metrics,
    pinned_nginx,
    run_wrk,
    spawn,
    stop_process,
)
from bench.report import Row

BASELINE = "75eb496"
# The syscall hooks both builds attach (the baseline has no sendmmsg/recvmmsg hooks).
HOOKS = ("read", "recvfrom", "readv", "recvmsg", "write", "sendto", "writev", "sendmsg",
         "sendfile64")
PROGRAMS = {"baseline": ("http", "http_exit_"), "current": ("l7", "l7_exit_")}


@contextlib.contextmanager
def baseline_tree() -> Iterator[Path]:
    """A worktree of BASELINE with its BPF objects built, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="pw-baseline-"))
    tree = tmp / "tree"
    try:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-q",
                        str(tree), BASELINE], check=True)
        subprocess.run(["make", "-s", "-C", str(tree / "bpf")], check=True,
                       stdout=subprocess.DEVNULL)
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force",
                        str(tree)], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def agent_from(src: Path, timeout_s: float = 30.0) -> Iterator[AgentProc]:
    """`probewire run` from the Python tree `src`, BPF stats always on."""
    with tempfile.TemporaryDirectory(prefix="pw-ab-") as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text("bpf_stats: on\n")
        listen = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "PYTHONPATH": str(src)}
        log = (Path(tmp) / "agent.log").open("wb")
        t0 = time.monotonic()
        proc = spawn([sys.executable, "-m", "probewire.cli", "run", "--listen", listen,
                      "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"agent from {src} exited: "
                                       f"{(Path(tmp) / 'agent.log').read_text()[-2000:]}")
                with contextlib.suppress(OSError):
                    if get(f"http://{listen}/healthz", 1.0):
                        break
                if time.monotonic() - t0 > timeout_s:
                    raise RuntimeError(f"agent from {src} not healthy after {timeout_s} s")
                time.sleep(0.01)
            yield AgentProc(proc, listen, t0)
        finally:
            stop_process(proc)
            log.close()


def hook_cost(before: Samples, after: Samples, probe: str, prefix: str
              ) -> tuple[float, float, dict[str, float]]:
    """(total ns, runs, ns per run per hook) of the syscall-hook programs between two scrapes."""
    def stats(s: Samples) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for (name, labels), v in s.items():
            d = dict(labels)
            program = d.get("program", "")
            if d.get("probe") != probe or not program.startswith(prefix):
                continue
            hook = program[len(prefix):]
            t, c = out.get(hook, (0.0, 0.0))
            if name == "probewire_bpf_run_time_seconds_total":
                out[hook] = (t + v * 1e9, c)
            elif name == "probewire_bpf_run_count_total":
                out[hook] = (t, c + v)
        return out

    b, a = stats(before), stats(after)
    total_ns = runs = 0.0
    per_hook: dict[str, float] = {}
    for hook in HOOKS:
        t1, n1 = a.get(hook, (0.0, 0.0))
        t0, n0 = b.get(hook, (0.0, 0.0))
        if n1 - n0 > 0:
            per_hook[hook] = (t1 - t0) / (n1 - n0)
            total_ns += t1 - t0
            runs += n1 - n0
    return total_ns, runs, per_hook


def run(quick: bool) -> list[Row]:
    rounds, duration_s = (2, 3) if quick else (4, 8)
    mean = {name: Row(f"kernel ns/run of the HTTP syscall hooks ({name} build)", "ns",
                      note="weighted over the 9 data-syscall exit hooks both builds attach, "
                           "nginx under wrk, BPF stats on, builds in turns")
            for name in PROGRAMS}
    ratio = Row(f"kernel cost of the HTTP hooks: this build / {BASELINE}", "x",
                target="≤ 1.0x (no worse than the baseline)", goal=("<=", 1.0))
    per_hook: dict[str, dict[str, list[float]]] = {n: {} for n in PROGRAMS}
    with baseline_tree() as tree, pinned_nginx(access_log=False) as ng:
        url = f"{ng.url}/static/index.html"
        run_wrk(url, 1)
        for r in range(rounds):
            order = list(PROGRAMS) if r % 2 == 0 else list(reversed(PROGRAMS))
            got = {}
            for name in order:
                src = tree / "src" if name == "baseline" else REPO_ROOT / "src"
                probe, prefix = PROGRAMS[name]
                with agent_from(src) as agent:
                    time.sleep(0.5)
                    before = parse_metrics(get(f"http://{agent.listen}/metrics").decode())
                    run_wrk(url, duration_s)
                    after = parse_metrics(get(f"http://{agent.listen}/metrics").decode())
                t, n, hooks = hook_cost(before, after, probe, prefix)
                if n:
                    got[name] = t / n
                    mean[name].add(t / n)
                    for hook, ns in hooks.items():
                        per_hook[name].setdefault(hook, []).append(ns)
            if len(got) == 2:
                ratio.add(got["current"] / got["baseline"])
    ratio.note = "per hook, median ns (baseline → this build): " + ", ".join(
        f"{h} {_median(per_hook['baseline'].get(h))}→{_median(per_hook['current'].get(h))}"
        for h in HOOKS if h in per_hook["baseline"] or h in per_hook["current"])
    return [mean["baseline"], mean["current"], ratio]


def _median(values: list[float] | None) -> str:
    if not values:
        return "-"
    v = sorted(values)
    return f"{v[len(v) // 2]:.0f}"
