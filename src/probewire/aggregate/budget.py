"""Series budgets: cap how many label sets a metric exports, in all and per service.

Once a metric holds ``max_series`` series, or a service holds ``max_series_per_service`` of
them, a new label set is not dropped but folded into an overflow series: the budget's overflow
labels (e.g. ``http_route``) take a fixed value (``"other"``) and the rest (service, method,
status) are kept, so per-service RED totals stay right while route detail is lost. Overflow
series do not count against the caps; their number is bounded by the distinct values of the
kept labels. The per-service share means one service's flood of routes folds only its own
routes: every other service keeps room for its own (as long as ``max_series`` is at least the
shares of the services that use it).

Label sets can be freed (:meth:`LabelBudget.release`, or :func:`expire_idle` for the ones no
record wrote for a TTL), and the room they took is admitted again. A counter or histogram
series freed that way and seen again later starts from zero: Prometheus reads that as a
counter reset, which ``rate()``/``increase()`` handle; in between, the series is absent from
/metrics (Prometheus marks it stale).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = ["LabelBudget", "expire_idle"]

Labels = tuple[str, ...]
_Key = tuple[tuple[str, ...], Labels]


class LabelBudget:
    """Admits label sets up to ``max_series`` (and ``max_series_per_service`` per value of the
    ``service_label`` label); later ones go to overflow series.

    ``admit`` runs on the reader thread and the properties on the scrape thread, so all state is
    behind one lock. Call ``admit`` once per distinct series in a batch, not once per event.
    """

    def __init__(self, max_series: int, overflow_label_values: Mapping[str, str],
                 max_series_per_service: int | None = None,
                 service_label: str = "service_name") -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be >= 1, got {max_series}")
        if max_series_per_service is not None and max_series_per_service < 1:
            raise ValueError(
                f"max_series_per_service must be >= 1 (or None for no share), got "
                f"{max_series_per_service}")
        if not overflow_label_values:
            raise ValueError(
                "overflow_label_values must name at least one label to fold, "
                "e.g. {'http_route': 'other'}"
            )
        self._max_series = max_series
        self._per_service = max_series_per_service
        self._service_label = service_label
        self._overflow_values = dict(overflow_label_values)
        self._admitted: set[_Key] = set()
        self._overflow_series: set[_Key] = set()
        self._by_service: Counter[str] = Counter()
        self._service_overflows: Counter[str] = Counter()
        self._overflows = 0
        self._released = 0
        self._generation = 0
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
    def max_series_per_service(self) -> int | None:
        return self._per_service

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

    @property
    def released(self) -> int:
        """Label sets freed so far (release / expire_idle)."""
        with self._lock:
            return self._released

    @property
    def generation(self) -> int:
        """Moves whenever a label set is freed: an answer of ``admit`` cached before may no
        longer be what it would answer (a freed label set is admitted anew, or takes the room
        another was folded for), and a series row cached for it may belong to another."""
        return self._generation

    def per_service(self) -> dict[str, tuple[int, int]]:
        """Per service: (label sets admitted and held, admit calls it folded)."""
        with self._lock:
            names = set(self._by_service) | set(self._service_overflows)
            return {s: (self._by_service[s], self._service_overflows[s]) for s in sorted(names)}

    def _service(self, labels: Labels, label_names: tuple[str, ...]) -> str | None:
        try:
            return labels[label_names.index(self._service_label)]
        except ValueError:
            return None

    def admit(self, labels: Labels, label_names: tuple[str, ...]) -> Labels:
        """The label values to record under: ``labels`` itself, or its overflow series."""
        if len(labels) != len(label_names):
            raise ValueError(
                f"got {len(labels)} label values for {len(label_names)} label names {label_names!r}"
            )
        # Keyed with the names too, so one budget can serve metrics with different label sets.
        key = (label_names, labels)
        service = self._service(labels, label_names)
        with self._lock:
            if key in self._admitted or key in self._overflow_series:
                return labels
            share_left = (self._per_service is None or service is None
                          or self._by_service[service] < self._per_service)
            if share_left and len(self._admitted) < self._max_series:
                self._admitted.add(key)
                if service is not None:
                    self._by_service[service] += 1
                return labels
            folded = self._fold(labels, label_names)
            if (label_names, folded) not in self._admitted:
                self._overflow_series.add((label_names, folded))
            self._overflows += 1
            if service is not None:
                self._service_overflows[service] += 1
            return folded

    def count_overflows(self, calls: int, service: str | None = None) -> None:
        """Count `calls` more ``admit`` calls of label sets it folded before, without them.

        A folded label set stays folded until :attr:`generation` moves, so a caller that
        remembers ``admit``'s answer for a label set (and drops what it remembers when the
        generation moves) can replay it; what a repeat changes is this count, once per call,
        exactly as ``admit`` would have.
        """
        with self._lock:
            self._overflows += calls
            if service is not None:
                self._service_overflows[service] += calls

    def release(self, labels: Labels, label_names: tuple[str, ...]) -> bool:
        """Free a label set (admitted or overflow): its room is admitted again."""
        key = (label_names, labels)
        with self._lock:
            if key in self._admitted:
                self._admitted.discard(key)
                service = self._service(labels, label_names)
                if service is not None:
                    self._by_service[service] -= 1
                    if not self._by_service[service]:
                        del self._by_service[service]
            elif key in self._overflow_series:
                self._overflow_series.discard(key)
            else:
                return False
            self._released += 1
            self._generation += 1
            return True

    def _fold(self, labels: Labels, label_names: tuple[str, ...]) -> Labels:
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


class _Series(Protocol):
    def idle(self, before: float) -> list[Labels]: ...
    def touched(self, labels: Labels) -> float | None: ...
    def remove(self, labels: Labels) -> bool: ...


def expire_idle(budget: LabelBudget, label_names: tuple[str, ...], series: Sequence[_Series],
                before: float) -> list[Labels]:
    """Drop the label sets no series in `series` wrote since `before` (the series' clock):
    from every one of them, and from the budget. Returns the label sets dropped.

    `series` are the metrics that share one label set per admit (e.g. a request's duration,
    request size and response size histograms): a label set written in any of them is live.
    The caller holds whatever lock guards the series, and drops its cached rows and admit
    answers afterwards (budget.generation has moved if anything was dropped).
    """
    candidates: set[Labels] = set()
    for s in series:
        candidates.update(s.idle(before))
    dropped = []
    for labels in sorted(candidates):
        last = [t for t in (s.touched(labels) for s in series) if t is not None]
        if last and max(last) >= before:
            continue
        for s in series:
            s.remove(labels)
        budget.release(labels, label_names)
        dropped.append(labels)
    return dropped
