"""HTTP/2 and gRPC from raw connection bytes: frames, HPACK (the `hpack` library), streams.

The kernel ships every chunk of an HTTP/2 connection in order, with a per-connection sequence
number; this module reassembles each direction, walks frames, decodes header blocks with one
HPACK decoder per direction, and turns each finished stream into an exchange. A connection
with a gap (a dropped or truncated chunk) or a broken frame is given up and counted: HPACK
state cannot be recovered, and a guess would put wrong labels on real traffic.
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import hpack
import numpy as np

log = logging.getLogger(__name__)

H2_CHUNK = 4096
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FLAG_TLS, FLAG_TRUNCATED = 1, 2
DIR_IN, DIR_OUT = 1, 2
ROLE_SERVER, ROLE_CLIENT = 1, 2

DATA, HEADERS, RST_STREAM, GOAWAY, CONTINUATION = 0x0, 0x1, 0x3, 0x7, 0x9
END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20
MAX_FRAME = 1 << 24
MAX_BUFFER = 1 << 20  # a direction holding more unparsed bytes than this has lost its frames
MAX_CONNECTIONS = 4096
MAX_STREAMS = 1024

H2_CHUNK_DTYPE = np.dtype(
    [
        ("kind", np.uint32),
        ("tgid", np.uint32),
        ("tid", np.uint32),
        ("len", np.uint32),
        ("conn_id", np.uint64),
        ("ts_ns", np.uint64),
        ("seq", np.uint32),
        ("dir", np.uint8),
        ("role", np.uint8),
        ("flags", np.uint8),
        ("family", np.uint8),
        ("lport", np.uint16),
        ("rport", np.uint16),
        ("_pad", np.uint32),
        ("laddr", np.uint8, (16,)),
        ("raddr", np.uint8, (16,)),
        ("data", np.uint8, (H2_CHUNK,)),
    ]
)


@dataclass
class Stream:
    start_ns: int = 0
    end_ns: int = 0
    tid: int = 0
    method: str = ""
    path: str = ""
    authority: str = ""
    grpc: bool = False
    status: int = 0
    grpc_status: int | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    reset: bool = False


@dataclass(frozen=True)
class H2Connection:
    """Which connection, seen by which process: fixed from its first chunk."""

    conn_id: int
    tgid: int
    role: int
    tls: bool
    family: int
    laddr: bytes
    raddr: bytes
    lport: int
    rport: int


@dataclass(frozen=True)
class H2Exchange:
    """A finished stream, from the point of view of the process that saw it."""

    conn: H2Connection
    tid: int
    start_ns: int
    end_ns: int
    method: str
    path: str
    status: int
    grpc: bool
    grpc_status: int | None
    request_bytes: int
    response_bytes: int
    reset: bool


def _decoder() -> hpack.Decoder:
    decoder = hpack.Decoder()
    # Peers may raise the table size by SETTINGS we parse no further; accept what they use.
    decoder.max_allowed_table_size = 1 << 16
    return decoder


@dataclass
class _Direction:
    buffer: bytearray = field(default_factory=bytearray)
    decoder: hpack.Decoder = field(default_factory=_decoder)
    pending_block: bytearray | None = None
    pending_stream: int = 0
    pending_flags: int = 0
    preface_left: int = 0


@dataclass
class _Conn:
    info: H2Connection
    next_seq: int = 1
    lost: str = ""
    # Index 0: client -> server bytes; 1: server -> client.
    dirs: tuple[_Direction, _Direction] = field(
        default_factory=lambda: (_Direction(preface_left=len(PREFACE)), _Direction())
    )
    streams: dict[int, Stream] = field(default_factory=dict)


class H2Tracker:
    def __init__(self) -> None:
        self.conns: OrderedDict[int, _Conn] = OrderedDict()
        self.lost: dict[str, int] = {}

    def _give_up(self, conn_id: int, conn: _Conn, reason: str) -> None:
        conn.lost = reason
        conn.streams.clear()
        conn.dirs = (_Direction(), _Direction())
        self.lost[reason] = self.lost.get(reason, 0) + 1
        log.debug("http2 connection %x given up: %s", conn_id, reason)

    def feed(self, records: np.ndarray) -> list[H2Exchange]:
        out: list[H2Exchange] = []
        for rec in records:
            conn_id = int(rec["conn_id"])
            seq = int(rec["seq"])
            conn = self.conns.get(conn_id)
            if conn is None or (seq == 1 and conn.next_seq != 1):
                conn = _Conn(H2Connection(
                    conn_id=conn_id, tgid=int(rec["tgid"]), role=int(rec["role"]),
                    tls=bool(rec["flags"] & FLAG_TLS), family=int(rec["family"]),
                    laddr=rec["laddr"].tobytes(), raddr=rec["raddr"].tobytes(),
                    lport=int(rec["lport"]), rport=int(rec["rport"]),
                ))
                self.conns[conn_id] = conn
                if seq != 1:
                    self._give_up(conn_id, conn, "started before the agent or lost its start")
                if len(self.conns) > MAX_CONNECTIONS:
                    self.conns.popitem(last=False)
            self.conns.move_to_end(conn_id)
            if conn.lost:
                continue
            if seq != conn.next_seq:
                self._give_up(conn_id, conn, "chunk dropped")
                continue
            conn.next_seq = seq + 1
            if rec["flags"] & FLAG_TRUNCATED:
                self._give_up(conn_id, conn, "syscall larger than the capture")
                continue
            to_server = (int(rec["dir"]) == DIR_OUT) == (conn.info.role == ROLE_CLIENT)
            data = rec["data"][: int(rec["len"])].tobytes()
            try:
                self._consume(conn, 0 if to_server else 1, data, int(rec["ts_ns"]),
                              int(rec["tid"]), conn_id, out)
            except (hpack.HPACKError, ValueError, struct.error, UnicodeDecodeError) as exc:
                self._give_up(conn_id, conn, f"unparseable frames ({type(exc).__name__})")
        return out

    def _consume(self, conn: _Conn, side: int, data: bytes, ts: int, tid: int, conn_id: int,
                 out: list[H2Exchange]) -> None:
        d = conn.dirs[side]
        if d.preface_left:
            take = min(d.preface_left, len(data))
            if data[:take] != PREFACE[len(PREFACE) - d.preface_left:][:take]:
                raise ValueError("no HTTP/2 client preface")
            d.preface_left -= take
            data = data[take:]
        d.buffer += data
        if len(d.buffer) > MAX_BUFFER:
            raise ValueError("frame larger than the reassembly limit")
        buf = d.buffer
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            ftype, flags = buf[pos + 3], buf[pos + 4]
            stream_id = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            if length > MAX_FRAME:
                raise ValueError("frame length out of range")
            if len(buf) - pos < 9 + length:
                break
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            self._frame(conn, side, ftype, flags, stream_id, payload, ts, tid, conn_id, out)
        del buf[:pos]

    def _frame(self, conn: _Conn, side: int, ftype: int, flags: int, stream_id: int,
               payload: bytes, ts: int, tid: int, conn_id: int, out: list[H2Exchange]) -> None:
        d = conn.dirs[side]
        if ftype == HEADERS:
            if flags & PADDED:
                pad = payload[0]
                payload = payload[1:len(payload) - pad]
            if flags & PRIORITY:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._headers(conn, side, stream_id, flags, payload, ts, tid, conn_id, out)
            else:
                d.pending_block = bytearray(payload)
                d.pending_stream, d.pending_flags = stream_id, flags
        elif ftype == CONTINUATION:
            if d.pending_block is None or stream_id != d.pending_stream:
                raise ValueError("CONTINUATION without HEADERS")
            d.pending_block += payload
            if flags & END_HEADERS:
                block, d.pending_block = bytes(d.pending_block), None
                self._headers(conn, side, stream_id, d.pending_flags, block, ts, tid,
                              conn_id, out)
        elif ftype == DATA:
            s = conn.streams.get(stream_id)
            if s is not None:
                if side == 0:
                    s.request_bytes += len(payload)
                else:
                    s.response_bytes += len(payload)
                if flags & END_STREAM:
                    self._end(conn, side, stream_id, ts, conn_id, out)
        elif ftype == RST_STREAM:
            s = conn.streams.get(stream_id)
            if s is not None:
                s.reset = True
                s.end_ns = ts
                self._finish(conn, stream_id, conn_id, out)

    def _headers(self, conn: _Conn, side: int, stream_id: int, flags: int, block: bytes,
                 ts: int, tid: int, conn_id: int, out: list[H2Exchange]) -> None:
        headers = conn.dirs[side].decoder.decode(block, raw=True)
        fields = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        if side == 0:
            if stream_id not in conn.streams and len(conn.streams) < MAX_STREAMS:
                conn.streams[stream_id] = Stream(
                    start_ns=ts, tid=tid, method=fields.get(":method", ""),
                    path=fields.get(":path", ""), authority=fields.get(":authority", ""),
                    grpc=fields.get("content-type", "").startswith("application/grpc"),
                )
        else:
            s = conn.streams.get(stream_id)
            if s is None:
                return
            if ":status" in fields:
                s.status = int(fields[":status"])
            if "grpc-status" in fields:
                s.grpc_status = int(fields["grpc-status"])
        if flags & END_STREAM:
            self._end(conn, side, stream_id, ts, conn_id, out)

    def _end(self, conn: _Conn, side: int, stream_id: int, ts: int, conn_id: int,
             out: list[H2Exchange]) -> None:
        s = conn.streams.get(stream_id)
        if s is None or side == 0:
            return  # the request half closing does not end the exchange
        s.end_ns = ts
        self._finish(conn, stream_id, conn_id, out)

    def _finish(self, conn: _Conn, stream_id: int, conn_id: int, out: list[H2Exchange]) -> None:
        s = conn.streams.pop(stream_id)
        out.append(H2Exchange(
            conn=conn.info, tid=s.tid, start_ns=s.start_ns, end_ns=s.end_ns, method=s.method,
            path=s.path, status=s.status, grpc=s.grpc, grpc_status=s.grpc_status,
            request_bytes=s.request_bytes, response_bytes=s.response_bytes, reset=s.reset,
        ))
