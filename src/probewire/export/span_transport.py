"""Sending encoded ExportTraceServiceRequest bytes with the SDK's own OTLP span exporters.

The direct encoder (:mod:`probewire.export.span_encoder`) makes the request's bytes; what sends
them is the SDK's exporter for the configured protocol, so the channel or session, TLS
credentials, headers, compression, timeout, retries with backoff (and the server's RetryInfo or
Retry-After), the reconnection after UNAVAILABLE and the exporter's own metrics are the SDK's,
from the same settings as before:

- gRPC: the SDK exporter's stub is swapped for one generic unary call on the SDK's channel with
  no request serializer (grpcio sends bytes as they are), so its retry loop sends our bytes;
- HTTP/protobuf: the SDK exporter's HTTP client takes serialized bytes already; only the
  encoding step of its ``export`` is left out.

Both still export ReadableSpans too (``export``), so either works wherever a SpanExporter does.
They lean on the SDK exporters' internals (``_export``, ``_client``), checked by
tests/unit/test_span_transport.py against the installed SDK.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as SdkGrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http._common import (
    RequestPayloadTooLargeError,
    _is_request_too_large,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as SdkHttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

__all__ = [
    "TRACE_EXPORT_METHOD",
    "EncodedSpanExporter",
    "EncodedSpans",
    "GrpcSpanExporter",
    "HttpSpanExporter",
]

log = logging.getLogger(__name__)

TRACE_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class EncodedSpans(NamedTuple):
    """An ExportTraceServiceRequest's bytes and the number of spans in it."""

    payload: bytes
    spans: int


@runtime_checkable
class EncodedSpanExporter(Protocol):
    """A span exporter that sends requests encoded elsewhere."""

    def export_encoded(self, payload: bytes, count: int) -> SpanExportResult: ...


class _BytesTraceService:
    """TraceServiceStub's one method, taking the request as bytes."""

    def __init__(self, channel: Any) -> None:
        self.Export = channel.unary_unary(
            TRACE_EXPORT_METHOD, request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString)


class GrpcSpanExporter(SdkGrpcSpanExporter):
    """The SDK's OTLP/gRPC span exporter, sending encoded requests too."""

    def _initialize_channel_and_stub(self) -> None:
        # Also called again by the SDK's retry loop to reconnect after UNAVAILABLE.
        super()._initialize_channel_and_stub()  # type: ignore[no-untyped-call]
        self._client = _BytesTraceService(self._channel)  # type: ignore[assignment]

    def _translate_data(self, data: Sequence[ReadableSpan] | EncodedSpans  # type: ignore[override]
                        ) -> bytes:
        if isinstance(data, EncodedSpans):
            return data.payload
        encoded: bytes = encode_spans(data).SerializeToString()
        return encoded

    def _count_data(self, data: Sequence[ReadableSpan] | EncodedSpans) -> int:
        return data.spans if isinstance(data, EncodedSpans) else len(data)

    def export_encoded(self, payload: bytes, count: int) -> SpanExportResult:
        result: SpanExportResult = self._export(EncodedSpans(payload, count))  # type: ignore[arg-type]
        return result


class HttpSpanExporter(SdkHttpSpanExporter):
    """The SDK's OTLP/HTTP (protobuf) span exporter, sending encoded requests too."""

    def export_encoded(self, payload: bytes, count: int) -> SpanExportResult:
        # The SDK's export() from the point where it has serialized the request.
        if self._shutdown:
            log.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(count) as result:
            if _is_request_too_large(payload, self._max_request_size):
                log.warning("Dropping span batch: serialized size %d bytes exceeds "
                            "max_request_size %d bytes.", len(payload), self._max_request_size)
                result.error = RequestPayloadTooLargeError(
                    f"Serialized span request size {len(payload)} bytes exceeds "
                    f"max_request_size {self._max_request_size} bytes.")
                return SpanExportResult.FAILURE
            sent = self._client.export(payload)
            if not sent.success:
                result.error = sent.error
                result.error_attrs = ({"http.response.status_code": sent.status_code}
                                      if sent.status_code is not None else None)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
