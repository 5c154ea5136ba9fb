"""Label-keyed counters and fixed-bucket histograms fed with numpy batches.

Series are keyed by label tuples that already passed a LabelBudget; observing a batch is one
`np.searchsorted` + `np.bincount` per label set, never a Python call per value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class HistogramSeries:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self.counts: dict[Labels, np.ndarray] = {}
        self.sums: dict[Labels, float] = {}

    def observe(self, labels: Labels, values: np.ndarray) -> None:
        if not len(values):
            return
        # Bucket i holds bounds[i-1] < v <= bounds[i], Prometheus' `le` semantics.
        idx = np.searchsorted(self.bounds, values, side="left")
        add = np.bincount(idx, minlength=len(self.bounds) + 1)
        self.merge(labels, add.astype(np.int64), float(values.sum()))

    def merge(self, labels: Labels, counts: np.ndarray, total: float) -> None:
        """Add another series' bucket counts and sum (e.g. when relabelling at scrape)."""
        if labels in self.counts:
            self.counts[labels] = self.counts[labels] + counts
            self.sums[labels] += total
        else:
            self.counts[labels] = counts.copy()
            self.sums[labels] = total

    def family(
        self, name: str, documentation: str, label_names: Sequence[str]
    ) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, documentation, labels=list(label_names))
        for labels, counts in sorted(self.counts.items()):
            cumulative = np.cumsum(counts).tolist()
            fam.add_metric(list(labels), list(zip(self.le, cumulative, strict=True)),
                           self.sums[labels])
        return fam

    def total(self) -> int:
        return int(sum(int(c.sum()) for c in self.counts.values()))


class CounterSeries:
    def __init__(self) -> None:
        self.values: dict[Labels, float] = {}

    def add(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(
        self, name: str, documentation: str, label_names: Sequence[str]
    ) -> CounterMetricFamily:
        fam = CounterMetricFamily(name, documentation, labels=list(label_names))
        for labels, value in sorted(self.values.items()):
            fam.add_metric(list(labels), value)
        return fam


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """One 64-bit hash per row of a 2-D integer or byte array.

    np.unique(axis=0) sorts whole rows as bytes and dominated a batch's cost; a hash per row
    leaves a 1-D sort of integers. Each 64-bit word, offset by its position, goes through the
    splitmix64 finaliser and the results are summed: a few whole-array operations. (A bare
    multiply-sum let rows that differ only in high bytes collide one time in 256; the property
    tests caught it.) Collisions are then as rare as for any 64-bit hash, which for a few
    hundred rows a batch is not a practical concern.
    """
    rows = np.ascontiguousarray(rows)
    n = rows.shape[0]
    raw = rows.view(np.uint8).reshape(n, -1)
    if raw.shape[1] % 8:
        raw = np.concatenate([raw, np.zeros((n, 8 - raw.shape[1] % 8), np.uint8)], axis=1)
    words = raw.view(np.uint64)
    with np.errstate(over="ignore"):
        offsets = (np.arange(1, words.shape[1] + 1, dtype=np.uint64) * _GOLDEN)
        z = words + offsets
        z = (z ^ (z >> np.uint64(30))) * _C1
        z = (z ^ (z >> np.uint64(27))) * _C2
        z ^= z >> np.uint64(31)
        hashed: np.ndarray = z.sum(axis=1, dtype=np.uint64)
    return hashed


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(one representative index per distinct row, inverse index per row)."""
    _, first, inverse = np.unique(row_hashes(rows), return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def group_rows(columns: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Group rows by several integer columns: (unique key rows, inverse index per row)."""
    stacked = np.stack([np.asarray(c, dtype=np.int64) for c in columns], axis=1)
    first, inverse = unique_rows(stacked)
    return stacked[first], inverse
