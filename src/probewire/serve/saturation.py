"""Per-service saturation for the UI and the JSON API: run-queue p99, CPU, disk p99, listen
overflows and OOM kills over the last minute, and whether a service counts as saturated.

Figures come from the saturation family's totals (what /metrics exports at the same moment);
windowed ones are deltas against the oldest reading in the window, which starts at the agent's
start (all zeros), so the first answers cover "since start".
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probewire.aggregate.histogram import log2_bucket_bounds
from probewire.probes.saturation import LOG2_SLOTS, US, SaturationProbe
from probewire.serve.snapshot import quantile

WINDOW_S = 60.0
# A service is shown as saturated when, over the window, any of these holds.
RUNQ_P99_SATURATED_S = 0.010  # its threads waited >= 10 ms for a CPU (p99)
DISK_P99_SATURATED_S = 0.050  # its block requests took >= 50 ms (p99)
# ... or a listener of it overflowed, or one of its processes was OOM-killed.
_BOUNDS = [float(b) for b in log2_bucket_bounds(LOG2_SLOTS, US)]


@dataclass
class _Reading:
    taken_at: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    runq_slots: dict[str, np.ndarray] = field(default_factory=dict)
    disk_slots: dict[str, np.ndarray] = field(default_factory=dict)
    overflows: dict[str, float] = field(default_factory=dict)
    oom_kills: dict[str, float] = field(default_factory=dict)


def _read(probe: SaturationProbe, now: float) -> _Reading:
    t = probe.totals()
    r = _Reading(now)
    for (svc,), row in t.sched.items():
        r.cpu_s[svc] = r.cpu_s.get(svc, 0.0) + row[0] * 1e-9
        r.runq_slots[svc] = r.runq_slots.get(svc, 0) + row[5:]
    for (svc, _dev, op), row in t.block.items():
        if op in ("read", "write"):  # a flush's or discard's time is the device's, not a read's
            r.disk_slots[svc] = r.disk_slots.get(svc, 0) + row[3:]
    for (svc, _port), row in t.listen.items():
        r.overflows[svc] = r.overflows.get(svc, 0.0) + float(row[0])
    for (svc, _cgroup), n in t.oom.items():
        r.oom_kills[svc] = r.oom_kills.get(svc, 0.0) + n
    return r


def _p99(slots: np.ndarray | None) -> float | None:
    if slots is None or not np.any(slots > 0):
        return None
    cumulative = np.cumsum(slots)
    return quantile(0.99, list(zip(_BOUNDS, cumulative.tolist(), strict=True)))


class SaturationView:
    def __init__(self, started_at: float | None = None, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._readings: deque[_Reading] = deque([_Reading(started_at or time.time())])

    def rows(self, probe: SaturationProbe | None) -> tuple[float, dict[str, dict[str, Any]]]:
        """(window seconds, service -> figures) over the window ending now."""
        if probe is None or probe.obj is None:
            return 0.0, {}
        now = time.time()
        current = _read(probe, now)
        with self._lock:
            self._readings.append(current)
            # Keep exactly one reading at or before the window's start.
            while len(self._readings) > 2 and self._readings[1].taken_at <= now - self.window_s:
                self._readings.popleft()
            base = self._readings[0]
        seconds = max(now - base.taken_at, 1e-9)
        services = set(current.cpu_s) | set(current.disk_slots) | set(current.overflows) | set(
            current.oom_kills)
        out: dict[str, dict[str, Any]] = {}
        for svc in services:
            runq = current.runq_slots.get(svc)
            if runq is not None:
                runq = runq - base.runq_slots.get(svc, 0)
            disk = current.disk_slots.get(svc)
            if disk is not None:
                disk = disk - base.disk_slots.get(svc, 0)
            row: dict[str, Any] = {
                "service_name": svc,
                "cpu_seconds": current.cpu_s.get(svc, 0.0),
                "cpu_cores": max(current.cpu_s.get(svc, 0.0) - base.cpu_s.get(svc, 0.0), 0.0)
                / seconds,
                "runqueue_p99_seconds": _p99(runq),
                "disk_p99_seconds": _p99(disk),
                "listen_overflows": current.overflows.get(svc, 0.0),
                "listen_overflows_window": max(
                    current.overflows.get(svc, 0.0) - base.overflows.get(svc, 0.0), 0.0),
                "oom_kills": current.oom_kills.get(svc, 0.0),
                "oom_kills_window": max(
                    current.oom_kills.get(svc, 0.0) - base.oom_kills.get(svc, 0.0), 0.0),
            }
            row["saturated_by"] = saturated_by(row)
            out[svc] = row
        return seconds, out


def saturated_by(row: dict[str, Any]) -> list[str]:
    """Which of the thresholds a service's figures cross (empty: not saturated)."""
    reasons = []
    if (row["runqueue_p99_seconds"] or 0.0) >= RUNQ_P99_SATURATED_S:
        reasons.append("cpu run queue")
    if (row["disk_p99_seconds"] or 0.0) >= DISK_P99_SATURATED_S:
        reasons.append("disk latency")
    if row["listen_overflows_window"] > 0:
        reasons.append("listen queue overflow")
    if row["oom_kills_window"] > 0:
        reasons.append("OOM kill")
    return reasons
