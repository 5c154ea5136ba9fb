"""MySQL / MariaDB (client/server protocol 4.1+): one exchange per statement.

Requests: COM_QUERY (a query string with several statements, under CLIENT_MULTI_STATEMENTS,
gives one exchange per statement result; a CALL's several results stay one exchange),
COM_STMT_PREPARE (its statement is cached per connection under the id the server answers;
a prepare that fails is an exchange with the error, one that succeeds is not) and
COM_STMT_EXECUTE (the cached statement's operation and table). COM_INIT_DB, a successful
``USE db`` and the database of the handshake response set ``namespace``. Other commands
(ping, statistics, ...) are followed to keep in step but are not exchanges.

Responses: OK, ERR (status = the MySQL error number, e.g. "1146"), EOF, and result sets in
text and binary form, with or without CLIENT_DEPRECATE_EOF (told apart without the
capability flags: an EOF packet is 5 bytes, an OK that ends rows is 7 or more; a row that
starts with 0xFE is at least 16 MiB long). The handshake (server greeting, handshake response
or SSLRequest, authentication switch/more data) is followed until its OK or ERR; after an
SSLRequest the capture layer delivers the plaintext from the TLS library.

Sync: requests are proven by a segment of whole packets starting with a command (sequence id 0)
or by a handshake response right after a greeting; responses are proven by a greeting, or by a
segment starting with sequence id 1 after a request sent after the loss. Sequence ids check
every response packet, so a response is never read as another's.

Bounds per connection: 64 KiB of unparsed bytes, 8 KiB of a statement's text, 256 prepared
statements (oldest evicted, ``statement_evicted``), 64 pending commands.
"""

from __future__ import annotations

import re
from collections.abc import Generator
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
from probewire.l7.stream import DuplexParser, Lost, Reader, Request, Source, le_int

COM_QUIT, COM_INIT_DB, COM_QUERY, COM_FIELD_LIST = 0x01, 0x02, 0x03, 0x04
COM_STATISTICS, COM_PING, COM_CHANGE_USER = 0x09, 0x0E, 0x11
COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_STMT_SEND_LONG_DATA = 0x16, 0x17, 0x18
COM_STMT_CLOSE, COM_STMT_RESET, COM_SET_OPTION, COM_STMT_FETCH = 0x19, 0x1A, 0x1B, 0x1C
COM_RESET_CONNECTION = 0x1F
NO_RESPONSE = frozenset({COM_QUIT, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE})
COMMANDS = frozenset(range(0x00, 0x20)) | {0xFA, 0xFE}  # 0xFA: MariaDB's COM_STMT_BULK_EXECUTE
CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_SSL = 0x800
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH_LENENC = 0x200000
SERVER_MORE_RESULTS_EXISTS = 0x8
SERVER_STATUS_CURSOR_EXISTS = 0x40
MAX_PACKET = 0xFFFFFF
KEEP_SQL = 8192
MAX_STATEMENTS = 256
_USE = re.compile(r"\s*USE\s+`?([\w$]{1,64})`?\s*$", re.I)

# (sequence id, kept payload, truncated, start ts, tid, bytes on the wire)
_Packet = tuple[int, bytes, bool, int, int, int]

# Response states
_FIRST, _COLUMNS, _AFTER_COLUMNS, _ROWS, _PREPARE_DEFS, _OTHER = range(6)


@dataclass(slots=True)
class _Command(Request):
    command: int = 0
    statements: list[Statement] = field(default_factory=list)
    sql_use: str = ""  # the database of a USE statement
    db: str = ""  # COM_INIT_DB's
    db_cut: bool = False  # the database it switches to was not all captured
    cut: bool = False  # its text was cut short: results past its statements are unknown ones


@dataclass(slots=True)
class _Handshake(Request):
    pass


@dataclass
class MySQLParser(DuplexParser):
    max_pending: int = 64
    namespace: str = ""
    prepared: dict[int, Statement] = field(default_factory=dict)
    state: int = _FIRST
    columns_left: int = 0
    defs_left: list[int] = field(default_factory=list)
    last_seq: int = 0
    resp_bytes: int = 0
    trailing_eof_seq: int = -1  # a prepare's defs may be followed by an EOF with this seq
    prepare_id: int = -1
    eof_allowed: bool = False  # an EOF may close the prepare's parameter definitions
    in_response: bool = False  # the head command's response has begun
    any_seq: bool = False  # after LOCAL INFILE the client used sequence ids too
    handshake_parsed: bool = False

    # -- sync ------------------------------------------------------------------------------------
    def on_lost(self, is_req: bool) -> None:
        # the response in progress, if any, is not followed any more: the next one read
        # starts afresh (at sequence id 1)
        self.state = _FIRST
        self.in_response = self.any_seq = self.eof_allowed = False
        self.defs_left = []
        self.trailing_eof_seq = -1
        self.resp_bytes = 0

    def request_proven(self, seg: Segment) -> bool | None:
        d = seg.data
        if self.pending and isinstance(self.pending[0], _Handshake):
            if len(d) < 4 or (le_int(d, 0, 3) + 4 > len(d) and not seg.skipped):
                return None if d[3:4] in (b"", b"\1") else False
            return len(d) >= 36 and le_int(d, 0, 3) + 4 == len(d) and d[3] == 1
        return _command_chain(d, seg.skipped, self.max_buffer)

    def response_proven(self, seg: Segment) -> bool | None:
        d = seg.data
        if len(d) < 7:
            return None if d[3:4] in (b"", b"\0") and d[4:5] in (b"", b"\x0a") else False
        if not _greeting(d):
            return False
        if le_int(d, 0, 3) + 4 > len(d):
            return None
        if le_int(d, 0, 3) + 4 < len(d):
            return False
        self.pending.clear()
        self.lost_turn = -1  # a greeting starts the connection afresh
        self.handshake_parsed = False
        self.push_pending(_Handshake(seg.ts_ns, seg.tid))
        return True

    def response_plausible(self, seg: Segment) -> bool | None:
        if len(seg.data) < 4:
            return None
        return seg.data[3] == 1

    # -- requests --------------------------------------------------------------------------------
    def request_reader(self, src: Source) -> Reader:
        while True:
            seq, payload, truncated, ts, tid, size = yield from self._packet(src, KEEP_SQL)
            if self.pending and isinstance(self.pending[-1], _Handshake) and seq != 0:
                if not self.handshake_parsed:
                    self.handshake_parsed = self._handshake_response(payload, size - 4,
                                                                     truncated)
                continue
            if seq == 0 and not payload and truncated:
                # the command byte itself was not captured: what the response answers is
                # unknown, so pairing starts again at a provable request
                raise Lost("request_unreadable")
            if seq != 0 or not payload:
                continue  # LOCAL INFILE contents
            self._command(payload, truncated, ts, tid, size)

    def _packet(self, src: Source, keep: int) -> Generator[None, None, _Packet]:
        """One logical packet: (seq, kept payload, truncated, start ts, tid, bytes)."""
        head = yield from src.take(4)
        length, seq = le_int(head, 0, 3), head[3]
        ts, tid = src.start_ts, src.start_tid
        payload, truncated = yield from src.body(length, keep)
        size = length + 4
        while length == MAX_PACKET:  # payloads of 16 MiB and more continue in the next packet
            head = yield from src.take(4)
            length = le_int(head, 0, 3)
            more, cut = yield from src.body(length, keep - len(payload))
            payload += more
            truncated |= cut
            size += length + 4
        return seq, payload, truncated, ts, tid, size

    def _handshake_response(self, p: bytes, length: int, truncated: bool) -> bool:
        """The database of a HandshakeResponse41 (p: its kept payload of `length` bytes);
        False for an SSLRequest."""
        if len(p) < 32:
            if truncated:
                self._namespace_unreadable()
            return True
        caps = le_int(p, 0, 4)
        if length == 32 and caps & CLIENT_SSL:
            return False  # SSLRequest: the full response follows through TLS
        pos = 32
        end = p.find(b"\0", pos)  # user name
        if end < 0:
            return True
        pos = end + 1
        if caps & CLIENT_PLUGIN_AUTH_LENENC:
            n, pos = _lenenc(p, pos)
            pos += n
        elif caps & CLIENT_SECURE_CONNECTION:
            if pos >= len(p):
                return True
            pos += 1 + p[pos]
        else:
            end = p.find(b"\0", pos)
            pos = end + 1 if end >= 0 else len(p)
        if caps & CLIENT_CONNECT_WITH_DB:
            end = p.find(b"\0", pos) if pos < len(p) else -1
            if end < 0 and truncated:
                self._namespace_unreadable()  # the hole took the name, or its end
            elif pos < len(p):
                db = p[pos: end if end >= 0 else len(p)]
                if db:
                    self.namespace = db.decode("utf-8", "replace")[:64]
        return True

    def _namespace_unreadable(self) -> None:
        """The database switched to was not captured whole: a prefix of its name would be
        another name, so the namespace is unknown from here on."""
        self.namespace = ""
        self.failures["namespace_unreadable"] += 1

    def _command(self, p: bytes, truncated: bool, ts: int, tid: int, size: int) -> None:
        cmd = p[0]
        if cmd in NO_RESPONSE:
            if cmd == COM_STMT_CLOSE and len(p) >= 5:
                self.prepared.pop(le_int(p, 1, 4), None)
            return
        item = _Command(ts, tid, size, cmd)
        if cmd in (COM_QUERY, COM_STMT_PREPARE):
            sql_bytes = p[1:]
            if sql_bytes[:2] == b"\0\x01":  # query attributes: none (count 0, one set)
                sql_bytes = sql_bytes[2:]
            sql = sql_bytes.decode("utf-8", "replace")
            cut = truncated or len(p) >= KEEP_SQL
            found = statements(sql, "mysql", cut) or (Statement(""),)
            item.statements = list(found if cmd == COM_QUERY else found[:1])
            item.cut = cut
            use = _USE.match(sql) if cmd == COM_QUERY else None
            item.sql_use = use.group(1) if use else ""
            item.db_cut = bool(use) and truncated
        elif cmd == COM_STMT_EXECUTE:
            # its statement id not captured whole, or not prepared where this parser saw it
            stmt = self.prepared.get(le_int(p, 1, 4)) if len(p) >= 5 else None
            if stmt is None:
                self.failures["statement_unknown" if len(p) >= 5 or not truncated
                              else "statement_unreadable"] += 1
            item.statements = [stmt or Statement("")]
        elif cmd == COM_INIT_DB:
            item.db = p[1:65].decode("utf-8", "replace")
            item.db_cut = truncated
        elif cmd == COM_CHANGE_USER:
            self.handshake_parsed = True  # its packet is no HandshakeResponse41
            self.push_pending(_Handshake(ts, tid))
            return
        self.push_pending(item)

    # -- responses -------------------------------------------------------------------------------
    def response_reader(self, src: Source) -> Reader:
        while True:
            seq, p, truncated, _, _, size = yield from self._packet(src, 1024)
            self.resp_bytes += size
            if not p and not truncated:
                continue
            if seq == self.trailing_eof_seq and size == 9 and p[:1] == b"\xfe":
                self.trailing_eof_seq = -1
                continue
            self.trailing_eof_seq = -1
            head = self.pending[0] if self.pending else None
            if isinstance(head, _Handshake):
                if not p:
                    raise Lost("response_unreadable")  # the end of the login, or more of it?
                if p[0] in (0x00, 0xFF) and seq != 0:
                    self.pending.popleft()
                    self.state = _FIRST
                    self.resp_bytes = 0
                elif seq == 0 and p[0] == 0x0A:
                    head.start_ns = src.ts
                continue
            if head is None:
                continue  # e.g. an error the server sends before it closes the connection
            expected = (self.last_seq + 1) & 0xFF if self.in_response else 1
            if seq != expected and not self.any_seq:
                if seq != 1:
                    raise Lost("bad_sequence")
                # a new response: the head's ended where this parser could not tell
                self.failures["response_incomplete"] += 1
                self.dropped(self.pending.popleft())
                self.state = _FIRST
                self.in_response = False
                if not self.pending:
                    continue
                head = self.pending[0]
            self.any_seq = False
            self.last_seq = seq
            self.in_response = True
            self._response(head, p, size, src.ts)

    def _response(self, cmd: _Command, p: bytes, size: int, ts: int) -> None:
        # p is the kept payload (a hole may have cut it short); the packet's shape is told by
        # its length on the wire
        length = size - 4
        if not p:
            # Its first byte was not captured: a column or parameter definition is one all
            # the same (never 5 bytes long, as an EOF is); anything else could be a row, OK,
            # EOF or error.
            if self.state == _COLUMNS or (self.state == _PREPARE_DEFS and length != 5):
                p = b"\0"
            else:
                raise Lost("response_unreadable")
        first = p[0]
        if self.state == _FIRST:
            if first == 0xFF:
                self._done(cmd, ts, error=self._error_code(p))
            elif cmd.command == COM_STMT_PREPARE and first == 0x00 and length >= 12:
                if len(p) < 12:  # how many definitions follow was not captured
                    raise Lost("response_unreadable")
                self.prepare_id = le_int(p, 1, 4)
                self.defs_left = [n for n in (le_int(p, 7, 2), le_int(p, 5, 2)) if n]
                self._prepared(cmd)
                if self.defs_left:
                    self.state = _PREPARE_DEFS
                else:
                    self._done(cmd, ts, emit=False)
            elif first == 0x00 or (first == 0xFE and length < 9):
                self._result_end(cmd, ts, self._ok_status(cmd, p, length))
            elif first == 0xFB:
                self.any_seq = True  # LOCAL INFILE: the client sends the file, then OK/ERR
            elif cmd.command in (COM_QUERY, COM_STMT_EXECUTE, COM_STMT_FETCH, COM_FIELD_LIST):
                if cmd.command in (COM_STMT_FETCH, COM_FIELD_LIST):
                    self.state = _ROWS
                else:
                    n, end = _lenenc(p, 0)
                    if end > len(p):
                        raise Lost("response_unreadable")  # the column count was not captured
                    self.columns_left = n
                    self.state = _COLUMNS if n else _ROWS
            else:
                self._done(cmd, ts, emit=False)  # a one-packet answer (statistics, ...)
        elif self.state == _COLUMNS:
            self.columns_left -= 1
            if self.columns_left <= 0:
                self.state = _AFTER_COLUMNS
        elif self.state == _AFTER_COLUMNS:
            self.state = _ROWS
            if first == 0xFE and length == 5:
                status = le_int(p, 3, 2) if len(p) == 5 else self._status_unreadable(0)
                if status & SERVER_STATUS_CURSOR_EXISTS:
                    self._result_end(cmd, ts, 0)
                return
            self._rows(cmd, p, length, ts)
        elif self.state == _ROWS:
            self._rows(cmd, p, length, ts)
        elif self.state == _PREPARE_DEFS:
            if self.eof_allowed and first == 0xFE and length == 5:
                self.eof_allowed = False
                return
            self.eof_allowed = False
            self.defs_left[0] -= 1
            if self.defs_left[0] == 0:
                self.defs_left.pop(0)
                self.eof_allowed = True
                if not self.defs_left:
                    self.trailing_eof_seq = (self.last_seq + 1) & 0xFF
                    self._done(cmd, ts, emit=False)

    def _rows(self, cmd: _Command, p: bytes, length: int, ts: int) -> None:
        if p[0] == 0xFF:
            self._done(cmd, ts, error=self._error_code(p))
        elif p[0] == 0xFE and length < MAX_PACKET:
            self._result_end(cmd, ts, self._ok_status(cmd, p, length))

    def _ok_status(self, cmd: _Command, p: bytes, length: int) -> int:
        """Status flags of an OK or EOF packet; where a hole took them, whether more results
        follow is guessed from the statements the command's text holds (and counted)."""
        if p[0] == 0xFE and length == 5:
            if len(p) == 5:
                return le_int(p, 3, 2)
        else:
            _, pos = _lenenc(p, 1)
            _, pos = _lenenc(p, pos)
            if pos + 2 <= len(p):
                return le_int(p, pos, 2)
        more = len(cmd.statements) > 1 or cmd.cut
        return self._status_unreadable(SERVER_MORE_RESULTS_EXISTS if more else 0)

    def _status_unreadable(self, guess: int) -> int:
        self.failures["status_unreadable"] += 1
        return guess

    def _error_code(self, p: bytes) -> str:
        if len(p) >= 3:
            return str(le_int(p, 1, 2))
        self.failures["status_unreadable"] += 1
        return "ERROR"

    def _prepared(self, cmd: _Command) -> None:
        if len(self.prepared) >= MAX_STATEMENTS:
            self.prepared.pop(next(iter(self.prepared)))
            self.failures["statement_evicted"] += 1
        self.prepared[self.prepare_id] = cmd.statements[0] if cmd.statements else Statement("")

    def _result_end(self, cmd: _Command, ts: int, status: int) -> None:
        """A result ended well; with more results to come the command goes on."""
        if status & SERVER_MORE_RESULTS_EXISTS:
            self.state = _FIRST
            if len(cmd.statements) > 1 or cmd.cut:
                self._emit(cmd, cmd.statements.pop(0) if cmd.statements else Statement(""),
                           ts, "")
                cmd.request_bytes = 0
            return
        self._done(cmd, ts)

    def _done(self, cmd: _Command, ts: int, error: str = "", emit: bool = True) -> None:
        self.pending.popleft()
        self.state = _FIRST
        self.in_response = False
        if not error:
            if cmd.db_cut and (cmd.command == COM_INIT_DB or len(cmd.statements) == 1):
                self._namespace_unreadable()
            elif cmd.command == COM_INIT_DB and cmd.db:
                self.namespace = cmd.db
            elif cmd.sql_use and len(cmd.statements) == 1:
                self.namespace = cmd.sql_use
        if cmd.command == COM_STMT_PREPARE and not error:
            emit = False
        if emit and (cmd.statements or cmd.cut):
            self._emit(cmd, cmd.statements[0] if cmd.statements else Statement(""), ts, error)
        self.resp_bytes = 0

    def _emit(self, cmd: _Command, stmt: Statement, ts: int, error: str) -> None:
        self.out.append(Exchange(
            start_ns=cmd.start_ns, end_ns=ts, operation=stmt.operation,
            target=stmt.collection, status=error, error_type=error, namespace=self.namespace,
            request_bytes=cmd.request_bytes, response_bytes=self.resp_bytes, tid=cmd.tid,
            summary=stmt.summary))
        self.resp_bytes = 0

    def abort(self, item: object, ts_ns: int) -> Exchange | None:
        if not isinstance(item, _Command) or not item.statements \
                or item.command == COM_STMT_PREPARE:
            return None
        stmt = item.statements[0]
        return Exchange(start_ns=item.start_ns, end_ns=ts_ns, operation=stmt.operation,
                        target=stmt.collection, namespace=self.namespace,
                        request_bytes=item.request_bytes, tid=item.tid, summary=stmt.summary,
                        aborted=True)

    def dropped(self, item: object) -> None:
        if isinstance(item, _Command) and item.statements:
            self.failures["request_lost"] += 1


# -- helpers ------------------------------------------------------------------------------------
def _lenenc(p: bytes, pos: int) -> tuple[int, int]:
    """A length-encoded integer at pos: (value, position after it)."""
    if pos >= len(p):
        return 0, pos
    b = p[pos]
    if b < 0xFB:
        return b, pos + 1
    width = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(b, 0)
    return le_int(p, pos + 1, width), pos + 1 + width


def _greeting(d: bytes) -> bool:
    """Handshake v10: seq 0, protocol 10, a version string starting with a digit."""
    return (len(d) >= 7 and d[3] == 0 and d[4] == 0x0A and 0x31 <= d[5] <= 0x39
            and (d[6] == 0x2E or 0x30 <= d[6] <= 0x39) and 40 <= le_int(d, 0, 3) <= 1024)


def _command_chain(d: bytes, skipped: int, held_max: int) -> bool | None:
    """d is whole command packets (sequence id 0), the last may run into the hole; None: so
    far the beginning of one.

    A packet that goes on in the next call (a client writing a long one in parts) is proven
    only when the bytes that complete it come: a header that happens to lie in the tail of
    an older message would otherwise swallow up to the length it claims. Only a statement
    too long to be held unsynced (held_max bytes) is taken on its header and the start of
    its text, as the first call of a long one is."""
    pos, sql = 0, False
    for _ in range(64):
        if pos > len(d):  # the packet goes on past these bytes
            return True if sql and pos > held_max else None
        if pos == len(d):
            return None if not skipped else False
        if pos + 5 > len(d):
            return None if d[pos + 3: pos + 4] in (b"", b"\0") and not skipped else False
        length, seq = le_int(d, pos, 3), d[pos + 3]
        if seq != 0 or length == 0 or d[pos + 4] not in COMMANDS:
            return False
        sql = d[pos + 4] in (COM_QUERY, COM_STMT_PREPARE) and pos + 5 < len(d) \
            and _sql_start(d[pos + 5])
        pos += 4 + length
        if pos == len(d) or (skipped and pos > len(d)):
            return True
    return False


# -- classification (the mirror of bpf/l7/proto_mysql.h) ---------------------------------------
def _sql_start(b: int) -> bool:
    return (0x41 <= b <= 0x5A) or (0x61 <= b <= 0x7A) or b in b" \t\r\n(/-"


def _name_start(b: int) -> bool:
    return (0x30 <= b <= 0x39) or (0x41 <= b <= 0x5A) or (0x61 <= b <= 0x7A) or b in b"_$"


def classify(d: bytes, call_len: int) -> int:
    """1: a server greeting; 2: a command packet; 0: neither."""
    n = len(d)
    if n < 5:
        return 0
    length = le_int(d, 0, 3)
    if _greeting(d):
        return 1
    if d[3] != 0 or length + 4 != call_len:
        return 0
    cmd = d[4]
    if cmd in (COM_QUERY, COM_STMT_PREPARE):
        if length < 2 or n < 6 or not _sql_start(d[5]):
            return 0
        return 2 if 0 not in d[5: min(n, length + 4)] else 0
    if cmd == COM_STMT_EXECUTE:
        return 2 if length >= 10 and n >= 14 and d[9] < 0x20 and d[10:14] == b"\1\0\0\0" else 0
    if cmd == COM_INIT_DB:
        ok = length >= 2 and n >= 6 and 0 not in d[5: min(n, length + 4)]
        return 2 if ok and _name_start(d[5]) else 0
    if cmd == COM_PING:
        return 2 if length == 1 else 0
    return 0


class MySQL(Protocol):
    name = "mysql"
    proto_id = c.Proto.MYSQL
    transports = frozenset({Transport.TCP})
    kind = "db"

    def classify(self, peek: bytes, direction: Direction, transport: Transport, *,
                 lport: int = 0, rport: int = 0, call_len: int = 0) -> Role:
        if transport != Transport.TCP:
            return Role.UNKNOWN
        what = classify(peek[: c.L7_PEEK], max(call_len, len(peek)))
        if what == 0:
            return Role.UNKNOWN
        server_speaks = (what == 1) == (direction == Direction.OUT)
        return Role.SERVER if server_speaks else Role.CLIENT

    def parser(self, conn: ConnInfo) -> StreamParser:
        return MySQLParser(conn)


PROTOCOL = MySQL()
