"""The protocol registry, on both sides of the capture layer.

A protocol is one kernel header (bpf/l7/proto_<name>.h: its classifier, and its parser unless
user space parses it) with its slot (its id in enum l7_proto, its line in L7_PROTOCOLS and its
#include in bpf/l7.bpf.c), and one Python module (src/probewire/l7/protocols/<name>.py) with
its line in l7/registry.py. These tests hold the two lists together, and show that a protocol
added on the Python side alone reaches metrics, the service graph and spans with no change to
any stage after decoding.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from probewire.aggregate.pipeline import ExchangePipeline
from probewire.enrich.service import ServiceResolver
from probewire.l7 import registry
from probewire.l7.constants import Direction, L7Flag, Proto, RecordKind, Role
from probewire.l7.exchanges import rows_from_exchanges
from probewire.l7.protocol import (
    ConnInfo,
    Exchange,
    Protocol,
    Segment,
    StreamParser,
    Transport,
)
from probewire.l7.records import L7_DATA
from probewire.l7.streams import StreamDemux
from probewire.runtime.ring import VarBatch

REPO = Path(__file__).resolve().parents[2]
SLOT = re.compile(r"^\s*X\((\w+),\s*(\w+),\s*(\w+),\s*(\w+)\)", re.M)


def kernel_slots() -> list[tuple[str, str, str, str]]:
    source = (REPO / "bpf" / "l7.bpf.c").read_text()
    return SLOT.findall(source[source.index("#define L7_PROTOCOLS"):])


def test_every_kernel_slot_is_a_registered_protocol_and_the_other_way_round() -> None:
    slots = kernel_slots()
    assert slots, "no L7_PROTOCOLS lines found in bpf/l7.bpf.c"
    kernel = {Proto[proto_id].value: name for proto_id, name, _, _ in slots}
    python = {int(p.proto_id): p.name for p in registry.PROTOCOLS}
    assert set(kernel) == set(python)
    for proto_id, name in python.items():
        # Kernel program names are l7_<name>_{tp,uprobe}: the same name on both sides.
        assert kernel[proto_id] == name, (proto_id, name)


def test_each_slot_has_its_header_and_a_parser_matching_where_it_is_parsed() -> None:
    source = (REPO / "bpf" / "l7.bpf.c").read_text()
    by_name = {p.name: p for p in registry.PROTOCOLS}
    for _, name, parse, close in kernel_slots():
        header = REPO / "bpf" / "l7" / f"proto_{name}.h"
        assert header.is_file(), header
        assert f'#include "l7/proto_{name}.h"' in source
        assert f"{name}_classify" in header.read_text()
        # Bytes shipped as they are (l7_ship_data), or walked by the protocol's own kernel
        # parser (HTTP/2 ships frames without DATA payloads): either way user space parses.
        if parse == "l7_ship_data":
            assert not by_name[name].parsed_in_kernel, name
            assert close == "l7_close_shipped", name
        if by_name[name].parsed_in_kernel:
            assert parse != "l7_ship_data", name


def test_protocol_names_and_ids_are_unique() -> None:
    names = [p.name for p in registry.PROTOCOLS]
    ids = [int(p.proto_id) for p in registry.PROTOCOLS]
    assert len(set(names)) == len(names) and len(set(ids)) == len(ids)
    assert all(0 < i < Proto.COUNT for i in ids)
    for p in registry.PROTOCOLS:
        assert registry.protocol_by_id(p.proto_id) is p
        assert registry.protocol_by_name(p.name) is p
        assert p.kind in ("http", "db", "dns")
    assert registry.protocol_by_id(Proto.UNKNOWN).kind == "unknown"


class _Echo(Protocol):
    """A made-up line protocol ("GET key" -> "VALUE ..." or "ERR code"): a plug-in as a new
    database protocol would be, known to no stage after decoding."""

    name = "echodb"
    proto_id = 6  # borrows a free id for the test
    kind = "db"

    def classify(self, peek: bytes, direction: Direction, transport: Transport, *,
                 lport: int = 0, rport: int = 0, call_len: int = 0) -> Role:
        return Role.UNKNOWN

    def parser(self, conn: ConnInfo) -> StreamParser:
        return _EchoParser(conn)


class _EchoParser(StreamParser):
    pending: list[tuple[int, str]]

    def feed(self, segment: Segment) -> list[Exchange]:
        if not hasattr(self, "pending"):
            self.pending = []
        out = []
        for line in segment.data.decode().splitlines():
            if segment.direction == Direction.OUT:
                self.pending.append((segment.ts_ns, line.split()[0]))
            elif self.pending:
                start, op = self.pending.pop(0)
                code = line.split()[1] if line.startswith("ERR") else ""
                out.append(Exchange(start, segment.ts_ns, op, target="keys", status=code,
                                    error_type=code))
        return out


def test_a_protocol_added_as_a_plug_in_reaches_metrics_graph_and_sinks() -> None:
    echo = _Echo()
    demux = StreamDemux({echo.proto_id: echo})
    rec = np.zeros(4, dtype=L7_DATA)
    rec["kind"] = RecordKind.DATA
    rec["proto"] = echo.proto_id
    rec["role"] = Role.CLIENT
    rec["tgid"] = 4242
    rec["conn_id"] = 0x77
    rec["seq"] = [1, 2, 3, 4]
    rec["dir"] = [Direction.OUT, Direction.IN, Direction.OUT, Direction.IN]
    rec["ts_ns"] = [10, 20, 30, 45]
    rec["family"] = 2
    rec["flags"] = L7Flag(0)
    rec["lport"], rec["rport"] = 40000, 7777
    rec["laddr"][:, :4] = [127, 0, 0, 1]
    rec["raddr"][:, :4] = [10, 1, 2, 3]
    finished = demux.feed(VarBatch(rec, [b"GET a\n", b"VALUE 1\n", b"SET b\n", b"ERR E42\n"]))
    assert [f.exchange.operation for f in finished] == ["GET", "SET"]

    class Names(ServiceResolver):
        def name_until(self, pid: int, port: int = 0) -> tuple[str, float]:
            return f"svc-{pid}", float("inf")

    pipeline = ExchangePipeline(Names(()), 100)
    sunk = []
    pipeline.sinks.append(sunk.append)
    labels = pipeline.start_batch()
    rows = rows_from_exchanges([(f.header, f.exchange) for f in finished], echo.proto_id,
                               labels)
    original = registry._BY_ID.get(echo.proto_id)
    registry._BY_ID[echo.proto_id] = echo
    try:
        pipeline.add(rows)
        families = {f.name: f for f in pipeline.families()}
    finally:
        if original is None:
            del registry._BY_ID[echo.proto_id]
        else:
            registry._BY_ID[echo.proto_id] = original
    db = families["db_client_operation_duration_seconds"]
    counts = {(s.labels["db_system_name"], s.labels["db_operation_name"],
               s.labels["db_response_status_code"], s.labels["server_address"]): s.value
              for s in db.samples if s.name.endswith("_count")}
    assert counts == {("echodb", "GET", "", "10.1.2.3"): 1.0,
                      ("echodb", "SET", "E42", "10.1.2.3"): 1.0}
    edges = {(s.labels["client"], s.labels["server"], s.labels["connection_type"]): s.value
             for s in families["traces_service_graph_request"].samples
             if s.name.endswith("_total")}
    assert edges == {("svc-4242", "10.1.2.3:7777", "database"): 2.0}
    (batch,) = sunk
    assert batch.operation == ["GET", "SET"] and batch.service == ["svc-4242"] * 2
