"""Prometheus export: a custom collector that reads kernel maps at scrape time, and the text
renderer /metrics serves it with.

Nothing is updated per event: probe families aggregate in kernel (or per batch) and this
collector turns their state into metric families when Prometheus asks.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import escape_label_name, escape_metric_name
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from probewire.agent import Agent

__all__ = ["CONTENT_TYPE_LATEST", "AgentCollector", "make_registry", "render_text"]

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


def make_registry(agent: Agent) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry


# Names in the legacy character set are written as they are; others get prometheus_client's
# escaping (characters outside the set become "_"), exactly as generate_latest writes them.
_LEGACY_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# Samples of OpenMetrics-only series, written as separate gauge families after their family.
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
# Lines joined into one chunk: big enough that joins are cheap, small enough that a family of
# 50,000 series never has all its lines as separate strings at once.
CHUNK_LINES = 1024
# OpenMetrics types that the Prometheus text format spells differently.
_TEXT_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
               "unknown": "untyped"}


class _Text:
    """Escaped label values, sample values and names, kept for one render: label values and
    bucket counts repeat across a page's series, so most lookups are hits."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.floats: dict[float, str] = {}
        self.names: dict[str, str] = {}
        self.label_names: dict[str, str] = {}

    def metric_name(self, name: str) -> str:
        out = self.names.get(name)
        if out is None:
            out = self.names[name] = (name if _LEGACY_METRIC_NAME.fullmatch(name)
                                      else escape_metric_name(name))
        return out

    def line(self, name: str, labels: dict[str, str], value: float,
             timestamp: object) -> str:
        if labels:
            parts = []
            for key, raw in sorted(labels.items()):
                ek = self.label_names.get(key)
                if ek is None:
                    ek = self.label_names[key] = escape_label_name(key)
                ev = self.values.get(raw)
                if ev is None:
                    ev = self.values[raw] = (
                        raw.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"'))
                parts.append(f'{ek}="{ev}"')
            head = f"{self.metric_name(name)}{{{','.join(parts)}}}"
        else:
            head = self.metric_name(name)
        v = float(value)
        text: str | None
        if v == 0.0:  # the commonest value; equal to -0.0 as a key, but written differently
            text = "-0.0" if math.copysign(1.0, v) < 0 else "0.0"
        else:
            text = self.floats.get(v)
            if text is None:
                text = str(floatToGoString(v))  # type: ignore[no-untyped-call]
                if v == v:  # NaN never finds itself again: not worth a slot per sample
                    self.floats[v] = text
        if timestamp is None:
            return f"{head} {text}\n"
        return f"{head} {text} {int(float(timestamp) * 1000):d}\n"  # type: ignore[arg-type]


def _help(name: str, documentation: str, typ: str) -> str:
    doc = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {typ}\n"


def render_text(families: Iterable[Metric]) -> Iterator[bytes]:
    """The Prometheus text format, byte for byte what prometheus_client's generate_latest
    writes, as UTF-8 chunks of at most CHUNK_LINES lines.

    generate_latest keeps a str per line for the whole page, joins them and encodes the join
    (three copies of the page at its peak). Here lines are joined and encoded a chunk at a time,
    so a scrape holds at most the encoded page (less if the caller compresses the chunks as they
    come) plus the family being rendered.
    """
    text = _Text()
    lines: list[str] = []
    for metric in families:
        try:
            name, typ = metric.name, metric.type
            if typ == "counter":
                name += "_total"
            elif typ == "info":
                name += "_info"
            typ = _TEXT_TYPES.get(typ, typ)
            lines.append(_help(text.metric_name(name), metric.documentation, typ))
            om_lines: dict[str, list[str]] = {}
            om_names = {metric.name + suffix: suffix for suffix in _OM_SUFFIXES}
            for s in metric.samples:
                line = text.line(s.name, s.labels, s.value, s.timestamp)
                suffix = om_names.get(s.name)
                if suffix is not None:
                    om_lines.setdefault(suffix, []).append(line)
                    continue
                lines.append(line)
                if len(lines) >= CHUNK_LINES:
                    yield "".join(lines).encode()
                    lines.clear()
        except Exception as exc:
            exc.args = (*(exc.args or ("",)), metric)
            raise
        for suffix, extra in sorted(om_lines.items()):
            lines.append(_help(text.metric_name(metric.name + suffix), metric.documentation,
                               "gauge"))
            lines.extend(extra)
        # Let this family go before the next one is built: the loop variable would keep it
        # alive until then, doubling the peak when two big families follow each other.
        del metric
    if lines:
        yield "".join(lines).encode()
