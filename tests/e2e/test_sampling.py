"""1-in-10 sampling with a real agent and a real OTLP receiver: the spans exported fall within
binomial bounds of 10% and carry their probability (tracestate ot=th), while the metrics of
the same requests stay exact. The kernel decides (bpf/l7/proto_http.h http_sample): the
exchanges of traces not kept are counted in kernel maps and never cross to user space, but
for the first of each path (user space learns its route from it)."""

from __future__ import annotations

import math
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import running_agent, scrape, total, wait_for

from support.otlp_receiver import otlp_receiver
from support.servers import free_port, python_upstream

pytestmark = pytest.mark.e2e

N = 400
P = 0.1
PATHS = 5


def test_one_in_ten_spans_within_binomial_bounds_and_metrics_exact() -> None:
    port = free_port()
    with otlp_receiver("grpc") as rx, python_upstream(port):
        config = {"sampling": {"one_in": 10}, "filter": {"ports": [port]},
                  "services": {"rules": [{"name": "sampled-upstream", "port": port}]},
                  "probes": {"l7": {"tls": False}},
                  "export": {"otlp": {"enabled": True, "protocol": "grpc",
                                      "endpoint": rx.endpoint, "interval_s": 3600,
                                      "link_wait_ms": 0}}}
        with running_agent(config) as (agent, listen):
            for i in range(N):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/s/{i % PATHS}",
                                           timeout=10).read()
                except urllib.error.HTTPError as exc:
                    exc.read()
            series = "http_server_request_duration_seconds_count"
            assert wait_for(lambda: total(scrape(listen), series,
                                          service_name="sampled-upstream") == N, 30)

            def servers() -> list[object]:
                return [s for s in rx.spans() if s.span.kind == s.span.SPAN_KIND_SERVER
                        and s.attributes.get("server.port") == port]

            otlp = agent.otlp
            assert otlp is not None
            # Every exchange decided: exported, or shipped and counted as unsampled, or
            # counted in the kernel. N server and N client ones (this process is the client;
            # the port filter leaves out everything else).
            def in_kernel() -> float:
                return total(scrape(listen), "probewire_http_exchanges_total", via="kernel")

            assert wait_for(lambda: otlp.assembler.unsampled + in_kernel() + len(
                [s for s in rx.spans() if s.attributes.get("server.port") == port]) == 2 * N,
                30)
            # Most records never reached user space: the kept ones did, and those of traces not
            # kept only while user space had not yet told the kernel their path's route (the
            # first of each path on each side, and any that raced it).
            assert in_kernel() >= N, in_kernel()
            kept = servers()
            sd = math.sqrt(N * P * (1 - P))
            # Five standard deviations: a false failure about once in 1.7 million runs.
            assert N * P - 5 * sd <= len(kept) <= N * P + 5 * sd, len(kept)
            for span in kept:
                assert "ot=th:e6666666666666" in span.span.trace_state  # type: ignore[attr-defined]
            # The metrics did not sample: every request is counted.
            assert total(scrape(listen), series, service_name="sampled-upstream") == N


def test_an_incoming_traceparent_decides_in_the_kernel() -> None:
    """Requests whose traceparent says sampled are all kept, those that say not sampled none,
    whatever the 1-in-10 draw would have said."""
    port = free_port()
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with otlp_receiver("grpc") as rx, python_upstream(port):
        config = {"sampling": {"one_in": 10}, "filter": {"ports": [port]},
                  "probes": {"l7": {"tls": False}},
                  "export": {"otlp": {"enabled": True, "protocol": "grpc",
                                      "endpoint": rx.endpoint, "interval_s": 3600,
                                      "link_wait_ms": 0}}}
        with running_agent(config) as (_, listen):
            for i in range(2 * PATHS * 5):
                flags = "01" if i % 2 else "00"
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/t/{i % PATHS}",
                    headers={"traceparent": f"00-{trace}-{i + 1:016x}-{flags}"})
                urllib.request.urlopen(request, timeout=10).read()
            series = "http_server_request_duration_seconds_count"
            assert wait_for(lambda: total(scrape(listen), series) == 2 * PATHS * 5, 30)

            def kept() -> list[object]:
                return [sp for sp in rx.spans() if sp.span.kind == sp.span.SPAN_KIND_SERVER
                        and sp.attributes.get("server.port") == port]

            wait_for(lambda: len(kept()) >= PATHS * 5, 30)
            parents = sorted(int(sp.span.parent_span_id.hex(), 16)  # type: ignore[attr-defined]
                             for sp in kept())
            assert parents == [i + 1 for i in range(2 * PATHS * 5) if i % 2]
