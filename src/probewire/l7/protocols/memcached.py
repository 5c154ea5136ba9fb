"""memcached text protocol (classic and meta commands): one exchange per command.

Requests: retrieval (get/gets/gat/gats with any number of keys: one exchange), storage
(set/add/replace/append/prepend/cas with their data blocks), delete/incr/decr/touch,
stats/version/verbosity/flush_all, and the meta commands mg/ms/md/ma/mn/me. ``operation`` is
the command, upper case ("GET", "MG"). ``noreply`` commands get no answer: they are exchanges
of zero duration (the client does not wait). Meta commands with the ``q`` flag get an answer
only when it is not the usual one (mg: a miss, EN; ms/md/ma: success, HD): a quiet command
is answered by the first reply that cannot be its own (of its hidden kind, another opaque
``O`` token, or the MN of a later ``mn``), and ends then with its hidden answer.

Replies: VALUE lines with their data blocks up to END, VA with its block, STAT lines up to END,
and one-line answers. A multi-key reply whose middle the kernel skipped (a call over 256 KiB:
further VALUE lines are in the hole) ends at the END its call's last shipped bytes carry.
ERROR, CLIENT_ERROR and SERVER_ERROR are errors (status and error_type the keyword);
NOT_FOUND, NOT_STORED, EXISTS and misses are not.

Sync: requests are proven by a segment of whole commands of the protocol (data blocks
included); replies are in sync from the first reply segment after a command sent after
the loss.

Bounds per connection: 64 KiB per line (a multi-key get), data blocks passed over unkept,
1024 pending commands.
"""

from __future__ import annotations

from dataclasses import dataclass

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
MAX_BLOCK = 1 << 30
STORAGE = frozenset({b"set", b"add", b"replace", b"append", b"prepend", b"cas"})
NOREPLY_ABLE = STORAGE | {b"delete", b"incr", b"decr", b"touch", b"flush_all", b"verbosity"}
META = frozenset({b"mg", b"ms", b"md", b"ma", b"mn", b"me"})
COMMANDS = STORAGE | META | {
    b"get", b"gets", b"gat", b"gats", b"delete", b"incr", b"decr", b"touch", b"stats",
    b"version", b"verbosity", b"flush_all", b"quit", b"cache_memlimit", b"shutdown",
    b"lru_crawler", b"slabs", b"watch", b"lru", b"misbehave", b"debugtime"}
ERRORS = frozenset({b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"})
HIDDEN = {b"mg": b"EN", b"ms": b"HD", b"md": b"HD", b"ma": b"HD"}  # what q leaves unsaid


@dataclass(slots=True)
class _Cmd(Request):
    name: bytes = b""
    quiet: bool = False
    opaque: bytes = b""


def _count(b: bytes) -> int | None:
    return int(b) if b.isdigit() and len(b) <= 10 and int(b) <= MAX_BLOCK else None


@dataclass
class MemcachedParser(DuplexParser):
    # -- sync ------------------------------------------------------------------------------------
    def request_proven(self, seg: Segment) -> bool | None:
        return _commands_chain(seg.data, seg.skipped, self.max_buffer)

    def response_plausible(self, seg: Segment) -> bool | None:
        d = seg.data
        return bool(d) and (0x41 <= d[0] <= 0x5A or 0x30 <= d[0] <= 0x39)

    # -- requests --------------------------------------------------------------------------------
    def request_reader(self, src: Source) -> Reader:
        while True:
            line = yield from src.line(MAX_LINE)
            ts, tid = src.start_ts, src.start_tid
            words = line.split()
            size = len(line) + 2
            # Names are case-sensitive ("GET" is answered ERROR, and its data block, if it
            # seemed to announce one, is a line of its own); an empty line is answered ERROR.
            name = words[0] if words else b""
            block = _block_len(name, words)
            if block is not None:
                yield from src.body(block + 2, 0)
                size += block + 2
            if name == b"quit":
                continue
            # a command the server does not know is answered ERROR: an error exchange
            item = _Cmd(ts, tid, size, name if name in COMMANDS else b"")
            if name in NOREPLY_ABLE and words[-1] == b"noreply":
                self._emit(item, ts, "")
                continue
            if name in META:
                flags = words[2:] if name not in (b"mn",) else []
                if name == b"ms":
                    flags = words[3:]
                item.quiet = b"q" in flags and name in HIDDEN
                item.opaque = next((f[1:] for f in flags if f[:1] == b"O"), b"")
            self.push_pending(item)

    # -- replies ---------------------------------------------------------------------------------
    def response_reader(self, src: Source) -> Reader:
        values = False  # inside a retrieval reply, after a whole VALUE block
        while True:
            try:
                line = yield from src.line(MAX_LINE)
            except Lost as lost:
                # A multi-key reply longer than the kernel ships whole lost its middle, VALUE
                # lines included; the call's last bytes still come, and end with its END.
                if not values or lost.reason != "hole_at_boundary":
                    raise
                yield from src.past_hole(b"END\r\n", MAX_BLOCK)
                line = b"END"
            words = line.split()
            word = words[0] if words else b""
            if word == b"VALUE" or word == b"VA":
                size = _count(words[3] if word == b"VALUE" and len(words) > 3 else
                              words[1] if word == b"VA" and len(words) > 1 else b"")
                if size is None:
                    raise Lost("bad_reply")
                yield from src.body(size + 2, 0)
                if word == b"VALUE":
                    values = True
                    continue
            elif word in (b"STAT", b"ITEM"):
                continue
            values = False
            self._answer(word, words, src.ts)

    def _answer(self, word: bytes, words: list[bytes], ts: int) -> None:
        opaque = next((w[1:] for w in words[1:] if w[:1] == b"O"), b"")
        while self.pending:
            head: _Cmd = self.pending[0]
            if not head.quiet:
                break
            hidden = word == HIDDEN.get(head.name) or word == b"MN" \
                or (head.opaque and opaque and head.opaque != opaque)
            if not hidden:
                break
            self.pending.popleft()
            self._emit(head, ts, "")
        if not self.pending:
            self.failures["reply_unmatched"] += 1
            return
        head = self.pending.popleft()
        error = word.decode("ascii") if word in ERRORS else ""
        self._emit(head, ts, error)

    def _emit(self, cmd: _Cmd, ts: int, error: str) -> None:
        op = cmd.name.decode("ascii").upper()
        self.out.append(Exchange(start_ns=cmd.start_ns, end_ns=max(ts, cmd.start_ns),
                                 operation=op, status=error, error_type=error,
                                 request_bytes=cmd.request_bytes, tid=cmd.tid, summary=op))

    def abort(self, item: object, ts_ns: int) -> Exchange | None:
        if not isinstance(item, _Cmd):
            return None
        op = item.name.decode("ascii").upper()
        return Exchange(start_ns=item.start_ns, end_ns=ts_ns, operation=op,
                        request_bytes=item.request_bytes, tid=item.tid, summary=op,
                        aborted=True)


def _block_len(name: bytes, words: list[bytes]) -> int | None:
    """The data block a command line announces (None: none)."""
    if name in STORAGE and len(words) >= 5:
        return _count(words[4])
    if name == b"ms" and len(words) >= 3:
        return _count(words[2])
    return None


def _commands_chain(d: bytes, skipped: int, held_max: int) -> bool | None:
    """d is whole commands (data blocks included; the last may go on only into the hole);
    None: so far the beginning of one.

    A data block that goes on in the next call (a client writing a long one in parts) is
    proven only when the bytes that complete it come: a line that happens to lie in the
    tail of an older block would otherwise swallow up to the length it claims. Only a block
    too long to be held unsynced (held_max bytes) is taken on its command line, as the
    first call of a long one is."""
    pos, n = 0, len(d)
    if not n:
        return False
    more = None if not skipped else False
    for _ in range(4096):
        if pos == n:
            return True
        end = d.find(b"\r\n", pos, pos + MAX_LINE)
        if end < 0 and pos:
            return more if n - pos < MAX_LINE else False
        if end < 0:
            word = d[pos:].split(b" ", 1)[0].rstrip(b"\r")
            known = any(c.startswith(word) for c in COMMANDS) if b" " not in d[pos:] \
                else word in COMMANDS
            return more if word and known and n - pos < MAX_LINE else False
        words = d[pos:end].split()
        if pos == 0 and (not words or words[0] not in COMMANDS
                         or not d.startswith(words[0]) or b"\n" in d[:end]):
            # A client writes a command name first, and a line ends only at its CRLF
            # (split() would find a name after the LF that ends an older line).
            return False  # after a known command, any line is one (unknown ones: ERROR)
        pos = end + 2
        if not words:
            continue  # an empty line (answered ERROR)
        block = _block_len(words[0], words)
        if block is not None:
            pos += block + 2
            if pos > n:  # the data block goes on past these bytes
                return True if skipped or pos > held_max else None
            if d[pos - 2: pos] != b"\r\n":
                return False
    return False


# -- classification (the mirror of bpf/l7/proto_memcached.h) -----------------------------------
KEYED = (b"get ", b"gets ", b"gat ", b"gats ", b"set ", b"add ", b"replace ", b"append ",
         b"prepend ", b"cas ", b"delete ", b"incr ", b"decr ", b"touch ", b"mg ", b"ms ",
         b"md ", b"ma ", b"me ")
BARE = (b"version\r\n", b"stats\r\n", b"stats ", b"mn\r\n", b"flush_all\r\n", b"flush_all ",
        b"verbosity ")


def classify(d: bytes) -> bool:
    """d starts a command: a keyed one followed by a key byte, or a bare one."""
    for word in KEYED:
        if d.startswith(word):
            return len(d) > len(word) and 0x21 <= d[len(word)] <= 0x7E
    return any(d.startswith(word) for word in BARE)


class Memcached(Protocol):
    name = "memcached"
    proto_id = c.Proto.MEMCACHED
    transports = frozenset({Transport.TCP})
    kind = "db"

    def classify(self, peek: bytes, direction: Direction, transport: Transport, *,
                 lport: int = 0, rport: int = 0, call_len: int = 0) -> Role:
        if transport != Transport.TCP or not classify(peek[: c.L7_PEEK]):
            return Role.UNKNOWN
        return Role.CLIENT if direction == Direction.OUT else Role.SERVER

    def parser(self, conn: ConnInfo) -> StreamParser:
        return MemcachedParser(conn)


PROTOCOL = Memcached()
