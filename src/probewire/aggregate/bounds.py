"""Bounded memory bookkeeping: every cache and table the agent keeps in user space registers its
name, its current size, its documented bound and how it stays within it, so /metrics shows the
user-space side next to the kernel maps' ``probewire_map_entries``:

- ``probewire_userspace_entries{structure}`` and ``probewire_userspace_max_entries{structure}``
  (absent for a structure bounded by time rather than by count; its policy says how);
- ``probewire_userspace_evictions_total{structure}``: entries it let go to stay in its bound;
- ``probewire_userspace_shrunk_entries_total{structure}``: entries dropped under memory
  pressure (:meth:`Bounds.shrink`, called by the memory guard, runtime/memory.py).

A structure that can be rebuilt (a cache of deterministic answers) or whose loss can be counted
(a queue whose drops are counted) registers a ``shrink`` callable; one that cannot, does not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from probewire.aggregate.routes import RouteTemplater

__all__ = ["BoundRow", "Bounds", "Structure", "register_templater"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Structure:
    name: str
    bound: int | None  # the documented maximum of entries; None: bounded by time (see policy)
    policy: str  # how it stays within the bound, in a few words
    size: Callable[[], int]
    shrink: Callable[[], int] | None = None  # drop what it can; returns entries dropped
    evictions: Callable[[], int] | None = None


@dataclass(frozen=True, slots=True)
class BoundRow:
    structure: str
    entries: int
    bound: int | None
    policy: str
    evictions: int
    shrunk: int


class Bounds:
    """The registry. Safe to use from any thread; a structure's callables must be too."""

    def __init__(self) -> None:
        self._structures: dict[str, Structure] = {}
        self._shrunk: dict[str, int] = {}
        self._lock = threading.Lock()

    def register(self, name: str, *, bound: int | None, policy: str, size: Callable[[], int],
                 shrink: Callable[[], int] | None = None,
                 evictions: Callable[[], int] | None = None) -> None:
        """Add (or replace) a structure."""
        if bound is not None and bound < 0:
            raise ValueError(f"bound of {name} must be >= 0 or None, got {bound}")
        with self._lock:
            self._structures[name] = Structure(name, bound, policy, size, shrink, evictions)
            self._shrunk.setdefault(name, 0)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._structures.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._structures)

    def rows(self) -> list[BoundRow]:
        with self._lock:
            structures = sorted(self._structures.values(), key=lambda s: s.name)
            shrunk = dict(self._shrunk)
        out = []
        for s in structures:
            try:
                entries = int(s.size())
                evictions = int(s.evictions()) if s.evictions is not None else 0
            except Exception:  # one broken reader must not hide the others
                log.exception("reading the size of %s failed", s.name)
                continue
            out.append(BoundRow(s.name, entries, s.bound, s.policy, evictions,
                                shrunk.get(s.name, 0)))
        return out

    def shrink(self) -> dict[str, int]:
        """Ask every structure that can to drop what it can; returns entries dropped by name."""
        with self._lock:
            structures = [s for s in self._structures.values() if s.shrink is not None]
        dropped: dict[str, int] = {}
        for s in structures:
            assert s.shrink is not None
            try:
                dropped[s.name] = int(s.shrink())
            except Exception:
                log.exception("shrinking %s failed", s.name)
        with self._lock:
            for name, n in dropped.items():
                self._shrunk[name] = self._shrunk.get(name, 0) + n
        return dropped

    def collect(self) -> Iterable[Metric]:
        entries = GaugeMetricFamily(
            "probewire_userspace_entries",
            "Entries in a user-space cache or table of the agent.", labels=["structure"])
        capacity = GaugeMetricFamily(
            "probewire_userspace_max_entries",
            "Documented bound of a user-space cache or table (absent: bounded by time).",
            labels=["structure"])
        evictions = CounterMetricFamily(
            "probewire_userspace_evictions",
            "Entries a user-space structure let go to stay within its bound.",
            labels=["structure"])
        shrunk = CounterMetricFamily(
            "probewire_userspace_shrunk_entries",
            "Entries dropped under memory pressure (the memory guard asked).",
            labels=["structure"])
        for row in self.rows():
            entries.add_metric([row.structure], row.entries)
            if row.bound is not None:
                capacity.add_metric([row.structure], row.bound)
            evictions.add_metric([row.structure], row.evictions)
            shrunk.add_metric([row.structure], row.shrunk)
        yield from (entries, capacity, evictions, shrunk)


def register_templater(bounds: Bounds, templater: RouteTemplater, prefix: str = "http") -> None:
    """The route cache and the learner's state: a family holding a templater calls this from
    its register_bounds."""
    bounds.register(
        f"{prefix}.route_cache", bound=templater.cache_size, policy="LRU of raw paths",
        size=lambda: templater.cached_paths, shrink=templater.clear_cache,
        evictions=lambda: templater.evictions)
    learner = templater.learner
    if learner is not None:
        bounds.register(
            f"{prefix}.route_learner", bound=learner.max_nodes,
            policy="per service a capped set of values per position; a value beyond the node "
            "cap collapses its position; idle services forgotten after the series TTL",
            size=lambda: learner.nodes, shrink=learner.shrink,
            evictions=lambda: learner.collapses)
