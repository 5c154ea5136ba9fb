"""HTTP/2 and gRPC from a connection's bytes: frames, HPACK (the `hpack` library), streams.

The capture layer ships every byte of an HTTP/2 connection in order (bpf/l7/proto_http2.h:
classified by the client preface); this parser reassembles each direction, walks frames,
decodes header blocks with one HPACK decoder per direction, and turns each finished stream
into an exchange. A connection with a gap (a dropped or truncated record) or a broken frame is
given up and counted: HPACK state cannot be recovered, and a guess would put wrong labels on
real traffic.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import hpack

from probewire.l7.constants import Proto
from probewire.l7.protocol import (
    ConnInfo,
    Direction,
    Exchange,
    Protocol,
    Role,
    Segment,
    StreamParser,
    Transport,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, GOAWAY, CONTINUATION = 0x0, 0x1, 0x3, 0x7, 0x9
END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20
MAX_FRAME = 1 << 24
MAX_BUFFER = 1 << 20  # a direction holding more unparsed bytes than this has lost its frames
MAX_STREAMS = 1024
TRUNCATED = "syscall larger than the capture"


@dataclass
class _Stream:
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
class Http2Parser(StreamParser):
    # Index 0: client -> server bytes; 1: server -> client.
    dirs: tuple[_Direction, _Direction] = field(
        default_factory=lambda: (_Direction(preface_left=len(PREFACE)), _Direction()))
    streams: dict[int, _Stream] = field(default_factory=dict)

    def _give_up(self, reason: str) -> None:
        self.lost = reason
        self.failures[reason] += 1
        self.streams.clear()
        self.dirs = (_Direction(), _Direction())

    def feed(self, segment: Segment) -> list[Exchange]:
        out: list[Exchange] = []
        if self.lost:
            return out
        to_server = (segment.direction == Direction.OUT) == (self.conn.role == Role.CLIENT)
        try:
            self._consume(0 if to_server else 1, segment.data, segment.ts_ns, segment.tid, out)
        except (hpack.HPACKError, ValueError, struct.error, UnicodeDecodeError) as exc:
            self._give_up(f"unparseable frames ({type(exc).__name__})")
            return out
        if segment.skipped:
            self._give_up(TRUNCATED)
        return out

    def _consume(self, side: int, data: bytes, ts: int, tid: int, out: list[Exchange]) -> None:
        d = self.dirs[side]
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
            self._frame(side, ftype, flags, stream_id, payload, ts, tid, out)
        del buf[:pos]

    def _frame(self, side: int, ftype: int, flags: int, stream_id: int, payload: bytes,
               ts: int, tid: int, out: list[Exchange]) -> None:
        d = self.dirs[side]
        if ftype == HEADERS:
            if flags & PADDED:
                pad = payload[0]
                payload = payload[1:len(payload) - pad]
            if flags & PRIORITY:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._headers(side, stream_id, flags, payload, ts, tid, out)
            else:
                d.pending_block = bytearray(payload)
                d.pending_stream, d.pending_flags = stream_id, flags
        elif ftype == CONTINUATION:
            if d.pending_block is None or stream_id != d.pending_stream:
                raise ValueError("CONTINUATION without HEADERS")
            d.pending_block += payload
            if flags & END_HEADERS:
                block, d.pending_block = bytes(d.pending_block), None
                self._headers(side, stream_id, d.pending_flags, block, ts, tid, out)
        elif ftype == DATA:
            s = self.streams.get(stream_id)
            if s is not None:
                if side == 0:
                    s.request_bytes += len(payload)
                else:
                    s.response_bytes += len(payload)
                if flags & END_STREAM:
                    self._end(side, stream_id, ts, out)
        elif ftype == RST_STREAM:
            s = self.streams.get(stream_id)
            if s is not None:
                s.reset = True
                s.end_ns = ts
                self._finish(stream_id, out)

    def _headers(self, side: int, stream_id: int, flags: int, block: bytes, ts: int, tid: int,
                 out: list[Exchange]) -> None:
        headers = self.dirs[side].decoder.decode(block, raw=True)
        fields = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        if side == 0:
            if stream_id not in self.streams and len(self.streams) < MAX_STREAMS:
                self.streams[stream_id] = _Stream(
                    start_ns=ts, tid=tid, method=fields.get(":method", ""),
                    path=fields.get(":path", ""), authority=fields.get(":authority", ""),
                    grpc=fields.get("content-type", "").startswith("application/grpc"),
                )
        else:
            s = self.streams.get(stream_id)
            if s is None:
                return
            if ":status" in fields:
                s.status = int(fields[":status"])
            if "grpc-status" in fields:
                s.grpc_status = int(fields["grpc-status"])
        if flags & END_STREAM:
            self._end(side, stream_id, ts, out)

    def _end(self, side: int, stream_id: int, ts: int, out: list[Exchange]) -> None:
        s = self.streams.get(stream_id)
        if s is None or side == 0:
            return  # the request half closing does not end the exchange
        s.end_ns = ts
        self._finish(stream_id, out)

    def _finish(self, stream_id: int, out: list[Exchange]) -> None:
        s = self.streams.pop(stream_id)
        out.append(Exchange(
            start_ns=s.start_ns, end_ns=s.end_ns, operation=s.method or "_OTHER",
            target=s.path, status=str(s.status) if s.status else "",
            request_bytes=s.request_bytes, response_bytes=s.response_bytes, tid=s.tid,
            aborted=s.reset and not s.status,
            attributes={"path": s.path, "authority": s.authority, "grpc": s.grpc,
                        "grpc_status": s.grpc_status, "reset": s.reset},
        ))


class Http2(Protocol):
    name = "http2"
    proto_id = Proto.HTTP2
    kind = "http"

    def classify(self, peek: bytes, direction: Direction, transport: Transport) -> Role:
        if transport == Transport.TCP and peek.startswith(PREFACE[:14]):
            return Role.CLIENT if direction == Direction.OUT else Role.SERVER
        return Role.UNKNOWN

    def parser(self, conn: ConnInfo) -> Http2Parser:
        return Http2Parser(conn)


PROTOCOL = Http2()
