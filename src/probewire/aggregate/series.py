"""Label-keyed counters and fixed-bucket histograms fed with numpy batches.

Series are keyed by label tuples that already passed a LabelBudget. A histogram keeps every
series as one row of a dense (series, bucket) array, so a batch is added in a few whole-array
operations whatever the number of series it touches: the caller maps its rows to series rows
once (`slot`) and hands over (series row, value) pairs (`add`), never a Python call per value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


def grown(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with room for `rows` rows along its first axis, new rows zero (a copy)."""
    if rows <= len(array):
        return array
    more = np.zeros((rows - len(array), *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, more])


class _Rows:
    """A dense row per label set, in arrays a subclass grows (`_grow`), sizes (`_capacity`) and
    clears (`_clear`, for a row `remove` frees and a later label set reuses).

    Each row remembers when it was last written (`touched`, seconds on `clock`), so label sets
    idle longer than a TTL can be found (`idle`) and removed; see aggregate.budget.expire_idle.
    """

    _rows: dict[Labels, int]
    clock: Callable[[], float] = time.monotonic

    def _capacity(self) -> int:
        raise NotImplementedError

    def _grow(self, size: int) -> None:
        raise NotImplementedError

    def _clear(self, row: int) -> None:
        raise NotImplementedError

    def _init_rows(self) -> None:
        self._rows = {}
        self._used = 0  # rows handed out so far (freed ones included): the arrays' live prefix
        self._free: list[int] = []
        self._touched = np.zeros(0, dtype=np.float64)

    def slot(self, labels: Labels) -> int:
        """The row of `labels`, made (empty, not yet exported) if it is new."""
        row = self._rows.get(labels)
        if row is None:
            if self._free:
                row = self._free.pop()
            else:
                row = self._used
                self._used += 1
                if row == self._capacity():
                    self._grow(max(16, 2 * row))
                    self._touched = grown(self._touched, self._capacity())
            self._rows[labels] = row
            self._touched[row] = self.clock()
        return row

    def touch(self, rows: np.ndarray) -> None:
        """Mark rows written now (add and merge do it; a caller that replays cached rows
        without adding may too)."""
        if len(rows):
            self._touched[rows] = self.clock()

    def touched(self, labels: Labels) -> float | None:
        """When `labels`' row was last written (None: no such row)."""
        row = self._rows.get(labels)
        return None if row is None else float(self._touched[row])

    def idle(self, before: float) -> list[Labels]:
        """Label sets whose rows were last written before `before`."""
        touched = self._touched
        return [labels for labels, row in self._rows.items() if touched[row] < before]

    def remove(self, labels: Labels) -> bool:
        """Forget a label set: its row is cleared and reused by a later one. A caller that
        cached the row (e.g. a memo of slot answers) must drop that cache."""
        row = self._rows.pop(labels, None)
        if row is None:
            return False
        self._clear(row)
        self._free.append(row)
        return True

    def __len__(self) -> int:
        return len(self._rows)


class HistogramSeries(_Rows):
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self.width = len(self.bounds) + 1
        # Row per label set, in order of creation. A row is exported once something landed in
        # it, as with the dict of series this replaced: an `add` always counts, and `merged`
        # marks rows given counts by `merge` (which may be all zero).
        self._init_rows()
        self._counts = np.zeros((0, self.width), dtype=np.int64)
        self._sums = np.zeros(0, dtype=np.float64)
        self._merged = np.zeros(0, dtype=bool)

    # --- rows ------------------------------------------------------------------------------
    def _capacity(self) -> int:
        return len(self._sums)

    def _grow(self, size: int) -> None:
        self._counts = grown(self._counts, size)
        self._sums = grown(self._sums, size)
        self._merged = grown(self._merged, size)

    def _clear(self, row: int) -> None:
        self._counts[row] = 0
        self._sums[row] = 0.0
        self._merged[row] = False

    def buckets(self, values: np.ndarray) -> np.ndarray:
        """Bucket of each value: bucket i holds bounds[i-1] < v <= bounds[i] (Prometheus' le)."""
        return np.searchsorted(self.bounds, values, side="left")

    def add(self, rows: np.ndarray, values: np.ndarray, buckets: np.ndarray | None = None,
            ) -> None:
        """Observe values[i] in series row rows[i] (rows from `slot`), all at once.

        `buckets` may be passed when the caller already has them (`buckets(values)`) for
        several histograms with these bounds. Sums add value by value, in order.
        """
        if not len(rows):
            return
        if buckets is None:
            buckets = self.buckets(values)
        np.add.at(self._counts.reshape(-1), rows * self.width + buckets, 1)
        np.add.at(self._sums, rows, values)
        self._touched[rows] = self.clock()

    # --- one label set at a time ---------------------------------------------------------------
    def observe(self, labels: Labels, values: np.ndarray) -> None:
        if not len(values):
            return
        add = np.bincount(self.buckets(values), minlength=self.width)
        self.merge(labels, add.astype(np.int64), float(values.sum()))

    def merge(self, labels: Labels, counts: np.ndarray, total: float) -> None:
        """Add another series' bucket counts and sum (e.g. when relabelling at scrape)."""
        row = self.slot(labels)
        self._counts[row] += counts
        self._sums[row] += total
        self._merged[row] = True
        if counts.any():
            self._touched[row] = self.clock()

    # --- reading -------------------------------------------------------------------------------
    def _live_rows(self) -> list[tuple[Labels, int]]:
        live = (self._merged | self._counts.any(axis=1)).tolist()
        return [(labels, row) for labels, row in self._rows.items() if live[row]]

    @property
    def counts(self) -> dict[Labels, np.ndarray]:
        """Bucket counts per label set (copies)."""
        return {labels: self._counts[row].copy() for labels, row in self._live_rows()}

    @property
    def sums(self) -> dict[Labels, float]:
        return {labels: float(self._sums[row]) for labels, row in self._live_rows()}

    def family(
        self, name: str, documentation: str, label_names: Sequence[str]
    ) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, documentation, labels=list(label_names))
        live = sorted(self._live_rows())
        if not live:
            return fam
        rows = np.array([row for _, row in live], dtype=np.intp)
        cumulative = np.cumsum(self._counts[rows], axis=1).tolist()
        sums = self._sums[rows].tolist()
        for (labels, _), counts, total in zip(live, cumulative, sums, strict=True):
            fam.add_metric(list(labels), list(zip(self.le, counts, strict=True)), total)
        return fam

    def total(self) -> int:
        return int(self._counts.sum())

    def snapshot(self) -> HistogramSeries:
        """A copy to render from while the original goes on counting (e.g. outside a lock)."""
        snap = HistogramSeries.__new__(HistogramSeries)
        snap.bounds, snap.le, snap.width = self.bounds, self.le, self.width
        n = self._used
        snap._rows, snap._used, snap._free = dict(self._rows), n, list(self._free)
        snap._touched = self._touched[:n].copy()
        snap._counts, snap._sums = self._counts[:n].copy(), self._sums[:n].copy()
        snap._merged = self._merged[:n].copy()
        return snap


class CounterSeries(_Rows):
    """Counters keyed by label tuples, one row of a dense vector per label set (as for
    HistogramSeries: `slot` once, then `add_rows` for a whole batch)."""

    def __init__(self) -> None:
        self._init_rows()
        self._values = np.zeros(0, dtype=np.float64)
        self._live = np.zeros(0, dtype=bool)

    def _capacity(self) -> int:
        return len(self._values)

    def _grow(self, size: int) -> None:
        self._values = grown(self._values, size)
        self._live = grown(self._live, size)

    def _clear(self, row: int) -> None:
        self._values[row] = 0.0
        self._live[row] = False

    def add(self, labels: Labels, amount: float = 1.0) -> None:
        row = self.slot(labels)
        self._values[row] += amount
        self._live[row] = True
        self._touched[row] = self.clock()

    def add_rows(self, rows: np.ndarray) -> None:
        """Count 1 in series row rows[i] for every i (rows from `slot`)."""
        if len(rows):
            np.add.at(self._values, rows, 1.0)
            self._live[rows] = True
            self._touched[rows] = self.clock()

    @property
    def values(self) -> dict[Labels, float]:
        live, values = self._live, self._values
        return {labels: float(values[row]) for labels, row in self._rows.items() if live[row]}

    def family(
        self, name: str, documentation: str, label_names: Sequence[str]
    ) -> CounterMetricFamily:
        fam = CounterMetricFamily(name, documentation, labels=list(label_names))
        for labels, value in sorted(self.values.items()):
            fam.add_metric(list(labels), value)
        return fam

    def snapshot(self) -> CounterSeries:
        """A copy to render from while the original goes on counting."""
        snap = CounterSeries.__new__(CounterSeries)
        n = self._used
        snap._rows, snap._used, snap._free = dict(self._rows), n, list(self._free)
        snap._touched = self._touched[:n].copy()
        snap._values, snap._live = self._values[:n].copy(), self._live[:n].copy()
        return snap


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

