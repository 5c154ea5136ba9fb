"""Exchange rows of every protocol -> connections -> RED series, the service graph and sinks.

    decode (l7/protocols/*, per protocol) -> memo (memo.py: connections, services, addresses)
      -> series (red.py) + graph (graph.py) -> collect (families at scrape time)

Rows come from the ring reader's thread; scrapes read copies taken under `lock`, so a big
scrape does not hold up the reader longer than the copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client.core import Metric

from probewire.aggregate.budget import LabelBudget
from probewire.aggregate.graph import ServiceGraph
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
from probewire.aggregate.red import RedSeries
from probewire.enrich.service import ServiceResolver
from probewire.l7.constants import Role
from probewire.l7.exchanges import NUMERIC_STATUSES, ExchangeBatch, ExchangeFlag, LabelTables

ExchangeSink = Callable[[ExchangeBatch], None]
# (row index, rpc service, rpc method, grpc status code) of a batch's gRPC calls.
RpcCall = tuple[int, str, str, str]


class ExchangePipeline:
    def __init__(self, services: ServiceResolver, max_series: int) -> None:
        self.services = services
        self.labels = LabelTables()
        self.memo = Memo()
        self.endpoints = Endpoints()
        self.connections = Connections(services, self.endpoints)
        self.red = RedSeries(max_series)
        self.graph = ServiceGraph(services, self.endpoints,
                                  LabelBudget(max_series, {"client": "other"}))
        self.lock = threading.Lock()
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
        if (self.memo.too_big() or self.labels.size() > MEMO_MAX
                or any(size() > MEMO_MAX for size in self.decoder_sizes)):
            self.memo = Memo()
            self.labels.reset()
        return self.labels

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
        duration_s = np.maximum(rows["end_ns"].astype(np.int64)
                                - rows["start_ns"].astype(np.int64), 0) / 1e9
        duration_bucket = self.red.sinks[0].duration.buckets(duration_s)
        eflags = rows["eflags"]
        status = rows["status"]
        failed = (((eflags & (ExchangeFlag.ABORTED | ExchangeFlag.ERROR)) != 0)
                  | ((status >= 500) & (status < NUMERIC_STATUSES)))
        is_server = rows["role"] == Role.SERVER
        local = at[:, LOCAL]
        with self.lock:
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

    def families(self) -> Iterator[Metric]:
        """RED and graph families from copies taken under the lock."""
        with self.lock:
            red = self.red.snapshot()
            graph = self.graph.totals()
        yield from red.families()
        del red
        yield from ServiceGraph.families(*graph)
