"""In-kernel aggregation of HTTP exchanges (l7_aggs) against the ring path it replaces.

Agents side by side watch the same exchanges: one counting known routes in the kernel, one
sending every exchange to user space, one on the bpf_probe_read_kernel path that kernels
without bpf_rdonly_cast take. Every exported count, body-size bucket and sum must be equal.
Each agent filters on the upstream's port, so other traffic on the machine stays out.

Needs: what tests/bpf/test_http.py needs, plus BPF_MAP_TYPE_PERCPU_HASH, task storage and the
bpf_rdonly_cast kfunc (Linux 6.2+) for the default path.
"""

from __future__ import annotations

import contextlib
import http.client
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from agentlib import Samples, running_agent, scrape, total, wait_for

from probewire.agent import Agent
from probewire.l7.records import L7_AGG as HTTP_AGG
from probewire.l7.records import L7_AGG_KEY as HTTP_AGG_KEY
from probewire.l7.records import L7_OP_KEY
from probewire.probes.l7 import L7Probe
from support.servers import python_upstream

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]

SERVER = "http_server_request_duration_seconds_count"
CLIENT = "http_client_request_duration_seconds_count"
# Families whose every sample (buckets, sums, counts) must not depend on the path taken.
EXACT = (
    "http_server_request_duration_seconds_count",
    "http_client_request_duration_seconds_count",
    "http_server_request_body_size_bytes",
    "http_server_response_body_size_bytes",
    "http_client_request_body_size_bytes",
    "traces_service_graph_request_total",
    "traces_service_graph_request_failed_total",
    "traces_service_graph_request_server_seconds_count",
    "traces_service_graph_request_client_seconds_count",
    "probewire_http_aborted_total",
)
BODY_SIZES = (0, 1, 63, 64, 65, 1000, 4097, 70_000)


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with python_upstream() as up:
        yield up.port


@contextlib.contextmanager
def agent_with(port: int, kfuncs: bool = True, **http: Any) -> Iterator[tuple[Agent, str]]:
    saved = L7Probe.kfuncs
    L7Probe.kfuncs = kfuncs  # read while the object loads, i.e. inside running_agent
    try:
        with running_agent({"filter": {"ports": [port]}, "probes": {"l7": http}}) as pair:
            L7Probe.kfuncs = saved
            yield pair
    finally:
        L7Probe.kfuncs = saved


def workload(port: int, rounds: int) -> int:
    """Keep-alive and fresh connections, GET/HEAD/POST, 200/201/404-ish/503; returns requests."""
    n = 0
    for r in range(rounds):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in range(4):
            conn.request("GET", f"/api/items/{i}?page={r}")
            conn.getresponse().read()
            n += 1
        for size in BODY_SIZES:
            conn.request("POST", "/api/upload", body=b"x" * size)
            conn.getresponse().read()
            n += 1
        conn.request("HEAD", "/api/items/7")
        conn.getresponse().read()
        conn.request("GET", "/api/fail")
        conn.getresponse().read()
        n += 2
        conn.close()
    return n


def settle(listen: str, n: int) -> Samples:
    wait_for(lambda: total(scrape(listen), SERVER, service_name="upstream") >= n
             and total(scrape(listen), CLIENT, service_name="pytest") >= n)
    time.sleep(0.2)  # anything extra shows up now, and fails the exact comparisons
    return scrape(listen)


def family(samples: Samples, prefix: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {k: v for k, v in samples.items() if k[0].startswith(prefix)}


def test_kernel_aggregates_equal_ring_records_for_the_same_exchanges(upstream: int) -> None:
    with agent_with(upstream) as (kernel, kernel_listen), \
            agent_with(upstream, kernel_aggregation=False) as (_, ring_listen), \
            agent_with(upstream, kfuncs=False) as (_, compat_listen):
        assert kernel.probes["l7"].kfuncs is True
        n = workload(upstream, rounds=6)
        by_path = {name: settle(listen, n) for name, listen in
                   (("kernel", kernel_listen), ("ring", ring_listen),
                    ("compat", compat_listen))}
    k, r, c = by_path["kernel"], by_path["ring"], by_path["compat"]
    assert total(r, SERVER, service_name="upstream") == n
    assert total(r, CLIENT, service_name="pytest") == n
    # The kernel path was taken for most: all but each path's first exchanges on each side
    # (until user space has registered the path, a few milliseconds).
    assert total(k, "probewire_http_exchanges_total", via="kernel") >= n
    assert total(c, "probewire_http_exchanges_total", via="kernel") >= n
    assert total(r, "probewire_http_exchanges_total", via="kernel") == 0
    assert total(r, "probewire_http_exchanges_total", via="ring") == 2 * n
    for prefix in EXACT:
        assert family(k, prefix) == family(r, prefix), prefix
        assert family(c, prefix) == family(r, prefix), prefix
    # Durations: the same count per bucket set; sums agree closely (each agent takes its
    # own timestamps, nanoseconds apart).
    for samples in (k, c):
        got = total(samples, "http_server_request_duration_seconds_sum", service_name="upstream")
        want = total(r, "http_server_request_duration_seconds_sum", service_name="upstream")
        assert got == pytest.approx(want, rel=0.05)
    # Request bodies were measured exactly: each POST body once per round, on both sides.
    assert total(k, "http_server_request_body_size_bytes_sum", service_name="upstream",
                 http_request_method="POST") == 6 * sum(BODY_SIZES)
    assert total(k, "http_client_request_body_size_bytes_sum", service_name="pytest",
                 http_request_method="POST") == 6 * sum(BODY_SIZES)


def test_full_kernel_map_sends_exchanges_through_the_ring_and_loses_none(upstream: int) -> None:
    with agent_with(upstream, kernel_keys=16) as (_, listen):
        conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=30)
        # 40 routes (letters are never templated), 3 times each: 80 keys for a map of 16.
        for _ in range(3):
            for i in range(40):
                conn.request("GET", f"/r/{chr(97 + i % 26)}{chr(97 + i // 26)}")
                conn.getresponse().read()
        conn.close()
        s = settle(listen, 120)
        assert total(s, SERVER, service_name="upstream") == 120
        assert total(s, CLIENT, service_name="pytest") == 120
        kernel = total(s, "probewire_http_exchanges_total", via="kernel")
        ring = total(s, "probewire_http_exchanges_total", via="ring")
        assert kernel > 0 and ring > 80  # each route's first exchanges, and the overflow
        assert kernel + ring == 240
        assert total(s, "probewire_map_entries", probe="l7", map="l7_aggs") <= 16


def test_keys_of_exited_clients_are_reaped_and_their_counts_kept(upstream: int) -> None:
    with agent_with(upstream) as (agent, listen):
        http_probe = agent.probes["l7"]
        assert isinstance(http_probe, L7Probe)
        url = f"http://127.0.0.1:{upstream}/api/items/1"
        pids = []
        for _ in range(6):
            proc = subprocess.Popen(["curl", "-sf", "-o", "/dev/null", url])
            pids.append(proc.pid)
            assert proc.wait(timeout=10) == 0
        wait_for(lambda: total(scrape(listen), CLIENT, service_name="curl") >= 6)
        before = scrape(listen)
        assert total(before, CLIENT, service_name="curl") == 6
        keys, _ = http_probe.map("l7_aggs").read_all(HTTP_AGG_KEY, HTTP_AGG)
        assert set(pids) & set(keys["tgid"].tolist())  # all but the first went to the kernel
        # Two reaps in a row find the curls gone: their keys (client side, and the server
        # side's keys naming them as peers) are deleted, every count they held is kept.
        assert http_probe.kernel is not None
        http_probe.kernel.reap_s = 0.0
        http_probe.sync()
        http_probe.sync()
        keys, _ = http_probe.map("l7_aggs").read_all(HTTP_AGG_KEY, HTTP_AGG)
        assert not set(pids) & set(keys["tgid"].tolist())
        assert not set(pids) & set(keys["peer_tgid"].tolist())
        after = scrape(listen)
        for name in (CLIENT, SERVER, "probewire_http_exchanges_total"):
            assert total(after, name) == total(before, name), name
        assert np.all(keys["tgid"] != 0)


def _route_hashes(probe: L7Probe, route: str) -> int:
    """l7_ops entries naming `route`: the path hashes user space registered for it."""
    keys, values = probe.map("l7_ops").read_all(L7_OP_KEY, np.dtype(np.uint32))
    oid = probe.ops.ids.get(route)
    return 0 if oid is None else int(np.count_nonzero(values.reshape(len(keys)) == oid))


@pytest.mark.parametrize("patterns", [(), ("/api/items/0",)])
def test_ids_in_paths_share_one_kernel_hash_and_are_counted_exactly(
        upstream: int, patterns: tuple[str, ...]) -> None:
    """A number in a path is the route's {id}: the kernel hashes the segment as one, so user
    space names the route from its first exchanges and the kernel counts all the others. A
    configured pattern with a number in it (/api/items/0) turns that off (the digits decide
    the route then): each path is named apart, and the counts are as exact."""
    ids = range(-3, 37)
    overrides = {"filter": {"ports": [upstream]}, "probes": {"http": {"routes": list(patterns)}}}
    with running_agent(overrides) as (agent, listen):
        probe = agent.probes["l7"]
        assert isinstance(probe, L7Probe)
        assert probe.templater.numbers_are_ids is not patterns
        conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=30)
        for i in ids:
            conn.request("GET", f"/api/items/{i}?q={i}")
            conn.getresponse().read()
        conn.close()
        s = settle(listen, len(ids))
        named = 1 if patterns else 0
        for name, service in ((SERVER, "upstream"), (CLIENT, "pytest")):
            assert total(s, name, service_name=service, http_route="/api/items/{id}") \
                == len(ids) - named
            assert total(s, name, service_name=service, http_route="/api/items/0") == named
        ring = total(s, "probewire_http_exchanges_total", via="ring")
        kernel = total(s, "probewire_http_exchanges_total", via="kernel")
        assert ring + kernel == 2 * len(ids)
        if patterns:
            # Every path is new to the kernel: each crosses (one side at least: the other may
            # end after user space named it) and is named apart.
            assert ring >= len(ids) and _route_hashes(probe, "/api/items/{id}") == len(ids) - 1
        else:
            # One hash for all the ids, whatever their digits and signs; the kernel counts
            # every exchange after the route was named (the first ones cross while it is).
            assert _route_hashes(probe, "/api/items/{id}") == 1
            assert kernel >= 2 * len(ids) - 10
