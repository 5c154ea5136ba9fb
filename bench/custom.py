"""Custom probes (probes.custom): what one probed call costs the traced program, next to
bpftrace's `uprobe:BIN:process_payment { @[arg1] = count(); }` on the same function in the
same run, and the agent's start-up with 5 custom probes.

The traced program (tests/bpf/custom_progs/payd.c, built here) times a loop of calls to
process_payment itself; the cost per call is (probed loop - bare loop) / calls. Both tools pay
the same uprobe trap, so the difference between them is the BPF program's own work.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.harness import REPO_ROOT, running_agent, spawn, stop_process
from bench.report import Row

PAYD_SRC = REPO_ROOT / "tests" / "bpf" / "custom_progs" / "payd.c"


def _build(tmp: Path) -> Path:
    out = tmp / "payd"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(PAYD_SRC)], check=True, timeout=60)
    return out


@contextlib.contextmanager
def _payd(binary: Path) -> Iterator[subprocess.Popen[str]]:
    proc: subprocess.Popen[str] = subprocess.Popen(
        [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def _loop_ns(proc: subprocess.Popen[str], calls: int) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"loop {calls}\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def _probe_yaml(binary: Path, name: str, symbol: str = "process_payment",
                returns: bool = False) -> str:
    extra = ", duration: true, result: {ok: '>= 0'}" if returns else ""
    return (f"    - {{name: {name}, target: {{exe: '{binary}'}}, symbol: {symbol}{extra}, "
            "labels: [{name: currency, arg: 1, type: u32}]}\n")


def _agent_config(binary: Path, probes: str, families: bool) -> str:
    off = "" if families else ("  tcp: {enabled: false}\n  l7: {enabled: false}\n"
                               "  saturation: {enabled: false}\n")
    return f"bpf_stats: off\nprobes:\n{off}  custom:\n{probes}"


@contextlib.contextmanager
def _bpftrace(exe: str, binary: Path) -> Iterator[None]:
    program = (f"uprobe:{binary}:process_payment {{ @[arg1] = count(); }}\n"
               'BEGIN { printf("attached\\n"); }\n')
    proc = spawn([exe, "-e", program], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        out = b""
        while b"attached" not in out:
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"bpftrace did not attach: {out.decode()[-500:]}")
            out += line
        yield
    finally:
        stop_process(proc)


def run(quick: bool) -> list[Row]:
    rounds, calls = (2, 100_000) if quick else (5, 300_000)
    ours = Row("custom probe: ns per call (uprobe, label from arg1, count)", "ns",
               note="probed loop - bare loop, per call; includes the uprobe trap")
    ours_ret = Row("custom probe: ns per call with duration + result (uprobe + uretprobe)", "ns")
    peer = Row("bpftrace: ns per call, uprobe { @[arg1] = count(); } on the same function", "ns",
               note="same binary, same run")
    ratio = Row("custom probe / bpftrace per call", "x", target="≤ 2x (DESIGN §5)",
                goal=("<=", 2.0), note="numbers need a quiet machine")
    startup = Row("start-up with 5 custom probes (default families + 5)", "s",
                  target="≤ 0.5 s", goal=("<=", 0.5), note="probewire_startup_seconds")
    startup_base = Row("start-up, default families alone (same run)", "s",
                       note="the difference is what 5 custom probes add")
    exe = shutil.which("bpftrace")
    with tempfile.TemporaryDirectory(prefix="pw-bench-custom-") as tmp:
        binary = _build(Path(tmp))
        with _payd(binary) as proc:
            _loop_ns(proc, calls)  # warm
            for _ in range(rounds):
                bare = _loop_ns(proc, calls)
                with running_agent(_agent_config(binary, _probe_yaml(binary, "payments"),
                                                 families=False)):
                    probed = _loop_ns(proc, calls)
                ours.add((probed - bare) / calls)
                with running_agent(_agent_config(
                        binary, _probe_yaml(binary, "payments", returns=True), families=False)):
                    probed_ret = _loop_ns(proc, calls)
                ours_ret.add((probed_ret - bare) / calls)
                if exe is not None:
                    with _bpftrace(exe, binary):
                        traced = _loop_ns(proc, calls)
                    peer.add((traced - bare) / calls)
                    ratio.add((probed - bare) / max(1.0, traced - bare))
            five = "".join(_probe_yaml(binary, f"p{i}", returns=i % 2 == 1) for i in range(5))
            for _ in range(rounds):
                with running_agent(_agent_config(binary, five, families=True)) as agent:
                    startup.add(agent.scrape()[("probewire_startup_seconds", ())])
                with running_agent("bpf_stats: off\n") as agent:
                    startup_base.add(agent.scrape()[("probewire_startup_seconds", ())])
    if exe is None:
        peer.status = ratio.status = "not installed"
    return [ours, ours_ret, peer, ratio, startup, startup_base]
