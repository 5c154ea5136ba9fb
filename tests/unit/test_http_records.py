"""L7Probe.on_batch (HTTP/1.x records, decoded and aggregated whole-array, memoised across
batches by aggregate/pipeline.py) against a straightforward per-row
reference of the same rules: the same series with the same counts, the same label budget
answers and overflow counts, the same endpoint tables (in the same order), the same rows for
sinks; sums agree to float rounding (the reference adds row by row).

The reference admits label sets, and puts endpoints, in the order they first appear in a
batch; that is the order on_batch promises (the hashed grouping it replaced had none).
"""

from __future__ import annotations

import bisect
import math
import socket
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import probewire.aggregate.ids as ids
import probewire.aggregate.memo as memo_module
import probewire.aggregate.pipeline as pipeline_module
import probewire.l7.protocols.http1 as http1
from probewire.aggregate.budget import LabelBudget
from probewire.aggregate.graph import EDGE_LABELS
from probewire.aggregate.http_heads import header_length, nth_request, request_paths
from probewire.aggregate.memo import ENDPOINTS_MAX
from probewire.aggregate.red import HTTP_CLIENT, HTTP_CLIENT_LABELS, HTTP_SERVER
from probewire.aggregate.red import HTTP_SERVER_LABELS as SERVER_LABELS
from probewire.aggregate.routes import RouteLearner, RouteTemplater
from probewire.config import config_from_mapping
from probewire.enrich.net import format_address
from probewire.enrich.service import ServiceResolver
from probewire.l7.constants import HttpFlag, L7Flag, Proto
from probewire.l7.exchanges import METHODS, ExchangeBatch
from probewire.l7.protocols.http1 import HEAD_LEN, METHOD_LEN
from probewire.l7.records import DURATION_BUCKETS, HTTP_EXCHANGE, SIZE_BUCKETS
from probewire.probes.base import ProbeContext
from probewire.probes.l7 import L7Probe

CLIENT_LABELS = HTTP_CLIENT_LABELS

ROUTES = ("/users/{id}", "/static/{*path}")
NAMES = {101: "api", 102: "web", 103: "api", 105: "cron"}  # 103 shares 101's name; 104: none


class Names(ServiceResolver):
    """Names from a table. A rename moves the generation, as the real resolver's do."""

    def __init__(self) -> None:
        super().__init__(())
        self.names = dict(NAMES)

    def name_for(self, pid: int) -> str:
        return self.names.get(pid, "unknown")

    def name_for_port(self, pid: int, port: int) -> str:
        return "edge-proxy" if port == 9999 else self.name_for(pid)

    def name_until(self, pid: int, port: int = 0) -> tuple[str, float]:
        return (self.name_for_port(pid, port) if port else self.name_for(pid)), math.inf

    def rename(self, pid: int, name: str) -> None:
        self.names[pid] = name
        self._generation += 1


# --- records -------------------------------------------------------------------------------
V4 = socket.AF_INET
V6 = socket.AF_INET6
ADDRESSES = (
    (V4, bytes([127, 0, 0, 1]) + bytes(12)),
    (V4, bytes([10, 0, 0, 1]) + bytes(12)),
    (V4, bytes([10, 0, 0, 2]) + bytes(12)),
    (V4, bytes([127, 0, 0, 1]) + bytes([9] * 12)),  # same string as 127.0.0.1, other bytes
    (V6, bytes(15) + b"\x01"),  # ::1
    (V6, bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])),  # v4-mapped 127.0.0.1
    (V6, bytes([0x20, 0x01, 0x0D, 0xB8]) + bytes(11) + b"\x07"),
)
PATHS = (
    b"/", b"/users/1", b"/users/22", b"/users/22?x=1", b"/static/a/b.css", b"/a/b/c",
    b"/a//b/", b"/x\x00", b"/x\x00y", b"/tab\there", b"*", b"http://h/p?q", b"",
    b"/orders/" + b"0123456789abcdef" * 3 + b"/items/7",  # past the first window
    b"/long/" + b"seg/" * 40,  # past the longer window and request_paths' 128-byte cut
    b"/" + b"%" * 60 + b"?after",  # ends just past the first window
)
# The kernel reads a status line's three digits: 100..999 (0: aborted).
STATUSES = (0, 200, 201, 304, 404, 500, 503, 999)
# Test flags: aborted 1, pipelined 2, TLS 4 (the kernel sets no others on HTTP/1.x records).
FLAGS = (0, 1, 2, 4, 5, 6, 7, 3)
PORTS = (80, 8080, 9999, 40000, 40001, 0)


@st.composite
def exchange(draw: st.DrawFn) -> dict[str, Any]:
    method = draw(st.integers(0, 9))
    verb = METHODS[method] if method else draw(st.sampled_from(["GET", "POST", "FOO", ""]))
    path = draw(st.sampled_from(PATHS))
    body = draw(st.sampled_from([b"", b"abc"]))
    one = (verb.encode() + b" " + path + b" HTTP/1.1\r\nHost: h\r\n"
           + (b"Content-Length: %d\r\n" % len(body) if body else b"") + b"\r\n" + body)
    pipe_idx = draw(st.sampled_from([0, 0, 0, 1, 2]))
    head = one * (pipe_idx + 1) if pipe_idx else one
    head_len = draw(st.one_of(st.just(min(len(head), HEAD_LEN)), st.integers(0, HEAD_LEN)))
    status = draw(st.sampled_from(STATUSES))
    resp = b"HTTP/1.1 %d OK\r\nContent-Length: 5\r\n\r\nhello" % (status or 200)
    family, laddr = draw(st.sampled_from(ADDRESSES))
    raddr = draw(st.sampled_from([a for f, a in ADDRESSES if f == family]))
    start = draw(st.integers(0, 1 << 40))
    return {
        "kind": 1,
        "tgid": draw(st.sampled_from([101, 102, 103, 104])),
        "role": draw(st.sampled_from([1, 1, 2, 2, 0])),
        "method": method, "status": status, "family": family,
        "flags": draw(st.sampled_from(FLAGS)), "pipe_idx": pipe_idx,
        "start_ns": start, "end_ns": max(0, start + draw(st.integers(-1000, 3 * 10**9))),
        "req_bytes": draw(st.integers(0, 300)), "resp_bytes": draw(st.integers(0, 10**6)),
        "conn_id": draw(st.integers(0, 3)),
        "lport": draw(st.sampled_from(PORTS)), "rport": draw(st.sampled_from(PORTS)),
        "req_head_len": head_len, "req_head": head,
        "resp_head_len": draw(st.integers(0, len(resp))), "resp_head": resp,
        "resp_first_write": draw(st.integers(0, 100)),
        "peer_tgid": draw(st.sampled_from([0, 0, 101, 102, 105])),
        "laddr": laddr, "raddr": raddr,
        # Bytes past a head's length are whatever the kernel's buffer held before.
        "stale": draw(st.binary(min_size=8, max_size=8)),
    }


def records(rows: list[dict[str, Any]]) -> np.ndarray:
    rec = np.zeros(len(rows), HTTP_EXCHANGE)
    rec["proto"] = Proto.HTTP
    for i, row in enumerate(rows):
        for name in HTTP_EXCHANGE.names:
            if name in row and name not in ("req_head", "resp_head", "laddr", "raddr", "flags"):
                rec[name][i] = row[name]
        rec["hflags"][i] = row["flags"] & (HttpFlag.ABORTED | HttpFlag.PIPELINED)
        rec["flags"][i] = L7Flag.TLS if row["flags"] & 4 else 0
        for name in ("req_head", "resp_head"):
            raw = (row[name][: row[f"{name}_len"]] + row["stale"] * 64)[:HEAD_LEN]
            rec[name][i, : len(raw)] = np.frombuffer(raw, np.uint8)
        rec["laddr"][i] = np.frombuffer(row["laddr"], np.uint8)
        rec["raddr"][i] = np.frombuffer(row["raddr"], np.uint8)
    return rec


# --- the reference -------------------------------------------------------------------------
def first_appearance(keys: list[Any]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


class Histograms:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[tuple[str, ...], tuple[list[int], float]] = {}

    def observe(self, labels: tuple[str, ...], values: list[float]) -> None:
        if not values:
            return
        counts, total = self.series.get(labels, ([0] * (len(self.bounds) + 1), 0.0))
        for v in values:
            counts[bisect.bisect_left(self.bounds, v)] += 1
        self.series[labels] = (counts, total + math.fsum(values))


class Reference:
    """The rules of on_batch, one row and one group at a time."""

    def __init__(self, budget: int, names: Names, per_service: int = 500,
                 learner: RouteLearner | None = None) -> None:
        self.names = names
        self.templater = RouteTemplater(ROUTES)
        self.learner = learner
        if learner is not None:
            learner.protected = learner.protected | frozenset(ROUTES)
        self.server_budget = LabelBudget(budget, {"http_route": "other"}, per_service)
        self.client_budget = LabelBudget(budget, {"http_route": "other",
                                                  "server_address": "other"}, per_service)
        self.edge_budget = LabelBudget(budget, {"client": "other"}, per_service,
                                       service_label="server")
        self.hist = {name: Histograms(DURATION_BUCKETS) for name in
                     ("server_duration", "client_duration", "edge_client_seconds",
                      "edge_server_seconds")}
        self.hist |= {name: Histograms(SIZE_BUCKETS) for name in
                      ("server_req_size", "server_resp_size", "client_req_size")}
        self.counters: dict[str, dict[tuple[str, ...], float]] = {
            "aborted": {}, "edge_server_total": {}, "edge_server_failed": {}}
        self.edge_client_total: dict[tuple[str, tuple[str, int], str], list[float]] = {}
        self.server_endpoints: OrderedDict[tuple[str, int], str] = OrderedDict()
        self.client_endpoints: OrderedDict[tuple[str, int], str] = OrderedDict()
        self.local_addresses = {"127.0.0.1", "::1"}

    def count(self, counter: str, labels: tuple[str, ...], n: float) -> None:
        self.counters[counter][labels] = self.counters[counter].get(labels, 0.0) + n

    @staticmethod
    def put(table: OrderedDict[tuple[str, int], str], key: tuple[str, int], value: str) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > ENDPOINTS_MAX:
            table.popitem(last=False)

    def row(self, r: np.void) -> dict[str, Any]:
        role, method, pipe_idx = int(r["role"]), int(r["method"]), int(r["pipe_idx"])
        head_len = int(r["req_head_len"])
        if method == 0 or pipe_idx > 0:
            parsed = nth_request(r["req_head"][:head_len].tobytes(), pipe_idx)
            verb, route = ("_OTHER", "unknown") if parsed is None else (
                parsed[0], self.templater.template(parsed[1]))
        else:
            verb = METHODS[method]
            path = request_paths(r["req_head"][None, :], np.array([head_len]),
                                 METHOD_LEN[[method]])[0].tobytes().rstrip(b"\0")
            route = self.templater.template(path)
        tgid, lport, rport = int(r["tgid"]), int(r["lport"]), int(r["rport"])
        port = lport if role == 1 else 0
        service = self.names.name_for_port(tgid, port) if port else self.names.name_for(tgid)
        family = int(r["family"])
        req_end = header_length(r["req_head"][: min(head_len, HEAD_LEN)].tobytes())
        resp_end = header_length(r["resp_head"][: int(r["resp_head_len"])].tobytes())
        resp_end = int(r["resp_first_write"]) if resp_end is None else resp_end
        aborted = bool(int(r["hflags"]) & HttpFlag.ABORTED)
        tls, status = bool(int(r["flags"]) & L7Flag.TLS), int(r["status"])
        return {
            "role": role, "verb": verb, "route": route, "service": service,
            "service_key": (tgid, port), "status": status,
            "peer": format_address(family, r["raddr"]), "peer_key": (family, bytes(r["raddr"])),
            "local": format_address(family, r["laddr"]), "local_key": (family, bytes(r["laddr"])),
            "lport": lport, "rport": rport, "peer_tgid": int(r["peer_tgid"]),
            "aborted": aborted, "tls": tls, "grpc": False,
            "failed": aborted or status >= 500,
            "duration": max(int(r["end_ns"]) - int(r["start_ns"]), 0) / 1e9,
            "req_size": (int(r["req_bytes"]) - req_end
                         if req_end is not None and pipe_idx == 0 else -1),
            "resp_size": int(r["resp_bytes"]) - resp_end,
        }

    def batch(self, rec: np.ndarray) -> list[dict[str, Any]]:
        rows = [self.row(r) for r in rec]
        if self.learner is not None:
            self.learn(rows)
        self.local_addresses.update(x["local"] for x in rows)
        for members in first_appearance([(x["role"], x["local_key"], x["lport"],
                                          x["service_key"]) for x in rows]).values():
            x = rows[members[0]]
            table = self.server_endpoints if x["role"] == 1 else self.client_endpoints
            self.put(table, (x["local"], x["lport"]), x["service"])
        self.series(rows)
        self.edges(rows)
        return rows

    def learn(self, rows: list[dict[str, Any]]) -> None:
        """Each row's route as its service learned it by the end of the batch: learn every
        row's in order, then ask again until no answer can change (no collapse)."""
        learner = self.learner
        assert learner is not None
        for x in rows:
            learner.learn(x["service"], x["route"])
        while True:
            generation = learner.generation
            answers = [learner.learn(x["service"], x["route"]) for x in rows]
            if learner.generation == generation:
                break
        for x, route in zip(rows, answers, strict=True):
            x["route"] = route

    def series(self, rows: list[dict[str, Any]]) -> None:
        keys = [(x["role"], x["service_key"], x["verb"], x["status"], x["route"],
                 None if x["role"] == 1 else x["peer_key"], 0 if x["role"] == 1 else x["rport"],
                 x["aborted"], x["tls"], x["grpc"]) for x in rows]
        for members in first_appearance(keys).values():
            x = rows[members[0]]
            group = [rows[i] for i in members]
            if x["aborted"]:
                side = "server" if x["role"] == 1 else "client"
                self.count("aborted", (x["service"], side), float(len(group)))
                continue
            if x["grpc"]:
                continue
            base = (x["service"], x["verb"], str(x["status"]), x["route"],
                    "https" if x["tls"] else "http")
            durations = [y["duration"] for y in group]
            req = [float(y["req_size"]) for y in group if y["req_size"] >= 0]
            if x["role"] == 1:
                labels = self.server_budget.admit(base, SERVER_LABELS)
                self.hist["server_duration"].observe(labels, durations)
                self.hist["server_req_size"].observe(labels, req)
                self.hist["server_resp_size"].observe(
                    labels, [float(max(y["resp_size"], 0)) for y in group])
            else:
                labels = self.client_budget.admit((*base, x["peer"], str(x["rport"])),
                                                  CLIENT_LABELS)
                self.hist["client_duration"].observe(labels, durations)
                self.hist["client_req_size"].observe(labels, req)

    def edges(self, rows: list[dict[str, Any]]) -> None:
        client = [x for x in rows if x["role"] == 2]
        for members in first_appearance([(x["service_key"], x["peer_key"], x["rport"])
                                         for x in client]).values():
            x = client[members[0]]
            totals = self.edge_client_total.setdefault(
                (x["service"], (x["peer"], x["rport"]), ""), [0.0, 0.0])
            totals[0] += len(members)
            totals[1] += sum(client[i]["failed"] for i in members)
            self.hist["edge_client_seconds"].observe(
                (x["service"], f"{x['peer']}:{x['rport']}", ""),
                [client[i]["duration"] for i in members])
        server = [x for x in rows if x["role"] == 1]
        for x in server:
            if x["peer_tgid"]:
                x["client"], x["remote"] = self.names.name_for(x["peer_tgid"]), False
            elif x["peer"] in self.local_addresses:
                found = self.client_endpoints.get((x["peer"], x["rport"]))
                x["client"], x["remote"] = found or "unknown", False
            else:
                x["client"], x["remote"] = x["peer"], True
        for members in first_appearance([(x["client"], x["service_key"], x["remote"])
                                         for x in server]).values():
            x = server[members[0]]
            labels = self.edge_budget.admit((x["client"], x["service"], ""), EDGE_LABELS)
            if x["remote"]:
                self.count("edge_server_total", labels, float(len(members)))
                bad = sum(server[i]["failed"] for i in members)
                if bad:
                    self.count("edge_server_failed", labels, float(bad))
            self.hist["edge_server_seconds"].observe(labels,
                                                     [server[i]["duration"] for i in members])


# --- comparing -----------------------------------------------------------------------------
def series_of(probe: L7Probe) -> dict[str, Any]:
    """The probe's series under the reference's names."""
    red, graph = probe.pipeline.red, probe.pipeline.graph
    server, client = red.sinks[HTTP_SERVER], red.sinks[HTTP_CLIENT]
    return {
        "server_duration": server.duration, "client_duration": client.duration,
        "server_req_size": server.req, "server_resp_size": server.resp,
        "client_req_size": client.req, "edge_client_seconds": graph.client_seconds,
        "edge_server_seconds": graph.server_seconds, "aborted": red.aborted,
        "edge_server_total": graph.server_total, "edge_server_failed": graph.server_failed,
        "server_budget": server.budget, "client_budget": client.budget,
        "edge_budget": graph.budget,
    }


def assert_same(probe: L7Probe, ref: Reference) -> None:
    got_series = series_of(probe)
    for name, hist in ref.hist.items():
        series = got_series[name]
        counts, sums = series.counts, series.sums
        assert set(counts) == set(hist.series), name
        for labels, (expected, total) in hist.series.items():
            assert counts[labels].tolist() == expected, (name, labels)
            assert math.isclose(sums[labels], total, rel_tol=1e-9, abs_tol=1e-12), (name, labels)
    for name, values in ref.counters.items():
        assert got_series[name].values == values, name
    assert probe.pipeline.graph.client_total == ref.edge_client_total
    for which in ("server_budget", "client_budget", "edge_budget"):
        got, want = got_series[which], getattr(ref, which)
        assert (got.overflows, got.active_series) == (want.overflows, want.active_series), which
    endpoints = probe.pipeline.endpoints
    assert list(endpoints.servers.items()) == list(ref.server_endpoints.items())
    assert list(endpoints.clients.items()) == list(ref.client_endpoints.items())
    assert endpoints.local_addresses == ref.local_addresses


# Route learning that collapses early and keeps no literal (which literals are kept depends
# on how often the learner is asked, which the memo changes on purpose).
LEARNING = {"max_distinct": 3, "keep_max": 0}


def run(batches: list[list[dict[str, Any]]], budget: int, renames: list[bool],
        per_service: int = 500) -> None:
    names = Names()
    cfg = config_from_mapping({"probes": {
        "l7": {"kernel_aggregation": False, "max_series_per_metric": budget,
               "max_series_per_service": per_service},
        "http": {"routes": list(ROUTES), "route_learning": LEARNING}}})
    probe = L7Probe(ProbeContext(cfg, names))
    sunk: list[ExchangeBatch] = []
    probe.sinks.append(sunk.append)
    ref = Reference(budget, names, per_service, RouteLearner(**LEARNING))
    for rows, rename in zip(batches, renames, strict=True):
        if rename:
            names.rename(102, "web-" + str(names.generation))
        rec = records(rows)
        probe.on_batch(rec)
        want = ref.batch(rec)
        got = sunk.pop()
        assert got.service == [x["service"] for x in want]
        assert got.operation == [x["verb"] for x in want]
        assert got.target == [x["route"] for x in want]
        assert got.peer_address == [x["peer"] for x in want]
        assert got.local_address == [x["local"] for x in want]
        assert_same(probe, ref)


BATCHES = st.lists(st.lists(exchange(), min_size=1, max_size=30), min_size=1, max_size=4)
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(BATCHES, st.sampled_from([10, 100_000]), st.sampled_from([3, 500]), st.data())
def test_batches_give_the_series_a_row_by_row_reference_gives(
        batches: list[list[dict[str, Any]]], budget: int, per_service: int,
        data: st.DataObject) -> None:
    renames = data.draw(st.lists(st.booleans(), min_size=len(batches), max_size=len(batches)))
    run(batches, budget, renames, per_service)


@SETTINGS
@given(st.lists(exchange(), min_size=1, max_size=30), st.sampled_from([10, 100_000]))
def test_a_rename_between_batches_of_the_same_connections_renames_everything(
        rows: list[dict[str, Any]], budget: int) -> None:
    """The memo keeps per connection what it worked out; a service renamed between batches
    of the very same connections must be seen in every series and edge."""
    run([rows, rows, rows, rows], budget, [False, True, False, True])


def test_a_client_address_that_turns_out_to_be_local_is_named_as_local_from_then_on() -> None:
    server = {"kind": 1, "tgid": 101, "role": 1, "method": 1, "status": 200, "family": V4,
              "flags": 0, "pipe_idx": 0, "start_ns": 0, "end_ns": 10**6, "req_bytes": 20,
              "resp_bytes": 40, "conn_id": 1, "lport": 80, "rport": 40000,
              "req_head_len": 16, "req_head": b"GET / HTTP/1.1\r\n", "resp_head_len": 0,
              "resp_head": b"", "resp_first_write": 0, "peer_tgid": 0,
              "laddr": ADDRESSES[0][1], "raddr": ADDRESSES[2][1], "stale": bytes(8)}
    # A process of this host, on 10.0.0.2 (the server's client address so far).
    client = server | {"tgid": 105, "role": 2, "lport": 40000, "rport": 80,
                       "laddr": ADDRESSES[2][1], "raddr": ADDRESSES[0][1]}
    run([[server], [client], [server]], 100_000, [False] * 3)


@pytest.fixture
def tiny_memo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Caches of one slot (every lookup collides), victims forgotten at once, and memo tables
    that start afresh all the time: the slow paths must give the same answers."""
    init = ids.IdCache.__init__

    def one_slot(self: ids.IdCache, bits: int, **options: Any) -> None:
        init(self, 1, **options)

    monkeypatch.setattr(ids.IdCache, "__init__", one_slot)
    monkeypatch.setattr(memo_module, "MEMO_MAX", 6)
    monkeypatch.setattr(pipeline_module, "MEMO_MAX", 6)
    monkeypatch.setattr(ids, "VICTIMS_MAX", 0)
    monkeypatch.setattr(memo_module, "CONNS_MAX", 3)
    yield


@settings(SETTINGS, suppress_health_check=[*SETTINGS.suppress_health_check,
                                            HealthCheck.function_scoped_fixture])
@given(BATCHES, st.sampled_from([10, 100_000]))
def test_cache_collisions_and_memo_resets_change_nothing(
        tiny_memo: None, batches: list[list[dict[str, Any]]], budget: int) -> None:
    run(batches, budget, [False] * len(batches))


def test_synthetic_mesh_across_batch_sizes() -> None:
    """The benchmark's records (keep-alive and churning connections), batches of several
    sizes, twice over, against the reference."""
    from bench.userspace import fake_proc, new_probe, synthetic_records

    for pool in (8, 0):
        rec = synthetic_records(1500, seed=pool, pool=pool)
        with fake_proc() as proc:
            probe = new_probe(proc, {"probes": {"l7": {"kernel_aggregation": False,
                                                        "max_series_per_metric": 300}}})
            ref = Reference(300, Names())
            ref.names = probe.ctx.services  # type: ignore[assignment]
            ref.templater = RouteTemplater(())
            start = 0
            for size in [1, 7, 128, 300, 64] * 6:
                part = rec[start % len(rec): start % len(rec) + size]
                start += size
                probe.on_batch(part)
                ref.batch(part)
            assert_same(probe, ref)


# --- the pieces ----------------------------------------------------------------------------
HEAD_BYTES = st.binary(max_size=HEAD_LEN) | st.lists(
    st.sampled_from([b"/", b"a", b"1", b" ", b"?", b"\r", b"\n", b"\0", b"\t", b"GET ",
                     b"\xff", b"x" * 40, b"\r\n\r\n"]), max_size=40).map(
    lambda parts: b"".join(parts)[:HEAD_LEN])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(HEAD_BYTES, st.integers(0, 9), st.integers(0, 300)), min_size=1,
                max_size=20), st.integers(0, 3))
def test_paths_are_cut_as_request_paths_cuts_them(
        rows: list[tuple[bytes, int, int]], again: int) -> None:
    """Arbitrary head bytes and lengths: each row's route is that of request_paths' path."""
    probe = L7Probe(ProbeContext(config_from_mapping({}), Names()))
    rec = np.zeros(len(rows), HTTP_EXCHANGE)
    for i, (head, method, head_len) in enumerate(rows):
        rec["req_head"][i, : len(head)] = np.frombuffer(head, np.uint8)
        rec["method"][i] = method or 1
        rec["req_head_len"][i] = head_len
    lens = rec["req_head_len"].astype(np.int64)
    paths = request_paths(rec["req_head"], lens, METHOD_LEN[rec["method"].astype(np.int64)])
    want = [probe.templater.template(p.tobytes().rstrip(b"\0")) for p in paths]
    for _ in range(again + 1):  # again: from the memo
        _, route_idx = probe.http1.routes_and_methods(rec)
        routes = probe.pipeline.labels.targets
        assert [routes[i] for i in route_idx.tolist()] == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(HEAD_BYTES, st.integers(0, 400), HEAD_BYTES, st.integers(0, 400)),
                min_size=1, max_size=12))
def test_header_ends_read_past_heads_but_not_beyond_their_length(
        rows: list[tuple[bytes, int, bytes, int]]) -> None:
    rec = np.zeros(len(rows), HTTP_EXCHANGE)
    for i, (req, req_len, resp, resp_len) in enumerate(rows):
        rec["req_head"][i, : len(req)] = np.frombuffer(req, np.uint8)
        rec["resp_head"][i, : len(resp)] = np.frombuffer(resp, np.uint8)
        rec["req_head_len"][i], rec["resp_head_len"][i] = req_len, resp_len
        rec["kind"][i] = 1
    want = [http1.header_lengths(rec[field], rec[f"{field}_len"].astype(np.int64)).tolist()
            for field in ("req_head", "resp_head")]
    # Contiguous records, a single one, and records in a strided view.
    for rows in (slice(None), slice(0, 1), slice(None, None, -1)):
        got = http1._record_header_ends(rec[rows])
        assert [g.tolist() for g in got] == [w[rows] for w in want]


def test_the_same_head_under_another_method_is_another_path() -> None:
    """The path starts after the kernel's method (and its space), whatever the head says."""
    probe = L7Probe(ProbeContext(config_from_mapping({}), Names()))
    head = b"GET /a/b HTTP/1.1\r\n"
    rec = np.zeros(4, HTTP_EXCHANGE)
    rec["req_head"][:, : len(head)] = np.frombuffer(head, np.uint8)
    rec["req_head_len"] = len(head)
    rec["method"] = [1, 4, 1, 4]  # GET, then DELETE: its path starts 7 bytes in, at "b"
    for _ in range(2):
        _, route_idx = probe.http1.routes_and_methods(rec)
        routes = probe.pipeline.labels.targets
        assert [routes[i] for i in route_idx.tolist()] == ["/a/b", "/b", "/a/b", "/b"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1 << 62), max_size=700), max_size=12),
       st.lists(st.integers(0, 1 << 62), max_size=50))
def test_sorted_ids_find_what_was_added(adds: list[list[int]], others: list[int]) -> None:
    sorted_ids, known = ids.SortedIds(), {}
    for keys in adds:
        new = [k for k in dict.fromkeys(keys) if k not in known]
        base = len(known)
        sorted_ids.add(np.array(new, dtype=np.int64), np.arange(base, base + len(new)))
        known.update((k, base + i) for i, k in enumerate(new))
        probe = np.array([*known, *others], dtype=np.int64)
        assert sorted_ids.find(probe).tolist() == [known.get(k, -1) for k in probe.tolist()]
    assert len(sorted_ids) == len(known)
