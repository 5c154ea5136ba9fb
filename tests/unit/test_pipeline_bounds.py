"""The record path's bounds, through L7Probe.on_batch: per-service shares of each metric's
budget, routes learned per service, and the series TTL (label sets no exchange wrote for the
TTL are dropped with their room, and what the memo built on them goes too)."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pytest

import probewire.aggregate.series as series_module
from probewire.aggregate.red import HTTP_SERVER
from probewire.aggregate.routes import PARAM
from probewire.config import config_from_mapping
from probewire.enrich.service import ServiceResolver
from probewire.l7.constants import Proto
from probewire.l7.records import HTTP_EXCHANGE
from probewire.probes.base import ProbeContext
from probewire.probes.l7 import L7Probe

LOCAL = bytes([127, 0, 0, 1]) + bytes(12)
REMOTE = bytes([10, 0, 0, 9]) + bytes(12)


class Names(ServiceResolver):
    def __init__(self) -> None:
        super().__init__(())

    def name_until(self, pid: int, port: int = 0) -> tuple[str, float]:
        return f"svc{pid}", float("inf")

    def name_for(self, pid: int) -> str:
        return f"svc{pid}"

    def name_for_port(self, pid: int, port: int) -> str:
        return f"svc{pid}"


def server_records(requests: list[tuple[int, str, int]]) -> np.ndarray:
    """HTTP/1.1 server exchanges: (pid, path, status) each, from a remote client."""
    rec = np.zeros(len(requests), HTTP_EXCHANGE)
    rec["proto"] = Proto.HTTP
    rec["kind"] = 1
    rec["role"] = 1
    rec["method"] = 1  # GET
    rec["family"] = socket.AF_INET
    rec["lport"] = 8080
    rec["rport"] = 40000
    rec["end_ns"] = 1_000_000
    for i, (pid, path, status) in enumerate(requests):
        head = f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
        rec["tgid"][i] = pid
        rec["status"][i] = status
        rec["req_head_len"][i] = len(head)
        rec["req_head"][i, : len(head)] = np.frombuffer(head, np.uint8)
        rec["laddr"][i] = np.frombuffer(LOCAL, np.uint8)
        rec["raddr"][i] = np.frombuffer(REMOTE, np.uint8)
    return rec


def probe_with(**l7: Any) -> L7Probe:
    http = l7.pop("http", {})
    cfg = config_from_mapping({"probes": {"l7": {"kernel_aggregation": False, **l7},
                                          "http": http}})
    return L7Probe(ProbeContext(cfg, Names()))


def server_series(probe: L7Probe) -> dict[tuple[str, ...], int]:
    sink = probe.pipeline.red.sinks[HTTP_SERVER]
    return {labels: int(c.sum()) for labels, c in sink.duration.counts.items()}


def routes_of(probe: L7Probe, service: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for labels, n in server_series(probe).items():
        if labels[0] == service:
            out[labels[3]] = out.get(labels[3], 0) + n
    return out


def test_one_services_flood_of_routes_folds_only_its_own() -> None:
    probe = probe_with(max_series_per_metric=100, max_series_per_service=10,
                       http={"route_learning": {"enabled": False}})
    flood = [(1, f"/report-{name}", 200) for name in ("a", "b", "c", "d", "e", "f", "g", "h",
                                                       "i", "j", "k", "l", "m", "n", "o")]
    quiet = [(2, f"/page-{name}", 200) for name in ("x", "y", "z")]
    for _ in range(3):
        probe.on_batch(server_records(flood + quiet))
    flooded = routes_of(probe, "svc1")
    assert len(flooded) == 11 and flooded["other"] == 5 * 3
    assert sum(flooded.values()) == 15 * 3  # every request counted
    assert routes_of(probe, "svc2") == {f"/page-{n}": 3 for n in "xyz"}
    budget = probe.pipeline.red.sinks[HTTP_SERVER].budget
    assert budget.per_service()["svc1"] == (10, 15)  # 5 folded label sets, 3 batches each
    assert budget.per_service()["svc2"] == (3, 0)


def test_parameters_the_heuristics_miss_are_learned_per_service() -> None:
    probe = probe_with(http={"route_learning": {"max_distinct": 4, "keep_hits": 2}})
    users = ["ann", "bob", "cat", "dan", "eve", "fay", "gus"]
    # /users/me is seen under many paths before the collapse: it stays literal.
    first = [(1, f"/users/me/{tab}", 200) for tab in ("a", "b")]
    probe.on_batch(server_records(first + [(1, f"/users/{u}/profile", 200) for u in users]
                                  + [(2, f"/users/{u}/profile", 200) for u in users[:3]]))
    probe.on_batch(server_records([(1, "/users/zed/profile", 200), (1, "/users/me/a", 200)]))
    learned = routes_of(probe, "svc1")
    assert learned == {f"/users/{PARAM}/profile": 8, "/users/me/a": 2, "/users/me/b": 1}
    # Another service's three users stay literal: it learned nothing yet.
    assert routes_of(probe, "svc2") == {f"/users/{u}/profile": 1 for u in users[:3]}
    assert probe.learned_routes()["services"]["svc1"]["collapsed"] == 1


def test_idle_label_sets_expire_with_their_room(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(series_module._Rows, "clock", staticmethod(lambda: now[0]))
    probe = probe_with(max_series_per_metric=10, max_series_per_service=3, series_ttl_s=60.0,
                       http={"route_learning": {"enabled": False}})
    probe.on_batch(server_records([(1, f"/old-{i}", 200) for i in range(3)]))
    assert len(routes_of(probe, "svc1")) == 3
    now[0] += 30
    probe.on_batch(server_records([(1, "/old-0", 200), (1, "/new-0", 200)]))
    assert routes_of(probe, "svc1") == {"/old-0": 2, "/old-1": 1, "/old-2": 1, "other": 1}
    now[0] += 45  # /old-1 and /old-2 idle for 75 s, /old-0 and other for 45 s
    assert probe.pipeline.expire(now[0]) == 2
    assert routes_of(probe, "svc1") == {"/old-0": 2, "other": 1}
    # Their room is admitted again, and the memo no longer answers "folded" for /new-0.
    probe.on_batch(server_records([(1, "/new-0", 200), (1, "/new-1", 200),
                                   (1, "/old-0", 200)]))
    assert routes_of(probe, "svc1") == {"/old-0": 3, "/new-0": 1, "/new-1": 1, "other": 1}
    budget = probe.pipeline.red.sinks[HTTP_SERVER].budget
    assert budget.released == 2 and budget.per_service()["svc1"][0] == 3
    assert probe.pipeline.expired == 2


def test_no_ttl_no_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = probe_with(http={"route_learning": {"enabled": False}})
    probe.on_batch(server_records([(1, "/a", 200)]))
    assert probe.pipeline.expire(1e12) == 0
    assert routes_of(probe, "svc1") == {"/a": 1}


def test_the_memory_guard_empties_the_memo_and_nothing_is_lost() -> None:
    from probewire.aggregate.bounds import Bounds

    probe = probe_with(http={"route_learning": {"enabled": False}})
    bounds = Bounds()
    probe.register_bounds(bounds)
    assert {"l7.memo", "l7.streams", "http.route_cache"} <= set(bounds.names())
    probe.on_batch(server_records([(1, f"/p{i}", 200) for i in range(50)]))
    before = {r.structure: r.entries for r in bounds.rows()}["l7.memo"]
    assert before >= 50
    dropped = bounds.shrink()
    assert dropped["l7.memo"] >= 50
    probe.on_batch(server_records([(1, f"/p{i}", 200) for i in range(50)]))
    assert routes_of(probe, "svc1") == {f"/p{i}": 2 for i in range(50)}
