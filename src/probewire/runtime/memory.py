"""The memory guard: the agent degrades under a memory limit instead of being OOM-killed.

Every ``interval_s`` it reads how much memory the agent's cgroup uses against its limit (cgroup
v2: the lowest ``memory.high``/``memory.max`` on the path to the root, usage
``memory.current``; cgroup v1: the lowest ``memory.limit_in_bytes``, usage
``memory.usage_in_bytes``; both minus inactive page cache, the working set the kernel reclaims
last and the OOM killer judges, as the kubelet computes it), or the agent's RSS against
``memory.limit_mb`` when that is set. When usage reaches ``shrink_at`` of the limit it asks
every registered structure to drop what it can (aggregate/bounds.py: caches of answers that
can be rebuilt, queues whose drops are counted), collects garbage and hands freed heap back to
the kernel (malloc_trim), then waits ``5 * interval_s`` before it would do so again, unless usage
reaches ``critical_at`` (two thirds of the way from ``shrink_at`` to the limit), where the
OOM killer is near and it shrinks at every check. Close to the threshold it checks four times
as often: a load can grow the heap by tens of MB in one interval. Every
shrink is counted (``probewire_memory_shrinks_total``) and so is every entry dropped
(``probewire_userspace_shrunk_entries_total``). Series and counters are never dropped: losing
them would lose counts, not cache.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from probewire.aggregate.bounds import Bounds

__all__ = ["CgroupMemory", "MemoryGuard", "MemoryReading"]

log = logging.getLogger(__name__)

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value.
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class MemoryReading:
    usage_bytes: int
    limit_bytes: int | None
    source: str  # "cgroup v2", "cgroup v1", "config" or "none"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _mounts(mountinfo: Path) -> tuple[Path | None, Path | None]:
    """(the cgroup2 mount, the cgroup v1 mount with the memory controller)."""
    v2 = v1 = None
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(fields[4])
        elif fstype == "cgroup" and "memory" in options.split(","):
            v1 = Path(fields[4])
    return v2, v1


def _ancestry(mount: Path, relative: str) -> list[Path]:
    """The cgroup's directory and its parents up to the mount, nearest first."""
    parts = [p for p in relative.split("/") if p]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


class CgroupMemory:
    """Reads the memory usage and limit that apply to a process (by default the agent)."""

    def __init__(self, pid: int | str = "self", proc: Path = Path("/proc"),
                 limit_mb: int = 0) -> None:
        self._proc = proc / str(pid)
        self._limit_mb = limit_mb

    def _paths(self) -> tuple[str | None, str | None]:
        v2 = v1 = None
        try:
            lines = (self._proc / "cgroup").read_text().splitlines()
        except OSError:
            return None, None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                v2 = path
            elif "memory" in controllers.split(","):
                v1 = path
        return v2, v1

    def read(self) -> MemoryReading:
        if self._limit_mb:
            return MemoryReading(_vm_rss(self._proc), self._limit_mb << 20, "config")
        v2_path, v1_path = self._paths()
        v2_mount, v1_mount = _mounts(self._proc / "mountinfo")
        if v2_mount is not None and v2_path is not None:
            dirs = _ancestry(v2_mount, v2_path)
            usage = _read_int(dirs[0] / "memory.current")
            if usage is not None:  # the memory controller is on cgroup2
                limits = [v for d in dirs for f in ("memory.high", "memory.max")
                          if (v := _read_int(d / f)) is not None]
                working = usage - _stat(dirs[0] / "memory.stat", "inactive_file")
                return MemoryReading(max(working, 0), min(limits) if limits else None,
                                     "cgroup v2")
        if v1_mount is not None and v1_path is not None:
            dirs = _ancestry(v1_mount, v1_path)
            usage = _read_int(dirs[0] / "memory.usage_in_bytes")
            if usage is not None:
                limits = [v for d in dirs
                          if (v := _read_int(d / "memory.limit_in_bytes")) is not None
                          and v < _V1_UNLIMITED]
                working = usage - _stat(dirs[0] / "memory.stat", "total_inactive_file")
                return MemoryReading(max(working, 0), min(limits) if limits else None,
                                     "cgroup v1")
        return MemoryReading(_vm_rss(self._proc), None, "none")


def _vm_rss(proc: Path) -> int:
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the freed heap stays with the process, as before


class MemoryGuard:
    """Watches a MemoryReading source and shrinks the registered structures under pressure."""

    def __init__(self, bounds: Bounds, memory: CgroupMemory | None = None,
                 shrink_at: float = 0.85, interval_s: float = 1.0) -> None:
        if not 0.0 < shrink_at <= 1.0:
            raise ValueError(f"shrink_at must be in (0, 1], got {shrink_at}")
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.bounds = bounds
        self.memory = memory or CgroupMemory()
        self.shrink_at = shrink_at
        self.interval_s = interval_s
        self.cooldown_s = 5 * interval_s
        self.critical_at = shrink_at + (1.0 - shrink_at) * 2 / 3
        self.shrinks = 0
        self.last = MemoryReading(0, None, "none")
        self._last_shrink = -float("inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, now: float | None = None) -> bool:
        """Read once; shrink if over the threshold (and not in the cool-down). True if it did."""
        now = time.monotonic() if now is None else now
        reading = self.last = self.memory.read()
        limit = reading.limit_bytes
        if limit is None or reading.usage_bytes < self.shrink_at * limit:
            return False
        critical = reading.usage_bytes >= self.critical_at * limit
        if now - self._last_shrink < self.cooldown_s and not critical:
            return False
        self._last_shrink = now
        dropped = self.bounds.shrink()
        gc.collect()
        _malloc_trim()
        self.shrinks += 1
        log.warning("memory at %.0f of %.0f MB (%s): dropped %s", reading.usage_bytes / 2**20,
                    limit / 2**20, reading.source,
                    ", ".join(f"{n} {name}" for name, n in sorted(dropped.items()) if n)
                    or "nothing droppable")
        return True

    def next_wait_s(self) -> float:
        """Seconds to the next check: a quarter interval from 90% of the threshold on."""
        limit = self.last.limit_bytes
        near = limit is not None and self.last.usage_bytes >= 0.9 * self.shrink_at * limit
        return self.interval_s / 4 if near else self.interval_s

    def _run(self) -> None:
        while not self._stop.wait(self.next_wait_s()):
            try:
                self.check()
            except Exception:
                log.exception("memory guard check failed")

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="probewire-memory",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def collect(self) -> Iterable[Metric]:
        reading = self.last
        shrinks = CounterMetricFamily(
            "probewire_memory_shrinks",
            "Times the memory guard dropped caches because the agent neared its memory limit.")
        shrinks.add_metric([], self.shrinks)
        usage = GaugeMetricFamily(
            "probewire_memory_usage_bytes",
            "Memory the guard measured (cgroup working set, or RSS against memory.limit_mb).",
            labels=["source"])
        usage.add_metric([reading.source], reading.usage_bytes)
        limit = GaugeMetricFamily(
            "probewire_memory_limit_bytes",
            "The memory limit the guard works against (absent: none found).", labels=["source"])
        if reading.limit_bytes is not None:
            limit.add_metric([reading.source], reading.limit_bytes)
        yield from (shrinks, usage, limit)
