"""Peer: bcc's tcplife and tcpretrans (Debian bpfcc-tools) beside probewire's tcp family, which
does the same job (connection lifecycle and retransmits), under one nginx load with connection
churn, in interleaved rounds with a no-agent baseline.

bcc compiles its C against kernel headers at every start. Our kernels ship none for the running
release (CONFIG_IKHEADERS off), so when bcc would find none the bench points bcc's own
BCC_KERNEL_SOURCE at Debian's linux-headers-amd64 (another release, 6.1 on our machines). Every
struct read then uses that release's layouts and bcc's output is wrong (tcplife printed
37,751,026 KB sent for a 100-byte connection): these rows are bcc's cost (start-up, RSS, CPU,
workload ratios, kernel ns per event), never a reference for what probewire reports.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    Samples,
    WrkResult,
    cpu_seconds,
    parse_wrk,
    pinned_nginx,
    rss_mb,
    running_agent,
    spawn,
    stop_process,
    wrk_argv,
)
from bench.report import Row, fmt

# Tool -> the line it prints right after BPF(text=...) returns. BPF() compiles, loads and, for
# TRACEPOINT_PROBE functions, attaches (bcc/__init__.py _trace_autoload) before it returns, so
# the line means "attached"; the perf buffers are opened just after it.
TOOLS = {
    "tcplife-bpfcc": b"PID ",
    "tcpretrans-bpfcc": b"Tracing retransmits",
}
HOOKS = {"tcplife-bpfcc": "sock:inet_sock_set_state", "tcpretrans-bpfcc": "tcp:tcp_retransmit_skb"}
# The closest probewire job to tcplife + tcpretrans: its tcp family alone.
TCP_ONLY = "probes: {l7: {enabled: false}, process: {enabled: false}}\n"
MODULES = Path("/lib/modules")
PEER = "probewire tcp family"


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _is_tree(path: Path) -> bool:
    # bcc's own test for a usable header tree (src/cc/frontends/clang/loader.cc).
    return (path / "include" / "linux" / "kconfig.h").is_file()


def _join(dst: Path, sources: list[Path]) -> None:
    """dst becomes the union of the source trees, as symlinks; a directory present in more than
    one source is made real and joined recursively, otherwise the first source's entry wins."""
    entries: dict[str, list[Path]] = {}
    for src in sources:
        for entry in src.iterdir():
            entries.setdefault(entry.name, []).append(entry)
    for name, paths in entries.items():
        dirs = [p for p in paths if p.is_dir()]
        if len(dirs) > 1:
            (dst / name).mkdir()
            _join(dst / name, dirs)
        else:
            (dst / name).symlink_to(dirs[0] if dirs else paths[0])


@dataclass
class Headers:
    source: Path | None  # BCC_KERNEL_SOURCE to set; None: leave bcc to its own search
    note: str


@contextlib.contextmanager
def kernel_headers() -> Iterator[Headers]:
    """Where bcc finds kernel headers, for as long as the bcc tools run; nothing outside a temp
    directory is created, and that is removed afterwards."""
    release = os.uname().release
    if os.environ.get("BCC_KERNEL_SOURCE"):
        yield Headers(None, f"BCC_KERNEL_SOURCE={os.environ['BCC_KERNEL_SOURCE']} (environment)")
        return
    if (MODULES / release / "build").is_dir() or Path("/sys/kernel/kheaders.tar.xz").exists():
        yield Headers(None, f"headers of the running kernel {release}")
        return
    builds = sorted((d for d in MODULES.glob("*/build")
                     if (d / "include" / "generated" / "autoconf.h").is_file()),
                    key=lambda d: _version_key(d.parent.name), reverse=True)
    if not builds:
        yield Headers(None, f"no kernel headers for {release} and none of another release "
                            "(Debian package linux-headers-amd64)")
        return
    build = builds[0].resolve()
    other = builds[0].parent.name
    note = (f"compiled against {other} headers on {release}: struct layouts differ, so its "
            "output is wrong; cost peer only")
    if _is_tree(build):
        yield Headers(build, note)
        return
    source = (builds[0].parent / "source").resolve()
    if not _is_tree(source):
        yield Headers(None, f"{build} has no include/linux/kconfig.h and no source/ beside it")
        return
    # Debian splits a header tree in two: <release>-amd64 holds the generated config headers,
    # <release>-common the rest. bcc joins build/ and source/ only under /lib/modules/<running
    # release>; BCC_KERNEL_SOURCE names one directory, so the two are joined here, as symlinks
    # in a temp directory, rather than by linking the 6.1 tree into /lib/modules.
    with tempfile.TemporaryDirectory(prefix="pw-bench-kheaders-") as tmp:
        _join(Path(tmp), [build, source])
        yield Headers(Path(tmp), note)


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """BPF run-time stats (run_time_ns/run_cnt) on for the duration. BPF_ENABLE_STATS keeps them
    on while its fd is open, so they go back off when it is closed or the bench dies; the
    kernel.bpf_stats_enabled sysctl would stay on after a crash."""
    libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
    fd = int(libbpf.bpf_enable_stats(0))  # BPF_STATS_RUN_TIME; libbpf returns -errno
    if fd < 0:
        raise RuntimeError(f"cannot enable BPF stats: {os.strerror(-fd)}")
    try:
        yield
    finally:
        os.close(fd)


def prog_stats(pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the BPF programs the process holds, each once."""
    progs: dict[str, tuple[int, int]] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError, KeyError, ValueError):
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":\t", 1) for line in
                        Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines()
                        if ":\t" in line)
            progs[info["prog_id"]] = (int(info["run_time_ns"]), int(info["run_cnt"]))
    return sum(t for t, _ in progs.values()), sum(c for _, c in progs.values())


def _failure(text: str) -> str:
    """The cause in a failed tool's output: libbcc's own message (missing headers, a compile
    error) comes before Python's traceback, whose last line is only "Failed to compile"."""
    head, _, tail = text.partition("Traceback (most recent call last):")
    cause = [ln.strip() for ln in head.splitlines()
             if re.search(r"error|Unable|No such|[Ff]ailed", ln)]
    lines = [ln.strip() for ln in (tail or head).splitlines() if ln.strip()]
    return (cause[0] if cause else lines[-1] if lines else "no output")[:200]


@dataclass
class BccTool:
    proc: subprocess.Popen[bytes]
    startup_s: float
    out: Path

    def lost_samples(self) -> int:
        # bcc's perf reader reports what the full perf buffer dropped, in the tool's output.
        return sum(int(n) for n in re.findall(rb"Possibly lost (\d+) samples",
                                              self.out.read_bytes()))


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(65536)


@contextlib.contextmanager
def running_bcc_tool(exe: str, headers: Headers, tmp: Path, timeout_s: float = 60.0
                     ) -> Iterator[BccTool]:
    """The tool with its output in a file (a pipe nobody drains would stall it under load)."""
    name = Path(exe).name
    # The tools are scripts for Debian's /usr/bin/python3: the bench's venv paths are not theirs.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"  # the attached line must reach the file when it is printed
    if headers.source is not None:
        env["BCC_KERNEL_SOURCE"] = str(headers.source)
    out = tmp / f"{name}.out"
    with out.open("wb") as sink:
        t0 = time.monotonic()
        proc = spawn([exe], stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     env=env)
    try:
        while TOOLS[name] not in _head(out):
            if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                text = out.read_bytes()[-4000:].decode(errors="replace")
                state = (f"exited with {proc.returncode}" if proc.poll() is not None
                         else f"not attached after {timeout_s:.0f} s")
                raise RuntimeError(f"{name} {state}: {_failure(text)} ({headers.note})")
            time.sleep(0.002)
        yield BccTool(proc, time.monotonic() - t0, out)
    finally:
        stop_process(proc)
        out.unlink(missing_ok=True)


def run_wrk_churn(url: str, duration_s: int) -> WrkResult:
    """wrk with one TCP connection per request, so the state-change programs run on every
    request and not only when wrk's keep-alive connections open."""
    argv = wrk_argv(url, duration_s)
    argv[-1:-1] = ["-H", "Connection: close"]
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=duration_s + 30)
    finally:
        stop_process(proc)
    return parse_wrk(out.decode())


def _tcp_programs(s: Samples) -> dict[str, tuple[float, float]]:
    """program -> (run seconds, runs) of probewire's tcp family from its /metrics."""
    out: dict[str, tuple[float, float]] = {}
    for (name, lbls), v in s.items():
        d = dict(lbls)
        if d.get("probe") != "tcp":
            continue
        t, c = out.get(d.get("program", ""), (0.0, 0.0))
        if name == "probewire_bpf_run_time_seconds_total":
            out[d.get("program", "")] = (t + v, c)
        elif name == "probewire_bpf_run_count_total":
            out[d.get("program", "")] = (t, c + v)
    return out


@dataclass
class Measured:
    wrk: WrkResult
    startup_s: float  # spawn -> attached (bcc) or -> /healthz answers (probewire)
    rss_mb: float
    cpu_pct: float
    # Run time and runs over the wrk run of the programs on the subject's hook: each bcc tool
    # loads one; probewire's tcp_state program is the one on tcplife's tracepoint.
    hook_ns: float
    hook_runs: float
    lost: int = 0  # events bcc's perf buffer dropped
    attach_s: float = float("nan")  # probewire_startup_seconds


def _measure_bcc(exe: str, headers: Headers, tmp: Path, url: str, d: int) -> Measured:
    with running_bcc_tool(exe, headers, tmp) as tool:
        time.sleep(0.5)  # the perf buffers open after the attached line; let start-up settle
        pid = tool.proc.pid
        c0, (t0, n0) = cpu_seconds(pid), prog_stats(pid)
        w = run_wrk_churn(url, d)
        c1, (t1, n1) = cpu_seconds(pid), prog_stats(pid)
        rss = rss_mb(pid)
        if tool.proc.poll() is not None:
            raise RuntimeError(f"{Path(exe).name} exited with {tool.proc.returncode} under load")
        return Measured(w, tool.startup_s, rss, 100.0 * (c1 - c0) / w.duration_s, t1 - t0,
                        n1 - n0, lost=tool.lost_samples())


def _measure_probewire(url: str, d: int) -> Measured:
    with running_agent(TCP_ONLY) as agent:
        time.sleep(0.5)  # as for bcc: let start-up work finish before measuring
        before, c0 = agent.scrape(), agent.cpu_s()
        w = run_wrk_churn(url, d)
        c1, after = agent.cpu_s(), agent.scrape()
        rss = agent.rss_mb()
    p0 = _tcp_programs(before)
    delta = {k: (t - p0.get(k, (0.0, 0.0))[0], n - p0.get(k, (0.0, 0.0))[1])
             for k, (t, n) in _tcp_programs(after).items()}
    # tcp_state_btf or its fallback tcp_state_tp: the same tracepoint as tcplife's program.
    state = [v for k, v in delta.items() if k.startswith("tcp_state")]
    return Measured(w, agent.healthy_after_s, rss, 100.0 * (c1 - c0) / w.duration_s,
                    1e9 * sum(t for t, _ in state), sum(n for _, n in state),
                    attach_s=after.get(("probewire_startup_seconds", ()), float("nan")))


def _which(name: str) -> str | None:
    # Debian installs the tools in /usr/sbin, which a non-login root shell may lack on PATH.
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def run(quick: bool) -> list[Row]:
    rounds, d = (1, 2) if quick else (3, 5)
    exes = {name: _which(name) for name in TOOLS}
    if not any(exes.values()):
        return [Row(f"bcc {name}", "", status="not installed",
                    note="Debian package bpfcc-tools (scripts/setup.sh installs it)")
                for name in TOOLS]
    load = f"wrk -t1 -c32 -d{d}s -H 'Connection: close' (one connection per request), 1 worker"
    base_rps = Row("bcc peers: nginx throughput, no agent", "req/s", note=load)
    base_p99 = Row("bcc peers: nginx p99 latency, no agent", "ms")
    subjects = (*TOOLS, PEER)
    label = {s: s if s == PEER else f"bcc {s}" for s in subjects}
    tput = {s: Row(f"{label[s]}: throughput ratio", "x no agent") for s in subjects}
    p99 = {s: Row(f"{label[s]}: p99 ratio", "x no agent") for s in subjects}
    start = {s: Row(f"{label[s]}: start-up", "s") for s in subjects}
    rss = {s: Row(f"{label[s]}: RSS under load", "MB") for s in subjects}
    cpu = {s: Row(f"{label[s]}: CPU under load", "% of a core") for s in subjects}
    kns = {s: Row(f"{label[s]}: kernel ns/event", "ns") for s in subjects}
    vs_start = Row("vs bcc: start-up, probewire ÷ bcc", "x", target="≤ 0.1x (≥ 10x faster)",
                   goal=("<=", 0.1),
                   note="probewire (tcp family) spawn → /healthz ÷ the slower of tcplife and "
                        "tcpretrans spawn → attached (run side by side, the job is on when "
                        "both are)")
    vs_rss = Row("vs bcc: RSS, bcc ÷ probewire", "x", target="≥ 3x", goal=(">=", 3.0),
                 note="tcplife + tcpretrans (the job needs both) ÷ probewire with its tcp "
                      "family only, each under the same load")
    vs_event = Row("vs bcc: kernel ns/event, probewire ÷ bcc", "x", target="≤ 1x (no higher)",
                   goal=("<=", 1.0),
                   note="per run on sock:inet_sock_set_state: probewire's tcp_state program ÷ "
                        "tcplife's. BPF stats time the program only; bcc's classic tracepoint "
                        "also pays the kernel's trace-record copy, which tp_btf does not")

    failed = {s: "not installed (Debian package bpfcc-tools)" for s, e in exes.items() if not e}
    lost: list[float] = []  # tcplife's, per second
    runs: dict[str, list[float]] = {s: [] for s in subjects}  # hook program runs/s
    attach: list[float] = []
    with (kernel_headers() as headers, bpf_stats(), pinned_nginx(access_log=False) as ng,
          tempfile.TemporaryDirectory(prefix="pw-bench-bcc-") as tmp):
        url = f"{ng.url}/static/index.html"
        run_wrk_churn(url, 1)  # warm-up, not recorded
        modes = ("none", *subjects)
        for r in range(rounds):
            # Rotate the order so no subject always follows the same one (page cache, TIME_WAIT).
            order = modes[r % len(modes):] + modes[: r % len(modes)]
            base: WrkResult | None = None
            got: dict[str, Measured] = {}
            for mode in order:
                if mode == "none":
                    base = run_wrk_churn(url, d)
                    continue
                if mode in failed:
                    continue
                try:
                    got[mode] = (_measure_probewire(url, d) if mode == PEER else
                                 _measure_bcc(exes[mode] or "", headers, Path(tmp), url, d))
                except RuntimeError as exc:
                    failed[mode] = str(exc).splitlines()[0][:300]
            assert base is not None
            base_rps.add(base.rps)
            base_p99.add(base.p99_ms)
            for s, m in got.items():
                tput[s].add(m.wrk.rps / base.rps)
                p99[s].add(m.wrk.p99_ms / base.p99_ms)
                start[s].add(m.startup_s)
                rss[s].add(m.rss_mb)
                cpu[s].add(m.cpu_pct)
                if m.wrk.errors:
                    tput[s].note = f"wrk: {m.wrk.errors}"
                if s == "tcplife-bpfcc":
                    lost.append(m.lost / m.wrk.duration_s)
                elif s == PEER and m.attach_s == m.attach_s:  # not NaN
                    attach.append(m.attach_s)
                if m.hook_runs:
                    kns[s].add(m.hook_ns / m.hook_runs)
                    runs[s].append(m.hook_runs / m.wrk.duration_s)
            if all(s in got for s in subjects):
                pw, bcc = got[PEER], [got[s] for s in TOOLS]
                vs_start.add(pw.startup_s / max(b.startup_s for b in bcc))
                vs_rss.add(sum(b.rss_mb for b in bcc) / pw.rss_mb)
                life = got["tcplife-bpfcc"]
                if life.hook_runs and pw.hook_runs:
                    vs_event.add((pw.hook_ns / pw.hook_runs) / (life.hook_ns / life.hook_runs))
        headers_note = headers.note

    for s in TOOLS:
        start[s].note = "spawn → attached line printed (clang compile + load + attach); " + (
            headers_note)
        kns[s].note = f"its program on {HOOKS[s]}; BPF stats (fdinfo run_time_ns/run_cnt)"
    kns["tcpretrans-bpfcc"].note += "; no retransmits on loopback, so it rarely runs"
    if lost:
        cpu["tcplife-bpfcc"].note = ("prints a line per TCP close from a perf buffer, which "
                                     f"lost {statistics.median(lost):,.0f} events/s (median)")
    tput[PEER].note = tput[PEER].note or "probewire run with `probes: {http: off, process: off}`"
    start[PEER].note = ("spawn → /healthz answers (Python start + imports + load + attach); "
                        f"load + attach alone {statistics.median(attach):.3f} s (median)"
                        if attach else "spawn → /healthz answers")
    kns[PEER].note = "its tcp_state program on sock:inet_sock_set_state, from its /metrics"
    for s, rates in runs.items():
        if rates:
            kns[s].note += f"; {fmt(statistics.median(rates))} runs/s"
    per_subject = [tput, p99, start, rss, cpu, kns]
    for s, why in failed.items():
        for rows in per_subject:
            if not rows[s].values:
                rows[s].status = "not installed" if why.startswith("not installed") else "error"
                rows[s].note = why
    for row in (vs_start, vs_rss, vs_event):
        if not row.values and failed:
            row.status = "not run"
            row.note = "needs tcplife, tcpretrans and probewire in the same round: " + "; ".join(
                f"{s}: {why}" for s, why in failed.items())
    out = [base_rps, base_p99]
    for s in subjects:
        out += [rows[s] for rows in per_subject]
    return [*out, vs_start, vs_rss, vs_event]
