"""Connection bytes from the kernel (l7_data records) to each connection's protocol parser.

Records come in order per connection, numbered by the kernel (`seq` counts every record it
made, shipped or dropped). A gap means a record was lost to a full ring: the connection is
given up (a parser fed a stream with a hole in it could put wrong labels on real traffic) and
counted. A close record ends the connection (its requests still waiting are aborted); the
number of connections held is bounded, the least recently active going first.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from probewire.enrich.net import format_address
from probewire.l7.constants import Direction, L7Flag, RecordKind, Role, Transport
from probewire.l7.protocol import ConnInfo, Exchange, Protocol, Segment, StreamParser
from probewire.l7.records import HEADER_SIZE
from probewire.runtime.ring import VarBatch

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 4096
# Record `dir` -> Direction (a tuple index: an enum call per record costs more).
_DIRECTIONS = (Direction.OUT, Direction.IN, Direction.OUT)
RECORD_DROPPED = "record dropped (ring full)"
EVICTED = "evicted (too many connections)"


@dataclass
class _Conn:
    proto: int
    parser: StreamParser
    header: bytes  # the neutral header of its latest record (rows are made from it)
    next_seq: int


@dataclass(frozen=True)
class Finished:
    """An exchange a parser finished, with what the pipeline needs to make its row."""

    proto: int
    header: bytes
    exchange: Exchange


class StreamDemux:
    def __init__(self, protocols: Mapping[int, Protocol],
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.protocols = protocols
        self.max_connections = max_connections
        self.conns: OrderedDict[int, _Conn] = OrderedDict()
        # (protocol name, reason) -> connections given up; failures of parsers gone.
        self.lost: Counter[tuple[str, str]] = Counter()
        self._failures_gone: Counter[tuple[str, str]] = Counter()
        self.exchanges: Counter[str] = Counter()
        self.records = 0

    def failures(self) -> Counter[tuple[str, str]]:
        """(protocol, reason) -> parse failures, of live parsers and gone ones."""
        out = Counter(self._failures_gone)
        for c in self.conns.values():
            name = self.protocols[c.proto].name
            for reason, n in c.parser.failures.items():
                out[(name, reason)] += n
        return out

    def _forget(self, conn_id: int) -> None:
        c = self.conns.pop(conn_id)
        name = self.protocols[c.proto].name
        for reason, n in c.parser.failures.items():
            self._failures_gone[(name, reason)] += n

    def _lose(self, c: _Conn, reason: str) -> None:
        if not c.parser.lost:
            c.parser.lost = reason
        self.lost[(self.protocols[c.proto].name, c.parser.lost)] += 1

    def feed(self, batch: VarBatch) -> list[Finished]:
        out: list[Finished] = []
        rec = batch.records
        n = len(rec)
        self.records += n
        size = rec.dtype.itemsize
        flat = (rec if rec.flags.c_contiguous else np.ascontiguousarray(rec)).tobytes()
        udp_peer = ((rec["flags"] & L7Flag.UDP) != 0) & (rec["rport"] != 0)
        for i, (kind, proto, conn_id, seq, direction, ts, tid, skipped, peered) in enumerate(zip(
                rec["kind"].tolist(), rec["proto"].tolist(), rec["conn_id"].tolist(),
                rec["seq"].tolist(), rec["dir"].tolist(), rec["ts_ns"].tolist(),
                rec["tid"].tolist(), rec["skipped"].tolist(), udp_peer.tolist(), strict=True)):
            protocol = self.protocols.get(proto)
            if protocol is None:
                continue
            header = flat[i * size: i * size + HEADER_SIZE]
            c = self.conns.get(conn_id)
            if c is None or (seq == 1 and c.next_seq != 1) or c.proto != proto:
                if c is not None:
                    out += self._finished(c, c.parser.close(ts))
                    self._forget(conn_id)
                c = self._new(rec[i], protocol, header)
                if seq != 1:
                    self._lose(c, "started before the agent or lost its start")
            else:
                self.conns.move_to_end(conn_id)
            if kind == RecordKind.CLOSE:
                if not c.parser.lost:
                    out += self._finished(c, c.parser.close(ts))
                self._forget(conn_id)
                continue
            if c.parser.lost:
                continue
            if seq != c.next_seq:
                self._lose(c, RECORD_DROPPED)
                continue
            c.next_seq = seq + 1
            c.header = header
            peer = None
            if peered:
                peer = (format_address(int(rec["family"][i]), rec["raddr"][i]),
                        int(rec["rport"][i]))
            try:
                done = c.parser.feed(Segment(_DIRECTIONS[direction], batch.data[i], ts, tid,
                                             skipped, peer))
            except Exception:  # a parser bug must cost its connection, not the batch
                log.exception("%s parser failed", protocol.name)
                c.parser.failures["parser error"] += 1
                self._lose(c, "parser error")
                continue
            self._note_lost(c)
            if done:
                out += self._finished(c, done)
        return out

    def _note_lost(self, c: _Conn) -> None:
        """Count a connection its parser just gave up."""
        if c.parser.lost:
            self._lose(c, c.parser.lost)

    def expire(self, now_ns: int) -> list[Finished]:
        """Exchanges parsers end for waiting too long (e.g. DNS timeouts)."""
        out: list[Finished] = []
        for c in list(self.conns.values()):
            if not c.parser.lost:
                out += self._finished(c, c.parser.expire(now_ns))
        return out

    def _new(self, rec: np.void, protocol: Protocol, header: bytes) -> _Conn:
        family = int(rec["family"])
        info = ConnInfo(
            transport=Transport.UDP if int(rec["flags"]) & L7Flag.UDP else Transport.TCP,
            role=Role(int(rec["role"])),
            tls=bool(int(rec["flags"]) & L7Flag.TLS),
            tgid=int(rec["tgid"]),
            family=family,
            local=(format_address(family, rec["laddr"]), int(rec["lport"])),
            remote=(format_address(family, rec["raddr"]), int(rec["rport"])),
        )
        c = _Conn(int(rec["proto"]), protocol.parser(info), header, 1)
        conn_id = int(rec["conn_id"])
        self.conns[conn_id] = c
        while len(self.conns) > self.max_connections:
            oldest_id, oldest = next(iter(self.conns.items()))
            self._lose(oldest, EVICTED)
            self._forget(oldest_id)
        return c

    def _finished(self, c: _Conn, exchanges: list[Exchange]) -> list[Finished]:
        if exchanges:
            self.exchanges[self.protocols[c.proto].name] += len(exchanges)
        return [Finished(c.proto, c.header, ex) for ex in exchanges]
