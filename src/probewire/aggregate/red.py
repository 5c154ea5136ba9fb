"""The RED stage: exchange rows -> rate/error/duration series, per protocol kind.

A row's label set is its connection's class (protocol, role, service, and for a client its
server endpoint: a server's clients, one ephemeral port each, do not split its series), its
flags (aborted, TLS, gRPC), operation, status and target, packed in one int64. The memo's
entry for a key holds what the budget said and its series rows, so a batch of known label
sets is a handful of whole-array adds. A new label set is labelled by its protocol's kind:

  http  http_{server,client}_request_duration_seconds (+ body sizes), probewire_http_aborted
  db    db_client_operation_duration_seconds, db_server_operation_duration_seconds
  dns   dns_lookup_duration_seconds (client side)
  rpc   rpc_{server,client}_duration_seconds (gRPC calls, observed one by one)

Every metric has a label budget (aggregate/budget.py), in all and per service: past it, label
sets fold into an "other" series and the overflow is counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import Metric

from probewire.aggregate.budget import LabelBudget
from probewire.aggregate.ids import first_rows
from probewire.aggregate.memo import ABORTED, CLASS, FOLDED, SKIPPED, Memo
from probewire.aggregate.series import CounterSeries, HistogramSeries
from probewire.l7.constants import L7Flag, Role
from probewire.l7.exchanges import ExchangeFlag, LabelTables, split_db_target
from probewire.l7.records import DURATION_BUCKETS, SIZE_BUCKETS
from probewire.l7.registry import protocol_by_id

HTTP_SERVER_LABELS = ("service_name", "http_request_method", "http_response_status_code",
                      "http_route", "url_scheme")
HTTP_CLIENT_LABELS = (*HTTP_SERVER_LABELS, "server_address", "server_port")
DB_SERVER_LABELS = ("service_name", "db_system_name", "db_operation_name", "db_collection_name",
                    "db_namespace", "error_type", "db_response_status_code")
DB_CLIENT_LABELS = (*DB_SERVER_LABELS, "server_address", "server_port")
DNS_LABELS = ("service_name", "dns_question_name", "dns_question_type", "error_type")
RPC_LABELS = ("service_name", "rpc_system", "rpc_service", "rpc_method", "rpc_grpc_status_code")
OVERFLOW = "other"
UNKNOWN = "unknown"

# Sinks, by index in RedSeries.sinks.
HTTP_SERVER, HTTP_CLIENT, DB_CLIENT, DB_SERVER, DNS = range(5)
# The flags that split series, as 3 bits: aborted, TLS, gRPC (pipelined and HTTP/2 rows share).
_TLS_BIT = 2
# As plain ints: numpy probes an enum member for array protocols (~1 µs a use, per batch).
_SPLIT_FLAGS = int(ExchangeFlag.ABORTED | ExchangeFlag.GRPC)
_TLS_FLAG = int(L7Flag.TLS)


def flag_code(eflags: np.ndarray, flags: np.ndarray) -> np.ndarray:
    code: np.ndarray = ((eflags.astype(np.int64) & _SPLIT_FLAGS)
                        | (flags.astype(np.int64) & _TLS_FLAG) * _TLS_BIT)
    return code


def series_keys(code: np.ndarray, op: np.ndarray, status: np.ndarray, target: np.ndarray,
                cls: np.ndarray) -> np.ndarray:
    key: np.ndarray = (code | op.astype(np.int64) << 3 | status.astype(np.int64) << 12
                       | target.astype(np.int64) << 24 | cls << 43)
    return key


def error_of(status: str, aborted: bool) -> tuple[str, str]:
    """(status code, error type) of a non-HTTP row's status text ("code" or "code\\0type")."""
    code, _, kind = status.partition("\0")
    if aborted and not kind:
        kind = "aborted"
    return code, kind or code


@dataclass
class Sink:
    """One RED metric family group: its budget and its series."""

    metric: str
    labels: tuple[str, ...]
    budget: LabelBudget
    duration: HistogramSeries
    req: HistogramSeries | None = None
    resp: HistogramSeries | None = None


class RedSeries:
    def __init__(self, max_series: int, max_series_per_service: int | None = None) -> None:
        def budget(fold: dict[str, str]) -> LabelBudget:
            return LabelBudget(max_series, fold, max_series_per_service)

        def sink(metric: str, labels: tuple[str, ...], fold: dict[str, str],
                 sizes: tuple[bool, bool] = (False, False)) -> Sink:
            return Sink(metric, labels, budget(fold),
                        HistogramSeries(DURATION_BUCKETS),
                        HistogramSeries(SIZE_BUCKETS) if sizes[0] else None,
                        HistogramSeries(SIZE_BUCKETS) if sizes[1] else None)

        route = {"http_route": OVERFLOW}
        db = {"db_operation_name": OVERFLOW, "db_collection_name": OVERFLOW}
        self.sinks = [
            sink("http_server_request_duration_seconds", HTTP_SERVER_LABELS, route, (True, True)),
            sink("http_client_request_duration_seconds", HTTP_CLIENT_LABELS,
                 {**route, "server_address": OVERFLOW}, (True, False)),
            sink("db_client_operation_duration_seconds", DB_CLIENT_LABELS,
                 {**db, "server_address": OVERFLOW}),
            sink("db_server_operation_duration_seconds", DB_SERVER_LABELS, db),
            sink("dns_lookup_duration_seconds", DNS_LABELS, {"dns_question_name": OVERFLOW}),
        ]
        self.aborted = CounterSeries()
        self.rpc_server_budget = budget({"rpc_method": OVERFLOW})
        self.rpc_client_budget = budget({"rpc_method": OVERFLOW})
        self.rpc_server = HistogramSeries(DURATION_BUCKETS)
        self.rpc_client = HistogramSeries(DURATION_BUCKETS)

    def budgets(self) -> list[tuple[str, LabelBudget]]:
        return [(s.metric, s.budget) for s in self.sinks] + [
            ("rpc_server_duration_seconds", self.rpc_server_budget),
            ("rpc_client_duration_seconds", self.rpc_client_budget)]

    # --- the record path ----------------------------------------------------------------------
    def add(self, memo: Memo, labels: LabelTables, at: np.ndarray, rows: np.ndarray,
            duration_s: np.ndarray, duration_bucket: np.ndarray) -> None:
        """Add a batch: `at` is each row's connection row in the memo."""
        code = flag_code(rows["eflags"], rows["flags"])
        key = series_keys(code, rows["op"], rows["status"], rows["target"], at[:, CLASS])
        entry, slots = memo.entry_cache.find(key)
        miss = (entry < 0).nonzero()[0]
        made: dict[int, int] = {}
        if len(miss):
            entry[miss] = memo.entry_cache.rescue(key[miss])
            lost = miss[entry[miss] < 0]
            if len(lost):
                entry[lost] = memo.entry_of.find(key[lost])
                new = lost[entry[lost] < 0]
            else:
                new = lost
            if len(new):
                # New label sets are admitted in the order they first appear.
                op, status, target = rows["op"], rows["status"], rows["target"]
                made = {k: self._new_entry(memo, labels, int(at[i, CLASS]), int(code[i]),
                                           int(op[i]), int(status[i]), int(target[i]))
                        for k, i in first_rows(key, new).items()}
                memo.entry_of.add(np.fromiter(made, np.int64, len(made)),
                                  np.fromiter(made.values(), np.int32, len(made)))
                entry[new] = [made[k] for k in key[new].tolist()]
            # Rescued keys stay where they were (putting them back pushes out the key they
            # share a slot with, to be rescued in turn next time).
            if len(lost):
                memo.entry_cache.put(key[lost], slots[lost], entry[lost])
                memo.entry_cache.fit(len(memo.entry_of), memo.entry_of.everything)
        table = memo.entries.take(entry, axis=0)
        kind = table[:, 0]
        if memo.any_folded:
            # Each distinct label set of a batch is one admit call (the keys made in this
            # batch had theirs): one that folded counts again.
            again = kind >= FOLDED
            if made and again.any():
                fresh = np.sort(np.fromiter(made, np.int64, len(made)))
                found = np.minimum(np.searchsorted(fresh, key), len(fresh) - 1)
                again &= fresh[found] != key  # (np.isin would import numpy.ma: 1.3 MB)
            if again.any():
                # Once per distinct label set, for its service's share too.
                where = again.nonzero()[0]
                _, first = np.unique(key[where], return_index=True)
                for i in where[first].tolist():
                    s = int(kind[i]) & ~FOLDED
                    if s < len(self.sinks):
                        service = memo.service_names[memo.classes[int(at[i, CLASS])][2]]
                        self.sinks[s].budget.count_overflows(1, service)
            kind = kind & ~FOLDED
        aborted = kind == ABORTED
        if aborted.any():
            ids, counts = np.unique(table[aborted, 3], return_counts=True)
            for a, c in zip(ids.tolist(), counts.tolist(), strict=True):
                self.aborted.add(memo.aborted_labels[a], float(c))
        for s, sink in enumerate(self.sinks):
            sel = (kind == s).nonzero()[0]
            if not len(sel):
                continue
            t = table.take(sel, axis=0)
            sink.duration.add(t[:, 1], duration_s[sel], duration_bucket[sel])
            if sink.resp is not None:
                sink.resp.add(t[:, 3], np.maximum(rows["resp_body"][sel], 0).astype(np.float64))
            if sink.req is not None:
                sizes = rows["req_body"][sel]
                measured = sizes >= 0
                sink.req.add(t[measured, 2], sizes[measured].astype(np.float64))

    def _new_entry(self, memo: Memo, labels: LabelTables, cls: int, code: int, op: int,
                   status: int, target: int) -> int:
        """A new label set: admit it (the one admit call of this batch) and find its rows."""
        proto, role, svc, endpoint = memo.classes[cls]
        service = memo.service_names[svc]
        kind = protocol_by_id(proto).kind
        aborted = bool(code & ExchangeFlag.ABORTED)
        side = "server" if role == Role.SERVER else "client"
        if kind == "http":
            if aborted:
                return memo.entry(ABORTED, aborted=(service, side))
            if code & ExchangeFlag.GRPC:
                return memo.entry(SKIPPED)  # gRPC has its own rpc_* metrics; it feeds edges
            base: tuple[str, ...] = (service, labels.ops[op], str(status),
                                     labels.targets[target],
                                     "https" if code & _TLS_BIT else "http")
            sink = HTTP_SERVER if role == Role.SERVER else HTTP_CLIENT
        elif kind == "db":
            collection, namespace = split_db_target(labels.targets[target])
            code_text, error = error_of(labels.status_name(status), aborted)
            base = (service, protocol_by_id(proto).name, labels.ops[op], collection, namespace,
                    error, code_text)
            sink = DB_SERVER if role == Role.SERVER else DB_CLIENT
        elif kind == "dns" and role == Role.CLIENT:
            _, error = error_of(labels.status_name(status), aborted)
            base = (service, labels.targets[target], labels.ops[op], error.lower())
            sink = DNS
        else:
            return memo.entry(SKIPPED)
        if sink in (HTTP_CLIENT, DB_CLIENT):
            peer, port = memo.endpoints[endpoint]
            base = (*base, peer, str(port))
        s = self.sinks[sink]
        admitted = s.budget.admit(base, s.labels)
        folded = admitted != base
        return memo.entry(sink | (FOLDED if folded else 0), s.duration.slot(admitted),
                          s.req.slot(admitted) if s.req is not None else -1,
                          s.resp.slot(admitted) if s.resp is not None else -1)

    # --- kernel aggregates ----------------------------------------------------------------------
    def merge_http(self, role: int, base: tuple[str, ...], peer: tuple[str, str] | None,
                   aborted: bool, count: float, duration: np.ndarray, seconds: float,
                   req: np.ndarray, req_bytes: float, resp: np.ndarray,
                   resp_bytes: float) -> None:
        """An HTTP kernel aggregate's growth into the series the rows feed. `base` is the
        server label set (service, method, status, route, scheme)."""
        if aborted:
            self.aborted.add((base[0], "server" if role == Role.SERVER else "client"), count)
            return
        if role == Role.SERVER:
            s = self.sinks[HTTP_SERVER]
            labels = s.budget.admit(base, s.labels)
            assert s.req is not None and s.resp is not None
            s.duration.merge(labels, duration, seconds)
            s.req.merge(labels, req, req_bytes)
            s.resp.merge(labels, resp, resp_bytes)
        else:
            s = self.sinks[HTTP_CLIENT]
            labels = s.budget.admit((*base, *(peer or ("", ""))), s.labels)
            assert s.req is not None
            s.duration.merge(labels, duration, seconds)
            s.req.merge(labels, req, req_bytes)

    # --- gRPC -----------------------------------------------------------------------------------
    def observe_rpc(self, role: int, service: str, rpc_service: str, rpc_method: str,
                    code: str, seconds: float) -> None:
        server = role == Role.SERVER
        budget = self.rpc_server_budget if server else self.rpc_client_budget
        labels = budget.admit(
            (service, "grpc", rpc_service or UNKNOWN, rpc_method or UNKNOWN, code), RPC_LABELS)
        series = self.rpc_server if server else self.rpc_client
        series.observe(labels, np.array([max(seconds, 0.0)]))

    # --- export ---------------------------------------------------------------------------------
    def snapshot(self) -> RedSeries:
        """A copy of the series for rendering outside the lock (budgets are shared)."""
        copy = RedSeries.__new__(RedSeries)
        copy.sinks = [Sink(s.metric, s.labels, s.budget, s.duration.snapshot(),
                           s.req.snapshot() if s.req is not None else None,
                           s.resp.snapshot() if s.resp is not None else None)
                      for s in self.sinks]
        copy.aborted = self.aborted.snapshot()
        copy.rpc_server_budget = self.rpc_server_budget
        copy.rpc_client_budget = self.rpc_client_budget
        copy.rpc_server = self.rpc_server.snapshot()
        copy.rpc_client = self.rpc_client.snapshot()
        return copy

    def families(self) -> Iterator[Metric]:
        http_server, http_client, db_client, db_server, dns = self.sinks
        assert http_server.req is not None and http_server.resp is not None
        assert http_client.req is not None
        yield http_server.duration.family(
            http_server.metric, "Duration of HTTP server requests: request's first byte read "
            "to response's last byte written.", HTTP_SERVER_LABELS)
        yield http_client.duration.family(
            http_client.metric, "Duration of HTTP client requests: request write to "
            "response's first byte.", HTTP_CLIENT_LABELS)
        yield http_server.req.family("http_server_request_body_size_bytes",
                                     "Size of HTTP server request bodies.", HTTP_SERVER_LABELS)
        yield http_server.resp.family("http_server_response_body_size_bytes",
                                      "Size of HTTP server response bodies.", HTTP_SERVER_LABELS)
        yield http_client.req.family("http_client_request_body_size_bytes",
                                     "Size of HTTP client request bodies.", HTTP_CLIENT_LABELS)
        yield self.aborted.family(
            "probewire_http_aborted",
            "HTTP requests whose connection closed before a response started.",
            ("service_name", "direction"))
        yield db_client.duration.family(
            db_client.metric, "Duration of database and cache operations, from the calling "
            "process: request written to response read.", DB_CLIENT_LABELS)
        yield db_server.duration.family(
            db_server.metric, "Duration of database and cache operations served by a "
            "process on this host: request read to response written.", DB_SERVER_LABELS)
        yield dns.duration.family(
            dns.metric, "Duration of DNS lookups: query sent to answer read.", DNS_LABELS)
        yield self.rpc_server.family(
            "rpc_server_duration_seconds", "Duration of RPCs served (gRPC over HTTP/2).",
            RPC_LABELS)
        yield self.rpc_client.family(
            "rpc_client_duration_seconds", "Duration of RPCs called (gRPC over HTTP/2).",
            RPC_LABELS)
