"""OTLP export: the /metrics families through the OpenTelemetry SDK's exporters, and spans
encoded by probewire and sent by the SDK's span exporters.

Metrics: every ``interval_s`` the agent's own Prometheus collector is read and its families are
converted to OTLP points (cumulative sums, gauges, explicit-bucket histograms) that the SDK's
OTLP metric exporter sends. Reading the collector, instead of keeping SDK instruments, keeps one
source of truth: the kernel maps and batch aggregates are read once per interval exactly as a
scrape reads them, so OTLP and /metrics cannot disagree, and nothing is updated per event (the
SDK has no asynchronous histogram, so instruments would mean a Python call per exchange).
Names are the Prometheus family names (counters without ``_total``, which an OTLP → Prometheus
translation appends again); the ``service_name`` label stays a point attribute, so the
collector's prometheus exporter reproduces /metrics series one for one. The resource is the
agent's (service.name ``probewire`` unless ``resource_attributes`` says otherwise).

Spans: the l7 family hands each decoded batch to :meth:`OtlpExporter.sink`; a queue decouples
the ring reader from the network and one exporter thread assembles spans
(:mod:`probewire.export.spans`) and exports them in requests of up to MAX_EXPORT_SPANS, waiting
at most EXPORT_LINGER_S after a batch for more: an export call has a fixed CPU cost (the SDK's
retry loop and metrics, the gRPC call's set-up) whatever its size, and one call per ring batch
(128 records or 5 ms) at a modest rate made it most of the span thread's work. Event → export
latency is measured from the exchange's kernel end timestamp to the export call's return. The
spans' request bytes are written by :mod:`probewire.export.span_encoder` straight from the
assembler's records and sent by the SDK exporter of the configured protocol
(:mod:`probewire.export.span_transport`: its channel or session, TLS, headers, compression,
timeout and retries); any other SpanExporter handed in gets the SDK's ReadableSpans instead.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Metric as OtlpMetric
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from probewire import __version__
from probewire.config import Config, OtlpConfig, SamplingConfig
from probewire.errors import ConfigError
from probewire.export.span_encoder import SpanEncoder
from probewire.export.span_transport import (
    EncodedSpanExporter,
    GrpcSpanExporter,
    HttpSpanExporter,
)
from probewire.export.spans import SCOPE, SpanAssembler, SpanRecord, readable_span
from probewire.l7.exchanges import ExchangeBatch

__all__ = ["OtlpExporter", "families_to_otlp", "make_exporters"]

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0)
MAX_EXPORT_SPANS = 2048
# How long the span thread waits for more batches before it exports a request that is not full:
# a few ring flushes (5 ms), well inside the event -> span p99 target (50 ms).
EXPORT_LINGER_S = 0.01
# Recent event → export latencies kept for the benchmark (ns, and 1 for server spans).
LATENCY_SAMPLES = 65536


def _unit(name: str) -> str:
    if name.endswith("_seconds"):
        return "s"
    if name.endswith("_bytes"):
        return "By"
    return "1"


def families_to_otlp(families: Iterable[Metric], start_ns: int, now_ns: int) -> list[OtlpMetric]:
    """Prometheus metric families -> OTLP metrics with the same names and values."""
    out: list[OtlpMetric] = []
    for fam in families:
        if fam.type == "counter":
            points = [
                NumberDataPoint(dict(s.labels), start_ns, now_ns, s.value)
                for s in fam.samples if s.name.endswith("_total")
            ]
            data: Any = Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True)
        elif fam.type in ("gauge", "unknown"):
            data = Gauge([NumberDataPoint(dict(s.labels), 0, now_ns, s.value)
                          for s in fam.samples])
        elif fam.type == "histogram":
            data = Histogram(_histogram_points(fam, start_ns, now_ns),
                             AggregationTemporality.CUMULATIVE)
        else:
            continue
        out.append(OtlpMetric(fam.name, fam.documentation, _unit(fam.name), data))
    return out


def _histogram_points(fam: Metric, start_ns: int, now_ns: int) -> list[HistogramDataPoint]:
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for s in fam.samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        entry = series.setdefault(labels, {"buckets": [], "sum": 0.0, "count": 0})
        if s.name.endswith("_bucket"):
            entry["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_sum"):
            entry["sum"] = s.value
        elif s.name.endswith("_count"):
            entry["count"] = int(s.value)
    points = []
    for labels, entry in series.items():
        buckets = sorted(entry["buckets"])
        bounds = [le for le, _ in buckets if not math.isinf(le)]
        cumulative = [int(v) for _, v in buckets]
        if not buckets or not math.isinf(buckets[-1][0]):
            cumulative.append(entry["count"])
        counts = [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]
        points.append(HistogramDataPoint(
            dict(labels), start_ns, now_ns, entry["count"], entry["sum"], counts, bounds,
            min=None, max=None,  # type: ignore[arg-type]  # unknown: the proto fields are optional
        ))
    return points


def agent_resource(extra: dict[str, str]) -> Resource:
    attrs: dict[str, str | int] = {
        "service.name": "probewire",
        "service.version": __version__,
        "host.name": socket.gethostname(),
        "process.pid": os.getpid(),
        "process.executable.path": sys.executable,
        "process.executable.name": os.path.basename(sys.executable),
        "process.command_line": " ".join(sys.argv),
        "process.runtime.name": sys.implementation.name,
        "process.runtime.version": ".".join(map(str, sys.version_info[:3])),
    }
    # Inside Kubernetes (the DaemonSet passes these through the downward API).
    for var, key in (("NODE_NAME", "k8s.node.name"), ("POD_NAME", "k8s.pod.name"),
                     ("POD_NAMESPACE", "k8s.namespace.name")):
        if os.environ.get(var):
            attrs[key] = os.environ[var]
    attrs.update(extra)
    return Resource.create(attrs)


def _read(path: str | None, field: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"export.otlp.{field}: cannot read {path}: {exc.strerror}") from None


def _grpc_channel(cfg: OtlpConfig, endpoint: str) -> dict[str, Any]:
    import grpc  # type: ignore[import-untyped]

    insecure = cfg.insecure and not endpoint.startswith("https://")
    credentials = None
    if not insecure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(cfg.certificate_file, "certificate_file"),
            private_key=_read(cfg.client_key_file, "client_key_file"),
            certificate_chain=_read(cfg.client_certificate_file, "client_certificate_file"),
        )
    return dict(endpoint=endpoint, insecure=insecure, credentials=credentials)


def signal_endpoint(cfg: OtlpConfig, signal: str) -> tuple[str, str]:
    """(protocol, URL) of one signal ("traces" or "metrics") as the OpenTelemetry spec has it:
    a per-signal endpoint is used as given; the generic one gets /v1/<signal> appended for
    http/protobuf; gRPC takes host:port as given."""
    protocol = getattr(cfg, f"{signal}_protocol") or cfg.protocol
    own = getattr(cfg, f"{signal}_endpoint")
    if own:
        return protocol, own
    if protocol == "grpc":
        return protocol, cfg.endpoint or "http://localhost:4317"
    return protocol, f"{(cfg.endpoint or 'http://localhost:4318').rstrip('/')}/v1/{signal}"


def make_exporters(cfg: OtlpConfig) -> tuple[MetricExporter, SpanExporter]:
    """The SDK's OTLP exporters for each signal's protocol, endpoint, headers and TLS (for
    spans, the SDK's exporters that also send requests encoded by us: span_transport)."""
    timeout = cfg.timeout_s
    tls: dict[str, Any] = dict(certificate_file=cfg.certificate_file,
                               client_certificate_file=cfg.client_certificate_file,
                               client_key_file=cfg.client_key_file)
    protocol, url = signal_endpoint(cfg, "metrics")
    headers = dict(cfg.metrics_headers if cfg.metrics_headers is not None else cfg.headers)
    metrics: MetricExporter
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetrics,
        )

        metrics = GrpcMetrics(**_grpc_channel(cfg, url), headers=headers, timeout=timeout)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetrics,
        )

        metrics = HttpMetrics(endpoint=url, headers=headers, timeout=timeout, **tls)
    protocol, url = signal_endpoint(cfg, "traces")
    headers = dict(cfg.traces_headers if cfg.traces_headers is not None else cfg.headers)
    spans: SpanExporter
    if protocol == "grpc":
        spans = GrpcSpanExporter(**_grpc_channel(cfg, url), headers=headers, timeout=timeout)
    else:
        spans = HttpSpanExporter(endpoint=url, headers=headers, timeout=timeout, **tls)
    return metrics, spans


class OtlpExporter:
    """Owns the OTLP metric loop and the span pipeline; start() and stop() from the agent."""

    def __init__(self, cfg: OtlpConfig, families: Callable[[], Iterable[Metric]],
                 exporters: tuple[MetricExporter, SpanExporter] | None = None,
                 process_attributes: Callable[[int, str], Mapping[str, str]] | None = None,
                 sampling: SamplingConfig | None = None) -> None:
        self.cfg = cfg
        self.families = families
        self.metric_exporter, self.span_exporter = exporters or make_exporters(cfg)
        self.resource = agent_resource(cfg.resource_attributes)
        sampling = sampling or SamplingConfig()
        self.assembler = SpanAssembler(
            cfg.sampling_ratio * sampling.probability, int(cfg.link_wait_ms * 1e6),
            cfg.resource_attributes, process_attributes=process_attributes,
            honor_traceparent=sampling.honor_traceparent)
        self.encoder = SpanEncoder()
        # Bounded by exchanges (cfg.max_queue_spans), not batches: a batch holds 1 to
        # thousands of them, and what the bound is for is how long the newest one waits.
        self._queue: queue.Queue[ExchangeBatch] = queue.Queue()
        self._queued = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.start_ns = time.time_ns()
        # Self metrics.
        self.spans_exported = 0
        self.spans_failed = 0
        self.batches_dropped = 0
        self.spans_dropped = 0  # exchanges in those batches
        self.metric_exports = {"success": 0, "failure": 0}
        self.latency_counts = np.zeros(len(LATENCY_BUCKETS) + 1, dtype=np.int64)
        self.latency_sum_s = 0.0
        self._samples = np.zeros(LATENCY_SAMPLES, dtype=np.int64)
        self._samples_server = np.zeros(LATENCY_SAMPLES, dtype=bool)
        self._n_samples = 0

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.cfg.metrics:
            self._threads.append(threading.Thread(target=self._metrics_loop,
                                                  name="probewire-otlp-metrics", daemon=True))
        if self.cfg.traces:
            self._threads.append(threading.Thread(target=self._spans_loop,
                                                  name="probewire-otlp-spans", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Flush what is left (spans, one last metric export) and shut the exporters down."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.cfg.timeout_s + 5)
        self._threads.clear()
        if self.cfg.metrics:
            self.export_metrics()
        self.metric_exporter.shutdown()
        self.span_exporter.shutdown()

    def reconfigure(self, config: Config) -> None:
        """Sampling and link wait from a reloaded config (endpoints need a restart). The span
        thread reads these once per exchange, so a plain assignment is enough."""
        cfg, sampling = config.export.otlp, config.sampling
        self.assembler.set_sampling(cfg.sampling_ratio * sampling.probability,
                                    sampling.honor_traceparent)
        self.assembler.link_wait_ns = int(cfg.link_wait_ms * 1e6)

    # --- spans -------------------------------------------------------------------------------
    def sink(self, batch: ExchangeBatch) -> None:
        """An exchange source's sink: called on the ring reader thread, never blocks. A batch that
        would take the exchanges waiting past cfg.max_queue_spans is dropped and counted (one
        larger than the bound still goes into an empty queue)."""
        n = len(batch)
        with self._lock:
            if self._queued and self._queued + n > self.cfg.max_queue_spans:
                self.batches_dropped += 1
                self.spans_dropped += n
                return
            self._queued += n
        self._queue.put_nowait(batch)

    @property
    def waiting_spans(self) -> int:
        """Exchanges handed to sink() that the span thread has not taken yet."""
        with self._lock:
            return self._queued

    def shrink(self) -> int:
        """Memory pressure (runtime/memory.py): drop the waiting batches, counted as dropped
        exactly as sink() counts a batch it refuses. Returns the exchanges dropped."""
        dropped = 0
        while True:
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                return dropped
            n = len(batch)
            with self._lock:
                self._queued -= n
                self.batches_dropped += 1
                self.spans_dropped += n
            dropped += n

    def _take(self, batch: ExchangeBatch) -> ExchangeBatch:
        with self._lock:
            self._queued -= len(batch)
        return batch

    def _spans_loop(self) -> None:
        # Wake often enough that a waiting client span leaves close to its link deadline.
        tick = max(min(self.cfg.link_wait_ms / 4000.0, 0.25), 0.005)
        while True:
            stopping = self._stop.is_set()
            spans: list[SpanRecord] = []
            try:
                batch = self._take(self._queue.get(timeout=tick))
                spans.extend(self.assembler.add_records(batch))
                linger_until = time.monotonic() + EXPORT_LINGER_S
                while len(spans) < MAX_EXPORT_SPANS:
                    wait_s = linger_until - time.monotonic()
                    batch = self._queue.get(timeout=wait_s) if wait_s > 0 and not stopping \
                        else self._queue.get_nowait()
                    spans.extend(self.assembler.add_records(self._take(batch)))
            except queue.Empty:
                pass
            except Exception:
                log.exception("building spans failed")
            spans.extend(self.assembler.flush_records(
                everything=stopping and self._queue.empty()))
            if spans:
                self._export_spans(spans)
            if stopping and self._queue.empty() and not self.assembler.pending:
                return

    def _export_spans(self, spans: Sequence[SpanRecord]) -> None:
        try:
            exporter = self.span_exporter
            if isinstance(exporter, EncodedSpanExporter):
                result = exporter.export_encoded(self.encoder.encode(spans), len(spans))
            else:
                result = exporter.export([readable_span(s) for s in spans])
        except Exception:
            log.exception("OTLP span export failed")
            result = SpanExportResult.FAILURE
        done = time.monotonic_ns()
        offset = self.assembler.offset_ns
        with self._lock:
            if result is not SpanExportResult.SUCCESS:
                self.spans_failed += len(spans)
                return
            self.spans_exported += len(spans)
            ends = np.array([s.end_ns - offset for s in spans], dtype=np.int64)
            lat = np.maximum(done - ends, 0)
            secs = lat / 1e9
            self.latency_counts += np.bincount(
                np.searchsorted(LATENCY_BUCKETS, secs, side="left"),
                minlength=len(LATENCY_BUCKETS) + 1)
            self.latency_sum_s += float(secs.sum())
            server = np.array([s.server for s in spans], dtype=bool)
            idx = (self._n_samples + np.arange(len(lat))) % LATENCY_SAMPLES
            self._samples[idx] = lat
            self._samples_server[idx] = server
            self._n_samples += len(lat)

    def clear_latency_samples(self) -> None:
        with self._lock:
            self._n_samples = 0

    def latency_samples_ns(self, server_only: bool = False) -> np.ndarray:
        """The most recent event → export latencies in ns (for the benchmark)."""
        with self._lock:
            n = min(self._n_samples, LATENCY_SAMPLES)
            lat = self._samples[:n].copy()
            if server_only:
                lat = lat[self._samples_server[:n]]
            return lat

    # --- metrics -----------------------------------------------------------------------------
    def _metrics_loop(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            self.export_metrics()

    def export_metrics(self) -> bool:
        """Read the collector once and export it; True on success."""
        try:
            metrics = families_to_otlp(self.families(), self.start_ns, time.time_ns())
            data = MetricsData([ResourceMetrics(
                self.resource, [ScopeMetrics(SCOPE, metrics, "")], "")])
            ok = self.metric_exporter.export(data) is MetricExportResult.SUCCESS
        except Exception:
            log.exception("OTLP metric export failed")
            ok = False
        with self._lock:
            self.metric_exports["success" if ok else "failure"] += 1
        return ok

    # --- self metrics (Prometheus) -----------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        with self._lock:
            spans = CounterMetricFamily(
                "probewire_otlp_spans",
                "HTTP spans by result: success, failure, unsampled, dropped (the exporter fell "
                "behind), export_call (an OTLP export request: never a span).",
                labels=["result"])
            spans.add_metric(["success"], self.spans_exported)
            spans.add_metric(["failure"], self.spans_failed)
            spans.add_metric(["unsampled"], self.assembler.unsampled)
            spans.add_metric(["dropped"], self.spans_dropped)
            spans.add_metric(["export_call"], self.assembler.export_calls)
            dropped = CounterMetricFamily(
                "probewire_otlp_batches_dropped",
                "HTTP batches dropped because the span exporter fell behind "
                "(export.otlp.max_queue_spans exchanges were waiting).")
            dropped.add_metric([], self.batches_dropped)
            exports = CounterMetricFamily("probewire_otlp_metric_exports",
                                          "OTLP metric exports, by result.", labels=["result"])
            for result, n in self.metric_exports.items():
                exports.add_metric([result], n)
            latency = HistogramMetricFamily(
                "probewire_export_latency_seconds",
                "Kernel end of an HTTP exchange to the return of its span's OTLP export.",
                labels=["signal"])
            cumulative = np.cumsum(self.latency_counts).tolist()
            latency.add_metric(
                ["spans"],
                [*zip(map(str, LATENCY_BUCKETS), cumulative[:-1], strict=True),
                 ("+Inf", cumulative[-1])],
                self.latency_sum_s)
        yield from (spans, dropped, exports, latency)
