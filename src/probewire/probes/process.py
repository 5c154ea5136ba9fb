"""process family: exec and exit of every process, one ring record each.

Exec records name the service while the process is still alive (so short-lived clients
keep a name after they exit); exit records retire the pid from the service cache after a
grace period, so connections it closed can still be attributed at the next scrape.

With security on (the default), the family also records forks and connects to watched
destinations, decides the cheap part of the security rules at exec in the kernel, and hands
every batch to its security engine (src/probewire/security/): the process tree, the rules,
the alerts. argv is redacted here, before anything downstream (events API, UI, subscribers,
alerts) sees it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from prometheus_client.core import CounterMetricFamily, Metric

from probewire.enrich.service import ProcessInfo
from probewire.probes.base import Hook, Probe, ProbeContext
from probewire.runtime.bpf import BpfObject
from probewire.security import kernel as sec
from probewire.security.kernel import PROCESS_EXEC, PROCESS_EXIT, PROCESS_FORK
from probewire.security.redact import Redactor
from probewire.security.tree import ticks

if TYPE_CHECKING:
    from probewire.security.engine import SecurityEngine

log = logging.getLogger(__name__)

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
        ("euid", np.uint32),
        ("comm", "S16"),
        ("filename", f"S{sec.PROCESS_FILENAME_LEN}"),
        ("args", f"V{sec.PROCESS_ARGS_LEN}"),
        ("start_ns", np.uint64),
        ("clauses", np.uint64),
        ("sec_flags", np.uint32),
        ("dport", np.uint16),
        ("family", np.uint8),
        ("listener_depth", np.uint8),
        ("daddr", np.uint8, (16,)),
        ("exe", f"S{sec.PROCESS_EXE_LEN}"),
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
    argv: tuple[str, ...] = ()  # redacted (security.redact)
    exe: str = ""  # exec, with security on: the image's path as the kernel resolved it
    exit_code: int | None = None
    exit_signal: int | None = None
    lifetime_s: float | None = None


def cstr(raw: bytes) -> str:
    """A C string field: bpf_probe_read_*_str stops at the NUL and leaves whatever the ring
    slot held before after it, so only the bytes up to the first NUL are the string."""
    return raw.split(b"\0", 1)[0].decode(errors="replace")


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
        # Security only (they return at once when it is off): the tree's forks, and the
        # listening sockets and watched connects.
        Hook("sched_process_fork", ("process_fork_btf", "process_fork_tp")),
        Hook("inet_sock_set_state", ("process_sock_btf", "process_sock_tp")),
    )
    structs: ClassVar[dict[str, np.dtype]] = {"process_event": PROCESS_EVENT, **sec.STRUCTS}
    record_dtype = PROCESS_EVENT

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        redact = ctx.config.security.redact
        self.redact = Redactor(redact.flags, redact.patterns)
        self.security: SecurityEngine | None = None
        if ctx.config.security.enabled:
            from probewire.security.engine import SecurityEngine

            self.security = SecurityEngine(ctx.config, ctx.services, self.redact)
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

    def before_load(self, obj: BpfObject) -> None:
        obj.set_rodata(security_on=int(self.security is not None))

    def after_load(self, obj: BpfObject) -> None:
        if self.security is not None:
            self.security.start(obj)

    def on_stop(self) -> None:
        if self.security is not None:
            self.security.stop()

    def on_batch(self, records: np.ndarray) -> None:
        # Service names need /proc per pid: resolve each distinct pid once per batch.
        services = self.ctx.services
        kinds = records["kind"]
        # A forked child has its parent's name until it execs (before the execs below: a
        # child's fork and exec may come in one batch).
        forks = kinds == PROCESS_FORK
        if forks.any():
            for child, parent, start_ns in zip(records["pid"][forks].tolist(),
                                               records["ppid"][forks].tolist(),
                                               records["start_ns"][forks].tolist(), strict=True):
                services.inherit(child, parent, ticks(start_ns))
        # An exec renames its pid at once (the cache would otherwise wait to revalidate).
        for pid in np.unique(records["pid"][kinds == PROCESS_EXEC]).tolist():
            services.forget(pid)
        pids = np.unique(records["pid"][(kinds == PROCESS_EXEC) | (kinds == PROCESS_EXIT)]).tolist()
        names = services.names_for(pids)
        now = time.monotonic()
        events: list[ProcessEvent] = []
        # Aligned with records: the event of each exec/exit record (forks and connects are
        # the security engine's alone).
        decoded: list[ProcessEvent | None] = [None] * len(records)
        head = records[["kind", "pid", "ppid", "uid", "timestamp_ns", "cgroup_id", "lifetime_ns",
                        "exit_code", "exit_signal", "args_len", "comm", "filename", "args", "exe"]]
        for i, rec in enumerate(head.tolist()):
            (kind, pid, ppid, uid, ts, cgid, lifetime, code, sig, args_len, comm, fn, args,
             exe) = rec
            if kind != PROCESS_EXEC and kind != PROCESS_EXIT:
                continue
            service = names.get(pid, "unknown")
            comm_s = comm.decode(errors="replace")
            if kind == PROCESS_EXEC:
                filename = cstr(fn)
                argv = self.redact(decode_argv(args, args_len))
                if service == "unknown":
                    # Gone before we could read /proc: name it from what the record holds.
                    service = services.remember(
                        ProcessInfo(pid, ppid, comm_s, filename, argv, "", None, None, 0))
                    names[pid] = service
                events.append(ProcessEvent(
                    "exec", pid, ppid, uid, ts, cgid, comm_s, service, filename=filename, argv=argv,
                    exe=cstr(exe),
                ))
            else:
                if service == "unknown":
                    service = comm_s or "unknown"
                events.append(ProcessEvent(
                    "exit", pid, ppid, uid, ts, cgid, comm_s, service,
                    exit_code=code, exit_signal=sig, lifetime_s=lifetime / 1e9,
                ))
            decoded[i] = events[-1]
        # The rules judge the batch before its events are visible: whoever sees a process's
        # exit in events() can rely on every record of its subtree having been judged.
        if self.security is not None:
            try:
                self.security.on_batch(records, decoded)
            except Exception:
                log.exception("security engine failed on a batch")
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
        if self.security is not None:
            yield from self.security.collect()
