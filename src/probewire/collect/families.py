"""What the agent exports, read when asked (a Prometheus scrape, an OTLP export interval).

Nothing is updated per event: probe families aggregate in the kernel (or per batch) and this
collector turns their state, and the agent's own, into metric families when asked. Both
exporters read it (export/prometheus.py, export/otlp.py); it knows the agent only through the
capabilities families declare.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from probewire.agent import Agent

log = logging.getLogger(__name__)

# Map fill needs a full map read; refresh it at most this often.
MAP_FILL_TTL_S = 10.0


class AgentCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._fill: list[tuple[str, str, int, int]] = []
        self._fill_at = 0.0

    def collect(self) -> Iterable[Metric]:
        for name, running in list(self.agent.running.items()):
            try:
                # Service keys -> service_name + k8s_* labels (enrich/identity.py).
                yield from self.agent.services.expand(running.probe.collect())
            except Exception:  # one broken family must not empty the whole scrape
                log.exception("collecting probe %s failed", name)
        if self.agent.otlp is not None:
            yield from self.agent.otlp.collect()
        yield from self._self_metrics()
        yield from self._budgets()

    def _budgets(self) -> Iterable[Metric]:
        overflow = CounterMetricFamily(
            "probewire_cardinality_overflow",
            "Label sets folded into an 'other' series because a metric hit its budget.",
            labels=["metric"])
        active = GaugeMetricFamily("probewire_active_series",
                                   "Label sets held per metric family.", labels=["metric"])
        for running in list(self.agent.running.values()):
            for metric, overflows, active_series in running.probe.budget_families():
                overflow.add_metric([metric], overflows)
                active.add_metric([metric], active_series)
        yield overflow
        yield active

    def _map_fill(self) -> list[tuple[str, str, int, int]]:
        now = time.monotonic()
        if now - self._fill_at < MAP_FILL_TTL_S:
            return self._fill
        fill = []
        for name, running in self.agent.running.items():
            for m in running.obj.maps.values():
                if m.type in (1, 5, 9, 10):  # hash, percpu hash, LRU hash, LRU percpu hash
                    fill.append((name, m.name, m.count(), m.max_entries))
        self._fill, self._fill_at = fill, now
        return fill

    def _self_metrics(self) -> Iterable[Metric]:
        attached = GaugeMetricFamily(
            "probewire_probe_attached",
            "1 if the probe's program for a hook is attached, else 0.",
            labels=["probe", "hook", "program", "hook_type"],
        )
        run_time = CounterMetricFamily(
            "probewire_bpf_run_time_seconds",
            "Kernel time spent in the program (BPF stats, enabled while the agent runs).",
            labels=["probe", "program"],
        )
        run_cnt = CounterMetricFamily(
            "probewire_bpf_run_count", "Times the program ran (BPF stats).",
            labels=["probe", "program"],
        )
        for s in self.agent.status():
            hook_type = s.section.split("/", 1)[0]
            attached.add_metric([s.probe, s.hook, s.program or "", hook_type], float(s.attached))
            if s.program:
                run_time.add_metric([s.probe, s.program], s.run_time_ns / 1e9)
                run_cnt.add_metric([s.probe, s.program], s.run_cnt)
        events = CounterMetricFamily(
            "probewire_events", "Ring-buffer records received from the kernel.", labels=["probe"]
        )
        dropped = CounterMetricFamily(
            "probewire_events_dropped",
            "Records the kernel dropped because the ring buffer was full.",
            labels=["probe"],
        )
        for name, running in self.agent.running.items():
            if running.probe.record_dtype is not None:
                events.add_metric([name], getattr(running.probe, "records", 0))
                dropped.add_metric([name], running.dropped())
        entries = GaugeMetricFamily(
            "probewire_map_entries", "Entries in a BPF map.", labels=["probe", "map"]
        )
        capacity = GaugeMetricFamily(
            "probewire_map_max_entries", "Capacity of a BPF map.", labels=["probe", "map"]
        )
        for probe, map_name, n, cap in self._map_fill():
            entries.add_metric([probe, map_name], n)
            capacity.add_metric([probe, map_name], cap)
        reader = self.agent.reader
        batches = CounterMetricFamily(
            "probewire_ring_batches", "Batches handed downstream by the ring reader."
        )
        batches.add_metric([], reader.stats.batches)
        wait = GaugeMetricFamily(
            "probewire_ring_batch_wait_max_seconds",
            "Longest time a drained record waited for its batch to be flushed.",
        )
        wait.add_metric([], reader.stats.max_wait_ns / 1e9)
        errors = CounterMetricFamily(
            "probewire_ring_handler_errors", "Batches whose handler raised (records lost)."
        )
        errors.add_metric([], reader.errors)
        startup = GaugeMetricFamily(
            "probewire_startup_seconds", "Time to load and attach every probe at start-up."
        )
        startup.add_metric([], self.agent.startup_s)
        yield from (attached, run_time, run_cnt, events, dropped, entries, capacity, batches,
                    wait, errors, startup)
