"""A real OTLP receiver for tests: gRPC (opentelemetry-proto + grpcio) and HTTP/protobuf.

    with otlp_receiver("grpc") as rx:          # or "http/protobuf"
        ... agent configured with endpoint=rx.endpoint ...
        rx.spans()                              # every span received, flattened
        rx.latest_metrics()                     # name -> {attributes: point} from the last export

It decodes exactly what an OpenTelemetry collector would receive; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import gzip
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    resource: dict[str, Any]
    span: Span

    @property
    def attributes(self) -> dict[str, Any]:
        return attrs(self.span.attributes)

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name"))


@dataclass
class Receiver:
    protocol: str
    endpoint: str = ""
    trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = field(
        default_factory=list)
    metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(
        default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    log_requests: list[logs_service_pb2.ExportLogsServiceRequest] = field(default_factory=list)
    # A stalled collector: while `hold` is clear, every export waits (answered once it is set).
    hold: threading.Event | None = None
    # A collector that fails: the first `fail_first` exports are refused as temporarily
    # unavailable (gRPC UNAVAILABLE, HTTP 503), as a restarting collector refuses them.
    fail_first: int = 0
    refused: int = 0
    held: int = 0  # exports that arrived while `hold` was clear (each waits for it)

    def _refuse(self) -> bool:
        """Wait while held; True if this export is to be refused (and counts it)."""
        if self.hold is not None:
            with self.lock:
                self.held += not self.hold.is_set()
            self.hold.wait(timeout=120)
        with self.lock:
            if self.refused < self.fail_first:
                self.refused += 1
                return True
            return False

    def logs(self) -> list[tuple[dict[str, Any], LogRecord]]:
        """(resource attributes, log record) of every log record received."""
        with self.lock:
            out = []
            for req in self.log_requests:
                for rl in req.resource_logs:
                    res = attrs(rl.resource.attributes)
                    for sl in rl.scope_logs:
                        out.extend((res, r) for r in sl.log_records)
            return out

    def spans(self) -> list[ReceivedSpan]:
        with self.lock:
            out = []
            for req in self.trace_requests:
                for rs in req.resource_spans:
                    res = attrs(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        out.extend(ReceivedSpan(res, s) for s in ss.spans)
            return out

    def latest_metrics(self) -> tuple[dict[str, Any], dict[str, Metric]]:
        """(resource attributes, name -> Metric) of the most recent metric export."""
        with self.lock:
            if not self.metric_requests:
                return {}, {}
            req = self.metric_requests[-1]
        res: dict[str, Any] = {}
        metrics: dict[str, Metric] = {}
        for rm in req.resource_metrics:
            res = attrs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    metrics[m.name] = m
        return res, metrics

    def _add(self, req: Any, headers: dict[str, str]) -> None:
        with self.lock:
            if isinstance(req, trace_service_pb2.ExportTraceServiceRequest):
                self.trace_requests.append(req)
            elif isinstance(req, logs_service_pb2.ExportLogsServiceRequest):
                self.log_requests.append(req)
            else:
                self.metric_requests.append(req)
            self.headers.append(headers)


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, rx: Receiver) -> None:
        self.rx = rx

    def Export(self, request: Any, context: Any) -> Any:
        if self.rx._refuse():
            context.abort(grpc.StatusCode.UNAVAILABLE, "collector restarting")
        self.rx._add(request, dict(context.invocation_metadata()))
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, rx: Receiver) -> None:
        self.rx = rx

    def Export(self, request: Any, context: Any) -> Any:
        if self.rx._refuse():
            context.abort(grpc.StatusCode.UNAVAILABLE, "collector restarting")
        self.rx._add(request, dict(context.invocation_metadata()))
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, rx: Receiver) -> None:
        self.rx = rx

    def Export(self, request: Any, context: Any) -> Any:
        if self.rx._refuse():
            context.abort(grpc.StatusCode.UNAVAILABLE, "collector restarting")
        self.rx._add(request, dict(context.invocation_metadata()))
        return logs_service_pb2.ExportLogsServiceResponse()


def _http_handler(rx: Receiver, delay_s: float = 0.0) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # As a collector does (Go sets TCP_NODELAY): the body written after the headers must
        # not wait for the client's delayed ACK of them.
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if delay_s:
                time.sleep(delay_s)  # a slow collector (the fault matrix)
            if rx._refuse():
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            encoding = self.headers.get("Content-Encoding", "")
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            req: Any
            if self.path == "/v1/traces":
                req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                resp = trace_service_pb2.ExportTraceServiceResponse()
            elif self.path == "/v1/metrics":
                req = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                resp = metrics_service_pb2.ExportMetricsServiceResponse()
            elif self.path == "/v1/logs":
                req = logs_service_pb2.ExportLogsServiceRequest.FromString(body)
                resp = logs_service_pb2.ExportLogsServiceResponse()
            else:
                self.send_error(404)
                return
            rx._add(req, {k.lower(): v for k, v in self.headers.items()})
            data = resp.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextlib.contextmanager
def otlp_receiver(protocol: str = "grpc", delay_s: float = 0.0,
                  hold: threading.Event | None = None, fail_first: int = 0) -> Iterator[Receiver]:
    """`delay_s` (http/protobuf only): answer each export that much later, a slow collector.
    `hold`, `fail_first`: see Receiver (a stalled collector; one refusing its first exports)."""
    rx = Receiver(protocol, hold=hold, fail_first=fail_first)
    if protocol == "grpc":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(rx), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(rx), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(rx), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        rx.endpoint = f"http://127.0.0.1:{port}"
        try:
            yield rx
        finally:
            server.stop(grace=None)
        return
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(rx, delay_s))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    rx.endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield rx
    finally:
        httpd.shutdown()
        httpd.server_close()


__all__ = ["ReceivedSpan", "Receiver", "otlp_receiver"]
