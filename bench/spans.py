"""OTLP spans per agent CPU-second, probewire's direct encoder beside the SDK's, over gRPC and
HTTP/protobuf; and event → span latency at a steady 5,000 exchanges/s.

    .venv/bin/python -m bench.spans [--quick]        (no root needed)
    .venv/bin/python -m bench.spans --profile grpc   (cProfile of the span thread instead)

The workload is what a traced web tier sends: per request, a server exchange of `web` (an nginx
in front, Kubernetes identity, a browser's or a tool's head with a unique id in the path, a
query, 20% of requests arriving with a traceparent), its client call to `catalog` (the
server span's child, linked by the assembler) and catalog's server exchange; statuses mostly
200 with some 404/500/503. Batches of up to 128 exchanges go through the real
``OtlpExporter.sink`` → span thread → SpanAssembler → encoder → the SDK exporter's transport,
to the real receiver of tests/support/otlp_receiver.py running in a child process, which
counts every span it decodes (and keeps none).

- "spans encoded+sent per agent CPU-second": every batch is handed to sink() at once (the
  exporter packs 2,048 spans per request, as at line rate) and the figure is spans received
  over the CPU time of this process (the span thread, grpcio's threads, the feeding loop; not
  the receiver's) until the last span was acknowledged. The SDK path runs in the same run, the
  same way, with the SDK's stock exporters (ReadableSpan + encode_spans), interleaved.
- "encode only": µs per span of the three encoders on the same assembled records: the direct
  encoder, the generated opentelemetry-proto classes used as well as we could (pre-built
  Resource and scope messages, a cached KeyValue per attribute), and the SDK's encode_spans
  with the ReadableSpans it needs. Plus the assembler's own cost, for where the rest goes.
- "event → span export p99 at 5k exchanges/s": batches of 25 exchanges every 5 ms (the ring
  reader's flush interval) with end timestamps of the moment they reach sink(); the latency is
  from that moment to the return of the export call that carried the span.
- "spans per agent CPU-second at 5k exchanges/s": the same steady run, spans exported over this
  process's CPU time from the exporter's start to its stop (what a modest rate costs: the fixed
  cost of each export call and thread wake-up, not only the per-span work of the line-rate row).

`run(quick)` returns bench.report Rows for `python -m bench`. Timings need a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus
from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.trace.export import SpanExporter

from bench.harness import REPO_ROOT
from bench.report import Row, render
from probewire.config import OtlpConfig, config_from_mapping
from probewire.enrich.identity import resource_attributes, service_key
from probewire.export.otlp import OtlpExporter, make_exporters, signal_endpoint
from probewire.export.span_encoder import SpanEncoder, any_value
from probewire.export.spans import SCOPE, SpanAssembler, SpanRecord, SpanResource, readable_span
from probewire.l7.constants import HTTP_HEAD_LEN, Proto, Role
from probewire.l7.exchanges import EXCHANGE, ExchangeBatch
from probewire.l7.records import HTTP_EXCHANGE

PROTOCOLS = ("grpc", "http/protobuf")
TARGET_SPANS_PER_S = 100_000
TARGET_P99_MS = 50.0
BATCH_EXCHANGES = 128  # the ring reader's batch
STEADY_EXCHANGES_PER_S = 5000
STEADY_TICK_S = 0.005  # the ring reader's flush interval

WEB = service_key("web", "shop", "deployment", "web")
CATALOG = service_key("catalog", "shop", "deployment", "catalog")
CATALOG_TGID = 4_000_000  # no such process: its resource has no executable
PATHS = ("/api/items/{i}", "/api/items/{i}/reviews", "/api/cart/{i}", "/api/users/{i}/orders",
         "/api/search", "/", "/static/app.{i}.js")
USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "curl/7.88.1", "python-requests/2.31.0", "Go-http-client/1.1",
)
STATUSES = (200,) * 17 + (404, 500, 503)


def _route(path: str) -> str:
    return path.replace("{i}", "{id}")


@dataclass
class Workload:
    """Request-shaped exchange batches (see the module docstring)."""

    web_tgid: int
    seed: int = 1

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def batch(self, requests: int, now_ns: int = 1_000_000_000) -> ExchangeBatch:
        """`requests` requests, three exchanges each, in the order their records arrive: the
        upstream's server exchange, the web tier's client call, then its server exchange."""
        rng = self.rng
        n = 3 * requests
        rows = np.zeros(n, dtype=EXCHANGE)
        http = np.zeros(n, dtype=HTTP_EXCHANGE)
        service, operation, target, status, peer, local = [], [], [], [], [], []
        for r in range(requests):
            shape = rng.choice(PATHS)
            path = shape.replace("{i}", str(rng.randrange(1, 10**6)))
            query = f"?page={rng.randrange(1, 50)}&sort=price" if rng.random() < 0.5 else ""
            code = rng.choice(STATUSES)
            client_port = rng.randrange(32768, 61000)
            upstream_port = rng.randrange(32768, 61000)
            web_tid = self.web_tgid + rng.randrange(2)
            t0 = now_ns - 700_000 - r * 1000
            trace = (f"traceparent: 00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}"
                     "-01\r\n" if rng.random() < 0.2 else "")
            inbound = (f"GET {path}{query} HTTP/1.1\r\nHost: shop.example.com\r\n{trace}"
                       f"User-Agent: {rng.choice(USER_AGENTS)}\r\nAccept: */*\r\n"
                       "\r\n").encode()[:HTTP_HEAD_LEN]  # what the kernel copies
            proxied = (f"GET {path}{query} HTTP/1.0\r\nHost: catalog\r\nConnection: close\r\n"
                       f"User-Agent: {rng.choice(USER_AGENTS)}\r\n\r\n").encode()
            for j, (role, tgid, tid, head, start, end, lport, rport, svc, src, dst) in enumerate((
                (Role.SERVER, CATALOG_TGID, CATALOG_TGID + rng.randrange(4), proxied,
                 t0 + 80_000, t0 + 580_000, 8080, upstream_port, CATALOG, "10.1.0.7",
                 "10.1.0.9"),
                (Role.CLIENT, self.web_tgid, web_tid, proxied, t0 + 50_000, t0 + 600_000,
                 upstream_port, 8080, WEB, "10.1.0.9", "10.1.0.7"),
                (Role.SERVER, self.web_tgid, web_tid, inbound, t0, t0 + 650_000, 443,
                 client_port, WEB, "203.0.113.24", "10.1.0.7"),
            )):
                i = 3 * r + j
                rows[i]["proto"] = Proto.HTTP
                rows[i]["role"] = role
                rows[i]["tgid"], rows[i]["tid"] = tgid, tid
                rows[i]["start_ns"], rows[i]["end_ns"] = start, end
                rows[i]["lport"], rows[i]["rport"] = lport, rport
                rows[i]["status"] = code
                http[i]["req_head"][: len(head)] = np.frombuffer(head, np.uint8)
                http[i]["req_head_len"] = len(head)
                service.append(svc)
                operation.append("GET")
                target.append(_route(shape))
                status.append(str(code))
                peer.append(src)
                local.append(dst)
        return ExchangeBatch(rows, service, operation, target, status, peer, local, http=http,
                             http_index=np.arange(n), attributes=[{} for _ in range(n)])

    def batches(self, exchanges: int) -> list[ExchangeBatch]:
        per = BATCH_EXCHANGES // 3
        return [self.batch(min(per, (exchanges - done) // 3))
                for done in range(0, exchanges - 2, 3 * per)]


def process_attributes(tgid: int, key: str) -> dict[str, str]:
    attrs = resource_attributes(key)
    attrs.update({"k8s.pod.name": f"{attrs['service.name']}-7d4b9c-x{tgid % 97:02d}",
                  "container.id": f"{tgid:064x}", "k8s.node.name": "node-1"})
    return attrs


# --- the receiver, in a child process ------------------------------------------------------
# It prints its port, then answers each line on its stdin with the number of spans received.
RECEIVER = """
import sys, threading
sys.path.insert(0, {tests!r})
from concurrent import futures
from http.server import ThreadingHTTPServer
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from support.otlp_receiver import Receiver, _http_handler, _Traces

class Counting(Receiver):
    received = 0

    def _add(self, req, headers):
        spans = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        with self.lock:
            self.received += spans

rx = Counting({protocol!r})
if rx.protocol == "grpc":
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(rx), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    serve = server.wait_for_termination
else:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(rx))
    port = httpd.server_address[1]
    serve = httpd.serve_forever
threading.Thread(target=serve, daemon=True).start()
print(port, flush=True)
for _ in sys.stdin:
    with rx.lock:
        print(rx.received, flush=True)
"""


class ReceiverProc:
    """tests/support/otlp_receiver.py's receiver in a child process, counting spans."""

    def __init__(self, protocol: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RECEIVER.format(tests=str(REPO_ROOT / "tests"),
                                                   protocol=protocol)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.endpoint = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    @property
    def received(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def receiver(protocol: str) -> Iterator[ReceiverProc]:
    rx = ReceiverProc(protocol)
    try:
        yield rx
    finally:
        rx.close()


# --- exporters -------------------------------------------------------------------------------
def otlp_config(protocol: str, endpoint: str) -> OtlpConfig:
    return config_from_mapping({"export": {"otlp": {
        "enabled": True, "protocol": protocol, "endpoint": endpoint, "metrics": False,
        "max_queue_spans": 1_048_576}}}).export.otlp


def sdk_exporters(cfg: OtlpConfig) -> tuple[MetricExporter, SpanExporter]:
    """The SDK's stock span exporter for the same settings (its own encoder)."""
    metrics, _ = make_exporters(cfg)
    protocol, url = signal_endpoint(cfg, "traces")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return metrics, OTLPSpanExporter(endpoint=url, insecure=True, timeout=cfg.timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpans,
    )

    return metrics, HttpSpans(endpoint=url, timeout=cfg.timeout_s)


def _wait(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@contextlib.contextmanager
def _listening() -> Iterator[None]:
    """A listening socket in this process: the web tier's tgid is ours, so the assembler
    holds its client exchanges for their server exchange, as it does for a real proxy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield


def throughput(path: str, protocol: str, rx: ReceiverProc,
               batches: Sequence[ExchangeBatch]) -> float:
    """Spans received per CPU-second of this process (see the module docstring)."""
    cfg = otlp_config(protocol, rx.endpoint)
    exporters = make_exporters(cfg) if path == "direct" else sdk_exporters(cfg)
    exporter = OtlpExporter(cfg, list, exporters, process_attributes=process_attributes)
    exporter.start()
    try:
        # Warm: the channel or connection is open, the resources encoded.
        exporter.sink(batches[0])
        if not _wait(lambda: exporter.spans_exported + exporter.spans_failed > 0, 60):
            raise RuntimeError(f"{path} {protocol}: nothing was exported")
        _wait(lambda: exporter.waiting_spans == 0 and not exporter.assembler.pending, 30)
        base = rx.received
        sent = exporter.spans_exported
        expected = 0
        cpu0 = time.process_time()
        for b in batches[1:]:
            exporter.sink(b)
            expected += len(b)
        if not _wait(lambda: exporter.spans_exported - sent + exporter.spans_failed
                     >= expected, 600):
            raise RuntimeError(f"{path} {protocol}: spans did not all leave")
        cpu_s = time.process_time() - cpu0
        got = rx.received - base
        if exporter.spans_failed or exporter.spans_dropped or got != expected:
            raise RuntimeError(f"{path} {protocol}: {expected} spans sent, {got} received, "
                               f"{exporter.spans_failed} failed, {exporter.spans_dropped} dropped")
        return got / cpu_s
    finally:
        exporter.stop()


def steady_latency(protocol: str, rx: ReceiverProc, workload: Workload,
                   duration_s: float) -> tuple[float, float, int, int, float]:
    """(p50 ms, p99 ms, spans exported, exchanges dropped, spans per CPU-second) at
    STEADY_EXCHANGES_PER_S."""
    cfg = config_from_mapping({"export": {"otlp": {
        "enabled": True, "protocol": protocol, "endpoint": rx.endpoint,
        "metrics": False}}}).export.otlp  # the default queue bound
    exporter = OtlpExporter(cfg, list, make_exporters(cfg), process_attributes=process_attributes)
    per_tick = STEADY_EXCHANGES_PER_S * STEADY_TICK_S / 3  # requests per tick
    ticks = int(duration_s / STEADY_TICK_S)
    owed, plan = 0.0, []
    for _ in range(ticks):
        owed += per_tick
        plan.append(workload.batch(int(owed)))
        owed -= int(owed)
    exporter.start()
    try:
        exporter.sink(plan[0])
        _wait(lambda: exporter.spans_exported > 0, 60)
        exporter.clear_latency_samples()
        exported0 = exporter.spans_exported
        cpu0 = time.process_time()
        next_s = time.monotonic()
        for b in plan[1:]:
            next_s += STEADY_TICK_S
            delay = next_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            shift = time.monotonic_ns() - int(b.rows["end_ns"].max())
            for column in ("start_ns", "end_ns"):
                b.rows[column] = (b.rows[column].astype(np.int64) + shift).astype(np.uint64)
            exporter.sink(b)
        _wait(lambda: exporter.waiting_spans == 0 and not exporter.assembler.pending, 30)
        time.sleep(0.2)
        cpu_s = time.process_time() - cpu0
        lat = exporter.latency_samples_ns()
        p50, p99 = (np.percentile(lat, [50, 99]) / 1e6) if len(lat) else (np.nan, np.nan)
        exported = exporter.spans_exported - exported0
        return float(p50), float(p99), exported, exporter.spans_dropped, exported / cpu_s
    finally:
        exporter.stop()


# --- encoders, on the same records -----------------------------------------------------------
class ClassEncoder:
    """The request built with the generated opentelemetry-proto (upb) classes, as cheaply as we
    could: Resource and scope messages built once, a KeyValue per attribute value cached."""

    def __init__(self) -> None:
        self.kv: dict[tuple[str, str | int], KeyValue] = {}
        self.resources: dict[SpanResource, PbResource] = {}
        self.scope = InstrumentationScope(name=SCOPE.name, version=SCOPE.version or "")

    def encode(self, records: Sequence[SpanRecord]) -> bytes:
        groups: dict[SpanResource, list[PbSpan]] = {}
        for rec in records:
            attrs = []
            for item in rec.attributes.items():
                kv = self.kv.get(item)
                if kv is None:
                    kv = self.kv[item] = KeyValue(key=item[0], value=any_value(item[1]))
                attrs.append(kv)
            groups.setdefault(rec.resource, []).append(PbSpan(
                trace_id=rec.trace_id.to_bytes(16, "big"),
                span_id=rec.span_id.to_bytes(8, "big"),
                trace_state=f"ot=th:{rec.threshold}" if rec.threshold else "",
                parent_span_id=rec.parent_id.to_bytes(8, "big") if rec.parent_id else b"",
                name=rec.name, kind=2 if rec.server else 3,
                start_time_unix_nano=rec.start_ns, end_time_unix_nano=rec.end_ns,
                attributes=attrs, status=PbStatus(code=2 if rec.error else 0),
                flags=0x100 | (0x200 if rec.parent_remote and rec.parent_id else 0)))
        resource_spans = []
        for res, spans in groups.items():
            pb = self.resources.get(res)
            if pb is None:
                pb = self.resources[res] = PbResource(attributes=[
                    KeyValue(key=k, value=any_value(v))
                    for k, v in res.resource.attributes.items()])
            resource_spans.append(ResourceSpans(
                resource=pb, scope_spans=[ScopeSpans(scope=self.scope, spans=spans)]))
        encoded: bytes = ExportTraceServiceRequest(
            resource_spans=resource_spans).SerializeToString()
        return encoded


def _per_span_us(fn: Callable[[], object], spans: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return min(times) / spans * 1e6


def encode_costs(workload: Workload, exchanges: int, repeats: int) -> dict[str, float]:
    """µs per span of assembling and of each encoder, on the same records."""
    batches = workload.batches(exchanges)
    assembler = SpanAssembler(1.0, link_wait_ns=2_000_000_000,
                              process_attributes=process_attributes)
    with _listening():
        records = [r for b in batches for r in assembler.add_records(b)]

        def assemble() -> None:
            a = SpanAssembler(1.0, link_wait_ns=2_000_000_000,
                              process_attributes=process_attributes)
            for b in batches:
                a.add_records(b)

        assemble_us = _per_span_us(assemble, len(records), repeats)
    chunks = [records[i:i + 2048] for i in range(0, len(records), 2048)]
    direct, classes = SpanEncoder(), ClassEncoder()
    # The direct encoder first, and compared last: the other two read each record's
    # attributes, which makes its dict, and the direct encoder then writes that dict instead
    # of the bytes the assembler made (as it must: a read dict may have been changed).
    direct_us = _per_span_us(lambda: [direct.encode(c) for c in chunks], len(records), repeats)
    encoded = [direct.encode(c) for c in chunks]
    if [ExportTraceServiceRequest.FromString(e) for e in encoded] != \
            [ExportTraceServiceRequest.FromString(classes.encode(c)) for c in chunks]:
        raise RuntimeError("the direct and the generated-class encoders disagree")
    return {
        "assemble": assemble_us,
        "direct": direct_us,
        "classes": _per_span_us(lambda: [classes.encode(c) for c in chunks], len(records),
                                repeats),
        "sdk": _per_span_us(
            lambda: [encode_spans([readable_span(r) for r in c]).SerializeToString()
                     for c in chunks], len(records), max(1, repeats // 2)),
    }


# --- rows ----------------------------------------------------------------------------------
def run(quick: bool) -> list[Row]:
    repeats = 1 if quick else 5
    direct_exchanges = 6_000 if quick else 60_000
    sdk_exchanges = 1_500 if quick else 9_000
    steady_s = 2.0 if quick else 10.0
    label = {"grpc": "gRPC", "http/protobuf": "HTTP/protobuf"}
    rows: dict[str, Row] = {}
    for protocol in PROTOCOLS:
        name = label[protocol]
        rows[f"direct {protocol}"] = Row(
            f"OTLP spans encoded+sent per agent CPU-second, {name}", "spans/s",
            target=f"≥ {TARGET_SPANS_PER_S:,} per core", goal=(">=", TARGET_SPANS_PER_S),
            note="probewire's encoder; assembly, encoding and the SDK exporter's transport, "
                 "all of this process's CPU, to a receiver in another process")
        rows[f"sdk {protocol}"] = Row(
            f"OTLP spans encoded+sent per agent CPU-second, {name}, SDK encoder", "spans/s",
            note="the same run and workload through the SDK's stock exporter "
                 "(ReadableSpan + encode_spans)")
    encode_rows = {
        "assemble": Row("span assembly (SpanAssembler.add_records)", "µs/span",
                        note="decode, parse heads, link, sample, attributes (an HTTP span's "
                             "own ones written as protobuf bytes here)"),
        "direct": Row("OTLP encode only: probewire's encoder", "µs/span",
                      note="hand-written wire format, pre-encoded resource and scope, "
                           "attribute bytes as the assembler made them"),
        "classes": Row("OTLP encode only: generated opentelemetry-proto classes", "µs/span",
                       note="upb messages, pre-built resource and scope, cached KeyValues"),
        "sdk": Row("OTLP encode only: SDK encode_spans", "µs/span",
                   note="ReadableSpan per span, then the SDK's encoder"),
    }
    latency_rows = {}
    for protocol in PROTOCOLS:
        name = label[protocol]
        latency_rows[protocol] = (
            Row(f"event → span export p99 at 5k exchanges/s, {name}", "ms",
                target=f"≤ {TARGET_P99_MS:.0f} ms", goal=("<=", TARGET_P99_MS), judge="max",
                note="batch at sink() to the return of its export call"),
            Row(f"exchanges dropped by the span queue at 5k exchanges/s, {name}", "exchanges",
                target="0", goal=("==", 0), judge="all"),
            Row(f"OTLP spans per agent CPU-second at 5k exchanges/s, {name}", "spans/s",
                note="this process's CPU over the steady run: per-span work plus each export "
                     "call's and wake-up's fixed cost"))
    workload = Workload(os.getpid())
    with _listening():
        direct_batches = workload.batches(direct_exchanges)
        sdk_batches = workload.batches(sdk_exchanges)
        for protocol in PROTOCOLS:
            with receiver(protocol) as rx:
                for _ in range(repeats):  # interleaved: direct, SDK, direct, SDK ...
                    rows[f"direct {protocol}"].add(
                        throughput("direct", protocol, rx, direct_batches))
                    rows[f"sdk {protocol}"].add(throughput("sdk", protocol, rx, sdk_batches))
                p50, p99, exported, dropped, per_cpu_s = steady_latency(
                    protocol, rx, workload, steady_s)
                p99_row, dropped_row, cpu_row = latency_rows[protocol]
                p99_row.add(p99)
                p99_row.note += f"; p50 {p50:.2f} ms over {exported:,} spans"
                dropped_row.add(dropped)
                cpu_row.add(per_cpu_s)
    for _ in range(repeats):
        for key, us in encode_costs(workload, 3_000 if quick else 12_000, 3).items():
            encode_rows[key].add(us)
    for protocol in PROTOCOLS:
        direct, sdk = rows[f"direct {protocol}"], rows[f"sdk {protocol}"]
        if direct.values and sdk.values:
            ratio = statistics.median(direct.values) / statistics.median(sdk.values)
            direct.note += f"; {ratio:.1f}x the SDK's"
    out = [*rows.values(), *encode_rows.values()]
    for pair in latency_rows.values():
        out += pair
    return out


def profile(protocol: str, exchanges: int, top: int) -> None:
    """cProfile of the span thread (assembly, encoding, the export call) over one line-rate
    run of the direct path, and what the garbage collector took on all threads meanwhile."""
    import cProfile
    import gc
    import pstats

    profiles: list[cProfile.Profile] = []
    loop = OtlpExporter._spans_loop

    def profiled(self: OtlpExporter) -> None:
        p = cProfile.Profile()
        profiles.append(p)
        p.runcall(loop, self)

    collections = [0, 0, 0]
    gc_s, started = [0.0], [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            collections[info["generation"]] += 1
            gc_s[0] += time.thread_time() - started[0]

    workload = Workload(os.getpid())
    OtlpExporter._spans_loop = profiled  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)
    try:
        with _listening(), receiver(protocol) as rx:
            batches = workload.batches(exchanges)
            gc_s[0], collections[:] = 0.0, [0, 0, 0]
            rate = throughput("direct", protocol, rx, batches)
    finally:
        OtlpExporter._spans_loop = loop  # type: ignore[method-assign]
        gc.callbacks.remove(on_gc)
    print(f"{protocol}: {rate:,.0f} spans per CPU-second under the profiler; garbage "
          f"collections (gen 0/1/2) {collections}, {gc_s[0] * 1e3:.0f} ms of CPU")
    pstats.Stats(profiles[0]).sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", choices=PROTOCOLS, metavar="PROTOCOL",
                        help="instead of the rows: cProfile the span thread over one direct "
                             "line-rate run (grpc or http/protobuf)")
    parser.add_argument("--top", type=int, default=30, help="functions --profile lists")
    args = parser.parse_args()
    if args.profile:
        profile(args.profile, 6_000 if args.quick else 30_000, args.top)
        return
    print(render(run(args.quick), "OTLP spans: direct encoder vs the SDK"))


if __name__ == "__main__":
    main()
