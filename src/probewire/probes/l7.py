"""l7 family: the capture layer (bpf/l7.bpf.c) and every protocol on it.

Kernel side: the data syscalls' exit tracepoints and OpenSSL's uprobes feed the capture layer,
which classifies each connection and hands its calls to its protocol's kernel parser. What
crosses to user space: HTTP/1.x exchange records (ring `events`; exchanges of known routes are
counted in kernel maps instead), and the bytes of connections whose protocol is parsed here
(ring `l7_data`: HTTP/2, PostgreSQL, MySQL, Redis, memcached, DNS ...).

User side, per batch: decode (l7/protocols/http1.py for records; l7/streams.py + each
protocol's parser for bytes) -> exchange rows -> aggregate/pipeline.py (RED series, service
graph, span sinks). Kernel counts are merged at scrape time (l7/kernel_agg.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
from prometheus_client.core import CounterMetricFamily, Metric

from probewire.aggregate.bounds import Bounds, register_templater
from probewire.aggregate.memo import MEMO_MAX
from probewire.aggregate.pipeline import ExchangePipeline, ExchangeSink, RpcCall
from probewire.aggregate.routes import RouteLearner, RouteTemplater
from probewire.config import Config
from probewire.l7.constants import Coverage, Proto
from probewire.l7.exchanges import ExchangeFlag, LabelTables, rows_from_exchanges
from probewire.l7.kernel_agg import KernelAggregates, KernelOps
from probewire.l7.protocol import Protocol
from probewire.l7.protocols.http1 import Http1Decoder
from probewire.l7.records import (
    DURATION_BUCKETS,
    HTTP_EXCHANGE,
    L7_DATA,
    SIZE_BUCKETS,
    STRUCTS,
)
from probewire.l7.registry import PROTOCOLS
from probewire.l7.streams import EVICTED, Finished, StreamDemux
from probewire.probes.base import Hook, Probe, ProbeContext
from probewire.probes.tls import TLS_PROGRAMS, TlsAttacher
from probewire.runtime.bpf import BpfObject
from probewire.runtime.features import (
    FEATURE_SINCE,
    L7_OPTIONAL,
    HookSupport,
    probe_kernel_features,
)
from probewire.runtime.ring import VarBatch

SYSCALLS = ("read", "recvfrom", "readv", "recvmsg", "recvmmsg", "write", "sendto", "writev",
            "sendmsg", "sendmmsg", "sendfile64")
# How often exchanges waiting for an answer are looked at for timeouts (DNS), at the latest.
EXPIRE_EVERY_NS = 1_000_000_000
# The object for kernels that lack any of L7_OPTIONAL (bpf/l7/bounded.h): the same programs,
# and an enter tracepoint per data syscall that parks its arguments for the exit.
BOUNDED_OBJECT = "l7_bounded"
ENTER_HOOKS = tuple(Hook(f"sys_enter_{s}", (f"l7_enter_{s}",)) for s in SYSCALLS)
# probewire_l7_missed_calls' reason for a call whose exit found no parked arguments.
MISSED_NO_SYS_ENTER = "no_sys_enter"


class L7Probe(Probe):
    name = "l7"
    object_name = "l7"
    hooks = (
        *(Hook(f"sys_exit_{s}", (f"l7_exit_{s}",)) for s in SYSCALLS),
        Hook("sys_enter_close", ("l7_close",)),
        Hook("inet_sock_set_state", ("l7_sock_close_btf", "l7_sock_close_tp")),
    )
    structs: ClassVar[dict[str, np.dtype]] = STRUCTS
    record_dtype = HTTP_EXCHANGE
    extra_rings: ClassVar[dict[str, np.dtype]] = {"l7_data": L7_DATA}
    variable_rings: ClassVar[frozenset[str]] = frozenset({"l7_data"})
    # Tail-call targets: the capture program, the TLS uprobes (attached per libssl), and each
    # protocol's parsers (the instance keeps those of the protocols its config enables).
    helper_programs = ("l7_capture_tp", *TLS_PROGRAMS, *(
        f"l7_{p.name}_{kind}" for p in PROTOCOLS for kind in ("tp", "uprobe")))

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self._features: dict[str, HookSupport] | None = None
        if self.bounded_reason():
            self.object_name = BOUNDED_OBJECT
        cfg = ctx.config.probes.l7
        self.protocols: dict[int, Protocol] = {
            p.proto_id: p for p in PROTOCOLS if cfg.protocols is None or p.name in cfg.protocols}
        self.helper_programs = ("l7_capture_tp", *TLS_PROGRAMS, *(
            f"l7_{p.name}_{kind}" for p in self.protocols.values() for kind in ("tp", "uprobe")))
        http = ctx.config.probes.http
        learning = http.route_learning
        learner = RouteLearner(
            max_distinct=learning.max_distinct,
            max_nodes_per_service=learning.max_nodes_per_service,
            max_services=learning.max_services, keep_hits=learning.keep_hits,
            keep_max=learning.keep_max) if learning.enabled else None
        self.templater = RouteTemplater(http.routes, learner=learner)
        self.pipeline = ExchangePipeline(ctx.services, cfg.max_series_per_metric,
                                         cfg.max_series_per_service, learner, cfg.series_ttl_s)
        self.http1 = Http1Decoder(self.templater, self.pipeline.labels)
        self.pipeline.decoder_sizes.append(self.http1.size)
        self.demux = StreamDemux({i: p for i, p in self.protocols.items()
                                  if not p.parsed_in_kernel})
        self.tls: TlsAttacher | None = None
        otlp = ctx.config.export.otlp
        self.aggregate = cfg.kernel_aggregation
        # With spans exported, the kernel keeps 1 trace in N (sampling.one_in, times the OTLP
        # sampling_ratio) and counts the rest in its maps: None when no spans are made.
        self.span_probability: float | None = (
            otlp.sampling_ratio * ctx.config.sampling.probability
            if otlp.enabled and otlp.traces else None)
        self.ops = KernelOps()
        self.kernel: KernelAggregates | None = None
        self.records = 0  # ring records handled (both rings)
        self.exchanges_from_records = 0
        self._expired_at = 0

    # --- variants: the bounded-loop object on kernels before bpf_loop (5.17) ---------------------
    def kernel_features(self) -> dict[str, HookSupport]:
        """L7_OPTIONAL on this kernel, probed once."""
        if self._features is None:
            self._features = probe_kernel_features(L7_OPTIONAL)
        return self._features

    def bounded_reason(self) -> str:
        """Why this kernel runs the bounded-loop object, or "" (the bpf_loop one)."""
        missing = [f"{n} ({FEATURE_SINCE[n]}+)" for n in L7_OPTIONAL
                   if not self.kernel_features()[n].available]
        return ("bounded-loop variant l7_bounded (this kernel lacks " + " and ".join(missing)
                + ")") if missing else ""

    def active_hooks(self) -> tuple[Hook, ...]:
        if self.object_name == BOUNDED_OBJECT:
            return (*self.hooks, *ENTER_HOOKS)
        return self.hooks

    def program_note(self, program: str) -> str:
        if self.object_name != BOUNDED_OBJECT:
            return ""
        note = self.bounded_reason()
        if program.startswith("l7_enter_"):
            note += "; parks the syscall's arguments for its exit (no bpf_task_pt_regs)"
        return note

    # --- capabilities the agent discovers ---------------------------------------------------------
    @property
    def sinks(self) -> list[ExchangeSink]:
        """Exchange source: called after each batch with its exchanges (spans, events)."""
        return self.pipeline.sinks

    def coverage(self) -> dict[str, Any]:
        """Per protocol: connections classified, exchanges parsed, failures, losses."""
        counts = self._coverage_counts()
        failures = self.demux.failures()
        out: dict[str, Any] = {}
        for p in self.protocols.values():
            out[p.name] = {
                "connections": int(counts[p.proto_id, Coverage.CLASSIFIED]),
                "exchanges": self._exchanges_of(p),
                "truncated_calls": int(counts[p.proto_id, Coverage.TRUNCATED]),
                "parse_failures": {r: n for (name, r), n in failures.items() if name == p.name},
                "connections_lost": {r: n for (name, r), n in self.demux.lost.items()
                                     if name == p.name},
            }
        out["unclassified"] = {
            "tls": int(counts[Proto.UNKNOWN, Coverage.UNCLASSIFIED_TLS]),
            "plain": int(counts[Proto.UNKNOWN, Coverage.UNCLASSIFIED])}
        out["missed_calls"] = self._missed_calls(counts)
        return out

    @staticmethod
    def _missed_calls(counts: np.ndarray) -> dict[str, int]:
        """Calls of traced processes that moved bytes the capture never looked at, per
        reason. no_sys_enter: l7_bounded's exit found no arguments parked by the call's enter
        tracepoint (the call began before the agent attached, e.g. a thread already blocked
        in recv(), or its entry was pushed out of the 16,384-thread LRU map). The object for
        kernels with bpf_task_pt_regs reads the arguments at the exit and never misses one:
        its count stays 0, exported all the same so a query or alert reads alike on every
        kernel."""
        return {MISSED_NO_SYS_ENTER: int(counts[Proto.UNKNOWN, Coverage.NO_SYS_ENTER])}

    def learned_routes(self) -> dict[str, Any]:
        """What the route learner holds per service (/api/routes, `probewire routes`)."""
        return self.templater.learned()

    def register_bounds(self, bounds: Bounds) -> None:
        """The family's user-space structures, with their bounds (serve/structures.py)."""
        register_templater(bounds, self.templater)
        bounds.register(
            "l7.memo", bound=MEMO_MAX,
            policy="ids of connections, services, addresses, label sets and paths; starts "
            "afresh past the bound", size=self.pipeline.memo_size, shrink=self.pipeline.shrink)
        bounds.register(
            "l7.streams", bound=self.demux.max_connections,
            policy="connections parsed here; the least recently fed goes (counted in "
            "probewire_l7_connections_lost{reason=evicted})", size=lambda: len(self.demux.conns),
            evictions=lambda: sum(n for (_, r), n in self.demux.lost.items() if r == EVICTED))

    def tls_status(self) -> dict[str, Any]:
        import dataclasses

        tls = self.tls
        if tls is None:
            return {"libraries": [], "failed": {}, "links": 0, "processes": []}
        return {"libraries": sorted(tls.attached.values()), "failed": dict(tls.failed),
                "links": len(tls.links),
                "processes": [dataclasses.asdict(c) for c in tls.coverage()]}

    # --- load -------------------------------------------------------------------------------------
    def before_load(self, obj: BpfObject) -> None:
        cfg = self.ctx.config.probes.l7
        if not cfg.trace_agent:
            obj.set_rodata(self_tgid=os.getpid())
        obj.maps["l7_aggs"].set_max_entries(cfg.kernel_keys)
        obj.set_rodata(
            enabled_protocols=sum(1 << i for i in self.protocols),
            aggregate=int(self.aggregate),
            sample_spans=int(self.span_probability is not None),
            duration_bounds_ns=np.array([round(b * 1e9) for b in DURATION_BUCKETS], np.uint64),
            size_bounds=np.array(SIZE_BUCKETS, np.uint64),
        )

    def after_load(self, obj: BpfObject) -> None:
        # Each enabled protocol's parser at its id, in both dispatch tables.
        for p in self.protocols.values():
            for kind in ("tp", "uprobe"):
                prog = obj.programs[f"l7_{p.name}_{kind}"]
                if prog.fd >= 0:
                    obj.maps[f"l7_parsers_{kind}"].update(
                        int(p.proto_id).to_bytes(4, "little"), prog.fd.to_bytes(4, "little"))
        self._set_sampling(self.ctx.config)
        self._set_path_ids()
        self.kernel = KernelAggregates(obj.maps["l7_aggs"], self.ops, self.pipeline,
                                       self.ctx.services)
        if self.ctx.config.probes.l7.tls and obj.programs["tls_exit"].fd >= 0:
            self.tls = TlsAttacher(obj)
            self.tls.start()

    @property
    def kernel_sampling(self) -> bool:
        """The kernel decides which traces' records cross (spans exported): records say
        which were kept (HttpFlag.SAMPLED)."""
        return self.span_probability is not None

    def _set_sampling(self, config: Config) -> None:
        """The kernel's draw (l7_sampling): the probability of keeping a new trace, out of
        2^32, and whether a request's traceparent decides."""
        if self.obj is None or self.span_probability is None:
            return
        self.span_probability = (config.export.otlp.sampling_ratio
                                 * config.sampling.probability)
        bound = round(self.span_probability * (1 << 32))
        value = bound.to_bytes(8, "little") + bytes([int(config.sampling.honor_traceparent)]) \
            + bytes(7)
        self.map("l7_sampling").update(bytes(4), value)

    def _set_path_ids(self) -> None:
        """Whether the kernel hashes numeric path segments as one (l7_path_ids): only while
        every number templates to {id} (no route pattern names one)."""
        if self.obj is not None:
            self.map("l7_path_ids").update(
                bytes(4), int(self.templater.numbers_are_ids).to_bytes(4, "little"))

    def reconfigure(self, config: Config) -> None:
        """Routes, budgets and TLS capture from a reloaded config (Agent.reconfigure). New
        route patterns apply to the next exchange on any path (the kernel forgets the paths it
        counts by route, the memo starts afresh); series already made stay as they are."""
        http, cfg = config.probes.http, config.probes.l7
        if tuple(RouteTemplater(http.routes).patterns) != self.templater.patterns:
            self.templater = RouteTemplater(http.routes, learner=self.templater.learner)
            self.http1.templater = self.templater
            self.pipeline.shrink()
            if self.obj is not None:
                self._set_path_ids()
                ops = self.map("l7_ops")
                for key in list(ops.keys()):
                    ops.delete(key)
        if cfg.max_series_per_metric != self.pipeline.red.sinks[0].budget.max_series:
            for _, budget in self.pipeline.budgets():
                budget.resize(cfg.max_series_per_metric)
            self.pipeline.shrink()  # (answers memoised under the old limit go)
        self._set_sampling(config)
        if self.obj is not None:
            if cfg.tls and self.tls is None and self.obj.programs["tls_exit"].fd >= 0:
                self.tls = TlsAttacher(self.obj)
                self.tls.start()
            elif not cfg.tls and self.tls is not None:
                self.tls.stop()  # detaches every libssl uprobe
                self.tls = None

    def on_stop(self) -> None:
        if self.tls is not None:
            self.tls.stop()
            self.tls = None

    def on_process_events(self, events: Sequence[Any]) -> None:
        """Exec/exit events (ProcessProbe.subscribers): TLS attaches to new processes."""
        if self.tls is not None:
            self.tls.on_process_events(events)

    # --- the record path --------------------------------------------------------------------------
    def on_batch(self, records: np.ndarray) -> None:
        """HTTP/1.x exchange records."""
        if not len(records):
            return
        self.pipeline.start_batch()
        rows = self.http1.decode(records)
        if self.aggregate and self.obj is not None:
            self._register_routes(records, rows)
        self.records += len(records)
        self.exchanges_from_records += len(records)
        self.pipeline.add(rows, http=records, http_index=np.arange(len(rows)))
        self._expire()

    def _register_routes(self, rec: np.ndarray, rows: np.ndarray) -> None:
        """Tell the kernel the route of each new path it shipped: later exchanges on that
        path are counted in the kernel. Only rows the kernel could have aggregated (a known
        method, first in their head) carry a hash of the path user space templated."""
        hashes = rec["path_hash"]
        fast = np.flatnonzero((hashes != 0) & (rec["method"] != 0) & (rec["pipe_idx"] == 0))
        if not len(fast):
            return
        uniq, first = np.unique(hashes[fast], return_index=True)
        targets = self.pipeline.labels.targets
        names = [targets[int(rows["target"][i])] for i in fast[first].tolist()]
        self.ops.register(self.map("l7_ops"), Proto.HTTP, uniq, names)

    def on_ring(self, map_name: str, batch: VarBatch) -> None:
        """Connection bytes for the protocols parsed here."""
        self.records += len(batch)
        # Name the process behind each new connection now, while it runs: a forked worker
        # (a PostgreSQL backend, a pre-fork server's child) makes no exec event, and by the
        # time its exchanges end (often at the close) it may have exited, leaving /proc
        # nothing to read. A name read once is kept for a pid that exits.
        first = batch.records["seq"] == 1
        if first.any():
            for tgid in np.unique(batch.records["tgid"][first]).tolist():
                self.ctx.services.name_for(tgid)
        self._rows_of(self.demux.feed(batch))
        self._expire(force=False)

    def _expire(self, force: bool = False) -> None:
        now = time.monotonic_ns()
        if force or now - self._expired_at >= EXPIRE_EVERY_NS:
            self._expired_at = now
            self._rows_of(self.demux.expire(now))

    def _rows_of(self, finished: list[Finished]) -> None:
        """Exchange rows from parsers' exchanges, per protocol."""
        if not finished:
            return
        labels = self.pipeline.start_batch()
        by_proto: dict[int, list[Finished]] = {}
        for f in finished:
            by_proto.setdefault(f.proto, []).append(f)
        for proto, items in by_proto.items():
            if proto == Proto.HTTP2:
                self._h2_rows(items, labels)
                continue
            rows = rows_from_exchanges([(f.header, f.exchange) for f in items], proto, labels)
            self.pipeline.add(rows, attributes=[f.exchange.attributes for f in items])

    def _h2_rows(self, items: list[Finished], labels: LabelTables) -> None:
        """HTTP/2 streams as HTTP rows (routes templated like HTTP/1.x paths); gRPC calls
        also feed rpc_* metrics."""
        template: Callable[[Any], str] = lambda ex: self.templater.template(  # noqa: E731
            ex.target.encode("latin-1", "replace") or b"/")
        rows = rows_from_exchanges([(f.header, f.exchange) for f in items], Proto.HTTP2,
                                   labels, target_of=template)
        rpc: list[RpcCall] = []
        for i, f in enumerate(items):
            ex, a = f.exchange, f.exchange.attributes
            rows[i]["req_body"] = ex.request_bytes
            rows[i]["resp_body"] = ex.response_bytes
            rows[i]["eflags"] = (ExchangeFlag.H2 | (ExchangeFlag.GRPC if a.get("grpc") else 0)
                                 | (ExchangeFlag.ABORTED if ex.aborted else 0))
            if a.get("grpc"):
                rpc_service, _, rpc_method = str(a.get("path", "")).lstrip("/").partition("/")
                code = a.get("grpc_status")
                rpc.append((i, rpc_service, rpc_method, "" if code is None else str(code)))
        self.pipeline.add(rows, attributes=[f.exchange.attributes for f in items], rpc=rpc)

    # --- export -----------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.kernel is not None and self.aggregate:
            self.kernel.sync()

    def _coverage_counts(self) -> np.ndarray:
        counts = np.zeros((int(Proto.COUNT), int(Coverage.COUNT)), dtype=np.int64)
        if self.obj is not None:
            keys, values = self.obj.maps["l7_coverage"].read_all(np.dtype(np.uint32),
                                                                 np.dtype(np.uint64))
            per_key = values.reshape(len(keys), -1).sum(axis=1)
            counts.reshape(-1)[keys.astype(np.int64)] = per_key
        return counts

    def _exchanges_of(self, p: Protocol) -> int:
        if p.parsed_in_kernel:
            counted = self.kernel.counted if self.kernel is not None else 0
            return counted + self.exchanges_from_records
        return self.demux.exchanges[p.name]

    def collect(self) -> Iterable[Metric]:
        self.sync()
        self._expire(force=True)
        yield from self.pipeline.families()
        counts = self._coverage_counts()
        failures = self.demux.failures()
        conns = CounterMetricFamily(
            "probewire_l7_connections", "Connections the capture layer classified, per "
            "protocol.", labels=["protocol"])
        exchanges = CounterMetricFamily(
            "probewire_l7_exchanges", "Exchanges parsed, per protocol.", labels=["protocol"])
        failed = CounterMetricFamily(
            "probewire_l7_parse_failures", "Bytes a protocol's parser could not read, per "
            "protocol and reason (each counted once where it happened).",
            labels=["protocol", "reason"])
        lost = CounterMetricFamily(
            "probewire_l7_connections_lost", "Connections whose parsing was given up, per "
            "protocol and reason (a record dropped by a full ring, a call larger than the "
            "capture, bytes no parser could follow).", labels=["protocol", "reason"])
        truncated = CounterMetricFamily(
            "probewire_l7_truncated_calls", "Calls that moved more bytes than the capture "
            "ships (the rest reached the parser as a hole).", labels=["protocol"])
        for p in self.protocols.values():
            conns.add_metric([p.name], float(counts[p.proto_id, Coverage.CLASSIFIED]))
            exchanges.add_metric([p.name], float(self._exchanges_of(p)))
            truncated.add_metric([p.name], float(counts[p.proto_id, Coverage.TRUNCATED]))
        for (name, reason), n in sorted(failures.items()):
            failed.add_metric([name, reason], n)
        for (name, reason), n in sorted(self.demux.lost.items()):
            lost.add_metric([name, reason], n)
        missed = CounterMetricFamily(
            "probewire_l7_missed_calls", "Data syscalls of traced processes that moved bytes "
            "the capture never looked at, per reason (no_sys_enter: on kernels without "
            "bpf_task_pt_regs, the call began before the agent attached or its parked "
            "arguments were pushed out; the fd is unknown then, so calls on any file count).",
            labels=["reason"])
        for reason, n in self._missed_calls(counts).items():
            missed.add_metric([reason], float(n))
        yield from (conns, exchanges, failed, lost, truncated, missed)
        h2_lost = CounterMetricFamily(
            "probewire_http2_connections_lost",
            "HTTP/2 connections given up (no preface seen, record dropped, too large).",
            labels=["reason"])
        for (name, reason), n in sorted(self.demux.lost.items()):
            if name == "http2":
                h2_lost.add_metric([reason], n)
        yield h2_lost
        unrec = CounterMetricFamily(
            "probewire_http_unrecognized_connections",
            "Connections whose first bytes no protocol classifier claimed (for TLS: "
            "typically HTTP/2 opened before the agent started).", labels=["transport"])
        unrec.add_metric(["tls"], float(counts[Proto.UNKNOWN, Coverage.UNCLASSIFIED_TLS]))
        unrec.add_metric(["plain"], float(counts[Proto.UNKNOWN, Coverage.UNCLASSIFIED]))
        yield unrec
        via = CounterMetricFamily(
            "probewire_http_exchanges",
            "HTTP/1.x exchanges seen: counted in kernel maps (route already known) or sent to "
            "user space as a ring record.", labels=["via"])
        via.add_metric(["kernel"], float(self.kernel.counted if self.kernel else 0))
        via.add_metric(["ring"], float(self.exchanges_from_records))
        yield via

    def budget_families(self) -> Iterable[tuple[str, float, int]]:
        """(metric, overflows, active series) of every label budget of the family."""
        for metric, budget in self.pipeline.budgets():
            yield metric, float(budget.overflows), budget.active_series


__all__ = ["L7Probe"]
