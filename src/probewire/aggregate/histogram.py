"""In-kernel log2 histograms -> Prometheus cumulative buckets.

The kernel helper puts an integer value v (in some unit, e.g. microseconds) in slot
``0 if v == 0 else min(64 - clz(v), n_slots - 1)``: slot i > 0 holds 2**(i-1) <= v < 2**i,
slot 0 holds v == 0, and the last slot is open-ended.

Bucket bounds: slot i's upper bound is ``le_i = 2**i * unit_seconds``. The kernel's v is the
measurement truncated to whole units (``duration_ns / 1000`` for microseconds), so the true
value of anything in slot i is below ``2**i`` units: le_i is the tightest bound that is true of
the measurement itself. (``(2**i - 1) * unit`` would be exact for the truncated integer but
wrong for the measurement, e.g. 1.5 us truncated to 1 would sit under "le=1e-06".) The price is
at the boundaries: an integer v == 2**k is counted under le = 2**(k+1) units, i.e. the bucket of
v is the first whose le is strictly greater than v * unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from prometheus_client.utils import floatToGoString

__all__ = [
    "MAX_SLOTS",
    "Log2Buckets",
    "log2_bucket_bounds",
    "log2_slot",
    "log2_slots",
    "log2_to_cumulative",
    "sum_per_cpu",
]

# A u64 has at most 64 significant bits, so slots 0..64 are the most a kernel histogram can use.
MAX_SLOTS = 65
INF_LE = "+Inf"


def _check_slots(n_slots: int) -> None:
    if not 2 <= n_slots <= MAX_SLOTS:
        raise ValueError(
            f"n_slots must be 2..{MAX_SLOTS} (slot 0 for zero, one open-ended slot, at most one "
            f"slot per bit of a u64), got {n_slots}"
        )


def log2_slot(value: int, n_slots: int) -> int:
    """The slot the kernel's log2 helper puts ``value`` in (its Python twin)."""
    _check_slots(n_slots)
    if value < 0:
        raise ValueError(f"kernel histogram values are unsigned, got {value}")
    # int.bit_length() == 64 - clz(v) for 0 < v < 2**64, and 0 for v == 0.
    return min(int(value).bit_length(), n_slots - 1)


def log2_slots(values: npt.ArrayLike, n_slots: int) -> npt.NDArray[np.intp]:
    """Vectorised :func:`log2_slot`, exact for every u64 (no float rounding near 2**53)."""
    _check_slots(n_slots)
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"values must be an integer array, got dtype {array.dtype}")
    if array.dtype.kind == "i" and array.size and array.min() < 0:
        raise ValueError("kernel histogram values are unsigned; got a negative value")
    remaining = array.astype(np.uint64)
    bit_length = np.zeros(remaining.shape, dtype=np.intp)
    # Binary search on the highest set bit: six shifts instead of one comparison per bit.
    for shift in (32, 16, 8, 4, 2, 1):
        high = remaining >= np.uint64(1 << shift)
        bit_length += np.where(high, shift, 0)
        remaining = np.where(high, remaining >> np.uint64(shift), remaining)
    bit_length += remaining > 0
    return np.minimum(bit_length, n_slots - 1)


def log2_bucket_bounds(n_slots: int, unit_seconds: float) -> list[float]:
    """Upper bounds in seconds: ``2**i * unit_seconds`` for slots 0..n_slots-2, then +Inf."""
    _check_slots(n_slots)
    if not (math.isfinite(unit_seconds) and unit_seconds > 0):
        raise ValueError(f"unit_seconds must be a finite number > 0, got {unit_seconds}")
    # Doubling a float is exact, so the bounds are strictly increasing for any unit.
    return [math.ldexp(unit_seconds, i) for i in range(n_slots - 1)] + [math.inf]


def sum_per_cpu(values: npt.ArrayLike, cpu_axis: int = 0) -> npt.NDArray[np.generic]:
    """Sum a per-CPU map value over its CPU axis.

    A lookup in a per-CPU map returns one value per possible CPU: shape (n_cpus,) for a
    counter, (n_cpus, n_slots) for a histogram, so the CPU axis is 0. A batch lookup returns
    (n_keys, n_cpus, ...): pass ``cpu_axis=1``.
    """
    array = np.asarray(values)
    if array.ndim == 0:
        raise ValueError("per-CPU values need a CPU axis; got a scalar")
    # Integer counters stay integers (numpy would sum small ints into the platform int anyway).
    dtype = np.uint64 if array.dtype.kind == "u" else None
    return np.asarray(array.sum(axis=cpu_axis, dtype=dtype))


class Log2Buckets:
    """Bucket layout for one (n_slots, unit) pair; build once, convert every scrape.

    The ``le`` strings are formatted once here, because formatting them per series per scrape
    costs more than the rest of the conversion.
    """

    def __init__(self, n_slots: int, unit_seconds: float) -> None:
        self.n_slots = n_slots
        self.unit_seconds = unit_seconds
        self.bounds_seconds: tuple[float, ...] = tuple(log2_bucket_bounds(n_slots, unit_seconds))
        self.le_labels: tuple[str, ...] = tuple(
            floatToGoString(b)  # type: ignore[no-untyped-call]
            for b in self.bounds_seconds
        )

    def _slot_counts(self, slot_counts: npt.ArrayLike) -> npt.NDArray[np.generic]:
        counts = np.asarray(slot_counts)
        if counts.ndim == 2:
            counts = sum_per_cpu(counts, cpu_axis=0)
        if counts.shape != (self.n_slots,):
            raise ValueError(
                f"expected slot counts of shape ({self.n_slots},) or (n_cpus, {self.n_slots}), "
                f"got {np.asarray(slot_counts).shape}"
            )
        return counts

    def cumulative(self, slot_counts: npt.ArrayLike) -> list[tuple[str, float]]:
        """``[(le, cumulative_count), ..., ("+Inf", total)]`` for ``HistogramMetricFamily``.

        ``slot_counts`` is one histogram, shape (n_slots,), or its per-CPU copies, shape
        (n_cpus, n_slots), which are summed first.
        """
        running = np.cumsum(self._slot_counts(slot_counts), dtype=np.float64)
        return list(zip(self.le_labels, running.tolist(), strict=True))

    def cumulative_many(self, slot_counts: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Cumulative counts for many histograms at once: (n_series, n_slots) -> same shape."""
        counts = np.asarray(slot_counts)
        if counts.ndim < 1 or counts.shape[-1] != self.n_slots:
            raise ValueError(f"last axis must have {self.n_slots} slots, got shape {counts.shape}")
        return np.cumsum(counts, axis=-1, dtype=np.float64)

    def pairs(self, cumulative_row: Sequence[float]) -> list[tuple[str, float]]:
        """Pair one row of :meth:`cumulative_many` with the ``le`` labels."""
        return list(zip(self.le_labels, cumulative_row, strict=True))


def log2_to_cumulative(slot_counts: npt.ArrayLike, unit_seconds: float) -> list[tuple[str, float]]:
    """One-shot :meth:`Log2Buckets.cumulative`; hot paths should keep a :class:`Log2Buckets`."""
    counts = np.asarray(slot_counts)
    if counts.ndim not in (1, 2):
        raise ValueError(f"expected shape (n_slots,) or (n_cpus, n_slots), got {counts.shape}")
    return Log2Buckets(counts.shape[-1], unit_seconds).cumulative(counts)
