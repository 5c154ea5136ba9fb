"""Span assembly from decoded exchanges, and Prometheus → OTLP metric conversion."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

import numpy as np
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from probewire.config import config_from_mapping
from probewire.export.otlp import OtlpExporter, families_to_otlp
from probewire.export.spans import SpanAssembler, is_otlp_export, parse_traceparent
from probewire.l7.constants import Proto, Role
from probewire.l7.exchanges import EXCHANGE, ExchangeBatch, ExchangeFlag
from probewire.l7.records import HTTP_EXCHANGE

ROLE_SERVER, ROLE_CLIENT = int(Role.SERVER), int(Role.CLIENT)
FLAG_ABORTED, FLAG_H2, FLAG_GRPC = ExchangeFlag.ABORTED, ExchangeFlag.H2, ExchangeFlag.GRPC

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def batch(*rows: dict[str, object]) -> ExchangeBatch:
    """Exchange rows as the l7 family makes them: HTTP/1.x rows point at their kernel record
    (whose head spans read); HTTP/2 rows (FLAG_H2) carry their path as an attribute."""
    n = len(rows)
    ex = np.zeros(n, dtype=EXCHANGE)
    http = np.zeros(n, dtype=HTTP_EXCHANGE)
    index = np.arange(n)
    attributes: list[dict[str, object]] = [{} for _ in range(n)]
    operations = ["GET"] * n
    for i, row in enumerate(rows):
        row = dict(row)
        head = bytes(row.pop("head", b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"))  # type: ignore[arg-type]
        eflags = int(row.pop("flags", 0))  # type: ignore[call-overload]
        http[i]["req_head"][: len(head)] = np.frombuffer(head, np.uint8)
        http[i]["req_head_len"] = len(head)
        base = {"tgid": 10, "tid": 10, "status": 200, "lport": 80, "rport": 5000,
                "proto": Proto.HTTP}
        for key, value in {**base, **row}.items():
            ex[i][key] = value
        ex[i]["eflags"] = eflags
        if eflags & FLAG_H2:
            method, path = head.split(b" ")[:2]
            index[i] = -1
            operations[i] = method.decode()
            attributes[i] = {"path": path.decode()}
            ex[i]["proto"] = Proto.HTTP2
    return ExchangeBatch(ex, ["svc"] * n, operations, ["/x"] * n,
                         [str(int(s)) for s in ex["status"]], ["10.0.0.2"] * n,
                         ["10.0.0.1"] * n, http=http, http_index=index, attributes=attributes)


def assembler(ratio: float = 1.0, serves: bool = True) -> SpanAssembler:
    a = SpanAssembler(ratio, link_wait_ns=1000, rng=random.Random(1))
    a._may_serve = lambda tgid, now: serves  # type: ignore[method-assign]
    return a


def test_client_started_inside_a_server_exchange_of_its_thread_is_its_child() -> None:
    a = assembler()
    # The client record arrives first: it waits for the server record.
    assert a.add(batch({"role": ROLE_CLIENT, "start_ns": 150, "end_ns": 180}), now_ns=0) == []
    other = batch({"role": ROLE_CLIENT, "tid": 11, "start_ns": 150, "end_ns": 180})
    assert a.add(other, now_ns=0) == []
    spans = a.add(batch({"role": ROLE_SERVER, "start_ns": 100, "end_ns": 200}), now_ns=1)
    assert [s.kind for s in spans] == [SpanKind.CLIENT, SpanKind.SERVER]
    client, server = spans
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    assert server.parent is None
    assert server.end_time - server.start_time == 100
    # Another thread's client is not adopted; it leaves as a root once its wait is over.
    (late,) = a.flush(now_ns=2000)
    assert late.parent is None and late.context.trace_id != server.context.trace_id


def test_server_span_joins_an_incoming_traceparent() -> None:
    head = f"GET /x HTTP/1.1\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\n\r\n".encode()
    (span,) = assembler().add(batch({"role": ROLE_SERVER, "start_ns": 1, "end_ns": 2,
                                     "head": head}))
    assert f"{span.context.trace_id:032x}" == TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT
    assert span.parent.is_remote


def test_client_span_takes_the_ids_the_application_propagated() -> None:
    head = f"GET /x HTTP/1.1\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\n\r\n".encode()
    (span,) = assembler(serves=False).add(batch({"role": ROLE_CLIENT, "start_ns": 1,
                                                 "end_ns": 2, "head": head}))
    assert f"{span.context.trace_id:032x}" == TRACE
    assert f"{span.context.span_id:016x}" == PARENT


def test_status_error_for_5xx_servers_and_4xx_clients() -> None:
    spans = assembler(serves=False).add(batch(
        {"role": ROLE_SERVER, "status": 404}, {"role": ROLE_SERVER, "status": 503},
        {"role": ROLE_CLIENT, "status": 404}, {"role": ROLE_SERVER, "flags": FLAG_ABORTED}))
    assert [s.status.status_code for s in spans] == [
        StatusCode.UNSET, StatusCode.ERROR, StatusCode.ERROR, StatusCode.ERROR]
    assert spans[1].attributes["error.type"] == "503"
    assert spans[3].attributes["error.type"] == "aborted"


def test_head_sampling_ratio_zero_keeps_only_sampled_parents() -> None:
    sampled = f"GET /x HTTP/1.1\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\n\r\n".encode()
    a = assembler(ratio=0.0)
    spans = a.add(batch({"role": ROLE_SERVER}, {"role": ROLE_SERVER, "head": sampled}))
    assert len(spans) == 1 and a.unsampled == 1


def test_invalid_traceparents_are_ignored() -> None:
    assert parse_traceparent(f"00-{'0' * 32}-{PARENT}-01".encode()) is None
    assert parse_traceparent(b"garbage") is None
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00".encode()).sampled is False  # type: ignore[union-attr]


def test_histogram_and_counter_families_become_cumulative_otlp_points() -> None:
    h = HistogramMetricFamily("d_seconds", "d", labels=["s"])
    h.add_metric(["a"], [("0.1", 2), ("1", 5), ("+Inf", 6)], 3.5)
    c = CounterMetricFamily("e", "e", labels=["p"])
    c.add_metric(["http"], 7)
    hist, counter = families_to_otlp([h, c], 1, 2)
    (point,) = hist.data.data_points
    assert hist.name == "d_seconds" and hist.unit == "s"
    assert list(point.explicit_bounds) == [0.1, 1.0]
    assert list(point.bucket_counts) == [2, 3, 1] and point.count == 6 and point.sum == 3.5
    assert counter.name == "e" and counter.data.is_monotonic
    assert counter.data.data_points[0].value == 7
    assert dict(counter.data.data_points[0].attributes) == {"p": "http"}


class _NoMetrics(MetricExporter):
    def __init__(self) -> None:
        super().__init__()

    def export(self, metrics_data: object, timeout_millis: float = 10_000,
               **kwargs: object) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        pass


def test_a_stalled_collector_bounds_the_span_queue_and_counts_every_dropped_exchange() -> None:
    """A collector slower than the traffic must not grow the queue (latency, memory) without
    bound: past export.otlp.max_queue_spans waiting exchanges a batch is dropped whole and its
    exchanges are counted; the rest are exported once the collector answers."""
    cfg = config_from_mapping({"export": {"otlp": {
        "enabled": True, "metrics": False, "max_queue_spans": 300}}}).export.otlp
    release, stalled = threading.Event(), threading.Event()

    class Stalled(InMemorySpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            stalled.set()
            release.wait(timeout=60)
            return super().export(spans)

    spans_out = Stalled()
    exporter = OtlpExporter(cfg, list, (_NoMetrics(), spans_out))

    def servers(n: int) -> ExchangeBatch:
        return batch(*({"role": ROLE_SERVER, "start_ns": 100, "end_ns": 200} for _ in range(n)))

    exporter.start()
    try:
        exporter.sink(servers(100))  # taken at once; its export stalls
        assert stalled.wait(timeout=30)
        assert exporter.waiting_spans == 0
        for n in (100, 100, 100, 100, 1):
            exporter.sink(servers(n))
        assert exporter.waiting_spans == 300
        assert (exporter.batches_dropped, exporter.spans_dropped) == (2, 101)
    finally:
        release.set()
        exporter.stop()
    assert len(spans_out.get_finished_spans()) == 400
    (family,) = [f for f in exporter.collect() if f.name == "probewire_otlp_spans"]
    by_result = {s.labels["result"]: s.value for s in family.samples}
    assert by_result["success"] == 400 and by_result["dropped"] == 101


def test_otlp_export_calls_never_become_spans_and_are_counted() -> None:
    """An OTLP export to a collector on this host is traced at the collector's end; a span of
    it would be exported by the next export, whose span would be exported by the next..."""
    assert is_otlp_export(b"/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    assert is_otlp_export(b"/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
    assert is_otlp_export(b"/v1/traces") and is_otlp_export(b"/v1/logs?x=1")
    assert is_otlp_export(b"/otlp/v1/metrics", "POST", b"application/x-protobuf")
    # An application's own API under such a path is not OTLP.
    assert not is_otlp_export(b"/api/v1/logs", "POST", b"application/json")
    assert not is_otlp_export(b"/v1/traces", "GET")
    assert not is_otlp_export(b"/v1/tracesx") and not is_otlp_export(b"/api/v1/orders")
    a = assembler()
    grpc_head = b"POST /opentelemetry.proto.collector.trace.v1.TraceService/Export HTTP/2\r\n\r\n"
    spans = a.add(batch(
        {"role": ROLE_SERVER, "start_ns": 100, "end_ns": 200, "head": grpc_head,
         "flags": FLAG_H2 | FLAG_GRPC},
        {"role": ROLE_SERVER, "start_ns": 100, "end_ns": 200,
         "head": b"POST /v1/traces HTTP/1.1\r\nHost: c\r\n\r\n"},
        {"role": ROLE_SERVER, "start_ns": 100, "end_ns": 200,
         "head": b"GET /api/v1/x HTTP/2\r\n\r\n", "flags": FLAG_H2},
    ), now_ns=1)
    assert a.export_calls == 2
    (span,) = spans
    assert span.attributes is not None
    assert span.attributes["url.path"] == "/api/v1/x"
    assert span.attributes["network.protocol.version"] == "2"


def test_ids_from_the_os_pool_are_nonzero_distinct_and_use_their_whole_width() -> None:
    """Past several refills of the pool: every id valid (never zero), none repeated, and 128-bit
    ids made of two words (their high half is random too)."""
    a = SpanAssembler()
    ids64 = [a._new_id(64) for _ in range(3000)]
    ids128 = [a._new_id(128) for _ in range(3000)]
    assert all(0 < i < 1 << 64 for i in ids64) and len(set(ids64)) == len(ids64)
    assert all(0 < i < 1 << 128 for i in ids128) and len(set(ids128)) == len(ids128)
    assert sum(i >> 127 for i in ids128) > 1000 and sum(i >> 63 for i in ids64) > 1000
    assert sum(i & 1 for i in ids128) > 1000
