"""Series budgets: cap how many label sets a metric exports.

Once a metric holds ``max_series`` series, a new label set is not dropped but folded into an
overflow series: the budget's overflow labels (e.g. ``http_route``) take a fixed value
(``"other"``) and the rest (service, method, status) are kept, so per-service RED totals stay
right while route detail is lost. Overflow series do not count against ``max_series``; their
number is bounded by the distinct values of the kept labels.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

__all__ = ["LabelBudget"]


class LabelBudget:
    """Admits label sets up to ``max_series``; later ones go to overflow series.

    ``admit`` runs on the reader thread and the properties on the scrape thread, so all state is
    behind one lock. Call ``admit`` once per distinct series in a batch, not once per event.
    """

    def __init__(self, max_series: int, overflow_label_values: Mapping[str, str]) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be >= 1, got {max_series}")
        if not overflow_label_values:
            raise ValueError(
                "overflow_label_values must name at least one label to fold, "
                "e.g. {'http_route': 'other'}"
            )
        self._max_series = max_series
        self._overflow_values = dict(overflow_label_values)
        self._admitted: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
        self._overflow_series: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
        self._overflows = 0
        self._lock = threading.Lock()

    @property
    def max_series(self) -> int:
        return self._max_series

    def resize(self, max_series: int) -> None:
        """A new limit (a reloaded config). Series already handed out stay; a larger limit
        admits new label sets again, a smaller one admits none until the count is below it."""
        if max_series < 1:
            raise ValueError(f"max_series must be >= 1, got {max_series}")
        with self._lock:
            self._max_series = max_series

    @property
    def active_series(self) -> int:
        """Distinct series handed out so far, overflow series included."""
        with self._lock:
            return len(self._admitted) + len(self._overflow_series)

    @property
    def overflows(self) -> int:
        """How many ``admit`` calls were folded into an overflow series."""
        with self._lock:
            return self._overflows

    def admit(self, labels: tuple[str, ...], label_names: tuple[str, ...]) -> tuple[str, ...]:
        """The label values to record under: ``labels`` itself, or its overflow series."""
        if len(labels) != len(label_names):
            raise ValueError(
                f"got {len(labels)} label values for {len(label_names)} label names {label_names!r}"
            )
        # Keyed with the names too, so one budget can serve metrics with different label sets.
        key = (label_names, labels)
        with self._lock:
            if key in self._admitted or key in self._overflow_series:
                return labels
            if len(self._admitted) < self._max_series:
                self._admitted.add(key)
                return labels
            folded = self._fold(labels, label_names)
            if (label_names, folded) not in self._admitted:
                self._overflow_series.add((label_names, folded))
            self._overflows += 1
            return folded

    def count_overflows(self, calls: int) -> None:
        """Count `calls` more ``admit`` calls of label sets it folded before, without them.

        A folded label set stays folded (the budget never frees a series), so a caller that
        remembers ``admit``'s answer for a label set can replay it; what a repeat changes is
        this count, once per call, exactly as ``admit`` would have.
        """
        with self._lock:
            self._overflows += calls

    def _fold(self, labels: tuple[str, ...], label_names: tuple[str, ...]) -> tuple[str, ...]:
        if not any(name in self._overflow_values for name in label_names):
            raise ValueError(
                f"none of the label names {label_names!r} is an overflow label "
                f"{sorted(self._overflow_values)!r}; give the budget an overflow value for one "
                "of them, or its overflow series would be unbounded"
            )
        return tuple(
            self._overflow_values.get(name, value)
            for name, value in zip(label_names, labels, strict=True)
        )
