"""OTLP end to end: nginx -> Python upstream traced by a real agent, received by a real receiver.

The receiver (tests/support/otlp_receiver.py) decodes what the SDK's exporters send over gRPC or
HTTP/protobuf. Counts are exact; waits poll for state and never assert on time.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import running_agent, scrape, total, wait_for

from support.otlp_receiver import ReceivedSpan, Receiver, otlp_receiver
from support.servers import nginx, python_upstream

pytestmark = pytest.mark.e2e

N = 20
ROUTE = "/api/otlp/{id}"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
        return int(resp.status)


def _server_spans(rx: Receiver, port: int) -> list[ReceivedSpan]:
    return [s for s in rx.spans() if s.span.kind == s.span.SPAN_KIND_SERVER
            and s.attributes.get("server.port") == port
            and str(s.attributes.get("url.path", "")).startswith("/api/otlp/")]


def _client_spans(rx: Receiver, pid: int, port: int) -> list[ReceivedSpan]:
    return [s for s in rx.spans() if s.span.kind == s.span.SPAN_KIND_CLIENT
            and s.resource.get("process.pid") == pid
            and s.attributes.get("server.port") == port
            and "/api/otlp/" in str(s.attributes.get("url.full", ""))]


def _otlp_export(protocol: str, endpoint: str) -> dict[str, Any]:
    return {"export": {"otlp": {
        "enabled": True, "protocol": protocol, "endpoint": endpoint, "interval_s": 3600,
        "link_wait_ms": 500, "headers": {"x-probewire-test": "yes"},
        "resource_attributes": {"deployment.environment": "test"},
    }}}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_spans_and_metrics_for_nginx_and_upstream(protocol: str) -> None:
    with otlp_receiver(protocol) as rx, python_upstream() as up, \
            nginx(upstream_port=up.port) as ng, \
            running_agent(_otlp_export(protocol, rx.endpoint)) as (agent, listen):
        for i in range(N - 1):
            assert _get(f"{ng.url}/api/otlp/{i}") == 200
        # The last request arrives with a W3C traceparent: nginx's server span must join it.
        assert _get(f"{ng.url}/api/otlp/{N - 1}",
                    {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) == 200
        assert wait_for(lambda: len(_server_spans(rx, ng.port)) >= N)
        nginx_pid = _server_spans(rx, ng.port)[0].resource["process.pid"]
        assert wait_for(lambda: len(_server_spans(rx, up.port)) >= N
                        and len(_client_spans(rx, nginx_pid, up.port)) >= N)

        # The receiver runs on this host, so its end of the agent's exports is traced too:
        # those exchanges are counted, never made spans (a span per export would be exported
        # by the next export, and so on for as long as the agent runs).
        assert wait_for(lambda: total(scrape(listen), "probewire_otlp_spans_total",
                                      result="export_call") > 0)

        # Metric points: one export now, compared with a scrape of the same state.
        samples = scrape(listen)
        assert agent.otlp is not None and agent.otlp.export_metrics()
        resource, metrics = rx.latest_metrics()
    # Leaving the agent flushed everything: now the counts are final.

    otlp_paths = ("/v1/traces", "/v1/metrics")
    export_calls = [s.span.name for s in rx.spans()
                    if "opentelemetry.proto.collector" in s.span.name
                    or str(s.attributes.get("url.path", "")).endswith(otlp_paths)]
    assert export_calls == []
    nginx_servers = _server_spans(rx, ng.port)
    upstream_servers = _server_spans(rx, up.port)
    clients = _client_spans(rx, nginx_pid, up.port)
    assert len(nginx_servers) == N
    assert len(upstream_servers) == N
    assert len(clients) == N
    assert {s.service for s in nginx_servers} == {"nginx"}
    assert {s.service for s in upstream_servers} == {"upstream"}

    # Attributes and timing of a server span.
    s = nginx_servers[0]
    a = s.attributes
    assert a["http.request.method"] == "GET"
    assert a["http.route"] == ROUTE
    assert a["http.response.status_code"] == 200
    assert a["client.address"] == "127.0.0.1"
    assert s.span.name == f"GET {ROUTE}"
    assert s.span.end_time_unix_nano >= s.span.start_time_unix_nano > 1_600_000_000 * 10**9
    assert s.resource["host.name"] and s.resource["process.pid"] == nginx_pid
    assert s.resource["deployment.environment"] == "test"

    # nginx's client span to the upstream is the child of the nginx server span it served.
    by_id = {x.span.span_id: x for x in nginx_servers}
    for c in clients:
        parent = by_id.get(c.span.parent_span_id)
        assert parent is not None, f"client span {c.attributes['url.full']} has no nginx parent"
        assert c.span.trace_id == parent.span.trace_id
        assert str(c.attributes["url.full"]).endswith(str(parent.attributes["url.path"]))
        assert parent.span.start_time_unix_nano <= c.span.start_time_unix_nano
        assert c.span.end_time_unix_nano <= parent.span.end_time_unix_nano

    # The traceparent-carrying request joined the caller's trace, and so did its child.
    joined = [x for x in nginx_servers if x.span.trace_id.hex() == TRACE_ID]
    assert len(joined) == 1
    assert joined[0].span.parent_span_id.hex() == PARENT_ID
    assert joined[0].attributes["url.path"] == f"/api/otlp/{N - 1}"
    assert [c for c in clients if c.span.trace_id.hex() == TRACE_ID]
    assert all(x.span.trace_id.hex() != TRACE_ID for x in nginx_servers if x is not joined[0])

    # Metric points equal /metrics, and count the requests we made.
    assert resource["service.name"] == "probewire"
    assert {"host.name", "process.pid", "process.executable.name"} <= resource.keys()
    hist = metrics["http_server_request_duration_seconds"]
    points = {tuple(sorted((kv.key, kv.value.string_value) for kv in p.attributes)): p
              for p in hist.histogram.data_points}
    for svc in ("nginx", "upstream"):
        want = total(samples, "http_server_request_duration_seconds_count",
                     service_name=svc, http_route=ROUTE)
        got = sum(p.count for labels, p in points.items()
                  if ("service_name", svc) in labels and ("http_route", ROUTE) in labels)
        assert want == got == N
    for labels, p in points.items():
        key = dict(labels)
        if key["service_name"] not in ("nginx", "upstream"):
            continue  # this process's own traffic (the scrape, OTLP/HTTP) moves on meanwhile
        assert p.count == total(samples, "http_server_request_duration_seconds_count", **key)
        assert sum(p.bucket_counts) == p.count
    counter = metrics["probewire_events"]
    assert counter.sum.is_monotonic
    assert rx.headers and all(h.get("x-probewire-test") == "yes" for h in rx.headers)
