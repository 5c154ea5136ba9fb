"""Shared machinery of the request/response parsers: resumable byte readers and sync rules.

Each direction of a connection is a :class:`Source`: the bytes not parsed yet plus the hole
(bytes the call moved that were not captured) that follows them. A protocol's message reader is
a generator that pulls tokens from its Source (``yield from src.take(5)``, ``src.line()``,
``src.body(n, keep)``) and simply yields when it needs more bytes, so a message split at any
boundary parses exactly as the whole one does. A counted body passes over a hole; a header or a
line that runs into a hole cannot be found, and the reader raises :class:`Lost`.

:class:`DuplexParser` runs one reader per direction and owns the sync rules every
request/response protocol here shares:

- a direction that lost sync (or a parser made for a connection picked up mid-stream) picks up
  again only at a segment that starts a message provably: requests by the protocol's proof
  (a segment that parses as whole messages, or a handshake), responses at the first response
  segment that arrives after a request sent after the loss (a request/response client reads
  a response to its end before it sends the next request, so that segment starts one);
- losing the requests loses the pairing too: the pending requests are dropped (counted) and
  the responses wait for the next proven request;
- every loss and drop is counted in ``failures`` with its reason.

Memory per connection is bounded: buffered bytes by ``max_buffer`` (a line or header longer
than that is a failure, not a reason to buffer more), kept message prefixes by each reader's
``keep``, pending requests by ``max_pending`` (the oldest is dropped and counted).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from probewire.l7.protocol import Direction, Exchange, Role, Segment, StreamParser

# A message reader: runs until it needs more bytes (yields), never returns.
Reader = Generator[None, None, None]
Pull = Generator[None, None, Any]


class Lost(Exception):
    """The reader cannot tell where the next message starts (internal to the parsers)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Source:
    """One direction's unparsed bytes, the hole after them, and when each byte came."""

    __slots__ = ("buf", "hole", "marks", "max_buffer", "pos", "start_tid", "start_ts", "tid",
                 "ts")

    def __init__(self, max_buffer: int) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.hole = 0
        self.max_buffer = max_buffer
        self.ts = 0  # the latest segment's
        self.tid = 0
        # (offset in buf, ts, tid) of each segment's first byte still buffered
        self.marks: list[tuple[int, int, int]] = []
        self.start_ts = 0  # where the token read last began
        self.start_tid = 0

    def push(self, data: bytes, skipped: int, ts: int, tid: int) -> None:
        if self.pos:
            del self.buf[: self.pos]
            keep = [m for m in self.marks if m[0] > self.pos]
            first = [m for m in self.marks if m[0] <= self.pos][-1:]
            self.marks = [(max(0, o - self.pos), t, d) for o, t, d in first + keep]
            self.pos = 0
        if data:
            self.marks.append((len(self.buf), ts, tid))
            self.buf += data
        self.hole += skipped
        self.ts, self.tid = ts, tid

    def reset(self) -> None:
        self.buf.clear()
        self.marks.clear()
        self.pos = self.hole = 0

    def available(self) -> int:
        return len(self.buf) - self.pos

    def _begin(self) -> None:
        ts, tid = self.ts, self.tid
        for off, t, d in self.marks:
            if off > self.pos:
                break
            ts, tid = t, d
        self.start_ts, self.start_tid = ts, tid

    def take(self, n: int) -> Pull:
        """Exactly n bytes (a header); a hole before they are all there loses sync."""
        while len(self.buf) - self.pos < n:
            if self.hole:
                raise Lost("hole_at_boundary")
            if len(self.buf) - self.pos > self.max_buffer:
                raise Lost("buffer_full")
            yield
        self._begin()
        out = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        return out

    def peek(self, n: int) -> Pull:
        """At least n bytes (or fewer if a hole follows them), not consumed."""
        while len(self.buf) - self.pos < n and not self.hole:
            yield
        self._begin()
        return bytes(self.buf[self.pos: self.pos + n])

    def line(self, max_len: int) -> Pull:
        """Bytes up to CRLF (not included); longer than max_len or cut by a hole: lost."""
        scanned = 0  # bytes after pos known to hold no CRLF (push() may move pos)
        while True:
            i = self.buf.find(b"\r\n", self.pos + scanned)
            if i >= 0:
                if i - self.pos > max_len:
                    raise Lost("line_too_long")
                self._begin()
                out = bytes(self.buf[self.pos: i])
                self.pos = i + 2
                return out
            if len(self.buf) - self.pos > max_len:
                raise Lost("line_too_long")
            if self.hole:
                raise Lost("hole_at_boundary")
            scanned = max(0, len(self.buf) - self.pos - 1)
            yield

    def body(self, n: int, keep: int) -> Pull:
        """Pass over n bytes, keeping the first `keep`; holes inside are passed over too.
        Returns (kept prefix, whether some of the n bytes were not captured)."""
        kept = bytearray()
        left = n
        truncated = False
        while left:
            avail = len(self.buf) - self.pos
            if avail:
                k = min(avail, left)
                room = keep - len(kept)
                if room > 0:
                    kept += self.buf[self.pos: self.pos + min(k, room)]
                self.pos += k
                left -= k
                continue
            if self.hole:
                k = min(self.hole, left)
                self.hole -= k
                left -= k
                truncated = True
                keep = len(kept)  # what is kept stays one contiguous prefix
                continue
            yield
        return bytes(kept), truncated

    def past_hole(self, terminator: bytes, limit: int) -> Pull:
        """A hole cut a message where the reader needed to see (a header line inside a reply):
        pass over it and what follows up to the end of the first call that ends with
        `terminator`. For protocols whose replies end so: of a call too long to ship whole the
        kernel still ships the last bytes (L7_TAIL in bpf/l7/capture.h). Lost when `limit`
        bytes go by without one."""
        passed = 0
        while True:
            passed += len(self.buf) - self.pos + self.hole
            self.pos = len(self.buf)
            self.hole = 0
            if passed > limit:
                raise Lost("hole_unresolved")
            yield
            if not self.hole and self.buf.endswith(terminator) and len(self.buf) > self.pos:
                self.pos = len(self.buf)
                return

    def at_hole(self) -> bool:
        """All captured bytes consumed and a hole follows (the reader is at a boundary it
        cannot see past)."""
        return self.hole > 0 and len(self.buf) == self.pos


def be16(b: bytes, at: int = 0) -> int:
    return (b[at] << 8) | b[at + 1]


def be32(b: bytes, at: int = 0) -> int:
    return int.from_bytes(b[at: at + 4], "big")


def le_int(b: bytes, at: int, n: int) -> int:
    return int.from_bytes(b[at: at + n], "little")


@dataclass(slots=True)
class Side:
    """A direction's reader and its sync state."""

    src: Source
    reader: Reader | None = None
    synced: bool = False
    seen: bool = False  # any segment arrived in this direction
    held: list[Segment] = field(default_factory=list)  # unsynced: a beginning being proven


@dataclass(slots=True)
class Request:
    """A request waiting for its response (protocols subclass it with what they need)."""

    start_ns: int
    tid: int = 0
    request_bytes: int = 0
    turn: int = field(default=0, kw_only=True)  # the client's turn (DuplexParser.turn)


@dataclass
class DuplexParser(StreamParser):
    """A request/response protocol: one reader per direction, requests paired with responses
    in order (protocols keep their own pending structures where order is not enough)."""

    max_buffer: int = 65536
    max_pending: int = 1024
    pending: deque[Any] = field(default_factory=deque)
    out: list[Exchange] = field(default_factory=list)
    lost_at_ns: int = 0
    # Turns: requests sent after responses came start a new turn. A client that reads its
    # answers before it asks again sends nothing in a turn that is answered in a later one,
    # so after a loss the responses are in step again with the first turn after it.
    turn: int = 0
    lost_turn: int = -1
    answered: bool = False  # a response segment came since the last request segment

    def __post_init__(self) -> None:
        self.req = Side(Source(self.max_buffer))
        self.resp = Side(Source(self.max_buffer))
        self.req_dir = Direction.IN if self.conn.role == Role.SERVER else Direction.OUT

    # -- what a protocol provides ------------------------------------------------------------
    def request_reader(self, src: Source) -> Reader:
        raise NotImplementedError

    def response_reader(self, src: Source) -> Reader:
        raise NotImplementedError

    # Proofs answer True (a message starts here), False (not provably), or None (the bytes
    # so far are a valid beginning: decide with the next segment's).
    def request_proven(self, seg: Segment) -> bool | None:
        """The segment provably starts a request (a handshake, or whole messages)."""
        raise NotImplementedError

    def response_proven(self, seg: Segment) -> bool | None:
        """The segment starts a response whatever was asked (e.g. a server greeting)."""
        return False

    def response_plausible(self, seg: Segment) -> bool | None:
        """The segment may start a response (checked with the request/response alternation)."""
        return True

    def response_resync(self, seg: Segment) -> bool:
        """A protocol's own way back into sync while lost (it may complete pending requests);
        True: the responses are in sync from the next segment on."""
        return False

    def abort(self, item: Any, ts_ns: int) -> Exchange | None:
        """The exchange a request still pending at close becomes (None: none)."""
        return None

    def on_lost(self, is_req: bool) -> None:
        """A direction lost sync: forget state its lost bytes may have changed."""

    def dropped(self, item: Any) -> None:
        """A pending request was dropped (lost pairing, overflow): count it if it mattered."""
        self.failures["request_lost"] += 1

    # -- the machinery -------------------------------------------------------------------------
    def push_pending(self, item: Any) -> None:
        if isinstance(item, Request):
            item.turn = self.turn
        if len(self.pending) >= self.max_pending:
            self.dropped(self.pending.popleft())
            self.failures["pending_overflow"] += 1
        self.pending.append(item)

    def feed(self, segment: Segment) -> list[Exchange]:
        is_req = segment.direction == self.req_dir
        side = self.req if is_req else self.resp
        side.seen = True
        if is_req and self.answered:
            self.turn += 1
        self.answered = not is_req
        if side.synced:
            self._run(side, is_req, [segment])
        else:
            self._run(side, is_req, self._sync(side, is_req, segment))
        return self._flush()

    def _run(self, side: Side, is_req: bool, segments: list[Segment]) -> None:
        for seg in segments:
            if not side.synced:
                return
            side.src.push(seg.data, seg.skipped, seg.ts_ns, seg.tid)
            try:
                if side.reader is None:
                    side.reader = (self.request_reader if is_req
                                   else self.response_reader)(side.src)
                next(side.reader)
                if side.src.at_hole():
                    raise Lost("hole_at_boundary")
            except Lost as lost:
                self.lose(is_req, lost.reason, seg.ts_ns)
            except Exception as exc:  # a parser bug must cost the connection, never the agent
                self.lose(is_req, f"parser_error:{type(exc).__name__}", seg.ts_ns)

    def _sync(self, side: Side, is_req: bool, seg: Segment) -> list[Segment]:
        """The segments to parse once this one (with those held before it) proves where a
        message starts; [] while it does not (yet)."""
        held = side.held
        if held and held[-1].skipped:
            held.clear()  # bytes missing between: the held ones cannot be continued
        held.append(seg)
        try:
            if len(held) > 1 and self._proves_itself(is_req, seg):
                # The bytes held so far only may begin a message; this call's bytes start
                # one for sure, so the held ones are taken for the tail of an older message
                # (a continuation that happens to parse is the likelier coincidence).
                self.failures["unsynced_segment"] += len(held) - 1
                del held[:-1]
                verdict: bool | None = True
            else:
                verdict = self._verdict(is_req, held)
            while verdict is False and len(held) > 1:  # perhaps a message starts later
                self.failures["unsynced_segment"] += 1
                held.pop(0)
                verdict = self._verdict(is_req, held)
            if verdict is None and (held[-1].skipped
                                    or sum(len(h.data) for h in held) > self.max_buffer):
                verdict = False  # a beginning that a hole cuts off never completes
            if verdict is False and not is_req and self.response_resync(seg):
                held.clear()
                self._start(side)
                return []  # in sync from the next segment: nothing of this one to parse
        except Exception as exc:
            self.failures[f"parser_error:{type(exc).__name__}"] += 1
            verdict = False
        if verdict is None:
            return []
        if verdict is False:
            self.failures["unsynced_segment"] += 1
            held.clear()
            if not is_req:
                # an answer to what waits would have started here: it cannot be seen
                self.lost_turn = self.turn
            return []
        if not is_req:
            # requests sent before the loss will never see their responses
            while self.pending and getattr(self.pending[0], "turn", 0) <= self.lost_turn:
                self.dropped(self.pending.popleft())
        out = list(held)
        held.clear()
        self._start(side)
        return out

    def _proves_itself(self, is_req: bool, seg: Segment) -> bool:
        """seg alone provably starts a message (what the alternation of requests and
        responses makes plausible is no proof)."""
        if is_req:
            return self.request_proven(seg) is True
        return self.response_proven(seg) is True

    def _verdict(self, is_req: bool, held: list[Segment]) -> bool | None:
        first = held[0]
        seg = first if len(held) == 1 else Segment(
            first.direction, b"".join(h.data for h in held), first.ts_ns, first.tid,
            held[-1].skipped, first.peer)
        if is_req:
            return self.request_proven(seg)
        proven = self.response_proven(seg)
        if proven is not False:
            return proven
        if self._after_request(first):
            return self.response_plausible(seg)
        return False

    def _start(self, side: Side) -> None:
        side.synced = True
        side.src.reset()
        side.reader = None

    def _after_request(self, seg: Segment) -> bool:
        return any(getattr(p, "turn", 0) > self.lost_turn and self._start_of(p) <= seg.ts_ns
                   for p in self.pending)

    @staticmethod
    def _start_of(item: Any) -> int:
        return int(getattr(item, "start_ns", 0))

    def lose(self, is_req: bool, reason: str, ts_ns: int) -> None:
        """Give a direction up until it can prove a message start again."""
        self.failures[reason] += 1
        for side in ((self.req, self.resp) if is_req else (self.resp,)):
            side.synced = False
            side.reader = None
            side.src.reset()
        self.lost_at_ns = ts_ns
        self.lost_turn = self.turn
        self.on_lost(is_req)
        if is_req:
            while self.pending:
                self.dropped(self.pending.popleft())

    def close(self, ts_ns: int) -> list[Exchange]:
        while self.pending:
            item = self.pending.popleft()
            if getattr(item, "turn", 0) <= self.lost_turn:
                self.dropped(item)  # answered, where this parser could not see
                continue
            ex = self.abort(item, ts_ns)
            if ex is not None:
                self.out.append(ex)
        return self._flush()

    def _flush(self) -> list[Exchange]:
        out, self.out = self.out, []
        return out
