"""log2 kernel histograms -> Prometheus cumulative buckets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric

from probewire.aggregate.histogram import (
    MAX_SLOTS,
    Log2Buckets,
    log2_bucket_bounds,
    log2_slot,
    log2_slots,
    log2_to_cumulative,
    sum_per_cpu,
)

US = 1e-6
U64_MAX = 2**64 - 1

n_slots_st = st.integers(min_value=2, max_value=MAX_SLOTS)
unit_st = st.sampled_from([1e-9, 1e-6, 1e-3, 1.0, 0.25, 3e-7])
values_st = st.lists(st.integers(min_value=0, max_value=U64_MAX), max_size=50)


def clz64(value: int) -> int:
    """Count leading zeros of a u64 the way __builtin_clzll does (value > 0)."""
    return 64 - len(bin(value)) + 2


def kernel_slot(value: int, n_slots: int) -> int:
    """The C helper, transcribed literally, as the reference for log2_slot."""
    return 0 if value == 0 else min(64 - clz64(value), n_slots - 1)


@pytest.mark.parametrize(
    ("value", "slot"),
    [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (1023, 10), (1024, 11), (10**9, 26)],
)
def test_log2_slot_examples(value: int, slot: int) -> None:
    assert log2_slot(value, 27) == slot


def test_last_slot_is_open_ended() -> None:
    assert log2_slot(2**40, 27) == 26
    assert log2_slot(U64_MAX, MAX_SLOTS) == 64


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="unsigned"):
        log2_slot(-1, 27)
    with pytest.raises(ValueError, match="n_slots"):
        log2_slot(1, 1)
    with pytest.raises(ValueError, match="n_slots"):
        log2_bucket_bounds(MAX_SLOTS + 1, US)
    with pytest.raises(ValueError, match="unit_seconds"):
        log2_bucket_bounds(27, 0.0)
    with pytest.raises(ValueError, match="unit_seconds"):
        log2_bucket_bounds(27, math.nan)
    with pytest.raises(ValueError, match="shape"):
        log2_to_cumulative(np.zeros((2, 3, 4)), US)
    with pytest.raises(ValueError, match="negative"):
        log2_slots(np.array([1, -1]), 27)
    with pytest.raises(ValueError, match="integer"):
        log2_slots(np.array([1.5]), 27)


def test_bounds_for_microseconds() -> None:
    bounds = log2_bucket_bounds(5, US)
    assert bounds == [1e-6, 2e-6, 4e-6, 8e-6, math.inf]


def test_cumulative_example_in_prometheus_form() -> None:
    assert log2_to_cumulative(np.array([2, 0, 3, 1]), US) == [
        ("1e-06", 2.0),
        ("2e-06", 2.0),
        ("4e-06", 5.0),
        ("+Inf", 6.0),
    ]


def test_per_cpu_rows_are_summed_before_accumulating() -> None:
    per_cpu = np.array([[1, 0, 2], [0, 4, 1]], dtype=np.uint64)
    assert sum_per_cpu(per_cpu).tolist() == [1, 4, 3]
    assert log2_to_cumulative(per_cpu, 1.0) == [("1.0", 1.0), ("2.0", 5.0), ("+Inf", 8.0)]


def test_sum_per_cpu_for_counters_and_batches() -> None:
    assert int(sum_per_cpu(np.array([3, 4, 5], dtype=np.uint64))) == 12
    batch = np.arange(2 * 3 * 4, dtype=np.uint64).reshape(2, 3, 4)  # (keys, cpus, slots)
    assert sum_per_cpu(batch, cpu_axis=1).tolist() == batch.sum(axis=1).tolist()
    assert sum_per_cpu(np.array([2**63, 2**63 - 1], dtype=np.uint64)).dtype == np.uint64


def test_buckets_feed_histogram_metric_family_and_render() -> None:
    family = HistogramMetricFamily("probewire_tcp_rtt_seconds", "TCP RTT", labels=["service_name"])
    family.add_metric(["api"], log2_to_cumulative(np.array([0, 1, 2, 3]), US), 1.5e-5)

    class Collector:
        def collect(self) -> list[Metric]:
            return [family]

    registry = CollectorRegistry()
    registry.register(Collector())
    text = generate_latest(registry).decode()
    assert 'probewire_tcp_rtt_seconds_bucket{le="4e-06",service_name="api"} 3.0' in text
    assert 'probewire_tcp_rtt_seconds_bucket{le="+Inf",service_name="api"} 6.0' in text
    assert 'probewire_tcp_rtt_seconds_count{service_name="api"} 6.0' in text


def test_log2_buckets_many_series_match_one_by_one() -> None:
    buckets = Log2Buckets(8, US)
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 1000, size=(50, 8), dtype=np.uint64)
    many = buckets.cumulative_many(counts)
    for row, cumulative in zip(counts, many, strict=True):
        assert buckets.pairs(cumulative.tolist()) == buckets.cumulative(row)
    with pytest.raises(ValueError, match="slots"):
        buckets.cumulative_many(np.zeros((2, 7)))
    with pytest.raises(ValueError, match="shape"):
        buckets.cumulative(np.zeros(7))


# --- properties --------------------------------------------------------------------------------


@given(value=st.integers(min_value=0, max_value=U64_MAX), n_slots=n_slots_st)
def test_log2_slot_is_the_kernel_formula(value: int, n_slots: int) -> None:
    assert log2_slot(value, n_slots) == kernel_slot(value, n_slots)


@given(values=values_st, n_slots=n_slots_st)
def test_vectorised_slots_match_the_scalar_twin_for_every_u64(
    values: list[int], n_slots: int
) -> None:
    array = np.array(values, dtype=np.uint64)
    assert log2_slots(array, n_slots).tolist() == [log2_slot(v, n_slots) for v in values]


@given(n_slots=n_slots_st, unit_seconds=unit_st)
def test_bounds_strictly_increase_and_end_at_inf(n_slots: int, unit_seconds: float) -> None:
    bounds = log2_bucket_bounds(n_slots, unit_seconds)
    assert len(bounds) == n_slots
    assert all(a < b for a, b in itertools.pairwise(bounds))
    assert bounds[-1] == math.inf
    labels = Log2Buckets(n_slots, unit_seconds).le_labels
    assert len(set(labels)) == n_slots and labels[-1] == "+Inf"
    assert [float(label) for label in labels] == bounds  # the text form loses nothing


@given(
    counts=hnp.arrays(
        np.uint64,
        st.tuples(st.integers(1, 4), st.integers(2, MAX_SLOTS)),
        elements=st.integers(0, 2**40),
    ),
    unit_seconds=unit_st,
)
def test_cumulative_is_monotonic_and_ends_at_the_total(
    counts: np.ndarray, unit_seconds: float
) -> None:
    pairs = log2_to_cumulative(counts, unit_seconds)
    cumulative = [count for _, count in pairs]
    assert all(a <= b for a, b in itertools.pairwise(cumulative))
    assert pairs[-1] == ("+Inf", float(counts.sum()))
    assert len(pairs) == counts.shape[1]


@given(values=values_st, n_slots=n_slots_st, unit_seconds=unit_st)
def test_every_value_lands_in_the_first_bucket_above_it(
    values: list[int], n_slots: int, unit_seconds: float
) -> None:
    # The kernel's v is a measurement truncated to whole units: the true value lies in
    # [v, v + 1) units, so its bucket is the first whose bound is strictly above v units (and
    # at least v + 1 units). Comparisons run in units: le / unit is exactly 2**i, whereas
    # v * unit rounds for large v.
    bounds_units = [le / unit_seconds for le in log2_bucket_bounds(n_slots, unit_seconds)]
    counts = np.zeros(n_slots, dtype=np.uint64)
    for value in values:
        slot = log2_slot(value, n_slots)
        counts[slot] += 1
        assert slot == next(i for i, le in enumerate(bounds_units) if le > value)
        assert value + 1 <= bounds_units[slot]
    # Prometheus semantics, per bucket: its cumulative count is every value below its bound.
    pairs = log2_to_cumulative(counts, unit_seconds)
    for (label, cumulative), le in zip(pairs, bounds_units, strict=True):
        assert cumulative == sum(1 for value in values if value < le), label
