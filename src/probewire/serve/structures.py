"""Registers the agent's user-space structures with the bounds registry and runs the memory
guard: the wiring that lives beside the HTTP server until the agent owns the registry.

A probe family that keeps caches of its own registers them itself through the capability
``register_bounds(bounds)`` (asked of every probe here), so nothing below knows a family's
insides; the structures of the stages outside the families (the UI history, the OTLP span
queue, the service cache) are registered here, each read lazily (the exporter exists only
once the agent started).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from probewire.agent import Agent
from probewire.aggregate.bounds import Bounds, register_templater
from probewire.probes.process import RECENT_EVENTS, ProcessProbe
from probewire.runtime.memory import CgroupMemory, MemoryGuard
from probewire.serve.history import MAX_COLUMNS, MAX_SERVICES, RATE_WINDOW_S, History

__all__ = ["BoundsCollector", "guard_for", "register_agent_structures", "register_templater"]

# ServiceResolver's default max_entries (enrich/service.py), until it exposes its bound.
SERVICE_CACHE_MAX = 65536


class BoundsCollector(Collector):
    def __init__(self, bounds: Bounds, guard: MemoryGuard | None = None) -> None:
        self.bounds = bounds
        self.guard = guard

    def collect(self) -> Iterable[Metric]:
        yield from self.bounds.collect()
        if self.guard is not None:
            yield from self.guard.collect()


def guard_for(agent: Agent, bounds: Bounds) -> MemoryGuard:
    cfg = agent.config.memory
    return MemoryGuard(bounds, CgroupMemory(limit_mb=cfg.limit_mb), cfg.shrink_at,
                       cfg.interval_s)


def register_agent_structures(bounds: Bounds, agent: Agent, history: History) -> None:
    bounds.register(
        "ui_history.columns", bound=MAX_COLUMNS,
        policy="at the bound, columns of keys absent from the newest sample are dropped",
        size=lambda: history.column_count, shrink=history.shrink,
        evictions=lambda: history.dropped_columns)
    bounds.register(
        "ui_history.services", bound=MAX_SERVICES,
        policy="services beyond the bound are not kept (counted); a service without a point "
        "for 15 min is dropped", size=lambda: history.service_count,
        evictions=lambda: history.dropped_services + history.expired_services)
    bounds.register(
        "ui_history.samples", bound=int(RATE_WINDOW_S / history.interval_s) + 2,
        policy="samples older than the rate window are dropped",
        size=lambda: history.sample_count)
    bounds.register(
        "services.process_cache", bound=SERVICE_CACHE_MAX,
        policy="LRU by lookup; exited processes forgotten 120 s after their exit",
        size=lambda: len(agent.services))
    process = agent.probes.get("process")
    if isinstance(process, ProcessProbe):
        bounds.register(
            "process.recent_events", bound=RECENT_EVENTS, policy="ring: the oldest event goes",
            size=lambda: len(process.recent))
    otlp = agent.config.export.otlp
    if otlp.enabled and otlp.traces:
        bounds.register(
            "otlp.span_queue", bound=otlp.max_queue_spans,
            policy="a batch that would exceed it is dropped and counted "
            "(probewire_otlp_spans_total{result=dropped})",
            size=lambda: agent.otlp.waiting_spans if agent.otlp is not None else 0,
            shrink=lambda: agent.otlp.shrink() if agent.otlp is not None else 0,
            evictions=lambda: agent.otlp.spans_dropped if agent.otlp is not None else 0)
    for probe in agent.probes.values():
        register = getattr(probe, "register_bounds", None)
        if callable(register):
            register(bounds)
