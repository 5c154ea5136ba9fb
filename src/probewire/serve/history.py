"""In-memory history for the UI: RED points per service over the last 15 minutes, and short-window
rates for services, routes and edges.

Memory is bounded: a fixed numpy ring per service (15 min / 5 s = 180 x 5 floats, ~7 KiB), at most
MAX_SERVICES services, and a few whole-counter samples covering RATE_WINDOW_S. Each counter key
(service, route, edge, service bucket) gets a column once; a sample is then one float64 array of
8 bytes a key (a dict of tuples per sample cost ~130 bytes a key: 36 MB at 1,000 services x 50
routes). Keys come and go (series expire, services exit): once there are MAX_COLUMNS columns,
the columns of keys absent from the newest snapshot are dropped (a key that returns starts from
zero, as its series did). A service whose ring got no point for HISTORY_S is dropped with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from probewire.serve.snapshot import Histogram, Snapshot, is_error_status, quantile

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 5.0
HISTORY_S = 15 * 60.0
MAX_SERVICES = 500
MAX_COLUMNS = 20_000
RATE_WINDOW_S = 60.0

Key = tuple[str | float, ...]
# Columns of a service's ring: unix time, requests/s, error ratio, p50 s, p99 s.
COLUMNS = ("time", "rate", "error_ratio", "p50_seconds", "p99_seconds")


def served(snap: Snapshot) -> Iterator[tuple[str, bool, Histogram]]:
    """(service, failed?, histogram) of everything a service served: HTTP requests, and the
    operations of a database or cache on this host."""
    for (svc, _m, status, _r), h in snap.server.items():
        yield svc, is_error_status(status), h
    for key, h in snap.db_server.items():
        yield key[0], bool(key[5]), h


def counters(snap: Snapshot) -> dict[Key, float]:
    """Every monotonic count a rate is shown for: per service (and its buckets by upper bound),
    per route, per edge."""
    out: dict[Key, float] = {}

    def add(key: Key, v: float) -> None:
        out[key] = out.get(key, 0.0) + v

    for svc, failed, h in served(snap):
        add(("svc", svc), h.count)
        for le, c in h.buckets.items():
            add(("svc_le", svc, le), c)
        if failed:
            add(("svc_err", svc), h.count)
    for (svc, method, status, route), h in snap.server.items():
        add(("route", svc, method, route), h.count)
        if is_error_status(status):
            add(("route_err", svc, method, route), h.count)
    for (client, server), e in snap.edges.items():
        add(("edge", client, server), e.requests)
        add(("edge_err", client, server), e.failed)
    return out


class _Ring:
    def __init__(self, points: int) -> None:
        self.points = points
        self.data = np.full((points, len(COLUMNS)), np.nan)
        self.next = 0
        self.filled = 0
        self.last_at = 0.0

    def append(self, row: tuple[float, ...]) -> None:
        self.last_at = row[0]
        self.data[self.next] = row
        self.next = (self.next + 1) % self.points
        self.filled = min(self.filled + 1, self.points)

    def rows(self) -> np.ndarray:
        if self.filled < self.points:
            return self.data[: self.filled]
        return np.concatenate([self.data[self.next:], self.data[: self.next]])


class History:
    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S,
                 started_at: float | None = None) -> None:
        self.interval_s = interval_s
        self.points = max(int(HISTORY_S / interval_s), 1)
        self._lock = threading.Lock()
        start = time.time() if started_at is None else started_at
        # Column of each counter key in the samples; keys are never dropped (their number is
        # bounded by the series budgets).
        self._columns: dict[Key, int] = {}
        # Whole-counter samples for windowed rates; the first is the agent's zero.
        self._samples: deque[tuple[float, np.ndarray]] = deque([(start, np.zeros(0))])
        self._rings: dict[str, _Ring] = {}
        self._prev: dict[str, tuple[float, float, list[tuple[float, float]]]] = {}
        self._prev_t = start
        self.dropped_services = 0
        self.dropped_columns = 0  # compactions' and shrinks' drops (evictions)
        self.expired_services = 0

    def add(self, snap: Snapshot) -> None:
        now = snap.taken_at
        current = counters(snap)
        per_service: dict[str, tuple[float, float, dict[float, float]]] = {}
        for svc, failed, h in served(snap):
            n, err, buckets = per_service.get(svc, (0.0, 0.0, {}))
            for le, c in h.buckets.items():
                buckets[le] = buckets.get(le, 0.0) + c
            per_service[svc] = (n + h.count, err + (h.count if failed else 0.0), buckets)
        with self._lock:
            if len(self._columns) + sum(k not in self._columns for k in current) > MAX_COLUMNS:
                self._compact(current)
            for svc in [s for s, r in self._rings.items() if r.last_at < now - HISTORY_S]:
                del self._rings[svc]
                self._prev.pop(svc, None)
                self.expired_services += 1
            columns = self._columns
            cols = np.fromiter((columns.setdefault(k, len(columns)) for k in current),
                               dtype=np.intp, count=len(current))
            values = np.zeros(len(columns))
            values[cols] = np.fromiter(current.values(), dtype=np.float64, count=len(current))
            self._samples.append((now, values))
            # Keep exactly one sample at or before the window start.
            while len(self._samples) > 2 and self._samples[1][0] <= now - RATE_WINDOW_S:
                self._samples.popleft()
            dt = max(now - self._prev_t, 1e-9)
            for svc, (n, err, buckets) in per_service.items():
                ring = self._rings.get(svc)
                if ring is None:
                    if len(self._rings) >= MAX_SERVICES:
                        self.dropped_services += 1
                        continue
                    ring = self._rings[svc] = _Ring(self.points)
                cum = sorted(buckets.items())
                pn, perr, pcum = self._prev.get(svc, (0.0, 0.0, []))
                prev = dict(pcum)
                delta = [(le, c - prev.get(le, 0.0)) for le, c in cum]
                dn, derr = n - pn, err - perr
                ring.append((
                    now, dn / dt, derr / dn if dn > 0 else 0.0,
                    _nan(quantile(0.5, delta)) if dn > 0 else np.nan,
                    _nan(quantile(0.99, delta)) if dn > 0 else np.nan,
                ))
                self._prev[svc] = (n, err, cum)
            self._prev_t = now

    def _compact(self, keep: Mapping[Key, float]) -> int:
        """Drop the columns of keys not in `keep` (under the lock); returns how many."""
        old = self._columns
        kept = [k for k in old if k in keep]
        at = np.fromiter((old[k] for k in kept), dtype=np.intp, count=len(kept))
        samples: deque[tuple[float, np.ndarray]] = deque()
        for t, values in self._samples:
            moved = np.zeros(len(kept))
            inside = at < len(values)
            moved[inside] = values[at[inside]]
            samples.append((t, moved))
        # A new dict, never the old one changed: a Window holds the map it was made with.
        self._columns = {k: i for i, k in enumerate(kept)}
        self._samples = samples
        dropped = len(old) - len(kept)
        self.dropped_columns += dropped
        return dropped

    @property
    def column_count(self) -> int:
        with self._lock:
            return len(self._columns)

    @property
    def sample_count(self) -> int:
        with self._lock:
            return len(self._samples)

    @property
    def service_count(self) -> int:
        with self._lock:
            return len(self._rings)

    def shrink(self) -> int:
        """Memory pressure: keep only the columns of the newest sample's keys and the window's
        first and last samples (rates stay right, over a coarser window for a while)."""
        with self._lock:
            if len(self._samples) > 2:
                first, last = self._samples[0], self._samples[-1]
                dropped = len(self._samples) - 2
                self._samples = deque([first, last])
            else:
                dropped = 0
            newest = self._samples[-1][1]
            live = {k: 0.0 for k, col in self._columns.items()
                    if col < len(newest) and newest[col] != 0.0}
            return dropped + self._compact(live)

    def window(self, snap: Snapshot) -> Window:
        """Deltas of every counter key over the last RATE_WINDOW_S (or since the agent started)."""
        with self._lock:
            base_t, base = self._samples[0]
            columns = self._columns
        # The column map only grows while it is in use (compaction makes a new one): reading
        # it unlocked sees each key either with its column or not yet there.
        return Window(counters(snap), base, columns, snap.taken_at - base_t)

    def series(self, service: str) -> dict[str, list[float | None]] | None:
        with self._lock:
            ring = self._rings.get(service)
            if ring is None:
                return None
            rows = ring.rows().copy()
        return {
            col: [None if np.isnan(v) else float(v) for v in rows[:, i]]
            for i, col in enumerate(COLUMNS)
        }

    def services(self) -> list[str]:
        with self._lock:
            return sorted(self._rings)


class Window:
    def __init__(self, current: dict[Key, float], base: np.ndarray, columns: Mapping[Key, int],
                 seconds: float) -> None:
        self.current = current
        self.base = base
        self.columns = columns
        self.seconds = seconds
        self._buckets: dict[str, list[tuple[float, float]]] | None = None

    def delta(self, key: Key) -> float:
        col = self.columns.get(key)
        # A key without a column in the base sample appeared after it: it started from zero.
        base = float(self.base[col]) if col is not None and col < len(self.base) else 0.0
        return max(self.current.get(key, 0.0) - base, 0.0)

    def rate(self, key: Key) -> float:
        return self.delta(key) / self.seconds if self.seconds > 0 else 0.0

    def service_quantile(self, service: str, q: float) -> float | None:
        if self._buckets is None:
            self._buckets = {}
            for k in self.current:
                if k[0] == "svc_le":
                    self._buckets.setdefault(str(k[1]), []).append((float(k[2]), self.delta(k)))
            for cum in self._buckets.values():
                cum.sort()
        return quantile(q, self._buckets.get(service, []))


def _nan(v: float | None) -> float:
    return np.nan if v is None else v


class Sampler:
    """Feeds a History from snapshots every SAMPLE_INTERVAL_S on a daemon thread."""

    def __init__(self, history: History, take: Callable[[], Snapshot]) -> None:
        self.history = history
        self.take = take
        self.interval_s = history.interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.history.add(self.take())
            except Exception:  # a failed reading must not end the history
                log.exception("history sample failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="probewire-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
