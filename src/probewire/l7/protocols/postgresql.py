"""PostgreSQL (frontend/backend protocol 3.0): one exchange per statement result.

Requests: the simple query protocol (a Query holding one or more statements: one exchange per
statement result) and the extended one (Parse/Bind/Describe/Execute/Sync: one exchange per
Execute). Statements are summarized once, when they are parsed (named statements are cached per
connection, so a statement prepared once and executed many times, as psycopg does from its 5th
execution, keeps its operation and table); Bind maps portals to statements.

A statement's exchange ends at its CommandComplete, EmptyQueryResponse, PortalSuspended or
ErrorResponse (status = SQLSTATE, error_type the same). After an error the server skips to the
next Sync, so the requests of that cycle left without result are dropped, not counted. A result
whose statement is not known (a connection picked up mid-stream executing a statement prepared
before) takes its operation from the CommandComplete tag. ``namespace`` is the database of the
StartupMessage (PostgreSQL's default: the user name) when the parser saw it.

Start-up: StartupMessage, SSLRequest and GSSENCRequest (the server's one-byte answer, then
either plaintext, or TLS, which the capture layer delivers as plaintext from the TLS library:
TLS records seen on the socket are ignored and counted as ``tls_ciphertext``) and CancelRequest.

Sync: requests are proven by a handshake packet, or by a segment that parses as whole frontend
messages ending a burst (Query, Sync, Flush, Terminate). Responses in sync from the first
response segment after such a request; while lost, a segment whose captured bytes end with
ReadyForQuery is parsed backwards (CommandComplete/ErrorResponse lengths pointing exactly at
it) to finish the cycle it ends, and the responses are in sync again right after it.

Bounds per connection: 64 KiB of unparsed bytes, 8 KiB of a Query/Parse text (statements past
it take their operation from the tag), 256 named statements (least recently prepared evicted,
``statement_evicted``), 64 portals, 1024 pending requests.
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
from probewire.l7.sql import Statement, statements
from probewire.l7.stream import DuplexParser, Lost, Reader, Request, Source, be32

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3 = 196608
MAX_MESSAGE = 1 << 30  # PostgreSQL's own limit on a message
MAX_STARTUP = 10000  # the server refuses longer startup packets
MAX_STATEMENTS = 256
MAX_PORTALS = 64
KEEP_SQL = 8192

FRONTEND = frozenset(b"BCcdDEfFHpPQSX")
BACKEND = frozenset(b"RK23CdcGHWDIEVnNAtS1sZTv")
KEEP_REQUEST = {ord("Q"): KEEP_SQL, ord("P"): KEEP_SQL + 256, ord("B"): 256, ord("E"): 256,
                ord("D"): 256, ord("C"): 256}
KEEP_RESPONSE = {ord("C"): 256, ord("E"): 1024}
BURST_END = frozenset(b"QSHX")
TLS_RECORD = frozenset(range(20, 24))  # change_cipher_spec .. application_data


@dataclass(slots=True)
class _Stmt(Request):
    """An execution: gets a result (CommandComplete/EmptyQuery/PortalSuspended/Error)."""

    statement: Statement | None = None


@dataclass(slots=True)
class _Step(Request):
    """Parse/Bind/Describe/Close: completed by its own message; an error names its statement."""

    done_by: bytes = b""
    statement: Statement | None = None


@dataclass(slots=True)
class _Sync(Request):
    """Completed by ReadyForQuery."""

    query: bool = False  # ends a simple Query (whose text may hold more statements than found)


@dataclass(slots=True)
class _OneByte(Request):
    """SSLRequest/GSSENCRequest: answered by one byte."""


@dataclass
class PostgresParser(DuplexParser):
    namespace: str = ""
    prepared: OrderedDict[bytes, Statement | None] = field(default_factory=OrderedDict)
    portals: OrderedDict[bytes, Statement | None] = field(default_factory=OrderedDict)
    req_bytes: int = 0  # frontend bytes since the last execution was queued
    req_start: tuple[int, int] | None = None
    resp_bytes: int = 0  # backend bytes since the last result
    cycle_error: bool = False
    tls: bool = False
    startup_next: bool = False  # the next frontend packet is a startup packet

    # -- sync ------------------------------------------------------------------------------------
    def on_lost(self, is_req: bool) -> None:
        if is_req:
            self.req_start = None
            self.req_bytes = 0
        self.resp_bytes = 0
        self.cycle_error = False
    def request_proven(self, seg: Segment) -> bool | None:
        data = seg.data
        if self._tls_record(data):
            self._tls_seen()
            return False
        if data[:1] == b"\0":  # typed messages never start with 0, start-up packets do
            proven = _startup_packet(data)
            if proven:
                self.startup_next = True
            return proven
        return _frontend_chain(data, seg.skipped, self.max_buffer)

    def response_plausible(self, seg: Segment) -> bool | None:
        d = seg.data
        if self._tls_record(d):
            self._tls_seen()
            return False
        head = self.pending[0] if self.pending else None
        if isinstance(head, _OneByte):
            return len(d) >= 1 and d[0] in b"SNGE"
        if not d or d[0] not in BACKEND:
            return False
        if len(d) < 5:
            return None if not seg.skipped else False
        return 4 <= be32(d, 1) < MAX_MESSAGE

    def response_resync(self, seg: Segment) -> bool:
        if seg.skipped or not self.req.synced:
            return False
        tail = _backward_tail(seg.data)
        if tail is None:
            return False
        # A client reads a cycle's answer to its ReadyForQuery before it sends the next one,
        # so every cycle asked before this segment ends here; the results found at its end
        # belong to the last executions of the last of them.
        syncs = [i for i, p in enumerate(self.pending)
                 if isinstance(p, _Sync) and p.start_ns <= seg.ts_ns]
        if syncs:
            cycle = [self.pending.popleft() for _ in range(syncs[-1] + 1)]
            execs = [p for p in cycle if isinstance(p, _Stmt)]
            k = min(len(execs), len(tail))
            for lost in execs[: len(execs) - k]:
                self.dropped(lost)
            for item, (kind, body) in zip(execs[len(execs) - k:], tail[len(tail) - k:],
                                          strict=True):
                self._result(item, kind, body, seg.ts_ns)
        self.failures["resynced_at_ready_for_query"] += 1
        self.resp_bytes = 0
        self.cycle_error = False
        return True

    def _tls_record(self, data: bytes) -> bool:
        return len(data) >= 3 and data[0] in TLS_RECORD and data[1] == 3 and data[2] <= 4

    def _tls_seen(self) -> None:
        if not self.tls:
            self.tls = True
            self.failures["tls_ciphertext"] += 1

    # -- requests --------------------------------------------------------------------------------
    def request_reader(self, src: Source) -> Reader:
        while True:
            if self.startup_next:
                self.startup_next = False
                first = yield from src.peek(3)
                if self._tls_record(first):
                    self._tls_seen()
                    raise Lost("tls_ciphertext")
                head = yield from src.take(8)
                length, code = be32(head), be32(head, 4)
                if not 8 <= length <= MAX_STARTUP:
                    raise Lost("bad_startup")
                ts, tid = src.start_ts, src.start_tid
                body, _ = yield from src.body(length - 8, MAX_STARTUP)
                self._startup(code, body, ts, tid)
                continue
            head = yield from src.take(5)
            kind, length = head[0], be32(head, 1)
            if kind not in FRONTEND or not 4 <= length < MAX_MESSAGE:
                if head[0] in TLS_RECORD and head[1] == 3:
                    self._tls_seen()
                raise Lost("bad_message")
            ts, tid = src.start_ts, src.start_tid
            body, truncated = yield from src.body(length - 4, KEEP_REQUEST.get(kind, 0))
            self._request(kind, body, truncated, ts, tid, length + 1)

    def _startup(self, code: int, body: bytes, ts: int, tid: int) -> None:
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            self.push_pending(_OneByte(ts, tid))
            # Answered S (TLS: the startup comes from the TLS library), G or N (plaintext).
            self.startup_next = True
        elif code == PROTOCOL_3 or code >> 16 == 3:
            params = body.split(b"\0")
            kv = dict(zip(params[0::2], params[1::2], strict=False))
            db = kv.get(b"database") or kv.get(b"user") or b""
            self.namespace = db.decode("utf-8", "replace")[:128]
            self.push_pending(_Sync(ts, tid))  # auth ends with ReadyForQuery
        # CancelRequest: the connection closes without an answer.

    def _request(self, kind: int, body: bytes, truncated: bool, ts: int, tid: int,
                 size: int) -> None:
        if self.req_start is None:
            self.req_start = (ts, tid)
        self.req_bytes += size
        cut = truncated or len(body) >= KEEP_REQUEST.get(kind, 0)
        if kind == ord("Q"):
            sql = _cstr(body).decode("utf-8", "replace")
            for st in statements(sql, "postgresql", cut) or (Statement(""),):
                self._exec(st)
            self.push_pending(_Sync(ts, tid, query=True))
            self._reset_if_deallocate(sql)
        elif kind == ord("P"):
            name, rest = _cstr_split(body)
            found = statements(_cstr(rest).decode("utf-8", "replace"), "postgresql", cut)
            stmt: Statement | None = found[0] if found else Statement("")
            self._remember(self.prepared, name, stmt, MAX_STATEMENTS, "statement_evicted")
            self._step(b"1", stmt)
        elif kind == ord("B"):
            portal, rest = _cstr_split(body)
            stmt_name, _ = _cstr_split(rest)
            stmt = self.prepared.get(stmt_name)
            if stmt_name in self.prepared:
                self.prepared.move_to_end(stmt_name)
            self._remember(self.portals, portal, stmt, MAX_PORTALS, "portal_evicted")
            self._step(b"2", stmt)
        elif kind == ord("D"):
            what, name = body[:1], _cstr(body[1:])
            stmt = (self.prepared if what == b"S" else self.portals).get(name)
            self._step(b"Tn", stmt)
        elif kind == ord("E"):
            portal, _ = _cstr_split(body)
            self._exec(self.portals.get(portal))
        elif kind == ord("C"):
            what, name = body[:1], _cstr(body[1:])
            (self.prepared if what == b"S" else self.portals).pop(name, None)
            self._step(b"3", None)
        elif kind in (ord("S"), ord("F")):
            self.push_pending(_Sync(ts, tid))
            self.req_start = None
            self.req_bytes = 0

    def _exec(self, stmt: Statement | None) -> None:
        ts, tid = self.req_start or (self.req.src.start_ts, self.req.src.start_tid)
        self.push_pending(_Stmt(ts, tid, self.req_bytes, stmt))
        self.req_bytes = 0
        self.req_start = None

    def _step(self, done_by: bytes, stmt: Statement | None) -> None:
        self.push_pending(_Step(self.req.src.start_ts, self.req.src.start_tid, 0, done_by, stmt))

    def _remember(self, cache: OrderedDict[bytes, Statement | None], name: bytes,
                  stmt: Statement | None, cap: int, reason: str) -> None:
        cache[name] = stmt
        cache.move_to_end(name)
        if len(cache) > cap:
            cache.popitem(last=False)
            self.failures[reason] += 1

    def _reset_if_deallocate(self, sql: str) -> None:
        head = sql.lstrip()[:32].upper().split()
        if head[:2] in (["DEALLOCATE", "ALL"], ["DISCARD", "ALL"]) \
                or head[:3] == ["DEALLOCATE", "PREPARE", "ALL"]:
            self.prepared.clear()
            self.portals.clear()

    # -- responses -------------------------------------------------------------------------------
    def response_reader(self, src: Source) -> Reader:
        while True:
            if self.pending and isinstance(self.pending[0], _OneByte):
                answer = yield from src.take(1)
                self.pending.popleft()
                if answer not in (b"S", b"G", b"N"):
                    raise Lost("bad_ssl_answer")
                continue
            head = yield from src.take(5)
            kind, length = head[0], be32(head, 1)
            if kind not in BACKEND or not 4 <= length < MAX_MESSAGE:
                if head[0] in TLS_RECORD and head[1] == 3:
                    self._tls_seen()
                raise Lost("bad_message")
            body, _ = yield from src.body(length - 4, KEEP_RESPONSE.get(kind, 0))
            self.resp_bytes += length + 1
            self._response(kind, body, src.ts)

    def _response(self, kind: int, body: bytes, ts: int) -> None:
        if kind in b"CIs":
            item = self._next_result()
            if item is None and self.pending and isinstance(self.pending[0], _Sync):
                # more results than the statements found in the text: the tag names it
                sync = self.pending[0]
                item = _Stmt(sync.start_ns, sync.tid, 0, None)
            if item is not None:
                self._result(item, kind, body, ts)
            else:
                self.failures["result_unmatched"] += 1
        elif kind == ord("E"):
            item = self._next_result(step_ok=True)
            if item is None and not self.cycle_error and self.pending \
                    and isinstance(self.pending[0], _Sync) and self.pending[0].query:
                # a statement the text cut short by a hole hid: it failed (never the login's)
                sync = self.pending[0]
                item = _Stmt(sync.start_ns, sync.tid, 0, None)
            if item is not None:
                self._result(item, kind, body, ts)
            self.cycle_error = True
            self._skip_to_sync()
        elif kind in b"123":
            self._complete_step(bytes([kind]))
        elif kind in b"Tn":
            if self.pending and isinstance(self.pending[0], _Step) \
                    and self.pending[0].done_by == b"Tn":
                self.pending.popleft()
        elif kind == ord("Z"):
            while self.pending:
                item = self.pending.popleft()
                if isinstance(item, _Sync):
                    break
                if isinstance(item, _Stmt) and not self.cycle_error:
                    self.failures["result_missing"] += 1
            self.cycle_error = False
            self.resp_bytes = 0

    def _next_result(self, step_ok: bool = False) -> _Stmt | _Step | None:
        """The request a result or an error belongs to: the first execution of the current
        cycle (or, for an error, the step that failed)."""
        while self.pending:
            item = self.pending[0]
            if isinstance(item, _Stmt):
                return self.pending.popleft()  # type: ignore[no-any-return]
            if isinstance(item, _Step):
                if step_ok:
                    return self.pending.popleft()  # type: ignore[no-any-return]
                self.pending.popleft()
                self.failures["step_unanswered"] += 1
                continue
            return None  # a Sync: the cycle holds no more executions
        return None

    def _complete_step(self, kind: bytes) -> None:
        if self.pending and isinstance(self.pending[0], _Step) \
                and kind in self.pending[0].done_by:
            self.pending.popleft()
        else:
            self.failures["unexpected_completion"] += 1

    def _skip_to_sync(self) -> None:
        while self.pending and not isinstance(self.pending[0], (_Sync, _OneByte)):
            self.pending.popleft()

    def _result(self, item: _Stmt | _Step, kind: int, body: bytes, ts: int) -> None:
        stmt = item.statement
        status = ""
        if kind == ord("E"):
            status = _sqlstate(body)
            if isinstance(item, _Step) and item.done_by == b"3":
                stmt = Statement("CLOSE")
        if stmt is None:
            tag = _cstr(body).split(b" ", 1)[0] if kind == ord("C") else b""
            stmt = Statement(tag.decode("ascii", "replace").upper() if tag.isalpha() else "")
            if kind != ord("C"):
                self.failures["statement_unknown"] += 1
        self.out.append(Exchange(
            start_ns=item.start_ns, end_ns=ts, operation=stmt.operation,
            target=stmt.collection, status=status, error_type=status,
            namespace=self.namespace, request_bytes=item.request_bytes,
            response_bytes=self.resp_bytes, tid=item.tid, summary=stmt.summary))
        self.resp_bytes = 0

    def abort(self, item: object, ts_ns: int) -> Exchange | None:
        if not isinstance(item, _Stmt):
            return None
        stmt = item.statement or Statement("")
        return Exchange(start_ns=item.start_ns, end_ns=ts_ns, operation=stmt.operation,
                        target=stmt.collection, namespace=self.namespace,
                        request_bytes=item.request_bytes, tid=item.tid,
                        summary=stmt.summary, aborted=True)

    def dropped(self, item: object) -> None:
        if isinstance(item, _Stmt):
            self.failures["request_lost"] += 1


# -- helpers ------------------------------------------------------------------------------------
def _cstr(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _cstr_split(b: bytes) -> tuple[bytes, bytes]:
    i = b.find(b"\0")
    return (b, b"") if i < 0 else (b[:i], b[i + 1:])


def _sqlstate(body: bytes) -> str:
    """The C field of an ErrorResponse (fields: type byte, NUL-terminated value)."""
    pos = 0
    while pos < len(body) and body[pos] != 0:
        end = body.find(b"\0", pos + 1)
        if end < 0:
            break
        if body[pos] == ord("C"):
            code = body[pos + 1: end]
            if len(code) == 5 and code.isalnum():
                return code.decode("ascii").upper()
            break
        pos = end + 1
    return "ERROR"


def _startup_packet(data: bytes) -> bool | None:
    """data is one whole start-up packet (None: the beginning of one)."""
    if len(data) < 8:
        return None if data[:2].strip(b"\0") == b"" else False
    length, code = be32(data), be32(data, 4)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        expect = 8
    elif code == CANCEL_REQUEST:
        expect = 16
    elif code == PROTOCOL_3 and 9 <= length <= MAX_STARTUP:
        expect = length
    else:
        return False
    if length != expect or len(data) > expect:
        return False
    if len(data) < expect:
        return None
    return code != PROTOCOL_3 or data[-1] == 0


def _frontend_chain(data: bytes, skipped: int, held_max: int) -> bool | None:
    """data is whole frontend messages, the last one ending a burst (it may run into the
    hole that follows data); None: so far a valid beginning of such messages.

    A message that goes on in the next call (a client flushing a long one in parts) is
    proven only when the bytes that complete it come: a header that happens to lie in the
    tail of an older message would otherwise swallow up to the length it claims. Only a
    Query too long to be held unsynced (held_max bytes) is taken on its header and the
    start of its text, as the first call of a long one is."""
    pos, last = 0, -1
    n = len(data)
    for _ in range(4096):
        if pos == n:
            return last in BURST_END
        if pos > n:  # the last message goes on past these bytes
            if skipped:
                return last in BURST_END
            return True if last == ord("Q") and pos > held_max else None
        if pos + 5 > n:
            return None if data[pos] in FRONTEND and not skipped else False
        kind, length = data[pos], be32(data, pos + 1)
        if kind not in FRONTEND or not 4 <= length < MAX_MESSAGE:
            return False
        end = pos + 1 + length
        # a Query's text is one C string: a NUL inside it is no Query
        if kind == ord("Q") and (data.find(b"\0", pos + 5, min(end - 1, n)) >= 0
                                 or (end <= n and data[end - 1] != 0)):
            return False
        if kind in b"SHX" and length != 4:
            return False
        if kind == ord("Q") and end > n and not skipped:
            # a Query that goes on in the next call begins its text as SQL does
            if pos + 5 >= n:
                return None
            if not _sql_start(data[pos + 5]):
                return False
        pos, last = end, kind
    return False


def _backward_tail(data: bytes) -> list[tuple[int, bytes]] | None:
    """The messages provably ending data, oldest first, if data ends with ReadyForQuery:
    each one found by a length that points exactly at the next."""
    if len(data) < 6 or data[-6:-1] != b"Z\0\0\0\x05" or data[-1] not in b"ITE":
        return None
    found: list[tuple[int, bytes]] = []
    end = len(data) - 6
    for _ in range(8):
        hit = None
        for pos in range(end - 5, max(-1, end - 1100), -1):
            if data[pos] in b"CEIs" and be32(data, pos + 1) == end - pos - 1:
                body = data[pos + 5: end]
                if data[pos] in b"Is" and body:
                    continue
                if data[pos] == ord("C") and (not body.endswith(b"\0") or b"\0" in body[:-1]):
                    continue
                hit = pos
                break
        if hit is None:
            break
        found.append((data[hit], data[hit + 5: end]))
        end = hit
    found.reverse()
    return found


# -- classification (the mirror of bpf/l7/proto_postgresql.h) ----------------------------------
def _printable_cstr(d: bytes, start: int) -> int:
    """Index of the NUL ending a printable name that starts at `start` within d, or -1."""
    for i in range(start, len(d)):
        if d[i] == 0:
            return i
        if not 0x21 <= d[i] <= 0x7E:
            return -1
    return -1


def _sql_start(b: int) -> bool:
    return (0x41 <= b <= 0x5A) or (0x61 <= b <= 0x7A) or b in b" \t\r\n(/-"


def classify(d: bytes, direction: Direction, call_len: int) -> bool:
    """d starts a frontend message: a startup-phase packet or a Query/Parse/Bind."""
    n = len(d)
    if n >= 8:
        length, code = be32(d), be32(d, 4)
        if length == 8 and code in (SSL_REQUEST, GSSENC_REQUEST):
            return True
        if length == 16 and code == CANCEL_REQUEST:
            return True
        if code == PROTOCOL_3 and 9 <= length <= MAX_STARTUP and n >= 9 and \
                (0x61 <= d[8] <= 0x7A or d[8] == ord("_")):
            return True
    if n < 6 or d[1] != 0:
        return False
    length = be32(d, 1)
    if d[0] == ord("Q"):
        return length >= 5 and length + 1 == call_len and _sql_start(d[5])
    if d[0] == ord("P"):
        if length < 8 or length + 1 > call_len:
            return False
        end = 5 if d[5] == 0 else _printable_cstr(d, 5)
        return 0 <= end < n - 1 and _sql_start(d[end + 1])
    if d[0] == ord("B"):
        if length < 12 or length + 1 >= call_len:
            return False
        end = 5 if d[5] == 0 else _printable_cstr(d, 5)
        if end < 0 or end + 1 >= n:
            return False
        end2 = end + 1 if d[end + 1] == 0 else _printable_cstr(d, end + 1)
        return end2 >= 0
    return False


class PostgreSQL(Protocol):
    name = "postgresql"
    proto_id = c.Proto.POSTGRESQL
    transports = frozenset({Transport.TCP})
    kind = "db"

    def classify(self, peek: bytes, direction: Direction, transport: Transport, *,
                 lport: int = 0, rport: int = 0, call_len: int = 0) -> Role:
        if transport != Transport.TCP:
            return Role.UNKNOWN
        if not classify(peek[: c.L7_PEEK], direction, max(call_len, len(peek))):
            return Role.UNKNOWN
        return Role.CLIENT if direction == Direction.OUT else Role.SERVER

    def parser(self, conn: ConnInfo) -> StreamParser:
        return PostgresParser(conn)


PROTOCOL = PostgreSQL()
