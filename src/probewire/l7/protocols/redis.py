"""Redis (RESP2 and RESP3): one exchange per command.

Requests: RESP arrays of bulk strings and inline commands, pipelined or not (each command its
own exchange, paired with replies in order). ``operation`` is the command name, upper case;
``namespace`` the database index of the last SELECT (or "0" after RESET) when the parser saw
one: without it the database is not known (a client on database 0 never says so).

Replies: every RESP2/RESP3 type, nested to 32 levels, values passed over without being kept.
An error reply (``-ERR ...``, ``-WRONGTYPE ...``, RESP3 blob errors) gives status and
error_type = its prefix (the first word, e.g. "WRONGTYPE"). RESP3 push frames and RESP2
pub/sub messages are never paired with commands; (P|S)SUBSCRIBE is answered by its first
confirmation (the others, one per channel, are absorbed).

Transactions: commands between MULTI and EXEC are answered QUEUED; each becomes an exchange
when EXEC answers, with the status of its own element of EXEC's array (so a WRONGTYPE inside
a transaction counts), and EXEC is an exchange of its own. A command refused at queue time is
an error exchange at once; when EXEC then fails (EXECABORT) the queued commands take EXEC's
error; when WATCH made EXEC answer nil, or DISCARD dropped them, they never ran and are not
exchanges. CLIENT REPLY OFF/SKIP: commands sent without a reply are exchanges of zero duration.
MONITOR: the connection stops being parsed (its replies are a feed).

Sync: requests are proven by a segment of whole commands; replies are in sync from the first
reply segment after a command sent after the loss.

Bounds per connection: 64 KiB per line (Redis's own inline limit), 2 arguments kept per command
(64 bytes each), 1024 pending commands, 1024 commands held in a transaction, 32 levels.
"""

from __future__ import annotations

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
from probewire.l7.stream import DuplexParser, Lost, Reader, Request, Source

MAX_LINE = 65536
MAX_ARGS = 1 << 20
MAX_BULK = 512 << 20
MAX_DEPTH = 32
MAX_TX = 1024
KEEP_ARG = 64
REPLY_TYPES = frozenset(b"+-:$*%~>_,#(!=|")
AGGREGATES = frozenset(b"*%~>|")
SUBSCRIBE = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE",
                       "SUNSUBSCRIBE"})
CONFIRMATIONS = frozenset({b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe",
                           b"punsubscribe", b"sunsubscribe"})
MESSAGES = frozenset({b"message", b"pmessage", b"smessage"})


@dataclass(slots=True)
class _Cmd(Request):
    name: str = ""
    namespace: str = ""
    queued: bool = False  # sent inside MULTI
    channels: int = 0  # (P|S)(UN)SUBSCRIBE: confirmations to expect
    arg: str = ""


@dataclass(slots=True)
class _Reply:
    kind: int
    error: str = ""
    first: bytes | None = None  # an aggregate's first element, when a string
    element_errors: list[str] = field(default_factory=list)
    null: bool = False


def _int(b: bytes) -> int | None:
    body = b[1:] if b[:1] == b"-" else b
    if not body or len(body) > 19 or not body.isdigit():
        return None
    return int(b)


def _prefix(text: bytes) -> str:
    word = text.split(b" ", 1)[0][:32]
    return word.decode("ascii", "replace").upper() if word.isascii() and word else "ERR"


def _name(raw: bytes) -> str:
    """The command name, upper case; "" when it is not one (a name is a label value)."""
    name = raw[:32].upper()
    ok = all(0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or b in b"_-.|:" for b in name)
    return name.decode("ascii") if ok else ""


@dataclass
class RedisParser(DuplexParser):
    namespace: str = ""  # as the requests left it
    in_multi: bool = False
    tx: list[_Cmd] = field(default_factory=list)
    subscribed: bool = False
    absorb: int = 0  # confirmations still to come for an answered SUBSCRIBE
    reply_off: bool = False
    skip_next: bool = False
    monitor: bool = False

    # -- sync ------------------------------------------------------------------------------------
    def on_lost(self, is_req: bool) -> None:
        if is_req:  # the EXEC or DISCARD may be among the lost bytes
            self.in_multi = self.skip_next = False
        # Queued commands whose EXEC may be among the lost replies: a later EXEC's array
        # would be paired with them (its last elements are those queued after the loss).
        if self.tx:
            self.failures["request_lost"] += len(self.tx)
            self.tx = []
    def request_proven(self, seg: Segment) -> bool | None:
        if self.monitor:
            return False
        return _commands_chain(seg.data, seg.skipped, self.max_buffer)

    def response_plausible(self, seg: Segment) -> bool | None:
        return not self.monitor and bool(seg.data) and seg.data[0] in REPLY_TYPES

    # -- requests --------------------------------------------------------------------------------
    def request_reader(self, src: Source) -> Reader:
        while True:
            first = yield from src.peek(1)
            if first == b"*":
                line = yield from src.line(MAX_LINE)
                ts, tid = src.start_ts, src.start_tid
                n = _int(line[1:])
                if n is None or n > MAX_ARGS:
                    raise Lost("bad_request")
                size = len(line) + 2
                args: list[bytes] = []
                unreadable = False
                for i in range(n):
                    head = yield from src.line(32)
                    length = _int(head[1:])
                    if head[:1] != b"$" or length is None or not 0 <= length <= MAX_BULK:
                        raise Lost("bad_request")
                    data, cut = yield from src.body(length + 2, KEEP_ARG if i < 3 else 0)
                    if i < 3:
                        # A value cut by a hole before its kept bytes is none (the first
                        # letters of a name could be another's); a hole over its CRLF only
                        # leaves it whole.
                        whole = not cut or len(data) >= min(length, KEEP_ARG)
                        args.append(data[:length] if whole else b"")
                        unreadable |= i == 0 and not whole
                    size += len(head) + 4 + length
                if n > 0:
                    if unreadable:
                        if self.in_multi:  # EXEC or DISCARD, perhaps: the transaction is lost
                            raise Lost("request_unreadable")
                        self.failures["command_unreadable"] += 1
                    self._command(args, n, ts, tid, size)
            else:
                line = yield from src.line(MAX_LINE)
                words = line.split()
                if words:
                    self._command(words[:3], len(words), src.start_ts, src.start_tid,
                                  len(line) + 2)

    def _command(self, args: list[bytes], argc: int, ts: int, tid: int, size: int) -> None:
        name = _name(args[0])
        arg = args[1][:KEEP_ARG].decode("utf-8", "replace") if len(args) > 1 else ""
        item = _Cmd(ts, tid, size, name, self.namespace, queued=self.in_multi, arg=arg)
        if name == "MULTI":
            self.in_multi = True
        elif name in ("EXEC", "DISCARD"):
            self.in_multi = False
            item.queued = False
        elif name == "SELECT" and arg.isdigit():
            self.namespace = arg
        elif name in SUBSCRIBE:
            self.subscribed = True
            item.channels = max(1, argc - 1)
        elif name == "MONITOR":
            self.monitor = True
        elif name == "RESET":
            self.in_multi = self.subscribed = self.reply_off = False
            self.namespace = "0"
        no_reply = self.reply_off or self.skip_next
        self.skip_next = False
        if name == "CLIENT" and arg.upper() == "REPLY" and len(args) > 2:
            mode = args[2].upper()
            if mode == b"ON":
                self.reply_off = no_reply = False
            elif mode == b"OFF":
                self.reply_off = no_reply = True
            elif mode == b"SKIP":
                self.skip_next = True
                no_reply = True
        if no_reply:
            self._emit(item, ts, "")
            return
        self.push_pending(item)

    # -- replies ---------------------------------------------------------------------------------
    def response_reader(self, src: Source) -> Reader:
        while True:
            if self.monitor and not self.pending:
                raise Lost("monitor")
            reply: _Reply = yield from self._reply(src)
            self._answer(reply, src.ts)

    def _reply(self, src: Source) -> Generator[None, None, _Reply]:
        reply: _Reply | None = None
        stack: list[int] = []  # elements still to come in each open aggregate
        while True:
            line = yield from src.line(MAX_LINE)
            if not line or line[0] not in REPLY_TYPES:
                raise Lost("bad_reply")
            kind = line[0]
            error = ""
            value: bytes | None = None
            count = 0
            null = False
            if kind == 0x2D:  # -
                error = _prefix(line[1:])
            elif kind in b"$=!":
                n = _int(line[1:])
                if n is None or n > MAX_BULK:
                    raise Lost("bad_reply")
                if n < 0:
                    null = True
                else:
                    data, _ = yield from src.body(n + 2, KEEP_ARG)
                    value = data[:n]
                    if kind == 0x21:  # !
                        error = _prefix(value)
            elif kind in AGGREGATES:
                n = _int(line[1:])
                if n is None or n > MAX_ARGS:
                    raise Lost("bad_reply")
                null = n < 0
                count = max(0, n) * (2 if kind in b"%|" else 1)
            else:
                value = line[1:]
            depth = len(stack)
            # A top-level RESP3 attribute (|) describes the reply that follows it.
            if depth == 0 and not (kind == 0x7C and count):
                reply = _Reply(kind, error, null=null)
            elif depth == 1 and reply is not None:
                if value is not None and not reply.element_errors:
                    reply.first = value
                if len(reply.element_errors) < MAX_TX:
                    reply.element_errors.append(error)
            if stack:
                stack[-1] -= 1
            if count:
                if len(stack) >= MAX_DEPTH:
                    raise Lost("too_deep")
                stack.append(count)
            while stack and stack[-1] == 0:
                stack.pop()
            if not stack and reply is not None:
                return reply

    def _answer(self, reply: _Reply, ts: int) -> None:
        head = self.pending[0] if self.pending else None
        if reply.kind in b"*>" and reply.first is not None:
            word = reply.first.lower()
            if word in MESSAGES and (reply.kind == 0x3E or self.subscribed):
                return
            if word in CONFIRMATIONS:
                if head is not None and head.name in SUBSCRIBE:
                    self.pending.popleft()
                    self.absorb = head.channels - 1
                    self._done(head, reply, ts)
                elif self.absorb > 0:
                    self.absorb -= 1
                elif not (self.subscribed or reply.kind == 0x3E):
                    self._pair(head, reply, ts)
                return
        if reply.kind == 0x3E:  # push
            return
        self._pair(head, reply, ts)

    def _pair(self, head: _Cmd | None, reply: _Reply, ts: int) -> None:
        if head is None:
            self.failures["reply_unmatched"] += 1
            return
        self.pending.popleft()
        self._done(head, reply, ts)

    def _done(self, cmd: _Cmd, reply: _Reply, ts: int) -> None:
        if cmd.queued:
            if reply.error:
                self._emit(cmd, ts, reply.error)
            elif len(self.tx) < MAX_TX:
                self.tx.append(cmd)
            else:
                self.failures["transaction_overflow"] += 1
            return
        if cmd.name == "EXEC":
            held, self.tx = self.tx, []
            if reply.error:
                for q in held:
                    self._emit(q, ts, reply.error)
            elif not reply.null:
                # commands queued before a loss are not held: theirs are the first elements
                errors = reply.element_errors[-len(held):] if held else []
                for i, q in enumerate(held):
                    self._emit(q, ts, errors[i] if i < len(errors) else "")
        elif cmd.name == "DISCARD":
            self.tx = []
        elif cmd.name == "SELECT" and reply.error and self.namespace == cmd.arg:
            self.namespace = cmd.namespace
        self._emit(cmd, ts, reply.error)

    def _emit(self, cmd: _Cmd, ts: int, error: str) -> None:
        ns = cmd.namespace
        self.out.append(Exchange(start_ns=cmd.start_ns, end_ns=max(ts, cmd.start_ns),
                                 operation=cmd.name, status=error, error_type=error,
                                 namespace=ns, request_bytes=cmd.request_bytes, tid=cmd.tid,
                                 summary=cmd.name))

    def abort(self, item: object, ts_ns: int) -> Exchange | None:
        if not isinstance(item, _Cmd) or item.queued:
            return None
        return Exchange(start_ns=item.start_ns, end_ns=ts_ns, operation=item.name,
                        namespace=item.namespace, request_bytes=item.request_bytes,
                        tid=item.tid, summary=item.name, aborted=True)


def _partial_int(b: bytes) -> bool:
    """b may begin a length line: digits, perhaps the CR that ends them."""
    digits = b[:-1] if b.endswith(b"\r") else b
    return digits.isdigit() or not b


def _commands_chain(d: bytes, skipped: int, held_max: int) -> bool | None:
    """d is whole commands (RESP arrays of bulk strings); the last value may go on past d
    only into the hole. None: so far the beginning of one.

    A command that goes on in the next call (a client writing a long one in parts) is
    proven only when the bytes that complete it come: heads that happen to lie in the tail
    of an older value would otherwise swallow up to the length they claim. Only a command
    too long to be held unsynced (held_max bytes) is taken on its heads, as the first call
    of a long one is."""
    pos, n = 0, len(d)
    if not n:
        return False
    more = None if not skipped else False  # what a command cut at the end of d means
    for _ in range(4096):
        if pos == n:
            return True
        if d[pos] == 0x2A:  # *
            end = d.find(b"\r\n", pos, pos + 24)
            if end < 0:
                return more if n - pos < 24 and _partial_int(d[pos + 1:]) else False
            argc = _int(d[pos + 1: end])
            if argc is None or not 0 < argc <= MAX_ARGS:
                return False
            pos = end + 2
            for _ in range(argc):
                if pos >= n:
                    return more
                end = d.find(b"\r\n", pos, pos + 24)
                if end < 0:
                    ok = d[pos:pos + 1] == b"$" and _partial_int(d[pos + 1:])
                    return more if ok and n - pos < 24 else False
                length = _int(d[pos + 1: end]) if d[pos:pos + 1] == b"$" else None
                if length is None or not 0 <= length <= MAX_BULK:
                    return False
                pos = end + 2 + length + 2
                if pos > n:  # the value goes on past these bytes
                    return True if skipped or pos > held_max else None
                if d[pos - 2: pos] != b"\r\n":
                    return False
        elif pos == 0:
            # an inline command proves nothing: the tail of a value looks the same
            return False
        else:
            end = d.find(b"\r\n", pos, pos + MAX_LINE)
            if end < 0:
                return more
            pos = end + 2
    return False


# -- classification (the mirror of bpf/l7/proto_redis.h) ---------------------------------------
def _digit(b: int) -> bool:
    return 0x30 <= b <= 0x39


def classify(d: bytes) -> bool:
    """d starts a RESP command: *<1-5 digits>\\r\\n$<1-3 digits>\\r\\n<letter>."""
    n = len(d)
    if n < 9 or d[0] != 0x2A or not _digit(d[1]) or d[1] == 0x30:
        return False
    i = 2
    while i < 6 and i < n and _digit(d[i]):
        i += 1
    if i + 4 >= n or d[i] != 0x0D or d[i + 1] != 0x0A or d[i + 2] != 0x24:
        return False
    i += 3
    if not _digit(d[i]) or d[i] == 0x30:
        return False
    j = i + 1
    while j < i + 3 and j < n and _digit(d[j]):
        j += 1
    if j + 2 >= n or d[j] != 0x0D or d[j + 1] != 0x0A:
        return False
    b = d[j + 2]
    return (0x41 <= b <= 0x5A) or (0x61 <= b <= 0x7A)


class Redis(Protocol):
    name = "redis"
    proto_id = c.Proto.REDIS
    transports = frozenset({Transport.TCP})
    kind = "db"

    def classify(self, peek: bytes, direction: Direction, transport: Transport, *,
                 lport: int = 0, rport: int = 0, call_len: int = 0) -> Role:
        if transport != Transport.TCP or not classify(peek[: c.L7_PEEK]):
            return Role.UNKNOWN
        return Role.CLIENT if direction == Direction.OUT else Role.SERVER

    def parser(self, conn: ConnInfo) -> StreamParser:
        return RedisParser(conn)


PROTOCOL = Redis()
