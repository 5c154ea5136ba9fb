"""Spans through the direct encoder and the SDK exporters' transport, to a real OTLP receiver
(tests/support/otlp_receiver.py decodes what a collector would receive), over gRPC and
HTTP/protobuf: every span arrives as the SDK would have sent it; a stalled collector still
bounds the queue and counts each dropped exchange; a collector refusing an export gets it
again through the SDK's retry loop; settings the SDK exporter reads (compression) apply."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from bench.spans import Workload, process_attributes
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export import SpanExportResult

from probewire.config import OtlpConfig, config_from_mapping
from probewire.export.otlp import OtlpExporter, make_exporters
from probewire.export.span_transport import (
    EncodedSpanExporter,
    GrpcSpanExporter,
    HttpSpanExporter,
)
from probewire.export.spans import SpanRecord, readable_span
from probewire.l7.constants import Proto, Role
from probewire.l7.exchanges import EXCHANGE, ExchangeBatch
from probewire.l7.records import HTTP_EXCHANGE
from support.otlp_receiver import otlp_receiver

pytestmark = pytest.mark.e2e

PROTOCOLS = ["grpc", "http/protobuf"]


def _config(endpoint: str, protocol: str, **extra: Any) -> OtlpConfig:
    return config_from_mapping({"export": {"otlp": {
        "enabled": True, "protocol": protocol, "endpoint": endpoint, "metrics": False,
        "headers": {"x-probewire-test": "direct"}, "link_wait_ms": 50,
        "resource_attributes": {"deployment.environment": "test"}, **extra}}}).export.otlp


def _wait(cond: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def _recording(exporter: OtlpExporter) -> list[SpanRecord]:
    """Keep every record the exporter's assembler hands out."""
    kept: list[SpanRecord] = []
    assembler = exporter.assembler
    add, flush = assembler.add_records, assembler.flush_records

    def add_records(*args: Any, **kwargs: Any) -> list[SpanRecord]:
        out = add(*args, **kwargs)
        kept.extend(out)
        return out

    def flush_records(*args: Any, **kwargs: Any) -> list[SpanRecord]:
        out = flush(*args, **kwargs)
        kept.extend(out)
        return out

    assembler.add_records = add_records  # type: ignore[method-assign]
    assembler.flush_records = flush_records  # type: ignore[method-assign]
    return kept


def _by_span_id(requests: list[Any]) -> dict[bytes, tuple[dict[str, Any], dict[str, Any]]]:
    out = {}
    for req in requests:
        for rs in req.resource_spans:
            resource = MessageToDict(rs.resource)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    assert span.span_id not in out
                    out[span.span_id] = (resource, MessageToDict(span))
    return out


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_span_reaches_a_real_receiver_as_the_sdk_would_send_it(protocol: str) -> None:
    """A realistic web tier's exchanges (bench/spans.py's workload: Kubernetes identity,
    linked client spans, traceparents, errors) through the real pipeline: the receiver gets
    each span once, and each equals what the SDK's encoder makes of the same record."""
    with otlp_receiver(protocol) as rx:  # this process listens: the web tier may serve
        exporter = OtlpExporter(_config(rx.endpoint, protocol), list,
                                process_attributes=process_attributes)
        assert isinstance(exporter.span_exporter, EncodedSpanExporter)
        records = _recording(exporter)
        workload = Workload(os.getpid(), seed=7)
        batches = [workload.batch(n) for n in (1, 42, 17, 42, 3)]
        exporter.start()
        try:
            for batch in batches:
                exporter.sink(batch)
        finally:
            exporter.stop()
        sent = sum(len(b) for b in batches)
        assert exporter.spans_exported == len(records) == sent
        assert exporter.spans_failed == exporter.spans_dropped == 0
        assert exporter.assembler.linked == sent // 3  # every client span found its parent
        received = _by_span_id(rx.trace_requests)
        expected = _by_span_id([encode_spans([readable_span(r) for r in records])])
        assert received == expected
        assert rx.headers and all(h.get("x-probewire-test") == "direct" for h in rx.headers)
        services = {a["value"]["stringValue"] for r, _ in received.values()
                    for a in r["attributes"] if a["key"] == "service.name"}
        assert services == {"web", "catalog"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_stalled_collector_bounds_the_queue_and_counts_every_dropped_exchange(
        protocol: str) -> None:
    """As tests/unit/test_export_spans.py has it with the SDK path, over the wire: past
    export.otlp.max_queue_spans waiting exchanges a batch is dropped whole and counted; the
    rest is exported once the collector answers."""
    hold = threading.Event()
    with otlp_receiver(protocol, hold=hold) as rx:
        exporter = OtlpExporter(_config(rx.endpoint, protocol, max_queue_spans=300), list)
        exporter.start()
        try:
            exporter.sink(_servers(100))  # taken at once; its export stalls
            assert _wait(lambda: rx.held == 1)
            assert exporter.waiting_spans == 0
            for n in (100, 100, 100, 100, 1):
                exporter.sink(_servers(n))
            assert exporter.waiting_spans == 300
            assert (exporter.batches_dropped, exporter.spans_dropped) == (2, 101)
        finally:
            hold.set()
            exporter.stop()
        assert len(rx.spans()) == 400
    by_result = {s.labels["result"]: s.value for f in exporter.collect()
                 if f.name == "probewire_otlp_spans" for s in f.samples}
    assert by_result["success"] == 400 and by_result["dropped"] == 101
    assert by_result["failure"] == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_refused_export_is_sent_again_by_the_sdk_retry_loop(protocol: str) -> None:
    """The collector answers the first export UNAVAILABLE (gRPC) or 503 (HTTP): the SDK
    exporter's own backoff and retry send our bytes again, and nothing is lost."""
    with otlp_receiver(protocol, fail_first=1) as rx:
        exporter = OtlpExporter(_config(rx.endpoint, protocol), list)
        exporter.start()
        try:
            exporter.sink(_servers(25))
            assert _wait(lambda: exporter.spans_exported + exporter.spans_failed >= 25)
        finally:
            exporter.stop()
        assert rx.refused == 1
        assert exporter.spans_exported == 25 and exporter.spans_failed == 0
        assert len(rx.spans()) == 25


def test_compression_the_sdk_exporter_reads_from_the_environment_applies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_EXPORTER_OTLP_TRACES_COMPRESSION is read by the SDK exporter we send with, so a
    gzip-compressed request reaches the receiver."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    with otlp_receiver("http/protobuf") as rx:
        exporter = OtlpExporter(_config(rx.endpoint, "http/protobuf"), list)
        exporter.start()
        try:
            exporter.sink(_servers(5))
        finally:
            exporter.stop()
        assert len(rx.spans()) == 5
        assert rx.headers[0].get("content-encoding") == "gzip"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_exporters_still_send_readable_spans_and_refuse_after_shutdown(
        protocol: str) -> None:
    """Where a SpanExporter is expected (the SDK's BatchSpanProcessor), ours send
    ReadableSpans with the SDK's encoder, and nothing once shut down."""
    with otlp_receiver(protocol) as rx:
        _, spans = make_exporters(_config(rx.endpoint, protocol))
        assert isinstance(spans, GrpcSpanExporter | HttpSpanExporter)
        exporter = OtlpExporter(_config(rx.endpoint, protocol), list)
        records = exporter.assembler.add_records(_servers(3))
        assert spans.export([readable_span(r) for r in records]) is SpanExportResult.SUCCESS
        assert len(rx.spans()) == 3
        spans.shutdown()
        assert spans.export_encoded(exporter.encoder.encode(records), 3) \
            is SpanExportResult.FAILURE
        assert len(rx.spans()) == 3


def _servers(n: int) -> ExchangeBatch:
    rows = np.zeros(n, dtype=EXCHANGE)
    rows["proto"], rows["role"] = Proto.HTTP, Role.SERVER
    rows["tgid"] = rows["tid"] = 10
    rows["status"] = 200
    rows["start_ns"], rows["end_ns"] = 100, 200
    head = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
    http = np.zeros(n, dtype=HTTP_EXCHANGE)
    http["req_head"][:, : len(head)] = np.frombuffer(head, np.uint8)
    http["req_head_len"] = len(head)
    return ExchangeBatch(rows, ["svc"] * n, ["GET"] * n, ["/x"] * n, ["200"] * n,
                         ["10.0.0.2"] * n, ["10.0.0.1"] * n, http=http,
                         http_index=np.arange(n), attributes=[{} for _ in range(n)])

