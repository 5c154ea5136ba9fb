"""http family: HTTP/1.x RED metrics for servers and clients, and the service graph.

Kernel side (bpf/http.bpf.c) emits one record per request/response exchange with the method,
status, timestamps, byte counts, the connection's addresses and the first bytes of both heads.
Here a batch is decoded with numpy: paths are cut out of the heads in one vectorised pass,
templated once per distinct path, and rows are grouped by label set before any Python work.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from probewire.aggregate.budget import LabelBudget
from probewire.aggregate.http_heads import nth_request, request_paths
from probewire.aggregate.routes import RouteTemplater
from probewire.aggregate.series import CounterSeries, HistogramSeries, group_rows, unique_rows
from probewire.enrich.net import format_address
from probewire.probes.base import Hook, Probe, ProbeContext
from probewire.probes.h2 import H2_CHUNK_DTYPE, H2Exchange, H2Tracker
from probewire.probes.tls import TLS_PROGRAMS, TlsAttacher
from probewire.runtime.bpf import BpfObject, Map

HEAD_LEN = 256
ROLE_SERVER, ROLE_CLIENT = 1, 2
FLAG_ABORTED, FLAG_PIPELINED, FLAG_TLS = 1, 2, 4
# User-space only (never set by the kernel): rows made from HTTP/2 streams.
FLAG_H2, FLAG_GRPC = 64, 128

HTTP_EXCHANGE = np.dtype(
    [
        ("kind", np.uint32),
        ("tgid", np.uint32),
        ("role", np.uint8),
        ("method", np.uint8),
        ("status", np.uint16),
        ("family", np.uint8),
        ("flags", np.uint8),
        ("pipe_idx", np.uint16),
        ("start_ns", np.uint64),
        ("end_ns", np.uint64),
        ("req_bytes", np.uint64),
        ("resp_bytes", np.uint64),
        ("conn_id", np.uint64),
        ("lport", np.uint16),
        ("rport", np.uint16),
        ("req_head_len", np.uint16),
        ("resp_head_len", np.uint16),
        ("resp_first_write", np.uint32),
        ("tid", np.uint32),
        ("peer_tgid", np.uint32),
        ("resp_header_end", np.int32),
        ("path_hash", np.uint64),
        ("laddr", np.uint8, (16,)),
        ("raddr", np.uint8, (16,)),
        ("req_head", np.uint8, (HEAD_LEN,)),
        ("resp_head", np.uint8, (HEAD_LEN,)),
    ]
)

HTTP_AGG_KEY = np.dtype(
    [
        ("tgid", np.uint32),
        ("route", np.uint32),
        ("peer_tgid", np.uint32),
        ("lport", np.uint16),
        ("rport", np.uint16),
        ("status", np.uint16),
        ("role", np.uint8),
        ("method", np.uint8),
        ("flags", np.uint8),
        ("family", np.uint8),
        ("_pad", np.uint16),
        ("laddr", np.uint8, (16,)),
        ("raddr", np.uint8, (16,)),
    ]
)
HTTP_ENDPOINT = np.dtype(
    [("addr", np.uint8, (16,)), ("port", np.uint16), ("family", np.uint8), ("_pad", np.uint8)]
)

# Kernel method codes (bpf/http.h); index 0 means "parse the head".
METHODS = ("_OTHER", "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "CONNECT",
           "TRACE")
METHOD_LEN = np.array([0] + [len(m) for m in METHODS[1:]], dtype=np.int64)
SYSCALLS = ("read", "recvfrom", "readv", "recvmsg", "write", "sendto", "writev", "sendmsg",
            "sendfile64")

# OpenTelemetry's recommended boundaries for http.*.request.duration (seconds).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0)
SIZE_BUCKETS = (0, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
# The kernel counts exchanges of known routes in these very buckets (http.h http_agg).
HTTP_AGG = np.dtype(
    [
        ("count", np.uint64),
        ("duration_ns", np.uint64),
        ("req_body_count", np.uint64),
        ("req_body_bytes", np.uint64),
        ("resp_body_bytes", np.uint64),
        ("duration", np.uint64, (len(DURATION_BUCKETS) + 1,)),
        ("req_body", np.uint64, (len(SIZE_BUCKETS) + 1,)),
        ("resp_body", np.uint64, (len(SIZE_BUCKETS) + 1,)),
    ]
)
_AGG_WORDS = HTTP_AGG.itemsize // 8

SERVER_LABELS = ("service_name", "http_request_method", "http_response_status_code", "http_route",
                 "url_scheme")
CLIENT_LABELS = (*SERVER_LABELS, "server_address", "server_port")
EDGE_LABELS = ("client", "server")
RPC_LABELS = ("service_name", "rpc_system", "rpc_service", "rpc_method", "rpc_grpc_status_code")
UNKNOWN_ROUTE = "unknown"
OVERFLOW_ROUTE = "other"
ENDPOINTS_MAX = 65536
# Route ids handed to the kernel (http_routes values). Past this many distinct routes a new
# path is registered as "other": the label budget would fold it there anyway.
ROUTE_IDS_MAX = 16384
# Aggregation keys of processes gone from /proc are read a last time and deleted this often.
AGG_REAP_S = 30.0
# A key of a process not named yet (it exited before its exec record was read) waits at most
# this long for the name before it is counted as "unknown".
NAME_WAIT_S = 2.0


def header_lengths(heads: np.ndarray, head_lens: np.ndarray) -> np.ndarray:
    """Bytes up to and including the first CRLFCRLF of each head, or -1 if not in the head."""
    if not len(heads):
        return np.zeros(0, dtype=np.int64)
    h = heads
    hit = (h[:, :-3] == 13) & (h[:, 1:-2] == 10) & (h[:, 2:-1] == 13) & (h[:, 3:] == 10)
    first = np.argmax(hit, axis=1)
    found = hit[np.arange(len(h)), first] & (first + 4 <= head_lens)
    return np.where(found, first + 4, -1).astype(np.int64)


@dataclass(frozen=True)
class ExchangeBatch:
    """One decoded batch for consumers beyond metrics (spans, the UI's event feed).

    `records` are the raw kernel records (HTTP_EXCHANGE); the lists give each row's decoded
    labels. Timestamps in records are CLOCK_MONOTONIC nanoseconds.
    """

    records: np.ndarray
    service: list[str]
    method: list[str]
    route: list[str]
    peer_address: list[str]
    local_address: list[str]


ExchangeSink = Callable[[ExchangeBatch], None]


class _Bounded(OrderedDict[tuple[str, int], str]):
    """Endpoint -> service, forgetting the oldest beyond a fixed size."""

    def put(self, key: tuple[str, int], value: str) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > ENDPOINTS_MAX:
            self.popitem(last=False)


class HttpProbe(Probe):
    name = "http"
    object_name = "http"
    hooks = (
        *(Hook(f"sys_exit_{s}", (f"http_exit_{s}",)) for s in SYSCALLS),
        Hook("sys_enter_close", ("http_close",)),
    )
    helper_programs = ("http_exit_common", "http_h2_ship_tp", "http_h2_ship_uprobe",
                       *TLS_PROGRAMS)
    structs: ClassVar[dict[str, np.dtype]] = {
        "http_exchange": HTTP_EXCHANGE, "h2_chunk": H2_CHUNK_DTYPE,
        "http_agg_key": HTTP_AGG_KEY, "http_agg": HTTP_AGG, "http_endpoint": HTTP_ENDPOINT,
    }
    record_dtype = HTTP_EXCHANGE
    extra_rings: ClassVar[dict[str, np.dtype]] = {"h2_events": H2_CHUNK_DTYPE}

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config.probes.http
        self.routes = RouteTemplater(cfg.routes)
        self._lock = threading.Lock()
        overflow = {"http_route": "other"}
        self.server_budget = LabelBudget(cfg.max_series_per_metric, overflow)
        self.client_budget = LabelBudget(cfg.max_series_per_metric,
                                         {**overflow, "server_address": "other"})
        self.edge_budget = LabelBudget(cfg.max_series_per_metric, {"client": "other"})
        self.server_duration = HistogramSeries(DURATION_BUCKETS)
        self.client_duration = HistogramSeries(DURATION_BUCKETS)
        self.server_req_size = HistogramSeries(SIZE_BUCKETS)
        self.server_resp_size = HistogramSeries(SIZE_BUCKETS)
        self.client_req_size = HistogramSeries(SIZE_BUCKETS)
        self.aborted = CounterSeries()
        # Service graph: client-side edges keep the server endpoint until scrape time, when
        # the server side (seen in its own records) can name it.
        self.edge_client_total: dict[tuple[str, tuple[str, int]], list[float]] = {}
        self.edge_client_seconds = HistogramSeries(DURATION_BUCKETS)
        self.edge_server_total = CounterSeries()
        self.edge_server_failed = CounterSeries()
        self.edge_server_seconds = HistogramSeries(DURATION_BUCKETS)
        self.server_endpoints = _Bounded()
        self.client_endpoints = _Bounded()
        self.local_addresses: set[str] = {"127.0.0.1", "::1"}
        self.records = 0
        # Called after each batch with its decoded rows (e.g. the OTLP span exporter).
        self.sinks: list[ExchangeSink] = []
        self.tls: TlsAttacher | None = None
        self.h2 = H2Tracker()
        self.rpc_budget = LabelBudget(cfg.max_series_per_metric, {"rpc_method": "other"})
        self.rpc_server = HistogramSeries(DURATION_BUCKETS)
        self.rpc_client = HistogramSeries(DURATION_BUCKETS)
        # In-kernel aggregation: route ids the kernel keys on, and each key's last total.
        otlp = ctx.config.export.otlp
        self.aggregate = cfg.kernel_aggregation and not (otlp.enabled and otlp.traces)
        self.route_names: list[str] = []
        self.route_ids: dict[str, int] = {}
        self._agg_last: dict[bytes, np.ndarray] = {}
        self._sync_lock = threading.Lock()
        self._reaped_at = time.monotonic()
        self.reap_s = AGG_REAP_S
        self._dead_before: set[bytes] = set()
        self._name_wait: dict[bytes, float] = {}
        self.aggregated = 0  # exchanges counted in the kernel, as of the last sync
        self._aggregated_gone = 0
        self.exchanges_from_records = 0

    def after_load(self, obj: BpfObject) -> None:
        if self.ctx.config.probes.http.tls and obj.programs["tls_exit"].fd >= 0:
            self.tls = TlsAttacher(obj)
            self.tls.start()

    def on_stop(self) -> None:
        if self.tls is not None:
            self.tls.stop()
            self.tls = None

    def before_load(self, obj: BpfObject) -> None:
        if not self.ctx.config.probes.http.trace_agent:
            obj.set_rodata(self_tgid=os.getpid())
        obj.maps["http_aggs"].set_max_entries(self.ctx.config.probes.http.kernel_keys)
        obj.set_rodata(
            aggregate=int(self.aggregate),
            duration_bounds_ns=np.array([round(b * 1e9) for b in DURATION_BUCKETS], np.uint64),
            size_bounds=np.array(SIZE_BUCKETS, np.uint64),
        )

    # --- decoding --------------------------------------------------------------------------
    def _routes_and_methods(
        self, rec: np.ndarray
    ) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """(route names, method names, per-row method index, per-row route index)."""
        n = len(rec)
        method = rec["method"].astype(np.int64)
        slow = (method == 0) | (rec["pipe_idx"] > 0)
        method_names = list(METHODS)
        route_names: list[str] = []
        route_idx = np.zeros(n, dtype=np.int64)
        fast = np.flatnonzero(~slow)
        if len(fast):
            paths = request_paths(rec["req_head"][fast], rec["req_head_len"][fast].astype(np.int64),
                                  METHOD_LEN[method[fast]])
            first, inverse = unique_rows(paths)
            base = len(route_names)
            for row in paths[first]:
                route_names.append(self.routes.template(row.tobytes().rstrip(b"\0")))
            route_idx[fast] = base + inverse
        for i in np.flatnonzero(slow).tolist():
            head = rec["req_head"][i][: int(rec["req_head_len"][i])].tobytes()
            parsed = nth_request(head, int(rec["pipe_idx"][i]))
            if parsed is None:
                route, m = UNKNOWN_ROUTE, "_OTHER"
            else:
                m, target = parsed
                route = self.routes.template(target)
            if m not in method_names:
                method_names.append(m)
            method[i] = method_names.index(m)
            route_names.append(route)
            route_idx[i] = len(route_names) - 1
        # Same route string from several paths: collapse to one index so grouping merges them.
        canon: dict[str, int] = {}
        remap = np.array([canon.setdefault(r, len(canon)) for r in route_names] or [0])
        return list(canon), method_names, method, remap[route_idx] if route_names else route_idx

    def _route_id(self, route: str) -> int:
        rid = self.route_ids.get(route)
        if rid is None:
            if len(self.route_names) >= ROUTE_IDS_MAX:
                route = OVERFLOW_ROUTE
                rid = self.route_ids.get(route)
            if rid is None:
                rid = self.route_ids[route] = len(self.route_names)
                self.route_names.append(route)
        return rid

    def _register_routes(self, rec: np.ndarray, routes: list[str], route_idx: np.ndarray) -> None:
        """Tell the kernel the route of each new path it shipped: later exchanges on that
        path are counted in the kernel. Only rows the kernel could have aggregated (a known
        method, first in their head) carry a hash of the path user space templated."""
        hashes = rec["path_hash"]
        fast = np.flatnonzero((hashes != 0) & (rec["method"] != 0) & (rec["pipe_idx"] == 0))
        if not len(fast) or not routes:
            return
        uniq, first = np.unique(hashes[fast], return_index=True)
        routes_map = self.map("http_routes")
        for h, i in zip(uniq.tolist(), fast[first].tolist(), strict=True):
            rid = self._route_id(routes[int(route_idx[i])])
            routes_map.update(int(h).to_bytes(8, "little"), rid.to_bytes(4, "little"))

    def on_batch(self, records: np.ndarray) -> None:
        rec = records
        n = len(rec)
        if not n:
            return
        role = rec["role"].astype(np.int64)
        status = rec["status"].astype(np.int64)
        flags = rec["flags"].astype(np.int64)
        aborted = (flags & FLAG_ABORTED) != 0
        duration_s = np.maximum(rec["end_ns"].astype(np.int64) - rec["start_ns"].astype(np.int64),
                                0) / 1e9
        routes, methods, method, route_idx = self._routes_and_methods(rec)
        if self.aggregate and self.obj is not None:
            self._register_routes(rec, routes, route_idx)
        # Service per (tgid, local port): port rules name the server side.
        server_port = np.where(role == ROLE_SERVER, rec["lport"], 0)
        keys, svc_inverse = group_rows([rec["tgid"], server_port])
        services = [
            self.ctx.services.name_for_port(int(t), int(p)) if p else
            self.ctx.services.name_for(int(t))
            for t, p in keys.tolist()
        ]
        svc = svc_inverse
        # Addresses: distinct (family, addr) only.
        peers = self._addresses(rec["family"], rec["raddr"])
        locals_ = self._addresses(rec["family"], rec["laddr"])
        req_hdr = header_lengths(rec["req_head"], rec["req_head_len"].astype(np.int64))
        resp_hdr = header_lengths(rec["resp_head"], rec["resp_head_len"].astype(np.int64))
        resp_hdr = np.where(resp_hdr < 0, rec["resp_first_write"].astype(np.int64), resp_hdr)
        req_body = np.where((req_hdr >= 0) & (rec["pipe_idx"] == 0),
                            rec["req_bytes"].astype(np.int64) - req_hdr, -1)
        resp_body = rec["resp_bytes"].astype(np.int64) - resp_hdr
        peer_idx, peer_names = peers
        local_idx, local_names = locals_
        lport = rec["lport"].astype(np.int64)
        rport = rec["rport"].astype(np.int64)
        with self._lock:
            self.records += n
            self.exchanges_from_records += n
            self.local_addresses.update(local_names)
            ends, _ = group_rows([role, local_idx, lport, svc])
            for r, li, lp, s in ends.tolist():
                table = self.server_endpoints if r == ROLE_SERVER else self.client_endpoints
                table.put((local_names[li], lp), services[s])
            ok = ~aborted
            tls = (flags & FLAG_TLS) != 0
            grpc = (flags & FLAG_GRPC) != 0
            is_server = role == ROLE_SERVER
            # The peer only labels client-side series: a server's clients (one ephemeral port
            # each) must not split its groups.
            gkeys, ginv = group_rows([role, svc, method, status, route_idx,
                                      np.where(is_server, 0, peer_idx),
                                      np.where(is_server, 0, rport),
                                      aborted.astype(np.int64), tls.astype(np.int64),
                                      grpc.astype(np.int64)])
            for g, (r, s, m, st, ro, pe, rp, ab, tl, gr) in enumerate(gkeys.tolist()):
                service = services[s]
                if ab:
                    direction = "server" if r == ROLE_SERVER else "client"
                    self.aborted.add((service, direction), float(np.count_nonzero(ginv == g)))
                    continue
                if gr:
                    continue  # gRPC has its own rpc_* metrics (on_ring); it still feeds edges
                rows = ginv == g
                base = (service, methods[m], str(st), routes[ro] if routes else UNKNOWN_ROUTE,
                        "https" if tl else "http")
                if r == ROLE_SERVER:
                    labels = self.server_budget.admit(base, SERVER_LABELS)
                    self.server_duration.observe(labels, duration_s[rows & ok])
                    sizes = req_body[rows]
                    self.server_req_size.observe(labels, sizes[sizes >= 0].astype(np.float64))
                    self.server_resp_size.observe(labels, np.maximum(resp_body[rows], 0)
                                                  .astype(np.float64))
                else:
                    labels = self.client_budget.admit(
                        (*base, peer_names[pe], str(rp)), CLIENT_LABELS)
                    self.client_duration.observe(labels, duration_s[rows])
                    sizes = req_body[rows]
                    self.client_req_size.observe(labels, sizes[sizes >= 0].astype(np.float64))
            self._edges(role, svc, services, peer_idx, peer_names, rport,
                        rec["peer_tgid"].astype(np.int64), aborted | (status >= 500),
                        duration_s)
        if self.sinks:
            batch = ExchangeBatch(
                records=rec,
                service=[services[i] for i in svc.tolist()],
                method=[methods[i] for i in method.tolist()],
                route=[routes[i] if routes else UNKNOWN_ROUTE for i in route_idx.tolist()],
                peer_address=[peer_names[i] for i in peer_idx.tolist()],
                local_address=[local_names[i] for i in local_idx.tolist()],
            )
            for sink in self.sinks:
                sink(batch)

    # --- HTTP/2 and gRPC ---------------------------------------------------------------------
    def on_ring(self, map_name: str, records: np.ndarray) -> None:
        exchanges = self.h2.feed(records)
        if not exchanges:
            return
        with self._lock:
            for ex in exchanges:
                if ex.grpc:
                    self._observe_rpc(ex)
        self.on_batch(self._as_records(exchanges))

    def _observe_rpc(self, ex: H2Exchange) -> None:
        service_path = ex.path.lstrip("/")
        rpc_service, _, rpc_method = service_path.partition("/")
        c = ex.conn
        if c.role == ROLE_SERVER:
            name = self.ctx.services.name_for_port(c.tgid, c.lport)
        else:
            name = self.ctx.services.name_for(c.tgid)
        code = "" if ex.grpc_status is None else str(ex.grpc_status)
        labels = self.rpc_budget.admit(
            (name, "grpc", rpc_service or UNKNOWN_ROUTE, rpc_method or UNKNOWN_ROUTE, code),
            RPC_LABELS)
        series = self.rpc_server if c.role == ROLE_SERVER else self.rpc_client
        series.observe(labels, np.array([max(ex.end_ns - ex.start_ns, 0) / 1e9]))

    @staticmethod
    def _as_records(exchanges: list[H2Exchange]) -> np.ndarray:
        """HTTP/2 streams as exchange records, so metrics, graph and sinks treat them alike."""
        rec = np.zeros(len(exchanges), dtype=HTTP_EXCHANGE)
        for i, ex in enumerate(exchanges):
            head = f"{ex.method or '_OTHER'} {ex.path or '/'} HTTP/2\r\n\r\n".encode()[:HEAD_LEN]
            resp = f"HTTP/2 {ex.status}\r\n\r\n".encode()
            r = rec[i]
            r["kind"] = 1
            c = ex.conn
            r["tgid"], r["tid"], r["role"] = c.tgid, ex.tid, c.role
            r["method"] = METHODS.index(ex.method) if ex.method in METHODS[1:] else 0
            r["status"] = ex.status
            r["family"] = c.family
            r["flags"] = ((FLAG_TLS if c.tls else 0) | FLAG_H2 | (FLAG_GRPC if ex.grpc else 0)
                          | (FLAG_ABORTED if ex.reset and not ex.status else 0))
            r["start_ns"], r["end_ns"] = ex.start_ns, ex.end_ns
            # Wire sizes as the HTTP/1 path expects them: head + body.
            r["req_bytes"] = len(head) + ex.request_bytes
            r["resp_bytes"] = len(resp) + ex.response_bytes
            r["resp_first_write"] = len(resp)
            r["conn_id"] = c.conn_id
            r["lport"], r["rport"] = c.lport, c.rport
            r["laddr"] = np.frombuffer(c.laddr, dtype=np.uint8)
            r["raddr"] = np.frombuffer(c.raddr, dtype=np.uint8)
            r["req_head"][: len(head)] = np.frombuffer(head, dtype=np.uint8)
            r["req_head_len"] = len(head)
            r["resp_head"][: len(resp)] = np.frombuffer(resp, dtype=np.uint8)
            r["resp_head_len"] = len(resp)
        return rec

    def _addresses(self, family: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, list[str]]:
        rows = np.concatenate([family.astype(np.uint8)[:, None], raw], axis=1)
        first, inverse = unique_rows(rows)
        return inverse, [format_address(int(k[0]), k[1:]) for k in rows[first]]

    def _edges(self, role: np.ndarray, svc: np.ndarray, services: list[str],
               peer_idx: np.ndarray, peer_names: list[str], rport: np.ndarray,
               peer_tgid: np.ndarray, failed: np.ndarray, duration_s: np.ndarray) -> None:
        """Service-graph edges of a batch, grouped before any Python per row."""
        client = role == ROLE_CLIENT
        if client.any():
            # Client side: kept by server endpoint until a scrape can name it.
            keys, inv = group_rows([svc[client], peer_idx[client], rport[client]])
            dur, bad = duration_s[client], failed[client]
            for g, (s, pe, rp) in enumerate(keys.tolist()):
                rows = inv == g
                totals = self.edge_client_total.setdefault(
                    (services[s], (peer_names[pe], rp)), [0.0, 0.0])
                totals[0] += float(np.count_nonzero(rows))
                totals[1] += float(np.count_nonzero(bad[rows]))
                self.edge_client_seconds.observe((services[s], f"{peer_names[pe]}:{rp}"),
                                                 dur[rows])
        server = role == ROLE_SERVER
        if not server.any():
            return
        # Server side: a client on this host has its own records (and counts the edge); a
        # remote client is named by its address. Each distinct client endpoint is named once.
        keys, inv = group_rows([peer_idx[server], rport[server], peer_tgid[server]])
        names: dict[str, int] = {}
        per_key, remote = [], []
        for pe, rp, pt in keys.tolist():
            name, local = self._client_name(peer_names[pe], pt, (peer_names[pe], rp))
            per_key.append(names.setdefault(name, len(names)))
            remote.append(not local)
        client_of = np.array(per_key, dtype=np.int64)[inv]
        is_remote = np.array(remote, dtype=np.int64)[inv]
        name_list = list(names)
        keys2, inv2 = group_rows([client_of, svc[server], is_remote])
        dur, bad = duration_s[server], failed[server]
        for g, (c, s, rem) in enumerate(keys2.tolist()):
            rows = inv2 == g
            labels = self.edge_budget.admit((name_list[c], services[s]), EDGE_LABELS)
            if rem:
                self.edge_server_total.add(labels, float(np.count_nonzero(rows)))
                nbad = float(np.count_nonzero(bad[rows]))
                if nbad:
                    self.edge_server_failed.add(labels, nbad)
            self.edge_server_seconds.observe(labels, dur[rows])

    def _client_name(self, peer: str, peer_tgid: int,
                     endpoint: tuple[str, int] | None) -> tuple[str, bool]:
        """(client name, is it on this host) for the far end of a server's connection: the
        kernel names a local client's process; a remote client is named by its address."""
        if peer_tgid:
            return self.ctx.services.name_for(peer_tgid), True
        if peer in self.local_addresses:
            found = self.client_endpoints.get(endpoint) if endpoint else None
            return found or "unknown", True
        return peer, False

    # --- in-kernel aggregates ------------------------------------------------------------------
    def sync(self) -> None:
        """Add what the kernel counted since the last call (http_aggs) to the series.

        Kernel entries are cumulative and per CPU; each key's growth since its last reading is
        merged, so a series never goes down and no exchange is counted twice. A key whose
        process cannot be named yet (it exited before its exec record was read) waits a
        moment for that record. Keys of processes gone for a whole reap period are read a
        last time and deleted (nothing adds to them any more).
        """
        if self.obj is None or not self.aggregate:
            return
        with self._sync_lock:
            aggs = self.map("http_aggs")
            keys, values = aggs.read_all(HTTP_AGG_KEY, HTTP_AGG)
            n = len(keys)
            totals = (values.view(np.uint64).reshape(n, -1, _AGG_WORDS).sum(axis=1)
                      if n else np.zeros((0, _AGG_WORDS), np.uint64))
            raw_keys = [k.tobytes() for k in keys]
            last = self._agg_last
            zero = np.zeros(_AGG_WORDS, np.uint64)
            deltas = totals - np.array([last.get(raw, zero) for raw in raw_keys]
                                       ).reshape(n, _AGG_WORDS)
            now = time.monotonic()
            ready = [i for i in np.flatnonzero(deltas[:, 0] > 0).tolist()
                     if self._nameable(keys[i], raw_keys[i], now)]
            if ready:
                with self._lock:
                    self._merge_aggregates(keys[ready], deltas[ready].view(HTTP_AGG)[:, 0])
                for i in ready:
                    last[raw_keys[i]] = totals[i]
            if now - self._reaped_at >= self.reap_s:
                self._reaped_at = now
                self._reap(aggs, keys, raw_keys, totals)
            self.aggregated = self._aggregated_gone + int(sum(int(v[0]) for v in last.values()))

    def _nameable(self, key: np.void, raw: bytes, now: float) -> bool:
        """True when the key's processes have names, or waiting for them is over."""
        services = self.ctx.services
        tgids = (int(key["tgid"]), int(key["peer_tgid"]))
        if all(t == 0 or services.info_for(t) is not None for t in tgids):
            self._name_wait.pop(raw, None)
            return True
        if now - self._name_wait.setdefault(raw, now) < NAME_WAIT_S:
            return False
        del self._name_wait[raw]
        return True  # named "unknown"

    def _reap(self, aggs: Map, keys: np.ndarray, raw_keys: list[bytes],
              totals: np.ndarray) -> None:
        """Delete keys whose process (or, server side, client process) was gone at this reap
        and the one before: an exchange of theirs still in flight has landed by then."""
        pids = np.unique(np.concatenate([keys["tgid"], keys["peer_tgid"]])).tolist()
        gone = {p for p in pids if p and not os.path.exists(f"/proc/{p}")}
        dead = {raw for key, raw in zip(keys, raw_keys, strict=True)
                if int(key["tgid"]) in gone or int(key["peer_tgid"]) in gone}
        last = self._agg_last
        for i, raw in enumerate(raw_keys):
            if raw in dead and raw in self._dead_before and raw in last \
                    and np.array_equal(last[raw], totals[i]):
                aggs.delete(raw)
                # Every count of the key is merged already; `aggregated` keeps them.
                self._aggregated_gone += int(last.pop(raw)[0])
        self._dead_before = dead

    def _merge_aggregates(self, keys: np.ndarray, d: np.ndarray) -> None:
        """Kernel counts (growth per key) into the same series the records feed."""
        for k, v in zip(keys, d, strict=True):
            role, tgid, lport = int(k["role"]), int(k["tgid"]), int(k["lport"])
            service = (self.ctx.services.name_for_port(tgid, lport) if role == ROLE_SERVER
                       else self.ctx.services.name_for(tgid))
            status = int(k["status"])
            flags = int(k["flags"])
            count = float(v["count"])
            duration = v["duration"].astype(np.int64)
            seconds = float(v["duration_ns"]) / 1e9
            failed = count if (flags & FLAG_ABORTED or status >= 500) else 0.0
            peer = format_address(int(k["family"]), k["raddr"])
            rid = int(k["route"])
            route = self.route_names[rid] if rid < len(self.route_names) else UNKNOWN_ROUTE
            base = (service, METHODS[int(k["method"])], str(status), route,
                    "https" if flags & FLAG_TLS else "http")
            if role == ROLE_SERVER:
                local = format_address(int(k["family"]), k["laddr"])
                self.local_addresses.add(local)
                self.server_endpoints.put((local, lport), service)
                client, is_local = self._client_name(peer, int(k["peer_tgid"]), None)
                labels = self.edge_budget.admit((client, service), EDGE_LABELS)
                if not is_local:
                    self.edge_server_total.add(labels, count)
                    if failed:
                        self.edge_server_failed.add(labels, failed)
                self.edge_server_seconds.merge(labels, duration, seconds)
            else:
                rport = int(k["rport"])
                totals = self.edge_client_total.setdefault((service, (peer, rport)), [0.0, 0.0])
                totals[0] += count
                totals[1] += failed
                self.edge_client_seconds.merge((service, f"{peer}:{rport}"), duration, seconds)
            if flags & FLAG_ABORTED:
                self.aborted.add((service, "server" if role == ROLE_SERVER else "client"), count)
                continue
            req = v["req_body"].astype(np.int64)
            if role == ROLE_SERVER:
                labels = self.server_budget.admit(base, SERVER_LABELS)
                self.server_duration.merge(labels, duration, seconds)
                self.server_req_size.merge(labels, req, float(v["req_body_bytes"]))
                self.server_resp_size.merge(labels, v["resp_body"].astype(np.int64),
                                            float(v["resp_body_bytes"]))
            else:
                labels = self.client_budget.admit((*base, peer, str(int(k["rport"]))),
                                                  CLIENT_LABELS)
                self.client_duration.merge(labels, duration, seconds)
                self.client_req_size.merge(labels, req, float(v["req_body_bytes"]))

    # --- export ----------------------------------------------------------------------------
    def _server_name(self, endpoint: tuple[str, int]) -> str:
        name = self.server_endpoints.get(endpoint)
        if name is None and endpoint[0] in self.local_addresses:
            name = next((svc for (_, port), svc in self.server_endpoints.items()
                         if port == endpoint[1]), None)
        return name or f"{endpoint[0]}:{endpoint[1]}"

    def collect(self) -> Iterable[Metric]:
        self.sync()
        with self._lock:
            yield self.server_duration.family(
                "http_server_request_duration_seconds",
                "Duration of HTTP server requests: request's first byte read to response's "
                "last byte written.", SERVER_LABELS)
            yield self.client_duration.family(
                "http_client_request_duration_seconds",
                "Duration of HTTP client requests: request write to response's first byte.",
                CLIENT_LABELS)
            yield self.server_req_size.family(
                "http_server_request_body_size_bytes", "Size of HTTP server request bodies.",
                SERVER_LABELS)
            yield self.server_resp_size.family(
                "http_server_response_body_size_bytes", "Size of HTTP server response bodies.",
                SERVER_LABELS)
            yield self.client_req_size.family(
                "http_client_request_body_size_bytes", "Size of HTTP client request bodies.",
                CLIENT_LABELS)
            yield self.aborted.family(
                "probewire_http_aborted",
                "HTTP requests whose connection closed before a response started.",
                ("service_name", "direction"))
            total = CounterSeries()
            failed = CounterSeries()
            for (client, endpoint), (n, nf) in self.edge_client_total.items():
                labels = self.edge_budget.admit((client, self._server_name(endpoint)),
                                                EDGE_LABELS)
                total.add(labels, n)
                if nf:
                    failed.add(labels, nf)
            for labels, v in self.edge_server_total.values.items():
                total.add(labels, v)
            for labels, v in self.edge_server_failed.values.items():
                failed.add(labels, v)
            client_seconds = HistogramSeries(DURATION_BUCKETS)
            for key, counts in self.edge_client_seconds.counts.items():
                client, peer = key
                host, _, port = peer.rpartition(":")
                labels = self.edge_budget.admit((client, self._server_name((host, int(port)))),
                                                EDGE_LABELS)
                client_seconds.merge(labels, counts, self.edge_client_seconds.sums[key])
            yield total.family("traces_service_graph_request", "Requests between two services.",
                               EDGE_LABELS)
            yield failed.family("traces_service_graph_request_failed",
                                "Failed requests (5xx or aborted) between two services.",
                                EDGE_LABELS)
            yield self.edge_server_seconds.family(
                "traces_service_graph_request_server_seconds",
                "Server-side duration of requests between two services.", EDGE_LABELS)
            yield client_seconds.family(
                "traces_service_graph_request_client_seconds",
                "Client-side duration of requests between two services.", EDGE_LABELS)
            yield self.rpc_server.family(
                "rpc_server_duration_seconds", "Duration of RPCs served (gRPC over HTTP/2).",
                RPC_LABELS)
            yield self.rpc_client.family(
                "rpc_client_duration_seconds", "Duration of RPCs called (gRPC over HTTP/2).",
                RPC_LABELS)
            lost = CounterMetricFamily(
                "probewire_http2_connections_lost",
                "HTTP/2 connections given up (no preface seen, chunk dropped, too large).",
                labels=["reason"])
            for reason, n in sorted(self.h2.lost.items()):
                lost.add_metric([reason], n)
            yield lost
            unrec = CounterMetricFamily(
                "probewire_http_unrecognized_connections",
                "Connections whose first plaintext was neither HTTP/1.x nor an HTTP/2 preface "
                "(for TLS: typically HTTP/2 opened before the agent started).",
                labels=["transport"])
            if self.obj is not None:
                _, values = self.obj.maps["tls_unrecognized"].read_all(
                    np.dtype(np.uint32), np.dtype(np.uint64))
                unrec.add_metric(["tls"], float(values.sum()))
            yield unrec
            overflow = CounterMetricFamily(
                "probewire_cardinality_overflow",
                "Label sets folded into an 'other' series because a metric hit its budget.",
                labels=["metric"])
            active = GaugeMetricFamily("probewire_active_series",
                                       "Label sets held per metric family.", labels=["metric"])
            for metric, budget in (("http_server_request_duration_seconds", self.server_budget),
                                   ("http_client_request_duration_seconds", self.client_budget),
                                   ("traces_service_graph_request", self.edge_budget)):
                overflow.add_metric([metric], budget.overflows)
                active.add_metric([metric], budget.active_series)
            yield overflow
            yield active
            via = CounterMetricFamily(
                "probewire_http_exchanges",
                "HTTP exchanges seen: counted in kernel maps (route already known) or sent to "
                "user space as a ring record.", labels=["via"])
            via.add_metric(["kernel"], float(self.aggregated))
            via.add_metric(["ring"], float(self.exchanges_from_records))
            yield via
