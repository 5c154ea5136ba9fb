"""DNS over UDP and TCP: one exchange per query.

UDP: one Segment is one datagram (``peer`` its remote end on an unconnected socket). TCP:
messages behind a 2-byte length, several per connection, answered in any order. A query
waits for the response with its id from the same peer (and the same question, when the
response repeats it, so glibc's parallel A and AAAA queries, two datagrams of one sendmmsg,
are two exchanges even with one id). Works the same from either end: whoever sends a query
(QR=0) is the requester.

``operation`` is the question's type ("A", "AAAA", "TYPE65534" for unnamed ones), ``target``
the question name in lower case without the trailing dot ("." for the root), written as dig
and dnspython write names (``\\.`` for a dot inside a label, ``\\DDD`` for unprintable bytes).
A response with RCODE other than NOERROR has ``status`` the RCODE's name ("NXDOMAIN") and
``error_type`` its lower case ("nxdomain", "servfail", "refused", ...); a query unanswered
for TIMEOUT_NS (5 s, glibc's default per try) ends as ``error_type`` "timeout" with that
duration, from ``expire()``; one pending at close ends as "timeout" too, marked aborted.
Only the header and the question are read, so responses cut short by the capture are
complete enough; names are decoded with compression pointers followed backwards only (no
loops) and at most 255 bytes long.

Bounds per connection: 256 pending queries (oldest expired first, ``pending_overflow``),
64 KiB of an unparsed TCP message.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from probewire.l7 import constants as c
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
from probewire.l7.stream import Lost, Reader, Source, be16

TIMEOUT_NS = 5_000_000_000
MAX_PENDING = 256
DNS_PORT = 53
KEEP_MESSAGE = 512
TYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT",
    17: "RP", 18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC", 33: "SRV", 35: "NAPTR",
    36: "KX", 37: "CERT", 39: "DNAME", 41: "OPT", 42: "APL", 43: "DS", 44: "SSHFP",
    45: "IPSECKEY", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 49: "DHCID", 50: "NSEC3",
    51: "NSEC3PARAM", 52: "TLSA", 53: "SMIMEA", 55: "HIP", 59: "CDS", 60: "CDNSKEY",
    61: "OPENPGPKEY", 62: "CSYNC", 63: "ZONEMD", 64: "SVCB", 65: "HTTPS", 99: "SPF",
    108: "EUI48", 109: "EUI64", 249: "TKEY", 250: "TSIG", 251: "IXFR", 252: "AXFR",
    253: "MAILB", 254: "MAILA", 255: "ANY", 256: "URI", 257: "CAA",
}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
          6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE"}
_ESCAPED = frozenset(b'"().;\\@$')  # as dig and dnspython write names


def type_name(qtype: int) -> str:
    return TYPES.get(qtype) or f"TYPE{qtype}"


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    response: bool
    opcode: int
    rcode: int
    qtype: int  # -1: no question
    qname: str


def _label_text(label: bytes) -> str:
    out = []
    for b in label.lower():
        if b in _ESCAPED:
            out.append("\\" + chr(b))
        elif 0x21 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def read_name(msg: bytes, pos: int) -> tuple[str, int] | None:
    """The name at pos and the offset after it (after the first pointer, if any), or None if
    malformed. Pointers must point strictly backwards, so there are no loops."""
    labels: list[str] = []
    end = -1
    total = 0
    limit = pos  # the next pointer must point before this
    for _ in range(128):
        if pos >= len(msg):
            return None
        n = msg[pos]
        if n == 0:
            if end < 0:
                end = pos + 1
            return (".".join(labels) or "."), end
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(msg):
                return None
            target = ((n & 0x3F) << 8) | msg[pos + 1]
            if end < 0:
                end = pos + 2
            if target >= limit:
                return None
            pos = limit = target
            continue
        if n & 0xC0:
            return None  # extended label types are not in use
        label = msg[pos + 1: pos + 1 + n]
        if len(label) < n:
            return None
        total += n + 1
        if total > 255:
            return None
        labels.append(_label_text(label))
        pos += 1 + n
    return None


def parse(msg: bytes) -> Message | None:
    """Header and first question of a DNS message, or None if it is not one."""
    if len(msg) < 12:
        return None
    flags = be16(msg, 2)
    qdcount = be16(msg, 4)
    qtype, qname = -1, ""
    if qdcount:
        name = read_name(msg, 12)
        if name is None or name[1] + 4 > len(msg):
            return None
        qname, at = name
        qtype = be16(msg, at)
    return Message(be16(msg, 0), bool(flags >> 15), (flags >> 11) & 0xF, flags & 0xF, qtype,
                   qname)


@dataclass(slots=True)
class _Query:
    start_ns: int
    tid: int
    qtype: int
    qname: str
    size: int
    peer: tuple[str, int] | None


@dataclass
class DnsParser(StreamParser):
    pending: OrderedDict[tuple[object, ...], _Query] = field(default_factory=OrderedDict)
    out: list[Exchange] = field(default_factory=list)
    # TCP: per direction, the reader of length-prefixed messages (None: not in sync)
    sources: dict[Direction, Source] = field(default_factory=dict)
    readers: dict[Direction, Reader | None] = field(default_factory=dict)
    held: dict[Direction, list[Segment]] = field(default_factory=dict)  # a beginning, unproven

    def feed(self, segment: Segment) -> list[Exchange]:
        try:
            if self.conn.transport == Transport.UDP:
                self._message(segment.data, len(segment.data) + segment.skipped,
                              segment.direction, segment.ts_ns, segment.ts_ns, segment.tid,
                              segment.peer)
            else:
                self._stream(segment)
        except Exception as exc:  # a parser bug must cost the connection, never the agent
            self.failures[f"parser_error:{type(exc).__name__}"] += 1
        out, self.out = self.out, []
        return out

    def _stream(self, seg: Segment) -> None:
        src = self.sources.setdefault(seg.direction, Source(65536 + 2))
        segments = [seg]
        if self.readers.get(seg.direction) is None:
            held = self.held.setdefault(seg.direction, [])
            if held and held[-1].skipped:
                held.clear()
            held.append(seg)
            data = b"".join(h.data for h in held)
            verdict = _tcp_chain(data, seg.skipped)
            if verdict is None and len(data) <= 65537:
                return  # the beginning of a message: decide with more of it
            if not verdict:
                self.failures["unsynced_segment"] += len(held)
                held.clear()
                return
            segments = list(held)
            held.clear()
            src.reset()
            self.readers[seg.direction] = self._tcp_reader(src, seg.direction)
        for s in segments:
            reader = self.readers.get(seg.direction)
            if reader is None:
                return
            src.push(s.data, s.skipped, s.ts_ns, s.tid)
            try:
                next(reader)
            except Lost as lost:
                self.failures[lost.reason] += 1
                self.readers[seg.direction] = None

    def _tcp_reader(self, src: Source, direction: Direction) -> Reader:
        while True:
            head = yield from src.take(2)
            start_ts, tid = src.start_ts, src.start_tid
            length = be16(head)
            body, _ = yield from src.body(length, KEEP_MESSAGE)
            self._message(body, length + 2, direction, start_ts, src.ts, tid, None)

    def _message(self, data: bytes, size: int, direction: Direction, start_ts: int,
                 end_ts: int, tid: int, peer: tuple[str, int] | None) -> None:
        msg = parse(data)
        if msg is None or msg.opcode != 0:
            self.failures["not_dns" if msg is None else "opcode"] += 1
            return
        peer = peer if peer is not None else self.conn.remote
        if not msg.response:
            key: tuple[object, ...] = (peer, msg.id, direction, msg.qtype, msg.qname)
            if key in self.pending:
                self.failures["retransmitted"] += 1
                return  # the first send starts the lookup
            if len(self.pending) >= MAX_PENDING:
                _, old = self.pending.popitem(last=False)
                self.failures["pending_overflow"] += 1
                self.out.append(self._exchange(old, old.start_ns + TIMEOUT_NS, "", "timeout"))
            self.pending[key] = _Query(start_ts, tid, msg.qtype, msg.qname, size, peer)
            return
        asked = Direction.OUT if direction == Direction.IN else Direction.IN
        key = (peer, msg.id, asked, msg.qtype, msg.qname)
        query = self.pending.pop(key, None)
        if query is None and msg.qtype < 0:  # no question repeated: the oldest with that id
            key = next((k for k in self.pending if k[:3] == (peer, msg.id, asked)), key)
            query = self.pending.pop(key, None)
        if query is None:
            self.failures["response_unmatched"] += 1
            return
        status = "" if msg.rcode == 0 else RCODES.get(msg.rcode, f"RCODE{msg.rcode}")
        ex = self._exchange(query, end_ts, status, status.lower())
        ex.response_bytes = size
        self.out.append(ex)

    def _exchange(self, q: _Query, end_ns: int, status: str, error: str) -> Exchange:
        op = type_name(q.qtype) if q.qtype >= 0 else ""
        return Exchange(start_ns=q.start_ns, end_ns=end_ns, operation=op, target=q.qname,
                        status=status, error_type=error, request_bytes=q.size, tid=q.tid,
                        summary=f"{op} {q.qname}", peer=q.peer)

    def expire(self, now_ns: int) -> list[Exchange]:
        out = []
        while self.pending:
            key, q = next(iter(self.pending.items()))
            if now_ns - q.start_ns < TIMEOUT_NS:
                break
            del self.pending[key]
            out.append(self._exchange(q, q.start_ns + TIMEOUT_NS, "", "timeout"))
        return out

    def close(self, ts_ns: int) -> list[Exchange]:
        out = []
        for q in self.pending.values():
            ex = self._exchange(q, max(ts_ns, q.start_ns), "", "timeout")
            ex.aborted = True
            out.append(ex)
        self.pending.clear()
        return out


def _tcp_chain(d: bytes, skipped: int) -> bool | None:
    """d is whole length-prefixed DNS messages (the last may run into the hole after d);
    None: so far the beginning of one."""
    pos, n = 0, len(d)
    if not n:
        return False
    for _ in range(256):
        if pos == n:
            return True
        if pos > n:  # the last message goes on past what was captured
            return True if skipped else None
        if pos + 2 > n:
            return None if not skipped else False
        length = be16(d, pos)
        if length < 12:
            return False
        if pos + 2 + length <= n and parse(d[pos + 2: pos + 2 + length]) is None:
            return False
        pos += 2 + length
    return False


# -- classification (the mirror of bpf/l7/proto_dns.h) -----------------------------------------
def classify(d: bytes, direction: Direction, transport: Transport, lport: int,
             rport: int) -> Role:
    off = 2 if transport == Transport.TCP else 0
    n = len(d)
    if n < off + 13:
        return Role.UNKNOWN
    if off and be16(d, 0) < 17:
        return Role.UNKNOWN
    h = off
    flags = d[h + 2]
    response = flags >> 7
    if (flags >> 3) & 0xF != 0 or d[h + 4] != 0 or d[h + 5] != 1:
        return Role.UNKNOWN
    if not response and (d[h + 3] & 0xF or any(d[h + 6: h + 10]) or d[h + 10] or d[h + 11] > 1):
        return Role.UNKNOWN
    if not response and d[h + 3] & 0x40:  # Z (AD and CD may be set: dig sets AD)
        return Role.UNKNOWN
    if d[h + 12] > 63:
        return Role.UNKNOWN
    requester = (direction == Direction.OUT) != bool(response)
    if requester:
        return Role.CLIENT if rport == DNS_PORT else Role.UNKNOWN
    return Role.SERVER if lport == DNS_PORT else Role.UNKNOWN


class DNS(Protocol):
    name = "dns"
    proto_id = c.Proto.DNS
    transports = frozenset({Transport.UDP, Transport.TCP})
    kind = "dns"

    def classify(self, peek: bytes, direction: Direction, transport: Transport, *,
                 lport: int = 0, rport: int = 0, call_len: int = 0) -> Role:
        return classify(peek[: c.L7_PEEK], direction, transport, lport, rport)

    def parser(self, conn: ConnInfo) -> StreamParser:
        return DnsParser(conn)


PROTOCOL = DNS()
