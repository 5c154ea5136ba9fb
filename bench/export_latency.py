"""Event → OTLP export latency: kernel end of an HTTP exchange to the return of the OTLP export
call that carried its span, p50/p99, at idle and under wrk load.

    sudo .venv/bin/python -m bench.export_latency [--quick]

The agent runs in this process with OTLP (gRPC) to a real receiver in a child process
(tests/support/otlp_receiver.py); nginx serves a static file. Only server spans are measured:
a client span of a process that also serves waits up to export.otlp.link_wait_ms for its
parent by design. `run(quick)` returns bench.report Rows for `python -m bench`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request

import numpy as np

from bench.harness import REPO_ROOT, free_port, nginx, run_wrk, wait_port
from bench.report import Row, render
from probewire.agent import Agent
from probewire.config import config_from_mapping

RECEIVER = """
import sys, time
sys.path.insert(0, {tests!r})
import grpc
from concurrent import futures
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from support.otlp_receiver import Receiver, _Traces, _Metrics

class Discard(Receiver):
    def _add(self, req, headers):
        pass  # decode happened in grpc; keep nothing, a long run must not grow

rx = Discard("grpc")
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(rx), server)
metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(rx), server)
server.add_insecure_port("127.0.0.1:{port}")
server.start()
server.wait_for_termination()
"""


def _percentiles(lat_ns: np.ndarray) -> tuple[float, float]:
    if not len(lat_ns):
        return float("nan"), float("nan")
    p50, p99 = np.percentile(lat_ns, [50, 99])
    return float(p50) / 1e6, float(p99) / 1e6


def run(quick: bool) -> list[Row]:
    idle_requests = 50 if quick else 300
    load_s = 3 if quick else 10
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER.format(tests=str(REPO_ROOT / "tests"), port=port)])
    rows = [
        Row("event → OTLP span export p50, idle", "ms", note="server spans, sequential GETs"),
        Row("event → OTLP span export p99, idle", "ms", target="≤ 5 ms idle", goal=("<=", 5.0),
            judge="max"),
        Row("event → OTLP span export p50, under wrk load", "ms"),
        Row("event → OTLP span export p99, under wrk load", "ms", target="p99 ≤ 1 ms under load",
            goal=("<=", 1.0), judge="max"),
        Row("spans exported under load", "spans/s"),
        Row("exchanges dropped by the span queue under load", "% of exchanges",
            note="the exporter fell behind: export.otlp.max_queue_spans (default 8192) waiting, "
                 "so a batch was dropped and counted (probewire_otlp_spans_total{result="
                 "\"dropped\"}); what bounds the latency above"),
    ]
    try:
        wait_port(port)
        cfg = config_from_mapping({"export": {"otlp": {
            "enabled": True, "endpoint": f"http://127.0.0.1:{port}", "metrics": False}}})
        agent = Agent(cfg)
        with nginx() as ng:
            agent.start()
            try:
                assert agent.otlp is not None
                url = f"{ng.url}/static/index.html"
                # Warm up: the first export opens the gRPC channel.
                with urllib.request.urlopen(url, timeout=10) as resp:
                    resp.read()
                time.sleep(0.5)
                agent.otlp.clear_latency_samples()
                for _ in range(idle_requests):
                    with urllib.request.urlopen(url, timeout=10) as resp:
                        resp.read()
                    time.sleep(0.02)
                time.sleep(0.5)
                p50, p99 = _percentiles(agent.otlp.latency_samples_ns(server_only=True))
                rows[0].values.append(p50)
                rows[1].values.append(p99)
                agent.otlp.clear_latency_samples()
                before = agent.otlp.spans_exported
                dropped_before = agent.otlp.spans_dropped
                run_wrk(url, load_s, connections=16)
                time.sleep(1.0)
                p50, p99 = _percentiles(agent.otlp.latency_samples_ns(server_only=True))
                rows[2].values.append(p50)
                rows[3].values.append(p99)
                exported = agent.otlp.spans_exported - before
                dropped = agent.otlp.spans_dropped - dropped_before
                rows[4].values.append(exported / load_s)
                rows[5].values.append(100.0 * dropped / max(1, exported + dropped))
            finally:
                agent.stop()
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(render(run(args.quick), "event → OTLP export latency"))


if __name__ == "__main__":
    main()
