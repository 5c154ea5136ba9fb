"""HTTP/1.x: the kernel's exchange records (bpf/l7/proto_http.h) as exchange rows.

The kernel decides method, status, role, timings and sizes and keeps the first bytes of both
heads. Here a batch is decoded with numpy: paths are cut out of the heads in one vectorised
pass and templated once per distinct path (a path table keyed by the head's words finds a
whole column of known paths at once), body sizes come from the heads' CRLFCRLF, and the rows
leave as `EXCHANGE` rows whose op is the method, target the route and status the code.
Pipelined requests and methods the kernel does not know (method 0) have their request line
read from the head in Python.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from probewire.aggregate.http_heads import nth_request
from probewire.aggregate.ids import MIX, Column, IdCache, SortedIds, same_rows
from probewire.aggregate.routes import RouteTemplater
from probewire.aggregate.series import grown
from probewire.l7.constants import HTTP_HEAD_LEN, HttpFlag, HttpMethod, Proto
from probewire.l7.exchanges import (
    EXCHANGE,
    METHODS,
    NUMERIC_STATUSES,
    ExchangeFlag,
    LabelTables,
)
from probewire.l7.protocol import ConnInfo, Direction, Protocol, Role, StreamParser, Transport
from probewire.l7.records import HEADER_SIZE, HTTP_EXCHANGE

HEAD_LEN = HTTP_HEAD_LEN
METHOD_LEN = np.array([0] + [len(m) for m in METHODS[1:]], dtype=np.int64)
UNKNOWN_ROUTE = "unknown"
# Flags as plain ints: numpy probes an enum member for array protocols (~1 µs a use, per batch).
_H_ABORTED, _H_PIPELINED = int(HttpFlag.ABORTED), int(HttpFlag.PIPELINED)
_E_ABORTED, _E_PIPELINED = int(ExchangeFlag.ABORTED), int(ExchangeFlag.PIPELINED)

def header_lengths(heads: np.ndarray, head_lens: np.ndarray) -> np.ndarray:
    """Bytes up to and including the first CRLFCRLF of each head, or -1 if not in the head."""
    if not len(heads):
        return np.zeros(0, dtype=np.int64)
    h = heads
    hit = (h[:, :-3] == 13) & (h[:, 1:-2] == 10) & (h[:, 2:-1] == 13) & (h[:, 3:] == 10)
    first = np.argmax(hit, axis=1)
    found = hit[np.arange(len(h)), first] & (first + 4 <= head_lens)
    return np.where(found, first + 4, -1).astype(np.int64)


# Request paths are cut from the first 64 head bytes, or, for a path still open there, from
# the first 144 (room for the longest method, its space and the 128 bytes request_paths cuts).
_PATH_WINDOW = 64
_LONG_PATH_WINDOW = 144
_PATH_MAX = 128  # request_paths' cut

# Row e: the masks keeping the first e bytes of a head read as little-endian 64-bit words.
_HEAD_MASKS = np.array(
    [[(1 << (8 * min(max(e - w, 0), 8))) - 1 for w in range(0, _LONG_PATH_WINDOW, 8)]
     for e in range(_LONG_PATH_WINDOW + 1)], dtype=np.uint64)


# Where the heads are in a record; the request head is followed by another field.
_REQ_HEAD_AT: int = HTTP_EXCHANGE.fields["req_head"][1]  # type: ignore[index]
_RESP_HEAD_AT: int = HTTP_EXCHANGE.fields["resp_head"][1]  # type: ignore[index]
_REQ_HEAD_SPARE = int(HTTP_EXCHANGE.itemsize > _REQ_HEAD_AT + HTTP_HEAD_LEN)


def _as_strings(field: np.ndarray, width: int) -> np.ndarray:
    """The first `width` bytes of each row of a (n, k) uint8 field as an S<width> vector."""
    part = field[:, :width]
    if part.strides[-1] != 1:
        part = np.ascontiguousarray(part)
    return part.view(f"S{width}")[:, 0]


# The searched-for bytes as ready arrays: given as bytes, each search first works out their
# dtype (~1 µs a call, seven calls a batch).
_PATH_STOPS = tuple(np.array(stop, dtype="S1") for stop in (b" ", b"?", b"\r", b"\n"))
_CRLFCRLF = np.array(b"\r\n\r\n", dtype="S4")


def _path_ends(text: np.ndarray, start: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Where each path ends: the first space, '?', CR or LF in [start, limit), else limit."""
    # As unsigned, "not found" (-1) is the largest value: a minimum keeps what was found.
    end = limit.astype(np.uint64)
    for stop in _PATH_STOPS:
        end = np.minimum(np.strings.find(text, stop, start, end).view(np.uint64), end)
    found: np.ndarray = end.view(np.int64)
    return found


def _head_words(heads: np.ndarray, width: int, end: np.ndarray) -> np.ndarray:
    """The first `width` bytes of each head as 64-bit words, every byte from end[i] on zeroed.

    With the path's start, these words decide the path exactly: it is their bytes from
    start, less trailing NULs (as request_paths' zero padding and the rstrip of it).
    """
    part = heads[:, :width]
    if part.strides[-1] != 1:
        part = np.ascontiguousarray(part)
    masks = _HEAD_MASKS if width == _LONG_PATH_WINDOW else _HEAD_MASKS[: width + 1, : width // 8]
    masked: np.ndarray = part.view(np.uint64) & masks.take(end, axis=0)
    return masked


def _header_ends(heads: np.ndarray, head_lens: np.ndarray) -> np.ndarray:
    """`header_lengths` of (n, HEAD_LEN) heads, each as an S-dtype item: one substring search
    per row. `heads` may take one byte more than HEAD_LEN (see _record_header_ends)."""
    if not len(heads):
        return np.zeros(0, dtype=np.int64)
    text = heads.view(f"S{heads.shape[1]}")[:, 0]
    found = np.strings.find(text, _CRLFCRLF, 0, np.minimum(head_lens, HEAD_LEN))
    return np.where(found >= 0, found + 4, -1)


def _record_header_ends(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(request, response) header lengths of each record: `header_lengths` of each head.

    A search over S-dtype items first finds each item's length by skipping its trailing
    NULs, which costs as much as the search when heads are short. So each head is read as an
    item one byte longer, taking the byte after it, which is seldom NUL (the response head's
    first, or the next record's type tag; not for the last record's response head): the skip
    stops at once, and the search itself stays within the head's length.
    """
    req_lens = rec["req_head_len"].astype(np.int64)
    resp_lens = rec["resp_head_len"].astype(np.int64)
    n = len(rec)
    if not rec.flags.c_contiguous or n < 2:
        return (_header_ends(_bytes_of(rec["req_head"]), req_lens),
                _header_ends(_bytes_of(rec["resp_head"]), resp_lens))
    flat = rec.view(np.uint8)
    raw = flat.reshape(n, -1)
    req = _header_ends(raw[:, _REQ_HEAD_AT: _REQ_HEAD_AT + HEAD_LEN + _REQ_HEAD_SPARE], req_lens)
    size = HTTP_EXCHANGE.itemsize
    on = flat[_RESP_HEAD_AT: _RESP_HEAD_AT + (n - 1) * size].reshape(n - 1, size)
    resp = np.concatenate([
        _header_ends(on[:, : HEAD_LEN + 1], resp_lens[:-1]),
        _header_ends(raw[-1:, _RESP_HEAD_AT: _RESP_HEAD_AT + HEAD_LEN], resp_lens[-1:])])
    return req, resp


def _bytes_of(field: np.ndarray) -> np.ndarray:
    return field if field.strides[-1] == 1 else np.ascontiguousarray(field)


class _PathTable:
    """Request paths cut from one window of the head: (head words up to the path's end, the
    path's start) -> route id, for a whole column at once: by hash in a direct-mapped cache,
    else in sorted hashes, each hit confirmed word by word; new paths are worked out per row
    (and found by their bytes, should two ever share a hash)."""

    def __init__(self, width: int, cache_bits: int) -> None:
        self.cache = IdCache(cache_bits)
        self.by_key = SortedIds()
        self.ids: dict[bytes, int] = {}
        self.keys = Column()
        self.words = np.zeros((64, width // 8), dtype=np.uint64)
        self.route = Column()
        self._mix = (np.arange(1, width // 8 + 1, dtype=np.uint64) * MIX) | np.uint64(1)

    def __len__(self) -> int:
        return len(self.ids)

    def routes(self, words: np.ndarray, start: np.ndarray,
               route_of: Callable[[bytes], int]) -> np.ndarray:
        key = ((words @ self._mix ^ start.astype(np.uint64) * MIX) >> np.uint64(1)
               ).view(np.int64)
        ids, slots = self.cache.find(key)
        # Equal words and equal keys mean equal starts (start * MIX is one to one, and
        # starts are below 256), so comparing the words is all the checking there is to do.
        ids[~same_rows(self.words, ids, words)] = -1
        miss = (ids < 0).nonzero()[0]
        if len(miss):
            # Mostly paths whose cache slot another took: pushed out, or in the sorted hashes.
            ids[miss] = self.cache.rescue(key[miss])
            ids[miss[~same_rows(self.words, ids[miss], words[miss])]] = -1
            lost = miss[ids[miss] < 0]
            if len(lost):
                ids[lost] = self.by_key.find(key[lost])
                ids[lost[~same_rows(self.words, ids[lost], words[lost])]] = -1
                new = lost[ids[lost] < 0]
                if len(new):
                    ids[new] = self._add(key[new], start[new], words[new], route_of)
                # Rescued paths stay where they were (as _series' entries do).
                self.cache.put(key[lost], slots[lost], ids[lost])
                self.cache.fit(len(self.ids), lambda: (self.keys.data[: len(self.ids)],
                                                       np.arange(len(self.ids))))
        route: np.ndarray = self.route.data[ids]
        return route

    def _add(self, keys: np.ndarray, start: np.ndarray, words: np.ndarray,
             route_of: Callable[[bytes], int]) -> list[int]:
        found: list[int] = []
        added: dict[int, int] = {}
        for key, first, row in zip(keys.tolist(), start.tolist(), words, strict=True):
            raw = row.tobytes()
            pid = self.ids.get(raw + bytes((first,)))
            if pid is None:
                pid = self.ids[raw + bytes((first,))] = len(self.ids)
                if pid == len(self.words):
                    self.words = grown(self.words, 2 * len(self.words))
                self.words[pid] = row
                self.keys[pid] = key
                # The path: from its start, less the zero padding (request_paths' rstrip).
                self.route[pid] = route_of(raw[first:].rstrip(b"\0"))
                added.setdefault(key, pid)
            found.append(pid)
        if added:
            new = np.fromiter(added, np.int64, len(added))
            free = self.by_key.find(new) < 0  # a hash another path has: found by bytes
            self.by_key.add(new[free], np.fromiter(added.values(), np.int32, len(added))[free])
        return found




class Http1Decoder:
    """Kernel HTTP/1.x records -> exchange rows, keeping its path tables across batches. Route
    ids are `labels` target ids: when the tables behind them start afresh (their generation
    moves), so do the path tables."""

    def __init__(self, templater: RouteTemplater, labels: LabelTables) -> None:
        self.templater = templater
        self.labels = labels
        self._reset()

    def _reset(self) -> None:
        self.generation = self.labels.generation
        # Request paths: head words up to the path's end and its start -> route id, for paths
        # ending in the first window and in the longer one; by the path's bytes -> route id.
        self.paths = _PathTable(_PATH_WINDOW, 16)
        self.long_paths = _PathTable(_LONG_PATH_WINDOW, 14)
        self.path_route: dict[bytes, int] = {}
        # Slow rows (method left to user space, pipelined): (head, index) -> (route, op).
        self.slow_requests: dict[tuple[bytes, int], tuple[int, int]] = {}

    def size(self) -> int:
        return max(len(self.paths), len(self.long_paths), len(self.path_route),
                   len(self.slow_requests))

    def decode(self, rec: np.ndarray) -> np.ndarray:
        """EXCHANGE rows of a batch of HTTP_EXCHANGE records, in order."""
        if self.labels.generation != self.generation:
            self._reset()
        n = len(rec)
        rows = np.zeros(n, dtype=EXCHANGE)
        if not n:
            return rows
        flat = rec if rec.flags.c_contiguous else np.ascontiguousarray(rec)
        rows.view(np.uint8).reshape(n, -1)[:, :HEADER_SIZE] = (
            flat.view(np.uint8).reshape(n, -1)[:, :HEADER_SIZE])
        method, route = self.routes_and_methods(rec)
        rows["op"] = method
        rows["target"] = route
        status = rec["status"]
        rows["status"] = status
        # The kernel reads three digits (100..999); anything else is named, never packed.
        for i in np.flatnonzero(status >= NUMERIC_STATUSES).tolist():
            rows["status"][i] = self.labels.status(f"status {int(status[i])}")
        rows["start_ns"] = rec["start_ns"]
        rows["end_ns"] = rec["end_ns"]
        req_hdr, resp_hdr = _record_header_ends(rec)
        resp_hdr = np.where(resp_hdr < 0, rec["resp_first_write"].astype(np.int64), resp_hdr)
        rows["req_body"] = np.where((req_hdr >= 0) & (rec["pipe_idx"] == 0),
                                    rec["req_bytes"].astype(np.int64) - req_hdr, -1)
        rows["resp_body"] = rec["resp_bytes"].astype(np.int64) - resp_hdr
        hflags = rec["hflags"].astype(np.uint32)
        rows["eflags"] = (np.where(hflags & _H_ABORTED, _E_ABORTED, 0)
                          | np.where(hflags & _H_PIPELINED, _E_PIPELINED, 0))
        return rows

    def routes_and_methods(self, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(op id, route target id) of each row."""
        method = rec["method"].astype(np.int64)
        pipe_idx = rec["pipe_idx"]
        slow = (method == 0) | (pipe_idx > 0)
        any_slow = bool(slow.any())
        lens = rec["req_head_len"].astype(np.int64)
        # Slow rows' heads are read whole below; here they count as empty.
        route = self._path_routes(rec["req_head"], np.where(slow, 0, lens) if any_slow
                                  else lens, METHOD_LEN[method])
        if any_slow:
            labels = self.labels
            for i in slow.nonzero()[0].tolist():
                request = (rec["req_head"][i][: int(lens[i])].tobytes(), int(pipe_idx[i]))
                known = self.slow_requests.get(request)
                if known is None:
                    parsed = nth_request(*request)
                    if parsed is None:
                        known = (labels.target(UNKNOWN_ROUTE), 0)
                    else:
                        m, target = parsed
                        known = (labels.target(self.templater.template(target)), labels.op(m))
                    self.slow_requests[request] = known
                route[i], method[i] = known
        return method, route

    def _path_routes(self, heads: np.ndarray, head_lens: np.ndarray, method_lens: np.ndarray,
                     ) -> np.ndarray:
        """Route id of each row's request path (request_paths' cut, then templated).

        Each path's end is found by string searches in the first _PATH_WINDOW head bytes
        (or _LONG_PATH_WINDOW, for paths still open there); the head's words up to it and the
        path's start are then looked up whole-array in the path tables, so a batch of known
        paths needs no Python per row.
        """
        start = method_lens + 1
        end = _path_ends(_as_strings(heads, _PATH_WINDOW), start,
                         np.minimum(head_lens, _PATH_WINDOW))
        # A path reaching the window's end may go on: those rows look in the longer window
        # (and never in this one's table, where their words could pass for a shorter path).
        reach = end == _PATH_WINDOW
        words = _head_words(heads, _PATH_WINDOW, end)
        if not reach.any():
            return self.paths.routes(words, start, self._route_of)
        longer = reach.nonzero()[0]
        shorter = (~reach).nonzero()[0]
        route = np.zeros(len(heads), dtype=np.int64)
        if len(shorter):
            route[shorter] = self.paths.routes(words[shorter], start[shorter], self._route_of)
        if len(longer):
            width = min(_LONG_PATH_WINDOW, heads.shape[1])
            heads, start = heads[longer], start[longer]
            end = _path_ends(_as_strings(heads, width), start,
                             np.minimum(np.minimum(head_lens[longer], width), start + _PATH_MAX))
            route[longer] = self.long_paths.routes(_head_words(heads, width, end), start,
                                                   self._route_of)
        return route

    def _route_of(self, path: bytes) -> int:
        found = self.path_route.get(path)
        if found is None:
            found = self.path_route[path] = self.labels.target(self.templater.template(path))
        return found


# The kernel's classifier (bpf/l7/http_parse.h method_of, status_of), byte for byte.
_METHOD_WORDS = tuple((m.encode() + b" ", code) for code, m in enumerate(METHODS) if code)


def method_of(b: bytes) -> int:
    """The kernel method code of a request line at the start of `b` (0: none)."""
    b = b.ljust(16, b"\0")
    for word, code in _METHOD_WORDS:
        if b.startswith(word):
            after = b[len(word)]
            if code == HttpMethod.CONNECT:
                return code if after > 0x20 else 0
            return code if after in b"/*h" else 0
    return 0


def status_of(b: bytes) -> int:
    """The status code of a status line at the start of `b` (0: none)."""
    b = b.ljust(16, b"\0")
    if (b[:7] != b"HTTP/1." or b[7:8] not in (b"0", b"1") or b[8] != 0x20
            or not b[9:12].isdigit() or b[9] == ord("0")):
        return 0
    return int(b[9:12])


class Http1(Protocol):
    """HTTP/1.x: parsed by its kernel parser (bpf/l7/proto_http.h), decoded by Http1Decoder."""

    name = "http"
    proto_id = Proto.HTTP
    kind = "http"
    parsed_in_kernel = True

    def classify(self, peek: bytes, direction: Direction, transport: Transport, *,
                 lport: int = 0, rport: int = 0, call_len: int = 0) -> Role:
        if transport != Transport.TCP:
            return Role.UNKNOWN
        if method_of(peek):
            return Role.SERVER if direction == Direction.IN else Role.CLIENT
        if status_of(peek):
            return Role.SERVER if direction == Direction.OUT else Role.CLIENT
        return Role.UNKNOWN

    def parser(self, conn: ConnInfo) -> StreamParser:
        raise LookupError("HTTP/1.x is parsed in the kernel (bpf/l7/proto_http.h)")


PROTOCOL = Http1()

__all__ = ["HEAD_LEN", "PROTOCOL", "UNKNOWN_ROUTE", "Http1Decoder", "header_lengths",
           "method_of", "status_of"]
