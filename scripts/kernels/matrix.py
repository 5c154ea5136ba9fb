"""The kernel matrix: boot each Debian kernel of kernels.list in an emulated guest and run the
kernel-facing tests there; print one table of kernel x pass/fail/skip per test, and the hook
types each kernel got.

    .venv/bin/python scripts/kernels/matrix.py [--suites bullseye,bookworm] [-- PYTEST ARGS]

`make test-kernels` runs every suite with the default test set; `make test` runs one suite with
a subset (Makefile). The guest is virtme-ng's: the host root shared read-only over 9p with tmpfs
overlays, so it runs this checkout's .venv and BPF objects unchanged; QEMU emulates the CPU
(TCG, `-cpu max`): on our machines KVM guests hang after the boot loader (DESIGN.md §3).
Per suite, test-output/kernels/<suite>/ receives the guest's console log, junit.xml,
pytest.log, doctor.txt, probes.txt and report.json; summary.md holds the printed table.
Exit status: 0 when every suite ran and no test failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "scripts" / "kernels"
VENV_BIN = REPO / ".venv" / "bin"
# tests/bpf: real objects, real kernel. The CLI end-to-end tests start `probewire run`, doctor
# and probes as processes and check what the kernel holds (bpftool) after SIGKILL/SIGTERM.
DEFAULT_TESTS = ["tests/bpf", "tests/e2e/test_cli.py"]
OUTCOMES = ("passed", "failed", "error", "skipped")
# pytest -v's progress line: "<file>::<test id> PASSED   [ 12%]" (test ids may hold spaces).
PROGRESS = re.compile(r"^(?P<id>\S+\.py::.+?) (?P<outcome>PASSED|FAILED|ERROR|SKIPPED)(?:\s|$)")


@dataclass
class SuiteRun:
    suite: str
    release: str = ""
    seconds: float = 0.0
    problem: str = ""  # why the guest gave no results (boot failure, timeout)
    reboots: list[str] = field(default_factory=list)  # why a frozen guest was booted again
    tests: dict[str, str] = field(default_factory=dict)  # test id -> outcome
    messages: dict[str, str] = field(default_factory=dict)  # test id -> first failure line
    report: dict[str, Any] = field(default_factory=dict)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.tests.values() if o == outcome)


def suites_listed() -> list[str]:
    lines = (HERE / "kernels.list").read_text().splitlines()
    return [ln.split()[0] for ln in lines if ln.strip() and not ln.startswith("#")]


def fetch(suite: str) -> tuple[str, Path]:
    out = subprocess.run([str(HERE / "fetch.sh"), suite], check=True, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    sys.stderr.write(out.stderr)
    _, release, vmlinuz = out.stdout.split()
    return release, Path(vmlinuz)


def build_images(cache: Path) -> list[tuple[Path, Path]]:
    """squashfs images (image, where the guest mounts it) of what Python reads at every start:
    the checkout, its .venv and the interpreter's standard library.

    Over 9p under TCG each file lookup is a round trip through emulated virtio: importing the
    agent took 105 s per process. From images on a virtio disk, the guest's own page cache
    serves the lookups (25 s for the first import, less after). Uncompressed, they take ~3 s
    to write. They are also a snapshot: edits to the checkout during a run do not reach it.
    """
    where = "import sysconfig; print(sysconfig.get_paths()['stdlib'])"
    stdlib = Path(subprocess.run([str(VENV_BIN / "python"), "-c", where], check=True,
                                 capture_output=True, text=True).stdout.strip())
    cache.mkdir(parents=True, exist_ok=True)
    images = []
    for name, src, excludes in (
        ("repo", REPO, [".venv/*", "test-output/*", ".hypothesis/*"]),
        ("venv", REPO / ".venv", []),
        ("stdlib", stdlib, ["site-packages", "test"]),
    ):
        image = cache / f"{name}.sqfs"
        subprocess.run(
            ["mksquashfs", str(src), str(image), "-noappend", "-noI", "-noD", "-noF", "-noX",
             "-no-progress", "-quiet", "-wildcards", "-e", *excludes, "__pycache__/*.pyc.*"],
            check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        images.append((image, src))
    return images


def boot(run: SuiteRun, vmlinuz: Path, out: Path, pytest_args: list[str], memory: str,
         timeout_s: float, images: list[tuple[Path, Path]], one_thread: bool = False) -> bool:
    """Boot the kernel under TCG and run guest.sh; its files land in `out`. True when the
    guest froze (guest_frozen) and was stopped. `one_thread`: both vCPUs on one host thread
    (TCG's thread=single; slower, but no vCPU runs while another patches kernel text)."""
    # Every boot is single-threaded unless GUEST_TCG_ONE_THREAD=0 (multi-threaded TCG, faster);
    # the second boot of a frozen guest always is.
    one_thread = one_thread or os.environ.get("GUEST_TCG_ONE_THREAD", "1") != "0"
    # Disks appear as /dev/vda, vdb, ... in the order given.
    mounts = " ".join(f"/dev/vd{chr(ord('a') + i)}={where}" for i, (_, where) in
                      enumerate(images))
    # The guest has its own environment: guest.sh's settings are handed over explicitly.
    passed = [f"{k}={os.environ[k]}" for k in ("GUEST_CLI_REPORTS", "GUEST_PYTEST_TIMEOUT_S",
                                                  "GUEST_GDB_PORT")
              if k in os.environ]
    # bash reads a script as it runs it: the guest runs a copy nobody edits meanwhile.
    shutil.copy(HERE / "guest.sh", out / "guest.sh")
    guest = shlex.join(["env", f"PW_IMAGES={mounts}", f"PW_REPO={REPO}", *passed,
                        str(out / "guest.sh"), str(out), *pytest_args])
    drives = " ".join(f"-drive file={image},if=virtio,format=raw,readonly=on"
                      for image, _ in images)
    cmd = [
        str(VENV_BIN / "vng"), "--run", str(vmlinuz), "--disable-kvm", "--cpus", "2",
        # --verbose: the kernel's console (a lockup or hung-task report) lands in console.log.
        "--verbose",
        # The root is read-only in the guest; these two directories are written through.
        "--memory", memory, "--rwdir", str(REPO / "test-output"), "--rwdir", str(out),
        "--exec", guest,
        f"--qemu-opts={'-accel tcg,thread=single' if one_thread else '-machine accel=tcg'} "
        f"{drives}",
    ]
    # GUEST_GDB_PORT=<port>: a gdb stub on loopback and no KASLR, so a hung guest's CPUs can be
    # read with gdb against the kernel's System.map (`target remote 127.0.0.1:<port>`).
    if os.environ.get("GUEST_GDB_PORT"):
        cmd[-1] += f" -gdb tcp:127.0.0.1:{os.environ['GUEST_GDB_PORT']}"
        cmd += ["--append", "nokaslr"]
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    console = out / "console.log"
    t0 = time.monotonic()
    frozen = ""
    with console.open("wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            over = time.monotonic() - t0 > timeout_s
            frozen = "" if over else guest_frozen(out)
            if over or frozen:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                run.problem = frozen or f"timed out after {timeout_s:.0f} s (see {console})"
    run.seconds = time.monotonic() - t0
    if not run.problem and not (out / "rc").exists():
        run.problem = f"guest exited {proc.returncode} before pytest finished (see {console})"
    return bool(frozen)


# What the guest kernel prints when its CPUs stop making progress.
STALL = re.compile(rb"rcu: INFO: .*stall|soft lockup - CPU#|blocked for more than \d+ seconds")
# guest.sh's watcher rewrites watch.log every 60 s from before the first test while the guest
# runs anything at all: after a stall report 5 silent minutes mean frozen, without one 10.
FROZEN_AFTER_S = 300.0
SILENT_AFTER_S = 600.0


def guest_frozen(out: Path) -> str:
    """Why the guest counts as frozen, or "": its kernel reported a stall or lockup and its
    watcher has written nothing for FROZEN_AFTER_S (a stall report alone can pass: an emulated
    CPU starved by a busy host), or nothing at all for SILENT_AFTER_S (a CI guest once ran into
    its limit with no report that reached the host)."""
    console, watch = out / "console.log", out / "watch.log"
    try:
        stall = STALL.search(console.read_bytes())
        # Not the console's age: a locked-up kernel keeps printing its report there.
        quiet_s = time.time() - (watch if watch.exists() else console).stat().st_mtime
    except OSError:
        return ""
    if stall and quiet_s >= FROZEN_AFTER_S:
        return (f"froze: the kernel reported \"{stall[0].decode(errors='replace')}\" and the "
                f"guest wrote nothing for {quiet_s:.0f} s (see {console})")
    if quiet_s >= SILENT_AFTER_S:
        return f"froze: the guest wrote nothing for {quiet_s:.0f} s (see {console})"
    return ""


def console_tail(out: Path, run: SuiteRun, lines: int = 25) -> str:
    """The last console lines of a guest that failed or froze (of its frozen boot too)."""
    text = []
    for console in (out / "hung-1" / "console.log", out / "console.log"):
        with contextlib.suppress(OSError):
            tail = console.read_bytes().decode(errors="replace").splitlines()[-lines:]
            text += [f"### {run.suite}: last {len(tail)} lines of {console}", "",
                     *(f"    {line[:200]}" for line in tail), ""]
    return "\n".join(text)


def _test_id(case: ET.Element) -> str:
    module = case.get("classname", "").rsplit(".", 1)[-1]
    return f"{module}::{case.get('name', '')}"


def _from_log(run: SuiteRun, log: Path) -> None:
    """Outcomes from pytest -v's progress lines: a guest stopped by its timeout writes no
    junit.xml, and the tests it finished still count."""
    for line in log.read_text(errors="replace").splitlines():
        m = PROGRESS.match(line)
        if m:
            path, _, name = m["id"].partition("::")
            run.tests[f"{Path(path).stem}::{name}"] = m["outcome"].lower()


def collect(run: SuiteRun, out: Path) -> None:
    junit = out / "junit.xml"
    if not junit.exists() and (out / "pytest.log").exists():
        _from_log(run, out / "pytest.log")
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            tid = _test_id(case)
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    msg = (node.get("message") or node.text or "").strip().splitlines()
                    run.messages[tid] = msg[0][:160] if msg else ""
                    break
            run.tests[tid] = outcome
    report = out / "report.json"
    if report.exists():
        run.report = json.loads(report.read_text())


CELL = {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip"}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _hook_kind(section: str) -> str:
    return section.split("/", 1)[0] if section else "-"


def summary(runs: list[SuiteRun]) -> str:
    head = [f"{r.suite} {r.release}" for r in runs]
    lines = ["## Tests", "", _row(["test", *head]), _row(["---"] * (len(runs) + 1))]
    tests = sorted({t for r in runs for t in r.tests})
    for tid in tests:
        lines.append(_row([tid, *(CELL.get(r.tests.get(tid, ""), "-") for r in runs)]))
    for outcome in OUTCOMES:
        lines.append(_row([f"**{outcome}**", *(str(r.count(outcome)) for r in runs)]))
    lines.append(_row(["**minutes in the guest**", *(f"{r.seconds / 60:.1f}" for r in runs)]))
    lines += ["", "## Hook types chosen (first program that loads and attaches)", "",
              _row(["probe / hook", *head]), _row(["---"] * (len(runs) + 1))]
    hooks: dict[tuple[str, str], dict[str, str]] = {}
    for r in runs:
        for name, fam in r.report.get("families", {}).items():
            if not fam.get("loaded"):
                hooks.setdefault((name, "(family)"), {})[r.suite] = "off"
            for h in fam.get("hooks", []):
                kind = _hook_kind(h["section"]) if h["attached"] else "not attached"
                hooks.setdefault((name, h["hook"]), {})[r.suite] = kind
    for (probe, hook), by_suite in sorted(hooks.items()):
        lines.append(_row([f"{probe} / {hook}", *(by_suite.get(r.suite, "-") for r in runs)]))
    lines += ["", "## What each kernel offers (tried, not looked up)", "",
              _row(["feature", *head]), _row(["---"] * (len(runs) + 1))]
    features = sorted({f"hook {t}" for r in runs for t in r.report.get("hook_types", {})}
                      | {f for r in runs for f in r.report.get("kernel_features", {})})
    for feat in features:
        cells = []
        for r in runs:
            src = (r.report.get("hook_types", {}).get(feat[5:]) if feat.startswith("hook ")
                   else r.report.get("kernel_features", {}).get(feat))
            cells.append("-" if src is None else "yes" if src["available"] else "no")
        lines.append(_row([feat, *cells]))
    costs = {(hook, t) for r in runs for hook, by_type in r.report.get("hook_costs", {}).items()
             for t in by_type if t != "error"}
    if costs:
        lines += ["", "## ns per program run by hook type (same workload, BPF stats; emulated "
                  "CPU: compare within a column only)", "",
                  _row(["hook / type", *head]), _row(["---"] * (len(runs) + 1))]
        for hook, hook_type in sorted(costs):
            cells = []
            for r in runs:
                c = r.report.get("hook_costs", {}).get(hook, {}).get(hook_type, "-")
                cells.append("n/a" if c is None else "-" if c == "-" else
                             f"{c['avg_ns']} ({c['runs']} runs)")
            lines.append(_row([f"{hook} / {hook_type}", *cells]))
    notes = [(r, tid, msg) for r in runs for tid, msg in sorted(r.messages.items())
             if r.tests.get(tid) in ("failed", "error")]
    off = [(r, name, fam) for r in runs for name, fam in r.report.get("families", {}).items()
           if not fam.get("loaded") or fam.get("features_off")]
    if notes or off or any(r.problem or r.reboots for r in runs):
        lines += ["", "## Failures and families switched off", ""]
        for r in runs:
            lines += [f"- {r.suite}: {why}" for why in r.reboots]
            if r.problem:
                lines.append(f"- {r.suite}: {r.problem}")
        for r, name, fam in off:
            what = fam.get("error") or "; ".join(f"{k}: {v}" for k, v in
                                                 fam.get("features_off", {}).items())
            lines.append(f"- {r.suite} {r.release}: family {name} "
                         f"{'off' if not fam.get('loaded') else 'partly off'}: {what}")
            # The end of the libbpf log holds the verifier's rejection (or the map it refused).
            tail = [ln for ln in fam.get("log", []) if "failed to load object" not in ln][-4:]
            lines.extend(f"    {ln}" for ln in tail)
        for r, tid, msg in notes:
            lines.append(f"- {r.suite}: {tid}: {msg}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", default=",".join(suites_listed()),
                        help="comma-separated Debian suites from kernels.list")
    parser.add_argument("--out", type=Path, default=REPO / "test-output" / "kernels")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--jobs", type=int, default=1, help="guests booted side by side")
    parser.add_argument("--timeout-min", type=float, default=150.0,
                        help="per guest: boot, report and tests")
    parser.add_argument("pytest_args", nargs="*", help="after --: what pytest runs in the guest")
    args = parser.parse_args()
    pytest_args = args.pytest_args or DEFAULT_TESTS
    if not shutil.which("qemu-system-x86_64"):
        print("test-kernels: qemu-system-x86_64 is missing; run make setup", file=sys.stderr)
        return 2
    t_all = time.monotonic()
    # Per output directory: guests of another run may still read theirs.
    images = build_images(args.out / ".images")
    runs = [SuiteRun(suite) for suite in args.suites.split(",") if suite]

    def one(run: SuiteRun) -> None:
        out = (args.out / run.suite).resolve()
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        try:
            run.release, vmlinuz = fetch(run.suite)
        except subprocess.CalledProcessError as exc:
            run.problem = f"fetch failed: {exc.stderr.strip()[-300:]}"
            return
        print(f"test-kernels: {run.suite} ({run.release}): booting under TCG", file=sys.stderr,
              flush=True)
        if boot(run, vmlinuz, out, pytest_args, args.memory, args.timeout_min * 60, images):
            # A frozen emulated guest is booted once more, and said so in the summary; its
            # files are kept in hung-1/ for the diagnosis (console.log, watch.log, pytest.log).
            kept = out / "hung-1"
            kept.mkdir()
            for f in list(out.iterdir()):
                if f.is_file():
                    f.rename(kept / f.name)
            why = run.problem.replace(str(out / "console.log"), str(kept / "console.log"))
            run.reboots.append(f"{why}; booted again (TCG thread=single), the frozen run's "
                               f"files are in {kept}")
            run.problem = ""
            (out / "test-output").mkdir(exist_ok=True)
            # The freezes seen so far (5.10: both vCPUs looping on the int3 of a live text
            # patch at a static branch) were under multi-threaded TCG; the second boot runs
            # its vCPUs on one host thread.
            boot(run, vmlinuz, out, pytest_args, args.memory, args.timeout_min * 60, images,
                 one_thread=True)
        collect(run, out)
        print(f"test-kernels: {run.suite} ({run.release}): {run.count('passed')} passed, "
              f"{run.count('failed')} failed, {run.count('error')} errors, "
              f"{run.count('skipped')} skipped in {run.seconds / 60:.1f} min"
              + (f"; {run.problem}" if run.problem else ""), file=sys.stderr, flush=True)

    # Guests one after another by default: each takes both cores (-smp 2).
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, runs))
    text = summary(runs)
    text += (f"\nWhole matrix: {(time.monotonic() - t_all) / 60:.1f} min on "
             f"{os.cpu_count()} host cores (TCG), {args.jobs} guest(s) at a time.\n")
    (args.out / "summary.md").write_text(text)
    print(text)
    # CI keeps only the tail of what was printed: a failed or frozen guest's last console lines
    # come last, so the cause can be read without the guest's files.
    for run in runs:
        if run.problem or run.reboots:
            print(console_tail(args.out / run.suite, run))
    bad = any(r.problem or r.count("failed") or r.count("error") or not r.tests for r in runs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
