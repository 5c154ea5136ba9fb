"""The service graph: traces_service_graph_request_total{client,server,connection_type} and
friends (the names Tempo's and Beyla's service graphs use), from exchange rows.

An edge is counted once: by its client when the client runs on this host (its rows), else by
its server (a remote client, named by its address). Client-side edges keep the server's
endpoint until scrape time, when the server side (seen in its own rows) can name it: a
database or cache on this host shows up under its service name, one elsewhere as
address:port. Edges to databases and caches carry connection_type="database".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.core import Metric

from probewire.aggregate.budget import LabelBudget
from probewire.aggregate.ids import Column, distinct
from probewire.aggregate.memo import (
    CLIENT_EDGE,
    PEER,
    PEER_SVC,
    SERVER_EDGE,
    SVC,
    Endpoints,
    Memo,
)
from probewire.aggregate.series import CounterSeries, HistogramSeries
from probewire.enrich.service import ServiceResolver
from probewire.l7.constants import Role
from probewire.l7.records import DURATION_BUCKETS
from probewire.l7.registry import protocol_by_id

EDGE_LABELS = ("client", "server", "connection_type")
# As plain ints: numpy probes an enum member for array protocols (~1 µs a use, per batch).
_CLIENT, _SERVER = int(Role.CLIENT), int(Role.SERVER)


def connection_type(proto: int) -> str:
    """Tempo's connection_type of an edge of this protocol ("" for plain service calls)."""
    return "database" if protocol_by_id(proto).kind == "db" else ""


@dataclass
class ServiceGraph:
    services: ServiceResolver
    endpoints: Endpoints
    budget: LabelBudget
    # Client side: (client service, server endpoint, connection type) -> [total, failed].
    client_total: dict[tuple[str, tuple[str, int], str], list[float]] = field(
        default_factory=dict)
    client_seconds: HistogramSeries = field(
        default_factory=lambda: HistogramSeries(DURATION_BUCKETS))
    server_total: CounterSeries = field(default_factory=CounterSeries)
    server_failed: CounterSeries = field(default_factory=CounterSeries)
    server_seconds: HistogramSeries = field(
        default_factory=lambda: HistogramSeries(DURATION_BUCKETS))

    # --- the record path ------------------------------------------------------------------------
    def add(self, memo: Memo, conn: np.ndarray, at: np.ndarray, rows: np.ndarray,
            failed: np.ndarray, duration_s: np.ndarray, duration_bucket: np.ndarray) -> None:
        """Edges of a batch: per-connection memo, then whole-array adds."""
        services = memo.service_names
        role = rows["role"]
        client = (role == _CLIENT).nonzero()[0]
        if len(client):
            # Client side: kept by server endpoint until a scrape can name it.
            edge = at[client, CLIENT_EDGE]
            memo.client_edge_row.ensure(len(memo.client_edges))
            edge_rows = memo.client_edge_row.data[edge]
            if edge_rows.min() < 0:
                for e in distinct(edge[edge_rows < 0]):
                    proto, svc, endpoint = memo.client_edges[e]
                    peer, port = memo.endpoints[endpoint]
                    while len(memo.client_edge_total) <= e:
                        memo.client_edge_total.append(None)
                    ctype = connection_type(proto)
                    memo.client_edge_total[e] = (services[svc], (peer, port), ctype)
                    memo.client_edge_row[e] = self.client_seconds.slot(
                        (services[svc], f"{peer}:{port}", ctype))
                edge_rows = memo.client_edge_row.data[edge]
            counts = np.bincount(edge)
            ids = counts.nonzero()[0]
            bad = np.bincount(edge, weights=failed[client], minlength=len(counts))[ids].tolist()
            for e, n, nbad in zip(ids.tolist(), counts[ids].tolist(), bad, strict=True):
                total_key = memo.client_edge_total[e]
                assert total_key is not None
                totals = self.client_total.setdefault(total_key, [0.0, 0.0])
                totals[0] += float(n)
                totals[1] += float(nbad)
            self.client_seconds.add(edge_rows, duration_s[client], duration_bucket[client])
        server = (role == _SERVER).nonzero()[0]
        if not len(server):
            return
        # Server side: a client on this host has its own rows (and counts the edge); a
        # remote client is named by its address. Per connection its edge is worked out once,
        # but for a local client the kernel did not name: that one goes by its port, as the
        # client side last said.
        sconn = conn[server]
        # Not from `at`: a changed name or locality has dropped edges since it was read.
        edge = memo.conns[sconn, SERVER_EDGE]
        existing = len(memo.server_edge_labels)
        if edge.min() < 0:
            client_port = rows["rport"][server]
            proto = rows["proto"][server]
            # Row by row, in order: a new (client, server) pair is admitted when first seen.
            for i in (edge < 0).nonzero()[0].tolist():
                c = int(sconn[i])
                known = int(memo.conns[c, SERVER_EDGE])
                edge[i] = known if known >= 0 else self._server_edge(
                    memo, c, int(client_port[i]), int(proto[i]))
        table = memo.server_edges.take(edge, axis=0)
        if memo.server_edge_folded:
            again = (table[:, 3] != 0) & (edge < existing)
            if again.any():
                for e in distinct(edge[again]):
                    # (A folded edge keeps its server: the share's service.)
                    self.budget.count_overflows(1, memo.server_edge_labels[e][1])
        far = table[:, 1] >= 0
        self.server_total.add_rows(table[far, 1])
        bad = far & failed[server]
        if bad.any():
            bad_rows = table[bad, 2]
            if bad_rows.min() < 0:
                for e in distinct(edge[bad][bad_rows < 0]):
                    memo.server_edges[e, 2] = self.server_failed.slot(
                        memo.server_edge_labels[e])
                bad_rows = memo.server_edges[edge[bad], 2]
            self.server_failed.add_rows(bad_rows)
        self.server_seconds.add(table[:, 0], duration_s[server], duration_bucket[server])

    def _server_edge(self, memo: Memo, conn: int, client_port: int, proto: int) -> int:
        """The server edge of a row of a connection (remembered for the connection, unless
        its client is a local one named by its port: -3 then, worked out per row)."""
        svc, peer_svc, peer = (int(v) for v in memo.conns[conn, SVC: PEER + 1])
        assert SVC + 1 == PEER_SVC
        keep = True
        if peer_svc:
            name, remote = memo.service_names[peer_svc], False
        elif memo.address_local.data[peer]:
            address = memo.address_names[peer]
            found = self.endpoints.clients.get((address, client_port))
            name, remote, keep = found or "unknown", False, False
        else:
            name, remote = memo.address_names[peer], True
        ctype = connection_type(proto)
        key = (svc, memo.name_ids.setdefault(name, len(memo.name_ids)), int(remote), ctype)
        edge = memo.server_edge_ids.get(key)
        if edge is None:
            # A new (client, server) label set: this batch's admit call.
            base = (name, memo.service_names[svc], ctype)
            labels = self.budget.admit(base, EDGE_LABELS)
            edge = memo.server_edge_ids[key] = len(memo.server_edge_labels)
            memo.server_edge_labels.append(labels)
            if edge == len(memo.server_edges):
                memo.server_edges = np.concatenate(
                    [memo.server_edges, np.zeros_like(memo.server_edges)])
            folded = labels != base
            memo.server_edges[edge] = (self.server_seconds.slot(labels),
                                       self.server_total.slot(labels) if remote else -1,
                                       -1, folded)
            memo.server_edge_folded |= folded
        memo.conns[conn, SERVER_EDGE] = edge if keep else -3
        return edge

    def client_name(self, peer: str, peer_tgid: int) -> tuple[str, bool]:
        """(client name, is it on this host) for the far end of a server's connection: the
        kernel names a local client's process; a remote client is named by its address."""
        if peer_tgid:
            return self.services.name_for(peer_tgid), True
        if peer in self.endpoints.local_addresses:
            return "unknown", True
        return peer, False

    # --- kernel aggregates ----------------------------------------------------------------------
    def merge_server(self, client: str, service: str, remote: bool, ctype: str, count: float,
                     failed: float, duration: np.ndarray, seconds: float) -> None:
        labels = self.budget.admit((client, service, ctype), EDGE_LABELS)
        if remote:
            self.server_total.add(labels, count)
            if failed:
                self.server_failed.add(labels, failed)
        self.server_seconds.merge(labels, duration, seconds)

    def merge_client(self, service: str, peer: str, port: int, ctype: str, count: float,
                     failed: float, duration: np.ndarray, seconds: float) -> None:
        totals = self.client_total.setdefault((service, (peer, port), ctype), [0.0, 0.0])
        totals[0] += count
        totals[1] += failed
        self.client_seconds.merge((service, f"{peer}:{port}", ctype), duration, seconds)

    # --- series TTL -------------------------------------------------------------------------------
    def expire_clients(self, before: float) -> int:
        """Drop client-side edges no exchange wrote since `before` (their server-side names
        are admitted at scrape time: those go from the budget too). The caller holds the
        pipeline's lock and drops the memo's names afterwards."""
        idle = self.client_seconds.idle(before)
        for key in idle:
            client, peer, ctype = key
            host, _, port = peer.rpartition(":")
            self.client_seconds.remove(key)
            self.client_total.pop((client, (host, int(port)), ctype), None)
            labels = (client, self.endpoints.server_name((host, int(port))), ctype)
            if self.server_seconds.touched(labels) is None:
                self.budget.release(labels, EDGE_LABELS)
        return len(idle)

    # --- export ---------------------------------------------------------------------------------
    def totals(self) -> tuple[CounterSeries, CounterSeries, HistogramSeries, HistogramSeries]:
        """(total, failed, client seconds, server seconds) with client-side edges named by
        their server (under the lock: the server side may have named an endpoint since the
        edge was counted)."""
        total = CounterSeries()
        failed = CounterSeries()
        for (client, endpoint, ctype), (n, nf) in self.client_total.items():
            labels = self.budget.admit((client, self.endpoints.server_name(endpoint), ctype),
                                       EDGE_LABELS)
            total.add(labels, n)
            if nf:
                failed.add(labels, nf)
        for labels, v in self.server_total.values.items():
            total.add(labels, v)
        for labels, v in self.server_failed.values.items():
            failed.add(labels, v)
        client_seconds = HistogramSeries(DURATION_BUCKETS)
        sums = self.client_seconds.sums
        for key, counts in self.client_seconds.counts.items():
            client, peer, ctype = key
            host, _, port = peer.rpartition(":")
            labels = self.budget.admit(
                (client, self.endpoints.server_name((host, int(port))), ctype), EDGE_LABELS)
            client_seconds.merge(labels, counts, sums[key])
        return total, failed, client_seconds, self.server_seconds.snapshot()

    @staticmethod
    def families(total: CounterSeries, failed: CounterSeries, client_seconds: HistogramSeries,
                 server_seconds: HistogramSeries) -> Iterator[Metric]:
        yield total.family("traces_service_graph_request", "Requests between two services.",
                           EDGE_LABELS)
        yield failed.family("traces_service_graph_request_failed",
                            "Failed requests (5xx, errors or aborted) between two services.",
                            EDGE_LABELS)
        yield server_seconds.family(
            "traces_service_graph_request_server_seconds",
            "Server-side duration of requests between two services.", EDGE_LABELS)
        yield client_seconds.family(
            "traces_service_graph_request_client_seconds",
            "Client-side duration of requests between two services.", EDGE_LABELS)


__all__ = ["EDGE_LABELS", "Column", "ServiceGraph", "connection_type"]
