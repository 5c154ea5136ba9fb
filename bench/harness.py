"""Processes and measurements shared by the benchmarks: the agent, nginx, wrk, /proc, /metrics.

Every process started here is stopped in a `finally` (and, as a last resort, at interpreter exit),
so Ctrl-C leaves nothing running. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # tests/support: the nginx/upstream peers

from support.bpf_build import compile_bpf  # noqa: E402
from support.metrics import Samples, parse_metrics, total  # noqa: E402
from support.servers import Server, free_port, nginx, wait_port  # noqa: E402

__all__ = ["Samples", "Server", "compile_bpf", "free_port", "nginx", "parse_metrics", "total",
           "wait_port"]

PROBEWIRE = REPO_ROOT / ".venv" / "bin" / "probewire"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
# nginx on the first CPU, wrk on the last; the agent floats (it competes as it would in production).
NGINX_CPU = 0
WRK_CPU = NCPU - 1


_live: list[subprocess.Popen[bytes]] = []


def _kill_leftovers() -> None:
    for proc in _live:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


atexit.register(_kill_leftovers)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if proc in _live:
        _live.remove(proc)


def spawn(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
    _live.append(proc)
    return proc


# ---------------------------------------------------------------------------------------------
# /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _descendants(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out.extend(_descendants(int(child)))
    return out


def pin(pid: int, cpu: int) -> None:
    """Pin a process, its threads and its children (nginx's workers) to one CPU."""
    for p in _descendants(pid):
        for task in Path(f"/proc/{p}/task").iterdir():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), {cpu})


# ---------------------------------------------------------------------------------------------
# nginx


@contextlib.contextmanager
def pinned_nginx(access_log: bool) -> Iterator[Server]:
    with nginx(workers=1, access_log=access_log) as server:
        if NCPU > 1:
            pin(server.process.pid, NGINX_CPU)
        yield server


# ---------------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p99_ms: float
    errors: str
    raw: str


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    done = re.search(r"^\s+(\d+) requests in ([\d.]+)(ms|s|m)", out, re.M)
    if not (rps and p99 and done):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    dur = float(done.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[done.group(3)]
    errors = re.search(r"^\s+(Socket errors:.*|Non-2xx.*)$", out, re.M)
    return WrkResult(int(done.group(1)), dur, float(rps.group(1)), _ms(p99.group(1)),
                     errors.group(1) if errors else "", out)


def wrk_argv(url: str, duration_s: int, connections: int = 32) -> list[str]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (Debian package `wrk`)")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", url]
    if NCPU > 1 and shutil.which("taskset"):
        argv = ["taskset", "-c", str(WRK_CPU), *argv]
    return argv


def run_wrk(url: str, duration_s: int, connections: int = 32) -> WrkResult:
    proc = spawn(wrk_argv(url, duration_s, connections), stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=duration_s + 30)
    finally:
        stop_process(proc)
    return parse_wrk(out.decode())


# ---------------------------------------------------------------------------------------------
# the agent


def get(url: str, timeout_s: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return bytes(resp.read())


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, lbls), v in samples.items():
        if n == name:
            key = dict(lbls).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    listen: str
    spawned_at: float  # time.monotonic() just before Popen
    healthy_after_s: float = 0.0
    log_path: Path = field(default_factory=Path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def scrape(self) -> Samples:
        return parse_metrics(get(f"http://{self.listen}/metrics").decode())

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)


AGENT_CONFIGS = {
    "default": "{}\n",
    "http_off": "probes: {l7: {enabled: false}}\n",
    # Every exchange through the ring to user space, as when OTLP spans are exported.
    "records": "probes: {l7: {kernel_aggregation: false}}\n",
}


@contextlib.contextmanager
def running_agent(config: str = "default", timeout_s: float = 120.0) -> Iterator[AgentProc]:
    """`probewire run` as its own process, answering /healthz before this yields."""
    if not PROBEWIRE.exists():
        raise RuntimeError(f"{PROBEWIRE} missing: run `make setup`")
    with tempfile.TemporaryDirectory(prefix="pw-bench-") as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(AGENT_CONFIGS.get(config, config))
        log_path = Path(tmp) / "agent.log"
        port = free_port()
        listen = f"127.0.0.1:{port}"
        with log_path.open("wb") as log:
            t0 = time.monotonic()
            proc = spawn([str(PROBEWIRE), "run", "--listen", listen, "--config", str(cfg)],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            agent = AgentProc(proc, listen, t0, log_path=log_path)
            try:
                deadline = t0 + timeout_s
                while True:
                    if proc.poll() is not None:
                        text = log_path.read_text()
                        cause = [ln for ln in text.splitlines()
                                 if re.match(r"^(\w+Error|\w+Exception|error):", ln)]
                        raise RuntimeError(f"agent exited with {proc.returncode}: "
                                           f"{cause[-1] if cause else ''}\n{text[-3000:]}")
                    with contextlib.suppress(OSError, urllib.error.URLError):
                        if get(f"http://{listen}/healthz", 1.0):
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"agent not healthy after {timeout_s} s:\n"
                                           f"{log_path.read_text()[-3000:]}")
                    time.sleep(0.002)
                agent.healthy_after_s = time.monotonic() - t0
                yield agent
            finally:
                stop_process(proc)


def wait_stable(read: Callable[[], float], interval_s: float = 0.5, timeout_s: float = 30.0
                ) -> float:
    """Poll until two successive readings agree (bounded by timeout_s); return the last."""
    last = read()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        now = read()
        if now == last:
            return now
        last = now
    return last


def foreign_bpf_holders() -> list[str]:
    """Other processes holding BPF programs (a concurrent agent or test skews every figure)."""
    ours = {os.getpid(), *(p.pid for p in _live)}
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in ours:
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == "anon_inode:bpf-prog" for fd in (proc / "fd").iterdir()):
                out.append(f"{(proc / 'comm').read_text().strip()}({proc.name})")
    return out
