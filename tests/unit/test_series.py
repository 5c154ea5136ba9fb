"""Row grouping by hash gives exactly the groups a row-wise np.unique gives."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from probewire.aggregate.series import CounterSeries, HistogramSeries, group_rows, unique_rows


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.int64, st.tuples(st.integers(1, 300), st.integers(1, 12)),
                  elements=st.integers(-3, 3)))
def test_group_rows_matches_rowwise_unique(rows: np.ndarray) -> None:
    keys, inverse = group_rows(list(rows.T))
    assert len(keys) == len(np.unique(rows, axis=0))
    # Every row maps to the key equal to it, and equal rows share a group.
    assert (keys[inverse] == rows).all()


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 200), st.sampled_from([5, 16, 128])),
                  elements=st.integers(0, 3)))
def test_unique_rows_of_bytes(rows: np.ndarray) -> None:
    first, inverse = unique_rows(rows)
    assert len(first) == len(np.unique(rows, axis=0))
    assert (rows[first][inverse] == rows).all()


def test_histogram_uses_le_semantics() -> None:
    h = HistogramSeries((0.1, 1.0))
    h.observe(("a",), np.array([0.1, 0.5, 1.0, 2.0]))
    assert h.counts[("a",)].tolist() == [1, 2, 1]
    assert h.sums[("a",)] == 3.6


def test_rows_differing_only_in_high_bytes_stay_apart() -> None:
    # A bare multiply-sum hash let such rows collide (one in 256 pairs); the mix must not.
    rows = np.zeros((256 * 4, 128), dtype=np.uint8)
    for i in range(len(rows)):
        rows[i, 7] = i % 256  # the top byte of word 0
        rows[i, 15] = i // 256  # the top byte of word 1
    first, _ = unique_rows(rows)
    assert len(first) == len(rows)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]),
                          st.floats(0, 20, allow_nan=False)), max_size=60))
def test_histogram_add_by_rows_equals_observe_per_label_set(pairs: list[tuple[str, float]]) -> None:
    bounds = (0.5, 1.0, 10.0)
    one_by_one, whole = HistogramSeries(bounds), HistogramSeries(bounds)
    for label in dict.fromkeys(p[0] for p in pairs):
        one_by_one.observe((label,), np.array([v for lab, v in pairs if lab == label]))
    rows = np.array([whole.slot((label,)) for label, _ in pairs], dtype=np.int64)
    whole.add(rows, np.array([v for _, v in pairs], dtype=np.float64))
    assert whole.counts.keys() == one_by_one.counts.keys()
    for labels, counts in one_by_one.counts.items():
        assert whole.counts[labels].tolist() == counts.tolist()
        assert np.isclose(whole.sums[labels], one_by_one.sums[labels])
    assert whole.total() == one_by_one.total() == len(pairs)


def test_a_series_exists_once_something_landed_in_it() -> None:
    h = HistogramSeries((1.0,))
    h.slot(("made",))  # a row, nothing in it: not exported
    h.merge(("zero",), np.zeros(2, dtype=np.int64), 0.0)  # merged, even all zero: exported
    assert list(h.counts) == [("zero",)]
    first = h.family("x", "x", ("l",)).samples[0]
    assert first.labels == {"l": "zero", "le": "1.0"}
    counters = CounterSeries()
    counters.slot(("made",))
    counters.add_rows(np.array([counters.slot(("b",)), counters.slot(("b",))]))
    counters.add(("a",), 0.0)
    assert counters.values == {("b",): 2.0, ("a",): 0.0}


def test_snapshots_render_what_was_there_while_the_series_go_on_counting() -> None:
    hist = HistogramSeries((0.1, 1.0))
    hist.observe(("a",), np.array([0.05, 2.0]))
    counter = CounterSeries()
    counter.add(("a",), 3.0)
    hist_snap, counter_snap = hist.snapshot(), counter.snapshot()
    hist.observe(("a",), np.array([0.5]))
    hist.observe(("b",), np.array([0.5]))
    counter.add(("a",))
    counter.add(("b",))
    assert [s.value for s in hist_snap.family("h", "", ("k",)).samples
            if s.name == "h_count"] == [2.0]
    assert [(s.labels, s.value) for s in counter_snap.family("c", "", ("k",)).samples] == [
        ({"k": "a"}, 3.0)]
    assert {tuple(s.labels.values()) for s in hist.family("h", "", ("k",)).samples} >= {
        ("a", "+Inf"), ("b", "+Inf")}
