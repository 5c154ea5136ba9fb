"""The one place that wires the agent: probes -> ring reader -> aggregation -> export."""

from __future__ import annotations

import functools
import logging
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from probewire.config import Config
from probewire.enrich.service import ServiceResolver
from probewire.errors import PrivilegeError, ProbewireError
from probewire.probes import REGISTRY
from probewire.probes.base import SHARED_MAPS, Probe, ProbeContext, RunningProbe, start_probe
from probewire.reload import LiveFilter, ReloadStatus, restart_needed
from probewire.runtime.bpf import (
    PRIVILEGE_FIX,
    BpfObject,
    StandaloneMap,
    StatsHandle,
    StatsSampler,
    enable_stats,
    limit_heap_retention,
)
from probewire.runtime.features import HookSupport, hook_type_of, probe_hook_types
from probewire.runtime.filter import Filter
from probewire.runtime.objects import object_path
from probewire.runtime.ring import Ring, RingReader

if TYPE_CHECKING:
    from probewire.export.otlp import OtlpExporter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeStatus:
    """What `probewire probes` and /api/probes report for one hook of one probe."""

    probe: str
    hook: str
    program: str | None
    section: str
    attached: bool
    fallback_reason: str
    run_time_ns: int
    run_cnt: int

    @property
    def avg_ns(self) -> float:
        return self.run_time_ns / self.run_cnt if self.run_cnt else 0.0


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise PrivilegeError(f"probewire needs to load BPF programs; {PRIVILEGE_FIX} (e.g. sudo)")


def raise_memlock() -> None:
    # Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use memcg.
    try:
        unlimited = resource.RLIM_INFINITY
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (unlimited, unlimited))
    except (ValueError, OSError):
        log.debug("could not raise RLIMIT_MEMLOCK", exc_info=True)


class Agent:
    def __init__(self, config: Config, forced_hooks: dict[str, str] | None = None) -> None:
        self.config = config
        self.forced_hooks = forced_hooks or {}
        self.services = ServiceResolver.from_config(config)
        self.ctx = ProbeContext(config=config, services=self.services)
        self.probes: dict[str, Probe] = {
            name: cls(self.ctx)
            for name, cls in REGISTRY.items()
            if getattr(config.probes, name).enabled
        }
        self.running: dict[str, RunningProbe] = {}
        self.support: dict[str, HookSupport] = {}
        self.reader = RingReader(config.ring.batch_records, config.ring.flush_ms / 1000.0)
        self.filter: Filter | None = None
        self.otlp: OtlpExporter | None = None
        self._stats: StatsHandle | StatsSampler | None = None
        self.started_at = 0.0
        self.startup_s = 0.0
        self._shared: dict[str, StandaloneMap] = {}
        self._opened: dict[str, BpfObject] = {}
        self.live_filter: LiveFilter | None = None  # filters + Kubernetes selectors (reload.py)
        self.reload_status: ReloadStatus | None = None  # set by reload.Reloader

    def start(self) -> None:
        check_privileges()
        raise_memlock()
        limit_heap_retention()
        t0 = time.monotonic()
        if self.config.bpf_stats == "on":
            self._stats = enable_stats()
        elif self.config.bpf_stats == "sampled":
            self._stats = StatsSampler()
            self._stats.start()
        try:
            self.support = probe_hook_types(self._prepare())
            # The filter is in place before any program is attached: nothing untraced is
            # ever seen, not even during start-up.
            self.filter = Filter(dict(self._shared))
            self.services.start()  # Kubernetes watches: selectors and names need pods
            self.live_filter = LiveFilter(self.filter, self.services)
            self.live_filter.apply(self.config.filter, self.config.containers)
            # Families load side by side: verification is the slow part of start-up, and
            # ctypes releases the GIL while the kernel verifies.
            with ThreadPoolExecutor(max_workers=len(self.probes) or 1) as pool:
                futures = {
                    name: pool.submit(start_probe, probe, self.support, self._shared,
                                      self.config.ring.size_bytes, self.forced_hooks,
                                      self.config.ring.batch_records, self._opened.pop(name))
                    for name, probe in self.probes.items()
                }
                errors = []
                for name, future in futures.items():
                    try:
                        self.running[name] = future.result()
                    except ProbewireError as exc:
                        errors.append(exc)
                if errors:
                    raise errors[0]
            for name, probe in self.probes.items():
                if probe.record_dtype is not None:
                    ring = Ring(self.running[name].obj.maps["events"], probe.record_dtype, name)
                    self.reader.add(ring, probe.on_batch)
                for ring_name, dtype in probe.extra_rings.items():
                    ring = Ring(self.running[name].obj.maps[ring_name], dtype,
                                f"{name}:{ring_name}", ring_name in probe.variable_rings)
                    self.reader.add(ring, functools.partial(probe.on_ring, ring_name))
            self._subscribe_process_events()
            if self.config.export.otlp.enabled:
                self._start_otlp()
        except BaseException:
            self.stop()
            raise
        self.reader.start()
        self.started_at = time.time()
        self.startup_s = time.monotonic() - t0
        log.info("probes attached in %.3f s: %s", self.startup_s,
                 ", ".join(f"{s.probe}:{s.section}" for s in self.status()))

    # --- capabilities: what families offer, discovered rather than tested by class ---------------
    def exchange_sources(self) -> list[list[Any]]:
        """The sink lists of every family that hands on exchanges (spans, the events feed)."""
        found = (getattr(probe, "sinks", None) for probe in self.probes.values())
        return [sinks for sinks in found if isinstance(sinks, list)]

    def _subscribe_process_events(self) -> None:
        """Families that follow execs and exits (on_process_events) get the process family's
        events."""
        source = getattr(self.probes.get("process"), "subscribers", None)
        if source is None:
            return
        for probe in self.probes.values():
            handler = getattr(probe, "on_process_events", None)
            if callable(handler):
                source.append(handler)

    def coverage(self) -> dict[str, Any]:
        """Per family that reports it: what it sees and what it loses (e.g. per protocol)."""
        found = {name: getattr(probe, "coverage", None) for name, probe in self.probes.items()}
        return {name: dict(report()) for name, report in found.items() if callable(report)}

    def _start_otlp(self) -> None:
        from probewire.collect.families import AgentCollector
        from probewire.export.otlp import OtlpExporter

        cfg = self.config.export.otlp
        self.otlp = OtlpExporter(cfg, AgentCollector(self).collect,
                                 process_attributes=self.services.resource_attributes,
                                 sampling=self.config.sampling)
        if cfg.traces:
            for sinks in self.exchange_sources():
                sinks.append(self.otlp.sink)
            # A family whose kernel side keeps 1 trace in N says which records were kept.
            self.otlp.assembler.kernel_sampling = any(
                getattr(p, "kernel_sampling", False) for p in self.probes.values())
        self.otlp.start()

    def _prepare(self) -> set[str]:
        """Create the maps all families share (the filter) and return the hook types the
        enabled probes attach through: only those are tried at start-up. (Helper programs
        are loaded, not attached, so their types need no attach test.)"""
        types: set[str] = set()
        for name, probe in self.probes.items():
            # Kept open for start_probe: opening parses the object's ELF and BTF.
            obj = self._opened[name] = BpfObject(object_path(probe.object_name))
            for map_name in SHARED_MAPS:
                if map_name not in self._shared:
                    self._shared[map_name] = StandaloneMap(obj.maps[map_name])
            types.update(hook_type_of(obj.programs[p].section)
                         for h in probe.hooks for p in h.programs)
        return types

    def stop(self) -> None:
        self.reader.stop()
        if self.live_filter is not None:
            self.live_filter.stop()
        self.services.close()
        if self.otlp is not None:
            for sinks in self.exchange_sources():
                if self.otlp.sink in sinks:
                    sinks.remove(self.otlp.sink)
            self.otlp.stop()
            self.otlp = None
        for running in self.running.values():
            running.stop()
        self.running.clear()
        for obj in self._opened.values():  # opened, but start failed before loading them
            obj.close()
        self._opened.clear()
        for shared in self._shared.values():
            shared.close()
        self._shared.clear()
        if self._stats:
            self._stats.close()
            self._stats = None

    def reconfigure(self, config: Config) -> list[str]:
        """Apply a new configuration while running (reload.py calls this): filters, service
        rules, sampling and each family's own settings (an optional `reconfigure(config)` of
        the family). Returns the changed keys that wait for a restart."""
        pending = restart_needed(self.config, config)
        self.config = config
        self.ctx.config = config
        logging.getLogger().setLevel(config.log_level.upper())
        self.services.reconfigure(config)
        if self.live_filter is not None:
            self.live_filter.apply(config.filter, config.containers)
        for probe in self.probes.values():
            family_reconfigure = getattr(probe, "reconfigure", None)
            if family_reconfigure is not None:
                family_reconfigure(config)
        if self.otlp is not None:
            self.otlp.reconfigure(config)
        return pending

    def tls_status(self) -> dict[str, Any]:
        """OpenSSL coverage: libraries attached (or why not) and the processes using TLS."""
        for probe in self.probes.values():
            status = getattr(probe, "tls_status", None)
            if callable(status):
                return dict(status())
        return {"libraries": [], "failed": {}, "links": 0, "processes": []}

    def status(self) -> list[ProbeStatus]:
        out = []
        for name, running in self.running.items():
            stats = running.program_stats()
            for c in running.choices:
                s = stats.get(c.program or "")
                out.append(ProbeStatus(
                    probe=name, hook=c.hook, program=c.program, section=c.section,
                    attached=c.attached, fallback_reason=c.reason,
                    run_time_ns=s.run_time_ns if s else 0, run_cnt=s.run_cnt if s else 0,
                ))
        return out
