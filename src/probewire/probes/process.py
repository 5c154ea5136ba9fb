"""process family: exec and exit of every process, one ring record each.

Exec records name the service while the process is still alive (so short-lived clients
keep a name after they exit); exit records retire the pid from the service cache after a
grace period, so connections it closed can still be attributed at the next scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from prometheus_client.core import CounterMetricFamily, Metric

from probewire.enrich.service import ProcessInfo
from probewire.probes.base import Hook, Probe, ProbeContext

log = logging.getLogger(__name__)

PROCESS_EXEC = 1
PROCESS_EXIT = 2

PROCESS_EVENT = np.dtype(
    [
        ("kind", np.uint32),
        ("pid", np.uint32),
        ("ppid", np.uint32),
        ("uid", np.uint32),
        ("timestamp_ns", np.uint64),
        ("cgroup_id", np.uint64),
        ("lifetime_ns", np.uint64),
        ("exit_code", np.int32),
        ("exit_signal", np.uint32),
        ("args_len", np.uint32),
        ("_pad", np.uint32),
        ("comm", "S16"),
        ("filename", "S128"),
        ("args", "V128"),
    ]
)

# How long an exited pid keeps its service name (covers one scrape interval or more).
FORGET_AFTER_S = 120.0
RECENT_EVENTS = 2048


@dataclass(frozen=True)
class ProcessEvent:
    """A decoded record, as the JSON API and the events feed show it."""

    kind: str
    pid: int
    ppid: int
    uid: int
    timestamp_ns: int
    cgroup_id: int
    comm: str
    service_name: str
    filename: str = ""
    argv: tuple[str, ...] = ()
    exit_code: int | None = None
    exit_signal: int | None = None
    lifetime_s: float | None = None


def decode_argv(raw: bytes, length: int) -> tuple[str, ...]:
    """NUL-separated argv bytes (possibly truncated) -> strings."""
    data = raw[: max(0, min(length, len(raw)))]
    return tuple(p.decode(errors="replace") for p in data.split(b"\0") if p)


def exit_status(exit_code: int, exit_signal: int) -> str:
    if exit_signal:
        return "killed"
    return "ok" if exit_code == 0 else "error"


class ProcessProbe(Probe):
    name = "process"
    object_name = "process"
    hooks = (
        Hook("sched_process_exec", ("process_exec_btf", "process_exec_tp")),
        Hook("sched_process_exit", ("process_exit_btf", "process_exit_tp")),
    )
    structs: ClassVar[dict[str, np.dtype]] = {"process_event": PROCESS_EVENT}
    record_dtype = PROCESS_EVENT

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self._lock = threading.Lock()
        self._execs: Counter[str] = Counter()
        self._exits: Counter[tuple[str, str]] = Counter()
        self.recent: deque[ProcessEvent] = deque(maxlen=RECENT_EVENTS)
        self._exited: deque[tuple[float, int]] = deque()
        self.records = 0
        # Called on the reader thread after each batch with its decoded events, in order
        # (e.g. the uprobe layer attaching to new processes, the security rules). A subscriber
        # must not block; one that raises is logged and the others still run.
        self.subscribers: list[Callable[[list[ProcessEvent]], None]] = []

    def on_batch(self, records: np.ndarray) -> None:
        # Service names need /proc per pid: resolve each distinct pid once per batch.
        services = self.ctx.services
        # An exec renames its pid at once (the cache would otherwise wait to revalidate).
        for pid in np.unique(records["pid"][records["kind"] == PROCESS_EXEC]).tolist():
            services.forget(pid)
        pids = np.unique(records["pid"]).tolist()
        names = services.names_for(pids)
        now = time.monotonic()
        events: list[ProcessEvent] = []
        for rec in records.tolist():
            (kind, pid, ppid, uid, ts, cgid, lifetime, code, sig, args_len, _, comm, fn, args) = rec
            service = names.get(pid, "unknown")
            comm_s = comm.decode(errors="replace")
            if kind == PROCESS_EXEC:
                filename = fn.decode(errors="replace")
                argv = decode_argv(args, args_len)
                if service == "unknown":
                    # Gone before we could read /proc: name it from what the record holds.
                    service = services.remember(
                        ProcessInfo(pid, ppid, comm_s, filename, argv, "", None, None, 0))
                    names[pid] = service
                events.append(ProcessEvent(
                    "exec", pid, ppid, uid, ts, cgid, comm_s, service, filename=filename, argv=argv,
                ))
            elif kind == PROCESS_EXIT:
                if service == "unknown":
                    service = comm_s or "unknown"
                events.append(ProcessEvent(
                    "exit", pid, ppid, uid, ts, cgid, comm_s, service,
                    exit_code=code, exit_signal=sig, lifetime_s=lifetime / 1e9,
                ))
        with self._lock:
            self.records += len(records)
            for ev in events:
                if ev.kind == "exec":
                    self._execs[ev.service_name] += 1
                else:
                    status = exit_status(ev.exit_code or 0, ev.exit_signal or 0)
                    self._exits[(ev.service_name, status)] += 1
                    self._exited.append((now, ev.pid))
            self.recent.extend(events)
            while self._exited and now - self._exited[0][0] > FORGET_AFTER_S:
                services.forget(self._exited.popleft()[1])
        for subscriber in list(self.subscribers):
            try:
                subscriber(events)
            except Exception:
                log.exception("process event subscriber %r failed", subscriber)

    def events(self, kind: str | None = None, limit: int = RECENT_EVENTS) -> list[ProcessEvent]:
        with self._lock:
            evs = [e for e in self.recent if kind is None or e.kind == kind]
        return evs[-limit:]

    def collect(self) -> Iterable[Metric]:
        execs = CounterMetricFamily(
            "probewire_process_execs", "Successful exec() calls.", labels=["service_name"]
        )
        exits = CounterMetricFamily(
            "probewire_process_exits",
            "Process exits by status (ok: exit 0, error: non-zero, killed: by a signal).",
            labels=["service_name", "status"],
        )
        with self._lock:
            for service, n in sorted(self._execs.items()):
                execs.add_metric([service], n)
            for (service, status), n in sorted(self._exits.items()):
                exits.add_metric([service, status], n)
        yield execs
        yield exits
