"""Exchange rows of every protocol -> connections -> RED series, the service graph and sinks.

    decode (l7/protocols/*, per protocol) -> memo (memo.py: connections, services, addresses)
      -> series (red.py) + graph (graph.py) -> collect (families at scrape time)

Rows come from the ring reader's thread; scrapes read copies taken under `lock`, so a big
scrape does not hold up the reader longer than the copy.

Bounds: every metric has a label budget, in all and per service (budget.py); HTTP routes are
learned per service (routes.py RouteLearner) between the memo and the series, so a service
whose paths carry parameters the heuristics missed ends up with templates; with a series TTL,
label sets no exchange wrote for that long are dropped with their room (`expire`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client.core import Metric

from probewire.aggregate.budget import LabelBudget, expire_idle
from probewire.aggregate.graph import EDGE_LABELS, ServiceGraph
from probewire.aggregate.memo import (
    BATCH_MAX,
    LOCAL,
    MEMO_MAX,
    PEER,
    PEER_SVC,
    PUT,
    SVC,
    Connections,
    Endpoints,
    Memo,
)
from probewire.aggregate.red import RPC_LABELS, RedSeries
from probewire.aggregate.routes import RouteLearner
from probewire.aggregate.series import HistogramSeries
from probewire.enrich.service import ServiceResolver
from probewire.l7.constants import Proto, Role
from probewire.l7.exchanges import NUMERIC_STATUSES, ExchangeBatch, ExchangeFlag, LabelTables

# As plain ints: numpy probes an enum member for array protocols (~1 µs a use, per batch).
_SERVER, _HTTP, _HTTP2 = int(Role.SERVER), int(Proto.HTTP), int(Proto.HTTP2)
_FAILED_FLAGS = int(ExchangeFlag.ABORTED | ExchangeFlag.ERROR)

ExchangeSink = Callable[[ExchangeBatch], None]
# Route learning looks rows up one by one up to this many HTTP rows a batch; past it, the
# sort that finds the distinct ones costs less than a look-up a row.
LEARN_BY_ROW_MAX = 1024


def names_of(memo: Memo, service_ids: np.ndarray) -> list[str]:
    names = memo.service_names
    return [names[i] for i in service_ids.tolist()]
# (row index, rpc service, rpc method, grpc status code) of a batch's gRPC calls.
RpcCall = tuple[int, str, str, str]


class ExchangePipeline:
    def __init__(self, services: ServiceResolver, max_series: int,
                 max_series_per_service: int | None = None,
                 learner: RouteLearner | None = None, series_ttl_s: float = 0.0) -> None:
        self.services = services
        self.labels = LabelTables()
        self.memo = Memo()
        self.endpoints = Endpoints()
        self.connections = Connections(services, self.endpoints)
        self.red = RedSeries(max_series, max_series_per_service)
        # An edge's service is its server: one server's flood of remote clients folds only
        # its own clients.
        self.graph = ServiceGraph(services, self.endpoints,
                                  LabelBudget(max_series, {"client": "other"},
                                              max_series_per_service, service_label="server"))
        self.lock = threading.Lock()
        # Route learning: (service id << 32 | heuristic route id) -> learned route id, as of
        # (memo, its names, label tables, learner generation); and by name for kernel counts.
        self.learner = learner
        self._learned: dict[int, int] = {}
        self._learned_names: dict[tuple[str, str], str] = {}
        self._learned_as_of: tuple[int, ...] = ()
        self._names_as_of = 0
        self._touched_at = 0.0  # when services that sent routes last told the learner
        # Series TTL: swept every quarter TTL (at least every second), by whichever thread
        # (reader or scrape) comes first; `expired` counts label sets dropped.
        self.series_ttl_s = series_ttl_s
        self._swept_at = HistogramSeries.clock()
        self.expired = 0
        self._names_stale = False  # label sets were freed: memo answers built on them go
        self._drop_memo = False  # the memory guard asked: start afresh at the next batch
        # Called after each batch with its rows and their strings (e.g. the OTLP span
        # exporter, the events feed).
        self.sinks: list[ExchangeSink] = []
        # Sizes of what decoders keep per label id (they start afresh with the labels).
        self.decoder_sizes: list[Callable[[], int]] = []
        self.rows = 0

    def budgets(self) -> list[tuple[str, LabelBudget]]:
        return [*self.red.budgets(), ("traces_service_graph_request", self.graph.budget)]

    def start_batch(self) -> LabelTables:
        """Call before decoding a batch: past their bounds the memo and the label ids start
        afresh (before, not after, so the batch's ids stay valid)."""
        if (self._drop_memo or self.memo.too_big() or self.labels.size() > MEMO_MAX
                or any(size() > MEMO_MAX for size in self.decoder_sizes)):
            self._drop_memo = False
            self.memo = Memo()
            self.labels.reset()
        return self.labels

    def memo_size(self) -> int:
        """Entries of the memo's largest table (bounded by MEMO_MAX)."""
        return max(self.memo.size(), self.labels.size(),
                   *(size() for size in self.decoder_sizes))

    def shrink(self) -> int:
        """Memory pressure: the memo and label ids start afresh at the next batch (on the
        reader thread, which owns them). Everything in them is rebuilt from the next rows."""
        self._drop_memo = True
        with self.lock:
            dropped = len(self._learned) + len(self._learned_names)
            self._learned_names = {}
        return self.memo_size() + dropped

    def add(self, rows: np.ndarray, http: np.ndarray | None = None,
            http_index: np.ndarray | None = None,
            attributes: Sequence[dict[str, Any]] | None = None,
            rpc: Sequence[RpcCall] = ()) -> None:
        """Aggregate a batch of EXCHANGE rows (decoded after `start_batch`)."""
        n = len(rows)
        if not n:
            return
        if n > BATCH_MAX:
            for start in range(0, n, BATCH_MAX):
                part = slice(start, start + BATCH_MAX)
                self.add(rows[part], http, http_index[part] if http_index is not None else None,
                         attributes[part] if attributes else None,
                         [(i - start, svc, method, code) for i, svc, method, code in rpc
                          if start <= i < start + BATCH_MAX])
            return
        memo = self.memo
        conn = self.connections.ids(memo, rows)
        at = memo.conns.take(conn, axis=0)
        self.connections.check_services(memo, at[:, SVC: PEER_SVC + 1])
        memo = self.memo  # (unchanged: check_services drops names within it)
        if self.learner is not None:
            self._learn_routes(memo, rows, at[:, SVC])
        duration_s = np.maximum(rows["end_ns"].astype(np.int64)
                                - rows["start_ns"].astype(np.int64), 0) / 1e9
        duration_bucket = self.red.sinks[0].duration.buckets(duration_s)
        eflags = rows["eflags"]
        status = rows["status"]
        failed = (((eflags & _FAILED_FLAGS) != 0)
                  | ((status >= 500) & (status < NUMERIC_STATUSES)))
        is_server = rows["role"] == _SERVER
        local = at[:, LOCAL]
        with self.lock:
            if self._names_stale:
                self._names_stale = False
                memo.drop_names()
            self.rows += n
            self.connections.add_local_addresses(memo, local)
            lport = rows["lport"].astype(np.int64)
            self.connections.put_endpoints(memo, is_server,
                                           at[:, PUT] + np.where(is_server, 0, lport << 8))
            self.red.add(memo, self.labels, at, rows, duration_s, duration_bucket)
            self.graph.add(memo, conn, at, rows, failed, duration_s, duration_bucket)
            for i, rpc_service, rpc_method, code in rpc:
                self.red.observe_rpc(int(rows["role"][i]), memo.service_names[int(at[i, SVC])],
                                     rpc_service, rpc_method, code, float(duration_s[i]))
        if self.series_ttl_s:
            self.expire()
        if self.sinks:
            services, addresses, labels = memo.service_names, memo.address_names, self.labels
            batch = ExchangeBatch(
                rows=rows,
                service=[services[i] for i in at[:, SVC].tolist()],
                operation=[labels.ops[i] for i in rows["op"].tolist()],
                target=[labels.targets[i] for i in rows["target"].tolist()],
                status=[labels.status_name(i) for i in status.tolist()],
                peer_address=[addresses[i] for i in at[:, PEER].tolist()],
                local_address=[addresses[i] for i in local.tolist()],
                http=http,
                http_index=http_index,
                attributes=list(attributes) if attributes else [{} for _ in range(n)],
            )
            for sink in self.sinks:
                sink(batch)

    # --- route learning ---------------------------------------------------------------------------
    def _learn_routes(self, memo: Memo, rows: np.ndarray, svc: np.ndarray) -> None:
        """HTTP rows' targets (heuristic routes) as their service learned them, in place.

        The learner sees each (service, route) of a batch once, in the order they first
        appear, and every row gets the answer as of the end of the batch (a collapse half-way
        through re-asks the rest); answers are memoised until the learner's generation moves.
        """
        learner = self.learner
        assert learner is not None
        http = np.flatnonzero((rows["proto"] == _HTTP) | (rows["proto"] == _HTTP2))
        if not len(http):
            return
        as_of = (id(memo), memo.names_epoch, self.labels.generation, learner.generation)
        if as_of != self._learned_as_of:
            self._learned = {}
        key = svc[http].astype(np.int64) << 32 | rows["target"][http].astype(np.int64)
        learned = self._learned
        # Steady state: every row's (service, route) answered already. In small batches a
        # dict look-up a row costs less than the sort that finds the distinct ones (~15 µs
        # at 128 rows).
        known = ([learned.get(k, -1) for k in key.tolist()] if len(key) <= LEARN_BY_ROW_MAX
                 else [-1])
        if -1 not in known:
            self._learned_as_of = as_of
            rows["target"][http] = known
            self._touch_learner(memo, svc[http])
            return
        uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        keys = uniq.tolist()
        out = [learned.get(k, -1) for k in keys]
        if -1 in out:
            labels, names = self.labels, memo.service_names
            for j in np.argsort(first, kind="stable").tolist():
                if out[j] < 0:
                    k = keys[j]
                    route = labels.targets[k & 0xFFFFFFFF]
                    out[j] = labels.target(learner.learn(names[k >> 32], route))
            seen = as_of[3]
            while learner.generation != seen:
                # A collapse: what was answered before it may have changed (and learning the
                # new forms may collapse a position below, so until nothing moves).
                seen = learner.generation
                learned.clear()
                for j, k in enumerate(keys):
                    route = labels.targets[k & 0xFFFFFFFF]
                    out[j] = labels.target(learner.learn(names[k >> 32], route))
            learned.update(zip(keys, out, strict=True))
            as_of = (*as_of[:3], learner.generation)
        self._learned_as_of = as_of
        rows["target"][http] = np.asarray(out, dtype=np.int64)[inverse.reshape(-1)]
        self._touch_learner(memo, svc[http])

    def _touch_learner(self, memo: Memo, svc: np.ndarray) -> None:
        """Services whose routes are all memoised here still use what they learned: say so
        to the learner, once a second."""
        now = time.monotonic()
        if self.learner is not None and now - self._touched_at >= 1.0:
            self._touched_at = now
            self.learner.touch(names_of(memo, np.unique(svc)))

    def learned_route(self, service: str, route: str) -> str:
        """A heuristic route as `service` learned it (for counts kept by route name)."""
        if self.learner is None:
            return route
        if self._names_as_of != self.learner.generation:
            self._names_as_of = self.learner.generation
            self._learned_names = {}
        key = (service, route)
        found = self._learned_names.get(key)
        if found is None:
            found = self.learner.learn(service, route)
            if len(self._learned_names) >= MEMO_MAX:
                self._learned_names = {}
            self._learned_names[key] = found
        else:
            self.learner.touch((service,))
        return found

    # --- series TTL -------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> int:
        """Drop the label sets no exchange wrote for the TTL (when a sweep is due); returns how
        many. Every memo answer built on them goes too (the budgets' generations moved)."""
        ttl = self.series_ttl_s
        now = HistogramSeries.clock() if now is None else now  # the series' clock
        if ttl <= 0 or now - self._swept_at < max(ttl / 4, 1.0):
            return 0
        self._swept_at = now
        before = now - ttl
        with self.lock:
            dropped = 0
            for sink in self.red.sinks:
                series = [s for s in (sink.duration, sink.req, sink.resp) if s is not None]
                dropped += len(expire_idle(sink.budget, sink.labels, series, before))
            red = self.red
            dropped += len(expire_idle(red.rpc_server_budget, RPC_LABELS, [red.rpc_server],
                                       before))
            dropped += len(expire_idle(red.rpc_client_budget, RPC_LABELS, [red.rpc_client],
                                       before))
            for labels in red.aborted.idle(before):
                red.aborted.remove(labels)
            graph = self.graph
            dropped += len(expire_idle(
                graph.budget, EDGE_LABELS,
                [graph.server_seconds, graph.server_total, graph.server_failed], before))
            dropped += graph.expire_clients(before)
            if self.learner is not None:
                self.learner.forget_idle(before)
            if dropped:
                # The memo belongs to the reader thread: it drops what it built on the freed
                # label sets at its next batch, under this lock, before using any of it.
                self.expired += dropped
                self._names_stale = True
                self._learned_names = {}
        return dropped

    def families(self) -> Iterator[Metric]:
        """RED and graph families from copies taken under the lock."""
        self.expire()
        with self.lock:
            red = self.red.snapshot()
            graph = self.graph.totals()
        yield from red.families()
        del red
        yield from ServiceGraph.families(*graph)
