"""HTTP/2 stream tracking from raw bytes (l7/protocols/http2.py through the capture layer's
stream demultiplexer): real conversations made by the `h2` library, split into records at
random, gaps, and garbage that must never raise."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from probewire.l7.constants import L7_CHUNK, Direction, Proto, RecordKind, Role
from probewire.l7.protocol import Exchange
from probewire.l7.protocols.http2 import PREFACE, PROTOCOL
from probewire.l7.records import L7_DATA
from probewire.l7.streams import StreamDemux
from probewire.runtime.ring import VarBatch

H2_CHUNK = L7_CHUNK


def tracker() -> StreamDemux:
    return StreamDemux({Proto.HTTP2: PROTOCOL})


def feed(demux: StreamDemux, batch: VarBatch) -> list[Exchange]:
    return [f.exchange for f in demux.feed(batch)]


def lost(demux: StreamDemux) -> dict[str, int]:
    return {reason: n for (_, reason), n in demux.lost.items()}


def conversation(requests: list[tuple[str, str, int, bool]]) -> list[tuple[int, bytes]]:
    """(side, bytes) in wire order; side 0 client->server. Each request: method, path,
    status, grpc (adds content-type and a grpc-status trailer)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    client.initiate_connection()
    server.initiate_connection()
    wire: list[tuple[int, bytes]] = []

    def pump() -> None:
        while True:
            c, s = client.data_to_send(), server.data_to_send()
            if not c and not s:
                return
            if c:
                wire.append((0, c))
                server.receive_data(c)
            if s:
                wire.append((1, s))
                client.receive_data(s)

    pump()
    for method, path, status, grpc in requests:
        sid = client.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":scheme", "https"),
                   (":authority", "example")]
        if grpc:
            headers.append(("content-type", "application/grpc"))
        client.send_headers(sid, headers, end_stream=not grpc)
        if grpc:
            client.send_data(sid, b"\0\0\0\0\x03abc", end_stream=True)
        pump()
        resp = [(":status", str(status))]
        if grpc:
            server.send_headers(sid, [*resp, ("content-type", "application/grpc")])
            server.send_data(sid, b"\0\0\0\0\x02ok")
            server.send_headers(sid, [("grpc-status", "0" if status == 200 else "13")],
                                end_stream=True)
        else:
            server.send_headers(sid, resp)
            server.send_data(sid, b"x" * 100, end_stream=True)
        pump()
    return wire


def kernel_view(wire: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """What the kernel's frame walk ships of each side's bytes (bpf/l7/proto_http2.h): the
    client preface, every frame header, every payload but DATA's. A model of it, per side."""
    buffers = {0: b"", 1: b""}
    out = []
    for side, data in wire:
        buf = buffers[side] + data
        kept, pos = b"", 0
        if side == 0 and not any(s == 0 for s, _ in out) and buf.startswith(PREFACE[:1]):
            kept, pos = buf[:len(PREFACE)], len(PREFACE)
        while len(buf) - pos >= 9:
            length, ftype = int.from_bytes(buf[pos:pos + 3], "big"), buf[pos + 3]
            if len(buf) - pos < 9 + length:
                break
            kept += buf[pos:pos + 9] if ftype == 0 else buf[pos:pos + 9 + length]
            pos += 9 + length
        buffers[side] = buf[pos:]
        out.append((side, kept))
    return [(side, data) for side, data in out if data]


def records_for(wire: list[tuple[int, bytes]], cuts: list[int] | None = None,
                conn_id: int = 0x1000, raw: bool = False) -> VarBatch:
    """The server's view: client->server bytes are reads (IN), the rest writes (OUT); DATA
    payloads elided as the kernel ships them (raw: the bytes as they are)."""
    if not raw:
        wire = kernel_view(wire)
    chunks: list[tuple[int, bytes]] = []
    for side, data in wire:
        step = max(1, (cuts or [H2_CHUNK])[len(chunks) % len(cuts or [1])])
        for i in range(0, len(data), min(step, H2_CHUNK)):
            chunks.append((side, data[i:i + min(step, H2_CHUNK)]))
    rec = np.zeros(len(chunks), dtype=L7_DATA)
    for i, (side, data) in enumerate(chunks):
        rec[i]["kind"] = RecordKind.DATA
        rec[i]["proto"] = Proto.HTTP2
        rec[i]["tgid"] = 42
        rec[i]["conn_id"] = conn_id
        rec[i]["seq"] = i + 1
        rec[i]["ts_ns"] = 1000 + i
        rec[i]["dir"] = Direction.IN if side == 0 else Direction.OUT
        rec[i]["role"] = Role.SERVER
        rec[i]["len"] = len(data)
    return VarBatch(rec, [data for _, data in chunks])


def part(batch: VarBatch, keep: np.ndarray | slice) -> VarBatch:
    index = np.arange(len(batch))[keep]
    return VarBatch(batch.records[index], [batch.data[i] for i in index.tolist()])


REQUESTS = [("GET", "/a", 200, False), ("POST", "/pkg.Svc/Do", 200, True),
            ("GET", "/missing", 404, False), ("POST", "/pkg.Svc/Fail", 500, True)]


def test_real_conversation_gives_one_exchange_per_stream() -> None:
    demux = tracker()
    out = feed(demux, records_for(conversation(REQUESTS)))
    got = [(e.operation, e.target, e.status, e.attributes["grpc"], e.attributes["grpc_status"])
           for e in out]
    assert got == [("GET", "/a", "200", False, None), ("POST", "/pkg.Svc/Do", "200", True, 0),
                   ("GET", "/missing", "404", False, None),
                   ("POST", "/pkg.Svc/Fail", "500", True, 13)]
    assert all(e.end_ns > e.start_ns for e in out)
    assert out[0].response_bytes == 100
    assert lost(demux) == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=6))
def test_any_chunking_gives_the_same_exchanges(cuts: list[int]) -> None:
    out = feed(tracker(), records_for(conversation(REQUESTS), cuts))
    assert [(e.target, e.status) for e in out] == [(p, str(s)) for _, p, s, _ in REQUESTS]


def test_a_gap_in_the_sequence_gives_the_connection_up() -> None:
    rec = records_for(conversation(REQUESTS), [50])
    demux = tracker()
    keep = np.ones(len(rec), dtype=bool)
    keep[len(rec) // 2] = False
    out = feed(demux, part(rec, keep))
    assert len(out) < len(REQUESTS)
    assert lost(demux) == {"record dropped (ring full)": 1}


def test_connection_seen_mid_stream_is_counted_not_guessed() -> None:
    rec = records_for(conversation(REQUESTS), [30])
    demux = tracker()
    assert feed(demux, part(rec, slice(5, None))) == []
    assert lost(demux) == {"started before the agent or lost its start": 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.binary(min_size=1, max_size=300)),
                min_size=1, max_size=12))
def test_garbage_never_raises(chunks: list[tuple[int, bytes]]) -> None:
    demux = tracker()
    # Both with and without a valid preface in front.
    for prefix in (b"", PREFACE):
        wire = [(0, prefix), *chunks] if prefix else chunks
        demux.feed(records_for(wire, conn_id=0x2000 + len(prefix), raw=True))


def test_a_call_larger_than_the_capture_gives_the_connection_up() -> None:
    rec = records_for(conversation(REQUESTS))
    rec.records["skipped"][1] = 5000
    demux = tracker()
    feed(demux, rec)
    assert lost(demux) == {"syscall larger than the capture": 1}


def grpc_conversation(calls: list[str]) -> list[tuple[int, bytes]]:
    """gRPC streams ended in the ways a real client and server end them: trailers, trailers
    only, a reset (cancel) with or without a grpc-timeout that ran out, and a GOAWAY."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    client.initiate_connection()
    server.initiate_connection()
    wire: list[tuple[int, bytes]] = []

    def take(receiver: h2.connection.H2Connection, data: bytes) -> None:
        for event in receiver.receive_data(data):
            if isinstance(event, h2.events.DataReceived):  # flow control: grant the window back
                receiver.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def pump() -> None:
        while True:
            c, s = client.data_to_send(), server.data_to_send()
            if not c and not s:
                return
            if c:
                wire.append((0, c))
                take(server, c)
            if s:
                wire.append((1, s))
                take(client, s)

    def send(conn: h2.connection.H2Connection, sid: int, data: bytes, end: bool) -> None:
        while data:  # frames of at most the peer's frame size, as the window allows
            size = min(len(data), conn.max_outbound_frame_size,
                       conn.local_flow_control_window(sid))
            conn.send_data(sid, data[:size], end_stream=end and size == len(data))
            data = data[size:]
            pump()

    pump()
    for how in calls:
        sid = client.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", "/pkg.Svc/Do"), (":scheme", "http"),
                   (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]
        if how == "deadline":
            headers.append(("grpc-timeout", "1n"))
        client.send_headers(sid, headers)
        send(client, sid, b"\0\0\0\0\x05hello" * 4000, True)
        if how == "ok":
            server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            send(server, sid, b"\0\0\0\0\x02ok" * 3000, False)
            server.send_headers(sid, [("grpc-status", "0"), ("grpc-message", "secret")],
                                end_stream=True)
        elif how == "trailers-only":
            server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                      ("grpc-status", "5"), ("grpc-message", "not found")],
                                end_stream=True)
        elif how in ("cancel", "deadline"):
            client.reset_stream(sid)
        elif how == "goaway":
            server.close_connection(last_stream_id=sid - 2)
        pump()
    return wire


def test_grpc_status_from_trailers_trailers_only_and_resets() -> None:
    demux = tracker()
    out = feed(demux, records_for(grpc_conversation(
        ["ok", "trailers-only", "cancel", "deadline", "ok"]), [700]))
    assert [e.attributes["grpc_status"] for e in out] == [0, 5, 1, 4, 0]
    # Large messages: bytes counted from the DATA headers, payloads never shipped.
    assert out[0].request_bytes == 10 * 4000 and out[0].response_bytes == 7 * 3000
    assert all("secret" not in repr(e) and "not found" not in repr(e) for e in out)
    assert lost(demux) == {}


def test_streams_a_goaway_says_were_never_processed_are_not_counted() -> None:
    out = feed(tracker(), records_for(grpc_conversation(["ok", "goaway"])))
    assert [e.attributes["grpc_status"] for e in out] == [0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=6))
def test_elided_data_and_any_split_give_the_same_grpc_exchanges(cuts: list[int]) -> None:
    wire = grpc_conversation(["ok", "trailers-only", "cancel", "ok"])
    out = feed(tracker(), records_for(wire, cuts))
    assert [e.attributes["grpc_status"] for e in out] == [0, 5, 1, 0]
