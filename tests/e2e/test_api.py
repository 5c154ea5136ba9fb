"""The JSON API against /metrics and its own OpenAPI description: real agent, real nginx and
Python upstream, exact counts; schemathesis generates requests from /api/openapi.json."""

from __future__ import annotations

import gzip
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agentlib import scrape, total, wait_for
from uistack import (
    EDGE,
    NGINX_ROUTES,
    NGINX_TOTAL,
    SERVER_COUNT,
    UPSTREAM_ROUTES,
    UPSTREAM_TOTAL,
    Stack,
    drive,
    observed_stack,
    tracing_everything,
)

from probewire.serve.openapi import openapi_document
from support.metrics import parse_metrics

pytestmark = pytest.mark.e2e


def get(stack: Stack, path: str) -> Any:
    with urllib.request.urlopen(stack.base + path, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        return json.load(resp)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with observed_stack() as s:
        drive(s)
        yield s


def http_series(stack: Stack) -> dict[Any, float]:
    """nginx's and the upstream's HTTP and service-graph series: nothing else moves them.

    (TCP series move with the API's own connections, and other processes' traffic is theirs.)
    """
    ours = {"nginx", "upstream"}
    return {
        k: v for k, v in scrape(stack.listen).items()
        if k[0].startswith(("http_", "traces_service_graph_"))
        and any(name in ("service_name", "client", "server") and value in ours
                for name, value in k[1])
    }


def test_api_counts_equal_metrics_per_service_and_route(stack: Stack) -> None:
    metrics = http_series(stack)
    services = {s["name"]: s for s in get(stack, "/api/services")["services"]}
    nginx = get(stack, "/api/services/nginx")
    upstream = get(stack, "/api/services/upstream")
    graph = get(stack, "/api/graph")
    after = http_series(stack)
    assert metrics == after, f"traffic moved: {sorted(set(metrics.items()) ^ set(after.items()))}"

    for name, detail, expected in (("nginx", nginx, NGINX_ROUTES),
                                   ("upstream", upstream, UPSTREAM_ROUTES)):
        want = total(metrics, SERVER_COUNT, service_name=name)
        assert services[name]["requests"] == detail["requests"] == want
        assert services[name]["kind"] == "service"
        routes = {(r["method"], r["route"]): r for r in detail["route_list"]}
        assert {k: r["requests"] for k, r in routes.items()} == expected
        for (method, route), r in routes.items():
            assert r["requests"] == total(metrics, SERVER_COUNT, service_name=name,
                                          http_request_method=method, http_route=route)
            for status, n in r["statuses"].items():
                assert n == total(metrics, SERVER_COUNT, service_name=name,
                                  http_request_method=method, http_route=route,
                                  http_response_status_code=status)
    assert nginx["requests"] == NGINX_TOTAL
    assert upstream["requests"] == UPSTREAM_TOTAL
    # 5xx are errors: nginx passes on the upstream's two 503s; 404 is not a server error.
    assert nginx["errors"] == 2 and upstream["errors"] == 2
    assert {r["route"]: r["statuses"] for r in upstream["route_list"]} == {
        "/api/items/{id}": {"200": 6}, "/api/fail": {"503": 2}}

    edges = {(e["client"], e["server"]): e for e in graph["edges"]}
    edge = edges[("nginx", "upstream")]
    assert edge["requests"] == total(metrics, EDGE, client="nginx", server="upstream")
    assert edge["requests"] == UPSTREAM_TOTAL and edge["failed"] == 2
    assert edge["failed"] == total(metrics, "traces_service_graph_request_failed_total",
                                   client="nginx", server="upstream")
    assert edge["rate"] > 0 and edge["p99_seconds"] is not None
    assert [e["server"] for e in nginx["outgoing"]] == ["upstream"]
    assert [e["client"] for e in upstream["incoming"]] == ["nginx"]
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert nodes["nginx"]["requests"] == NGINX_TOTAL and nodes["nginx"]["rate"] > 0
    assert nodes["upstream"]["requests"] == UPSTREAM_TOTAL


def test_tcp_peers_equal_metrics(stack: Stack) -> None:
    # Each reading opens a connection to the agent itself: leave those out, and read again
    # while other processes on the host move the rest.
    agent_port = stack.listen.rsplit(":", 1)[1]

    def tcp_series() -> dict[Any, float]:
        return {k: v for k, v in scrape(stack.listen).items()
                if k[0].startswith("probewire_tcp_")
                and ("server_port", agent_port) not in k[1]}

    for _ in range(20):
        before = tcp_series()
        peers = [p for p in get(stack, "/api/tcp")["peers"] if p["server_port"] != agent_port]
        if before == tcp_series():
            break
    else:
        pytest.fail("TCP counters never held still long enough to compare")
    for p in peers:
        labels = {k: p[k] for k in ("service_name", "direction", "server_address", "server_port")}
        assert p["opened"] == total(before, "probewire_tcp_connections_opened_total", **labels)
        assert p["retransmits"] == total(before, "probewire_tcp_retransmits_total", **labels)
        assert p["resets_sent"] == total(before, "probewire_tcp_resets_total", reset="sent",
                                         **labels)
    # nginx accepted this test's connections on its port and opened one to the upstream.
    nginx_server = [p for p in peers if p["service_name"] == "nginx"
                    and p["direction"] == "server" and p["server_port"] == str(stack.nginx.port)]
    assert nginx_server and nginx_server[0]["opened"] >= NGINX_TOTAL
    to_upstream = [p for p in peers if p["service_name"] == "nginx" and p["direction"] == "client"
                   and p["server_port"] == str(stack.upstream.port)]
    assert to_upstream and to_upstream[0]["opened"] >= 1


def test_history_has_red_points_for_each_service(stack: Stack) -> None:
    assert wait_for(lambda: {"nginx", "upstream"} <= set(get(stack, "/api/history")["services"]))
    h = get(stack, "/api/history?service=upstream")
    assert h["interval_seconds"] == 1.0
    n = len(h["time"])
    assert n >= 1 and all(len(h[c]) == n for c in ("rate", "error_ratio", "p50_seconds",
                                                    "p99_seconds"))
    assert h["time"] == sorted(h["time"])


def test_events_feed_pages_by_timestamp(stack: Stack) -> None:
    import subprocess

    with tracing_everything(stack):
        for _ in range(3):
            subprocess.run(["/bin/true"], check=True)
        wait_for(lambda: len(get(stack, "/api/events?kind=exec")["events"]) >= 3)
    events = get(stack, "/api/events?kind=exec&limit=5")["events"]
    assert events and all(e["kind"] == "exec" for e in events) and len(events) <= 5
    last = events[-1]["timestamp_ns"]
    newer = get(stack, f"/api/events?since_ns={last}")["events"]
    assert all(e["timestamp_ns"] > last for e in newer)


@pytest.mark.parametrize("path", ["/api/services/no-such-service", "/api/nope",
                                  "/api/history?service=no-such-service"])
def test_unknown_things_answer_404_with_a_json_error(stack: Stack, path: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        get(stack, path)
    assert info.value.code == 404
    assert "error" in json.load(info.value)


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "kind=fork", "since_ns=-1"])
def test_bad_event_queries_answer_400(stack: Stack, query: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        get(stack, "/api/events?" + query)
    assert info.value.code == 400


def test_metrics_come_gzipped_to_a_client_that_asks_and_say_the_same(stack: Stack) -> None:
    def ours(samples: dict[Any, float]) -> dict[Any, float]:
        return {k: v for k, v in samples.items() if k in plain}

    plain = http_series(stack)
    request = urllib.request.Request(stack.base + "/metrics",
                                     headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        zipped = parse_metrics(gzip.decompress(resp.read()).decode())
    assert plain and ours(zipped) == plain


def test_existing_endpoints_still_answer(stack: Stack) -> None:
    assert get(stack, "/api/probes")["probes"]
    with urllib.request.urlopen(stack.base + "/healthz", timeout=10) as resp:
        assert resp.read() == b"ok\n"
    agent = get(stack, "/api/agent")
    assert {p["probe"] for p in agent["probes"]} == set(stack.agent.running)
    assert all(p["dropped"] == 0 for p in agent["probes"])


# Schemathesis' pytest fixture loader does not work with this pytest; drive its strategies
# with hypothesis directly, one test per operation of the document.
@pytest.mark.parametrize("path", sorted(set(openapi_document("test")["paths"])
                                        - {"/api/openapi.json"}))
def test_api_conforms_to_its_openapi_description(stack: Stack, path: str) -> None:
    schema = schemathesis.openapi.from_url(stack.base + "/api/openapi.json")
    assert schema.raw_schema == openapi_document(schema.raw_schema["info"]["version"])
    operation = schema.find_operation_by_path("GET", path)
    assert operation is not None, f"{path} is not in the served document"

    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case: Any) -> None:
        case.call_and_validate(timeout=10)

    check()
