"""HTTP/2 and gRPC from a connection's frames: HPACK (the `hpack` library), streams, trailers.

The kernel walks each direction's frames (bpf/l7/proto_http2.h) and ships the client preface,
every frame header and every payload but DATA's: a DATA frame arrives as its 9-byte header
alone. This parser reassembles each direction, reads the frames, decodes header blocks with one
HPACK decoder per direction, and turns each finished stream into an exchange. A connection with
a gap (a dropped or truncated record) or a broken frame is given up and counted: HPACK state
cannot be recovered, and a guess would put wrong labels on real traffic.

gRPC status comes from the trailers (a trailers-only response included); a stream reset before
its trailers is CANCELLED (1), or DEADLINE_EXCEEDED (4) when its request's grpc-timeout had run
out by then, as the client library reports it. grpc-message is never kept. Streams above a
GOAWAY's last stream id were never processed (the client retries them elsewhere): they are
dropped, not counted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from probewire.l7.constants import Proto
from probewire.l7.hpack import Decoder
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
MAX_STREAMS = 4096  # in flight on one connection (grpc's default limit is 100; kept generous)
TRUNCATED = "syscall larger than the capture"
GRPC_CANCELLED, GRPC_DEADLINE_EXCEEDED = 1, 4
DEADLINE_SLACK_NS = 5_000_000
# grpc-timeout units (the gRPC over HTTP/2 spec), in nanoseconds.
_TIMEOUT_UNITS = {"H": 3_600_000_000_000, "M": 60_000_000_000, "S": 1_000_000_000,
                  "m": 1_000_000, "u": 1_000, "n": 1}


def grpc_timeout_ns(value: str) -> int | None:
    """A grpc-timeout header ("100m", "5S"; at most 8 digits) in nanoseconds, else None."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


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
    timeout_ns: int | None = None  # the request's grpc-timeout


# The header fields the parser reads (HPACK decodes every field; these are kept).
WANTED = frozenset({b":method", b":path", b":authority", b":status", b"content-type",
                    b"grpc-status", b"grpc-timeout"})


@dataclass
class _Direction:
    buffer: bytearray = field(default_factory=bytearray)
    decoder: Decoder = field(default_factory=Decoder)
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
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
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
            if ftype == DATA:  # its payload never crosses: the kernel walked over it
                pos += 9
                self._data(side, flags, stream_id, length, ts, out)
                continue
            if len(buf) - pos < 9 + length:
                break
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            self._frame(side, ftype, flags, stream_id, payload, ts, tid, out)
        del buf[:pos]

    def _data(self, side: int, flags: int, stream_id: int, length: int, ts: int,
              out: list[Exchange]) -> None:
        s = self.streams.get(stream_id)
        if s is None:
            return
        if side == 0:
            s.request_bytes += length
        else:
            s.response_bytes += length
        if flags & END_STREAM:
            self._end(side, stream_id, ts, out)

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
        elif ftype == RST_STREAM:
            s = self.streams.get(stream_id)
            if s is not None:
                s.reset = True
                s.end_ns = ts
                self._finish(stream_id, out)
        elif ftype == GOAWAY and len(payload) >= 4:
            # Streams above the last one the sender processed were never processed: their
            # client retries them (on another connection); they are not exchanges here.
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            for sid in [sid for sid in self.streams if sid > last]:
                del self.streams[sid]

    def _headers(self, side: int, stream_id: int, flags: int, block: bytes, ts: int, tid: int,
                 out: list[Exchange]) -> None:
        fields = self.dirs[side].decoder.decode(block, WANTED)
        if side == 0:
            if stream_id not in self.streams and len(self.streams) < MAX_STREAMS:
                self.streams[stream_id] = _Stream(
                    start_ns=ts, tid=tid,
                    method=fields.get(b":method", b"").decode("latin-1"),
                    path=fields.get(b":path", b"").decode("latin-1"),
                    authority=fields.get(b":authority", b"").decode("latin-1"),
                    grpc=fields.get(b"content-type", b"").startswith(b"application/grpc"),
                    timeout_ns=grpc_timeout_ns(fields.get(b"grpc-timeout", b"").decode("latin-1")),
                )
        else:
            s = self.streams.get(stream_id)
            if s is None:
                return
            if b":status" in fields:
                s.status = int(fields[b":status"])
            if b"grpc-status" in fields:
                s.grpc_status = int(fields[b"grpc-status"])
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
        if s.grpc and s.grpc_status is None and s.reset:
            # Reset before its trailers: what the client library reports. The client resets
            # a call at its deadline, so its own clock says which it was (a few ms of slack
            # for the hook's timestamps). A server reads the request some time after the
            # client sent it (queued behind other streams' bytes, or waiting for a CPU), with
            # the deadline the client had left then: it sees the deadline's reset early by
            # that delay, so on its side a reset past half the deadline is the deadline's.
            elapsed = s.end_ns - s.start_ns
            if s.timeout_ns is None:
                expired = False
            elif self.conn.role == Role.CLIENT:
                expired = elapsed >= s.timeout_ns - DEADLINE_SLACK_NS
            else:
                expired = elapsed >= s.timeout_ns // 2
            s.grpc_status = GRPC_DEADLINE_EXCEEDED if expired else GRPC_CANCELLED
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

    def classify(self, peek: bytes, direction: Direction, transport: Transport, *,
                 lport: int = 0, rport: int = 0, call_len: int = 0) -> Role:
        if transport == Transport.TCP and peek.startswith(PREFACE[:14]):
            return Role.CLIENT if direction == Direction.OUT else Role.SERVER
        return Role.UNKNOWN

    def parser(self, conn: ConnInfo) -> Http2Parser:
        return Http2Parser(conn)


PROTOCOL = Http2()
