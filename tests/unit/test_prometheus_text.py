"""/metrics text: render_text writes exactly what prometheus_client's generate_latest writes."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from probewire.export.prometheus import CHUNK_LINES, render_text


class Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def reference(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed(families))
    return generate_latest(registry)


def ours(families: list[Metric]) -> bytes:
    return b"".join(render_text(families))


def every_kind() -> list[Metric]:
    counter = CounterMetricFamily("reqs", "Requests\nwith a \\ and newline.",
                                  labels=["svc", "route"])
    counter.add_metric(["a", "/x"], 3)
    counter.add_metric(['quote"d', "back\\slash\nnl"], 0.5, timestamp=1700000000.25)
    created = CounterMetricFamily("jobs", "Jobs.", labels=["q"], created=1700000000.0)
    created.add_metric(["q1"], 7, created=1700000001.5)
    gauge = GaugeMetricFamily("temp_celsius", "Temperature.", value=-0.0)
    big = GaugeMetricFamily("big", "Values Go writes with an exponent.", labels=["k"])
    for i, v in enumerate((1e6, 1234567.0, 1e22, 1e-7, -2.5, math.inf, -math.inf, math.nan,
                           0.0, -0.0, 12, True)):
        big.add_metric([str(i)], v)
    hist = HistogramMetricFamily("lat_seconds", "Latency.", labels=["svc"])
    hist.add_metric(["a"], [("0.005", 1), ("0.1", 4), ("+Inf", 4)], sum_value=0.2)
    hist.add_metric(["b"], [("0.005", 0), ("0.1", 0), ("+Inf", 0)], sum_value=0)
    ghist = GaugeHistogramMetricFamily("queue", "Queue.", buckets=[("1.0", 2), ("+Inf", 3)],
                                       gsum_value=4)
    summary = SummaryMetricFamily("rpc", "RPCs.", count_value=3, sum_value=1.5)
    info = InfoMetricFamily("build", "Build.", value={"version": "1.0", "commit": "abc"})
    stateset = StateSetMetricFamily("state", "State.", value={"up": True, "down": False})
    unknown = UnknownMetricFamily("mystery", "Unknown type.", value=1)
    empty = CounterMetricFamily("nothing", "No samples.", labels=["x"])
    odd = Metric("odd", "Sample and label names outside the legacy set.", "gauge")
    odd.add_sample("odd.name", {"lab.el": "v", "__reserved": "r"}, 1)
    return [counter, created, gauge, big, hist, ghist, summary, info, stateset, unknown, empty,
            odd]


def test_every_metric_type_renders_like_generate_latest() -> None:
    families = every_kind()
    assert ours(families) == reference(families)


def test_a_big_family_comes_in_chunks_of_whole_lines() -> None:
    counter = CounterMetricFamily("c", "Counter.", labels=["i"])
    for i in range(3 * CHUNK_LINES):
        counter.add_metric([str(i)], i)
    chunks = list(render_text([counter]))
    assert len(chunks) == 4  # HELP/TYPE then 3072 lines, 1024 a chunk
    assert all(c.endswith(b"\n") for c in chunks)
    assert b"".join(chunks) == reference([counter])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(max_size=12),
            st.text(max_size=12),
            st.one_of(st.floats(), st.integers(min_value=-(2**63), max_value=2**63)),
        ),
        max_size=20,
    )
)
def test_any_label_values_and_numbers_render_like_generate_latest(
    rows: list[tuple[str, str, float]],
) -> None:
    counter = CounterMetricFamily("c", "Counter.", labels=["a", "b"])
    gauge = GaugeMetricFamily("g", "Gauge.", labels=["b", "a"])
    for a, b, v in rows:
        counter.add_metric([a, b], v)
        gauge.add_metric([b, a], v)
    assert ours([counter, gauge]) == reference([counter, gauge])
