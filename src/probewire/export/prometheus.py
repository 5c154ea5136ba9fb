"""Prometheus export: the registry /metrics serves (the agent's families, read at scrape time
by collect/families.py), and the text renderer.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import escape_label_name, escape_metric_name
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from probewire.collect.families import AgentCollector

if TYPE_CHECKING:
    from probewire.agent import Agent

__all__ = ["CONTENT_TYPE_LATEST", "AgentCollector", "make_registry", "render_text"]

log = logging.getLogger(__name__)

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
