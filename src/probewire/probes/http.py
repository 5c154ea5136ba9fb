"""http family: HTTP/1.x RED metrics for servers and clients, and the service graph.

Kernel side (bpf/http.bpf.c) emits one record per request/response exchange with the method,
status, timestamps, byte counts, the connection's addresses and the first bytes of both heads.
Here a batch is decoded with numpy: paths are cut out of the heads in one vectorised pass,
templated once per distinct path, and rows are grouped by label set before any Python work.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from probewire.aggregate.budget import LabelBudget
from probewire.aggregate.http_heads import nth_request
from probewire.aggregate.routes import RouteTemplater
from probewire.aggregate.series import CounterSeries, HistogramSeries, grown
from probewire.config import Config
from probewire.enrich.net import format_address
from probewire.probes.base import Hook, Probe, ProbeContext
from probewire.probes.h2 import H2_CHUNK_DTYPE, H2Exchange, H2Tracker
from probewire.probes.tls import TLS_PROGRAMS, TlsAttacher
from probewire.runtime.bpf import BpfObject, Map

HEAD_LEN = 256
ROLE_SERVER, ROLE_CLIENT = 1, 2
FLAG_ABORTED, FLAG_PIPELINED, FLAG_TLS = 1, 2, 4
# User-space only (never set by the kernel): rows made from HTTP/2 streams.
FLAG_H2, FLAG_GRPC = 64, 128

HTTP_EXCHANGE = np.dtype(
    [
        ("kind", np.uint32),
        ("tgid", np.uint32),
        ("role", np.uint8),
        ("method", np.uint8),
        ("status", np.uint16),
        ("family", np.uint8),
        ("flags", np.uint8),
        ("pipe_idx", np.uint16),
        ("start_ns", np.uint64),
        ("end_ns", np.uint64),
        ("req_bytes", np.uint64),
        ("resp_bytes", np.uint64),
        ("conn_id", np.uint64),
        ("lport", np.uint16),
        ("rport", np.uint16),
        ("req_head_len", np.uint16),
        ("resp_head_len", np.uint16),
        ("resp_first_write", np.uint32),
        ("tid", np.uint32),
        ("peer_tgid", np.uint32),
        ("resp_header_end", np.int32),
        ("path_hash", np.uint64),
        ("laddr", np.uint8, (16,)),
        ("raddr", np.uint8, (16,)),
        ("req_head", np.uint8, (HEAD_LEN,)),
        ("resp_head", np.uint8, (HEAD_LEN,)),
    ]
)

HTTP_AGG_KEY = np.dtype(
    [
        ("tgid", np.uint32),
        ("route", np.uint32),
        ("peer_tgid", np.uint32),
        ("lport", np.uint16),
        ("rport", np.uint16),
        ("status", np.uint16),
        ("role", np.uint8),
        ("method", np.uint8),
        ("flags", np.uint8),
        ("family", np.uint8),
        ("_pad", np.uint16),
        ("laddr", np.uint8, (16,)),
        ("raddr", np.uint8, (16,)),
    ]
)
HTTP_ENDPOINT = np.dtype(
    [("addr", np.uint8, (16,)), ("port", np.uint16), ("family", np.uint8), ("_pad", np.uint8)]
)

# Kernel method codes (bpf/http.h); index 0 means "parse the head".
METHODS = ("_OTHER", "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "CONNECT",
           "TRACE")
METHOD_LEN = np.array([0] + [len(m) for m in METHODS[1:]], dtype=np.int64)
SYSCALLS = ("read", "recvfrom", "readv", "recvmsg", "write", "sendto", "writev", "sendmsg",
            "sendfile64")

# OpenTelemetry's recommended boundaries for http.*.request.duration (seconds).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0)
SIZE_BUCKETS = (0, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
# The kernel counts exchanges of known routes in these very buckets (http.h http_agg).
HTTP_AGG = np.dtype(
    [
        ("count", np.uint64),
        ("duration_ns", np.uint64),
        ("req_body_count", np.uint64),
        ("req_body_bytes", np.uint64),
        ("resp_body_bytes", np.uint64),
        ("duration", np.uint64, (len(DURATION_BUCKETS) + 1,)),
        ("req_body", np.uint64, (len(SIZE_BUCKETS) + 1,)),
        ("resp_body", np.uint64, (len(SIZE_BUCKETS) + 1,)),
    ]
)
_AGG_WORDS = HTTP_AGG.itemsize // 8

SERVER_LABELS = ("service_name", "http_request_method", "http_response_status_code", "http_route",
                 "url_scheme")
CLIENT_LABELS = (*SERVER_LABELS, "server_address", "server_port")
EDGE_LABELS = ("client", "server")
RPC_LABELS = ("service_name", "rpc_system", "rpc_service", "rpc_method", "rpc_grpc_status_code")
UNKNOWN_ROUTE = "unknown"
OVERFLOW_ROUTE = "other"
ENDPOINTS_MAX = 65536
# Route ids handed to the kernel (http_routes values). Past this many distinct routes a new
# path is registered as "other": the label budget would fold it there anyway.
ROUTE_IDS_MAX = 16384
# Aggregation keys of processes gone from /proc are read a last time and deleted this often.
AGG_REAP_S = 30.0
# A key of a process not named yet (it exited before its exec record was read) waits at most
# this long for the name before it is counted as "unknown".
NAME_WAIT_S = 2.0


def header_lengths(heads: np.ndarray, head_lens: np.ndarray) -> np.ndarray:
    """Bytes up to and including the first CRLFCRLF of each head, or -1 if not in the head."""
    if not len(heads):
        return np.zeros(0, dtype=np.int64)
    h = heads
    hit = (h[:, :-3] == 13) & (h[:, 1:-2] == 10) & (h[:, 2:-1] == 13) & (h[:, 3:] == 10)
    first = np.argmax(hit, axis=1)
    found = hit[np.arange(len(h)), first] & (first + 4 <= head_lens)
    return np.where(found, first + 4, -1).astype(np.int64)


@dataclass(frozen=True)
class ExchangeBatch:
    """One decoded batch for consumers beyond metrics (spans, the UI's event feed).

    `records` are the raw kernel records (HTTP_EXCHANGE); the lists give each row's decoded
    labels. Timestamps in records are CLOCK_MONOTONIC nanoseconds.
    """

    records: np.ndarray
    service: list[str]
    method: list[str]
    route: list[str]
    peer_address: list[str]
    local_address: list[str]


ExchangeSink = Callable[[ExchangeBatch], None]


class _Bounded(OrderedDict[tuple[str, int], str]):
    """Endpoint -> service, forgetting the oldest beyond a fixed size."""

    def put(self, key: tuple[str, int], value: str) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > ENDPOINTS_MAX:
            self.popitem(last=False)


# --- record path: helpers and what on_batch keeps between batches ---------------------------------
# Request paths are cut from the first 64 head bytes, or, for a path still open there, from
# the first 144 (room for the longest method, its space and the 128 bytes request_paths cuts).
_PATH_WINDOW = 64
_LONG_PATH_WINDOW = 144
_PATH_MAX = 128  # request_paths' cut
# Memo tables start afresh past this many entries (each holds deterministic answers only), and
# a batch beyond _BATCH_MAX records is taken in parts, so every id fits its bits in a key.
_MEMO_MAX = 1 << 16
_BATCH_MAX = 1 << 18
_ID_BITS = 19
# Connections cost ~300 bytes each: a host opening many keeps at most this many in the memo.
_CONNS_MAX = 1 << 14
# Keys a cache keeps after other keys took their slots (see _IdCache).
_VICTIMS_MAX = 256
_CONN_BITS = 16
# Columns of the memo's per-connection rows: its service, its peer process's service (0: not
# known), peer and local address ids, series class (role, service, client's server
# endpoint), endpoint put key less a client's own port, client edge id, server edge id.
(_SVC, _PEER_SVC, _PEER, _LOCAL, _CLASS, _PUT, _CLIENT_EDGE, _SERVER_EDGE) = range(8)
_CONN_COLUMNS = 8
# Kinds of series entry.
_SERVER, _CLIENT, _ABORTED, _SKIPPED = 0, 1, 2, 3
_FOLDED = 4  # added to the kind of an entry whose label set the budget folded
# The flags that split series (aborted, TLS, gRPC) as 3 bits; pipelined and HTTP/2 rows share.
_FLAG_CODE = np.array([(f & FLAG_ABORTED) | (f & FLAG_TLS) >> 1 | (f & FLAG_GRPC) >> 5
                       for f in range(256)], dtype=np.int64)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_ALL_EQUAL = np.uint64(0x0101010101010101)
# Row e: the masks keeping the first e bytes of a head read as little-endian 64-bit words.
_HEAD_MASKS = np.array(
    [[(1 << (8 * min(max(e - w, 0), 8))) - 1 for w in range(0, _LONG_PATH_WINDOW, 8)]
     for e in range(_LONG_PATH_WINDOW + 1)], dtype=np.uint64)


def _conn_words(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit words of a record holding its connection (process, role, addresses, ports,
    peer process), and a mask per word keeping only those bytes."""
    keep = np.zeros(dtype.itemsize, dtype=np.uint8)
    for name in ("kind", "tgid", "role", "family", "lport", "rport", "peer_tgid", "laddr",
                 "raddr"):
        field, offset = dtype.fields[name][:2]  # type: ignore[index]
        keep[offset: offset + field.itemsize] = 0xFF
    words = keep.view(np.uint64)
    index = words.nonzero()[0]
    return index, words[index]


_CONN_WORDS, _CONN_MASKS = _conn_words(HTTP_EXCHANGE)


def _port_clear(dtype: np.dtype, name: str) -> tuple[int, np.uint64]:
    """(column of the connection words holding port field `name`, mask clearing it)."""
    offset = dtype.fields[name][1]  # type: ignore[index]
    column = int(np.flatnonzero(offset // 8 == _CONN_WORDS)[0])
    return column, ~np.uint64(0xFFFF << (8 * (offset % 8)))


# A connection's ephemeral port (a server's client port, a client's own port) is left out of
# its words: what the memo keeps per connection does not depend on it.
_LPORT_CLEAR = _port_clear(HTTP_EXCHANGE, "lport")
_RPORT_CLEAR = _port_clear(HTTP_EXCHANGE, "rport")
_KEEP_ALL = ~np.uint64(0)
# Where the heads are in a record; the request head is followed by another field.
_REQ_HEAD_AT: int = HTTP_EXCHANGE.fields["req_head"][1]  # type: ignore[index]
_RESP_HEAD_AT: int = HTTP_EXCHANGE.fields["resp_head"][1]  # type: ignore[index]
_REQ_HEAD_SPARE = int(HTTP_EXCHANGE.itemsize > _REQ_HEAD_AT + HEAD_LEN)
_CONN_MIX = (np.arange(1, len(_CONN_WORDS) + 1, dtype=np.uint64) * _MIX) | np.uint64(1)


def _as_strings(field: np.ndarray, width: int) -> np.ndarray:
    """The first `width` bytes of each row of a (n, k) uint8 field as an S<width> vector."""
    part = field[:, :width]
    if part.strides[-1] != 1:
        part = np.ascontiguousarray(part)
    return part.view(f"S{width}")[:, 0]


def _path_ends(text: np.ndarray, start: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Where each path ends: the first space, '?', CR or LF in [start, limit), else limit."""
    # As unsigned, "not found" (-1) is the largest value: a minimum keeps what was found.
    end = limit.astype(np.uint64)
    for stop in (b" ", b"?", b"\r", b"\n"):
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
    found = np.strings.find(text, b"\r\n\r\n", 0, np.minimum(head_lens, HEAD_LEN))
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


def _same_rows(table: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Whether table[ids[i]] equals rows[i] for each i. -1 ids read the last row of the
    table; callers treat those rows as misses anyway."""
    equal = table.take(ids, axis=0) == rows
    # Rows of 8 words: all 8 bytes of a row of the bool array are 1, one compare per row
    # where a reduction along a short axis costs ~10 ns a row.
    same: np.ndarray = (equal.view(np.uint64)[:, 0] == _ALL_EQUAL if equal.shape[1] == 8
                        else equal.all(axis=1))
    return same


def _distinct(values: np.ndarray) -> list[int]:
    """Distinct values in order of first appearance (np.unique without index or counts
    imports numpy.ma on first use: 1.3 MB)."""
    return list(dict.fromkeys(values.tolist()))


def _first_rows(keys: np.ndarray, rows: np.ndarray) -> dict[int, int]:
    """Distinct keys among `rows`, in order of first appearance, each with its first row."""
    first: dict[int, int] = {}
    for key, row in zip(keys[rows].tolist(), rows.tolist(), strict=True):
        first.setdefault(key, row)
    return first


class _IdCache:
    """A direct-mapped cache of int64 keys (>= 0) to ids, looked up a whole column at once.

    A slot holds the last key stored in it; a key whose slot another key took is a miss like a
    new key, answered by the caller's authority (a dict, sorted arrays) and stored again.
    Slots hold key+1 (0: empty). The cache starts small and grows, up to `max_bits`, to keep
    itself at most an eighth full (`fit`; a slot then holds a key another wants about one time
    in eight): its memory follows what it holds. A key pushed out of its slot by another goes
    to a small dict (`rescue`): a batch of a few hundred keys nearly always has a pair that
    share a slot, and a dict lookup for its few misses is cheaper than asking the authority.
    """

    def __init__(self, max_bits: int, bits: int = 10, victims: bool = True) -> None:
        self._max_bits = max_bits
        self._victims: dict[int, int] | None = {} if victims else None
        self._size(min(bits, max_bits))

    def _size(self, bits: int) -> None:
        self._bits = bits
        self._shift = np.uint64(64 - bits)
        self._keys = np.zeros(1 << bits, dtype=np.int64)
        self._ids = np.zeros(1 << bits, dtype=np.int64)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(id per key, -1 where not cached; slot per key, for `put`)."""
        slots = ((keys.view(np.uint64) * _MIX) >> self._shift).astype(np.intp)
        return np.where(self._keys[slots] == keys + 1, self._ids[slots], -1), slots

    def put(self, keys: np.ndarray, slots: np.ndarray, ids: np.ndarray) -> None:
        if self._victims is None:
            self._keys[slots] = keys + 1
            self._ids[slots] = ids
            return
        held = self._keys[slots]
        out = (held != 0) & (held != keys + 1)
        if out.any():
            if len(self._victims) > _VICTIMS_MAX:
                self._victims.clear()
            self._victims.update(zip((held[out] - 1).tolist(), self._ids[slots[out]].tolist(),
                                     strict=True))
        self._keys[slots] = keys + 1
        self._ids[slots] = ids

    def rescue(self, keys: np.ndarray) -> list[int]:
        """Ids of keys pushed out of their slots (-1: not among them)."""
        get = (self._victims or {}).get
        return [get(k, -1) for k in keys.tolist()]

    def fit(self, count: int, everything: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
        """Grow for an authority of `count` keys; `everything()` gives all its (keys, ids)."""
        bits = self._bits
        while count * 8 > 1 << bits and bits < self._max_bits:
            bits += 1
        if bits != self._bits:
            self._size(bits)
            if self._victims is not None:
                self._victims.clear()
            keys, ids = everything()
            self.put(keys, self.find(keys)[1], ids)


class _SortedIds:
    """int64 keys -> ids, as sorted arrays: a tenth of a dict's memory for the many series
    entries a big host has, looked up a column at a time (on cache misses only). New keys go
    to a small sorted level, merged into the big one when it has grown by an eighth: the big
    arrays are reallocated a few times in all, not on every batch with a new key."""

    def __init__(self) -> None:
        keys, ids = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        self._levels = [(keys, ids), (keys, ids)]

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self._levels)

    def everything(self) -> tuple[np.ndarray, np.ndarray]:
        (big, big_ids), (small, small_ids) = self._levels
        return np.concatenate([big, small]), np.concatenate([big_ids, small_ids])

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Id per key, -1 for keys not here."""
        found = np.full(len(keys), -1, dtype=np.int64)
        for known, ids in self._levels:
            if len(known):
                at = np.minimum(np.searchsorted(known, keys), len(known) - 1)
                found = np.where(known[at] == keys, ids[at], found)
        return found

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """Add distinct keys not here yet."""
        (big, big_ids), (small, small_ids) = self._levels
        small, small_ids = _merged(small, small_ids, keys, ids)
        if len(small) > max(1024, len(big) // 8):
            big, big_ids = _merged(big, big_ids, small, small_ids)
            small, small_ids = small[:0], small_ids[:0]
        self._levels = [(big, big_ids), (small, small_ids)]


def _merged(keys: np.ndarray, ids: np.ndarray, more: np.ndarray, more_ids: np.ndarray,
            ) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(more)
    more, more_ids = more[order], more_ids[order]
    at = np.searchsorted(keys, more)
    return np.insert(keys, at, more), np.insert(ids, at, more_ids)


class _Column:
    """An append-only int64 (or float64) column, grown by doubling."""

    def __init__(self, fill: float = -1, dtype: type = np.int64) -> None:
        self.fill = fill
        self.data: np.ndarray = np.full(64, fill, dtype=dtype)

    def __setitem__(self, index: int, value: float) -> None:
        self.ensure(index + 1)
        self.data[index] = value

    def ensure(self, size: int) -> None:
        """Room for `size` entries (new ones hold the fill value)."""
        if size > len(self.data):
            old = len(self.data)
            self.data = grown(self.data, max(2 * old, size))
            self.data[old:] = self.fill


class _PathTable:
    """Request paths cut from one window of the head: (head words up to the path's end, the
    path's start) -> route id, for a whole column at once: by hash in a direct-mapped cache,
    else in sorted hashes, each hit confirmed word by word; new paths are worked out per row
    (and found by their bytes, should two ever share a hash)."""

    def __init__(self, width: int, cache_bits: int) -> None:
        self.cache = _IdCache(cache_bits)
        self.by_key = _SortedIds()
        self.ids: dict[bytes, int] = {}
        self.keys = _Column()
        self.words = np.zeros((64, width // 8), dtype=np.uint64)
        self.route = _Column()
        self._mix = (np.arange(1, width // 8 + 1, dtype=np.uint64) * _MIX) | np.uint64(1)

    def __len__(self) -> int:
        return len(self.ids)

    def routes(self, words: np.ndarray, start: np.ndarray,
               route_of: Callable[[bytes], int]) -> np.ndarray:
        key = ((words @ self._mix ^ start.astype(np.uint64) * _MIX) >> np.uint64(1)
               ).view(np.int64)
        ids, slots = self.cache.find(key)
        # Equal words and equal keys mean equal starts (start * _MIX is one to one, and
        # starts are below 256), so comparing the words is all the checking there is to do.
        ids[~_same_rows(self.words, ids, words)] = -1
        miss = (ids < 0).nonzero()[0]
        if len(miss):
            # Mostly paths whose cache slot another took: pushed out, or in the sorted hashes.
            ids[miss] = self.cache.rescue(key[miss])
            ids[miss[~_same_rows(self.words, ids[miss], words[miss])]] = -1
            lost = miss[ids[miss] < 0]
            if len(lost):
                ids[lost] = self.by_key.find(key[lost])
                ids[lost[~_same_rows(self.words, ids[lost], words[lost])]] = -1
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


class _Memo:
    """What on_batch keeps between batches, so a steady stream of records costs whole-array
    work only: per connection (process, role, addresses, ports, peer process) its service,
    addresses and endpoints; per label set what the budget said and its series rows.

    Everything here is a memo of a deterministic answer (templating a path, formatting an
    address, the budget's answer for a label set: a budget never frees a series, so that
    answer never changes), except service names, which are asked again whenever the resolver
    says an answer may have changed (ServiceResolver.name_until); a changed name drops
    everything built from names. Ids are dense and start afresh with the memo.
    """

    # Set by HttpProbe.reconfigure (another thread): the reader replaces the memo before its
    # next batch, never in the middle of one.
    stale = False

    def __init__(self) -> None:
        # Request paths: head words up to the path's end and its start -> route id, for paths
        # ending in the first window and in the longer one; by the path's bytes -> route id.
        # Route ids name routes. Slow rows (method left to user space, pipelined): (head,
        # index) -> (route, method).
        self.paths = _PathTable(_PATH_WINDOW, 16)
        self.long_paths = _PathTable(_LONG_PATH_WINDOW, 14)
        self.path_route: dict[bytes, int] = {}
        self.route_ids: dict[str, int] = {}
        self.route_names: list[str] = []
        self.slow_requests: dict[tuple[bytes, int], tuple[int, str]] = {}
        # (family, address words) -> id; per id its string, whether it is one of ours
        # (self.local_addresses, as of `locals_seen` of them) and whether it was added there.
        self.address_ids: dict[tuple[int, int, int], int] = {}
        self.address_names: list[str] = []
        self.address_local = _Column(0)
        self.address_added = _Column(0)
        self.locals_seen = -1
        # (tgid << 16 | server port) -> service id; per id its key, name and until when the
        # name stands (reset to 0 whenever the resolver's generation moves). Id 0: no process
        # (a server's client the kernel did not know).
        self.service_ids: dict[int, int] = {-1: 0}
        self.service_keys: list[int] = [-1]
        self.service_names: list[str] = [""]
        self.service_until = _Column(0.0, np.float64)
        self.service_until[0] = np.inf
        self.generation = -1
        # Client endpoints (address id << 16 | port) -> id, with their (address, port).
        self.endpoint_ids: dict[int, int] = {}
        self.endpoints: list[tuple[str, int]] = []
        # Small interned tuples: series classes (role, service, endpoint), client edges
        # (service, endpoint).
        self.class_ids: dict[tuple[int, int, int], int] = {}
        self.classes: list[tuple[int, int, int]] = []
        self.client_edge_ids: dict[tuple[int, int], int] = {}
        self.client_edges: list[tuple[int, int]] = []
        self.drop_connections()
        self.drop_names()

    def drop_connections(self) -> None:
        """Forget connections (and endpoint puts, one per client connection): many hosts
        open connections without end, and nothing else refers to them."""
        # By hash of a connection's words: a direct-mapped cache in front of a dict.
        # (No victims: the dict behind it is as quick for a few misses.)
        self.conn_cache = _IdCache(_CONN_BITS, victims=False)
        self.conn_keys: dict[int, int] = {}
        self.conn_count = 0
        self.conn_words = np.zeros((64, len(_CONN_WORDS)), dtype=np.uint64)
        # Per connection, a row: see _SVC.._SERVER_EDGE.
        self.conns = np.zeros((64, _CONN_COLUMNS), dtype=np.int64)
        # Endpoint put key (see _new_connections) -> ((local address, port), service).
        self.put_items: dict[int, tuple[tuple[str, int], str]] = {}

    def drop_names(self) -> None:
        """Forget everything built from service names (one changed)."""
        # Series keys -> entry; per entry a row of `entries`: kind (plus _FOLDED if its label
        # set was folded), its rows in the duration, request size and response size
        # histograms of its side (-1: none). Keys with the same effect share an entry (with a
        # budget full, most keys fold into a few series). An aborted entry's labels.
        self.entry_cache = _IdCache(14)
        self.entry_of = _SortedIds()
        self.entry_keys = 0
        self.entries = np.zeros((64, 4), dtype=np.int32)
        self.entry_ids: dict[tuple[int, ...], int] = {}
        self.aborted_labels: list[tuple[str, ...]] = []
        self.aborted_ids: dict[tuple[str, ...], int] = {}
        self.status_text: dict[int, str] = {}
        self.any_folded = False
        # Client edges: per client edge id, its edge_client_total key and histogram row.
        self.client_edge_total: list[tuple[str, tuple[str, int]] | None] = []
        self.client_edge_row = _Column()
        # Server edges: client names; per connection its edge (_SERVER_EDGE: -2 not worked
        # out, -3 a local client named by its port, worked out per row); edge keys
        # (service, client name, remote?) -> id; per id its labels and rows (seconds,
        # total, failed), folded?
        self.name_ids: dict[str, int] = {}
        self.conns[:, _SERVER_EDGE] = -2
        self.put_items.clear()
        self.server_edge_ids: dict[tuple[int, int, int], int] = {}
        self.server_edge_labels: list[tuple[str, ...]] = []
        self.server_edges = np.zeros((64, 4), dtype=np.int64)
        self.server_edge_folded = False

    def entry(self, kind: int, duration: int = -1, req: int = -1, resp: int = -1,
              aborted: tuple[str, ...] = ()) -> int:
        """The entry with these effects (for an aborted one: counted under `aborted`)."""
        self.entry_keys += 1
        content = (kind, duration, req, resp) if kind != _ABORTED else (
            kind, _interned(self.aborted_ids, self.aborted_labels, aborted))
        entry = self.entry_ids.get(content)
        if entry is None:
            entry = self.entry_ids[content] = len(self.entry_ids)
            if entry == len(self.entries):
                self.entries = grown(self.entries, 2 * len(self.entries))
            self.entries[entry] = content if kind != _ABORTED else (kind, -1, -1, content[1])
            self.any_folded |= bool(kind & _FOLDED)
        return entry

    def route_id(self, route: str) -> int:
        return _interned(self.route_ids, self.route_names, route)

    def address_ids_of(self, family: list[int], words: np.ndarray, ours: set[str]) -> list[int]:
        """Ids of (family, 16 address bytes as two words) rows, made for new ones."""
        keys = list(zip(family, words[:, 0].tolist(), words[:, 1].tolist(), strict=True))
        get = self.address_ids.get
        ids = [get(k, -1) for k in keys]
        if -1 in ids:
            for i, key in enumerate(keys):
                aid = get(key, -1)
                if aid < 0:
                    aid = self.address_ids[key] = len(self.address_names)
                    raw = key[1].to_bytes(8, "little") + key[2].to_bytes(8, "little")
                    name = format_address(key[0], raw)
                    self.address_names.append(name)
                    self.address_local[aid] = name in ours
                    self.address_added[aid] = 0
                ids[i] = aid
        return ids

    def service_ids_of(self, keys: list[int]) -> list[int]:
        ids = _interned_all(self.service_ids, self.service_keys, keys)
        while len(self.service_names) < len(self.service_keys):
            self.service_names.append("")  # not asked yet: its until is 0
        self.service_until.ensure(len(self.service_keys))
        return ids

    def too_big(self) -> bool:
        return self.stale or max(len(self.paths), len(self.long_paths), len(self.path_route),
                   len(self.slow_requests), len(self.route_names),
                   len(self.address_names), len(self.service_keys), len(self.endpoints),
                   len(self.classes), len(self.client_edges), self.entry_keys,
                   len(self.name_ids), len(self.server_edge_labels)) > _MEMO_MAX


_K = TypeVar("_K")


def _interned(table: dict[_K, int], items: list[_K], key: _K) -> int:
    found = table.get(key)
    if found is None:
        found = table[key] = len(items)
        items.append(key)
    return found


def _interned_all(table: dict[_K, int], items: list[_K], keys: list[_K]) -> list[int]:
    get = table.get
    ids = [get(k, -1) for k in keys]
    if -1 in ids:
        ids = [_interned(table, items, k) for k in keys]
    return ids


def _interned_endpoint(memo: _Memo, address: int, port: int) -> int:
    key = address << 16 | port
    found = memo.endpoint_ids.get(key)
    if found is None:
        found = memo.endpoint_ids[key] = len(memo.endpoints)
        memo.endpoints.append((memo.address_names[address], port))
    return found


class HttpProbe(Probe):
    name = "http"
    object_name = "http"
    hooks = (
        *(Hook(f"sys_exit_{s}", (f"http_exit_{s}",)) for s in SYSCALLS),
        Hook("sys_enter_close", ("http_close",)),
        Hook("inet_sock_set_state", ("http_sock_close_btf", "http_sock_close_tp")),
    )
    helper_programs = ("http_exit_common", "http_h2_ship_tp", "http_h2_ship_uprobe",
                       *TLS_PROGRAMS)
    structs: ClassVar[dict[str, np.dtype]] = {
        "http_exchange": HTTP_EXCHANGE, "h2_chunk": H2_CHUNK_DTYPE,
        "http_agg_key": HTTP_AGG_KEY, "http_agg": HTTP_AGG, "http_endpoint": HTTP_ENDPOINT,
    }
    record_dtype = HTTP_EXCHANGE
    extra_rings: ClassVar[dict[str, np.dtype]] = {"h2_events": H2_CHUNK_DTYPE}

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config.probes.http
        self.routes = RouteTemplater(cfg.routes)
        self._lock = threading.Lock()
        overflow = {"http_route": "other"}
        self.server_budget = LabelBudget(cfg.max_series_per_metric, overflow)
        self.client_budget = LabelBudget(cfg.max_series_per_metric,
                                         {**overflow, "server_address": "other"})
        self.edge_budget = LabelBudget(cfg.max_series_per_metric, {"client": "other"})
        self.server_duration = HistogramSeries(DURATION_BUCKETS)
        self.client_duration = HistogramSeries(DURATION_BUCKETS)
        self.server_req_size = HistogramSeries(SIZE_BUCKETS)
        self.server_resp_size = HistogramSeries(SIZE_BUCKETS)
        self.client_req_size = HistogramSeries(SIZE_BUCKETS)
        self.aborted = CounterSeries()
        # Service graph: client-side edges keep the server endpoint until scrape time, when
        # the server side (seen in its own records) can name it.
        self.edge_client_total: dict[tuple[str, tuple[str, int]], list[float]] = {}
        self.edge_client_seconds = HistogramSeries(DURATION_BUCKETS)
        self.edge_server_total = CounterSeries()
        self.edge_server_failed = CounterSeries()
        self.edge_server_seconds = HistogramSeries(DURATION_BUCKETS)
        self.server_endpoints = _Bounded()
        self.client_endpoints = _Bounded()
        self.local_addresses: set[str] = {"127.0.0.1", "::1"}
        self.records = 0
        # Called after each batch with its decoded rows (e.g. the OTLP span exporter).
        self.sinks: list[ExchangeSink] = []
        self.tls: TlsAttacher | None = None
        self.h2 = H2Tracker()
        self.rpc_budget = LabelBudget(cfg.max_series_per_metric, {"rpc_method": "other"})
        self.rpc_server = HistogramSeries(DURATION_BUCKETS)
        self.rpc_client = HistogramSeries(DURATION_BUCKETS)
        # In-kernel aggregation: route ids the kernel keys on, and each key's last total.
        otlp = ctx.config.export.otlp
        self.aggregate = cfg.kernel_aggregation and not (otlp.enabled and otlp.traces)
        self.route_names: list[str] = []
        self.route_ids: dict[str, int] = {}
        self._agg_last: dict[bytes, np.ndarray] = {}
        self._sync_lock = threading.Lock()
        self._reaped_at = time.monotonic()
        self.reap_s = AGG_REAP_S
        self._dead_before: set[bytes] = set()
        self._name_wait: dict[bytes, float] = {}
        self.aggregated = 0  # exchanges counted in the kernel, as of the last sync
        self._aggregated_gone = 0
        self.exchanges_from_records = 0

    def after_load(self, obj: BpfObject) -> None:
        if self.ctx.config.probes.http.tls and obj.programs["tls_exit"].fd >= 0:
            self.tls = TlsAttacher(obj)
            self.tls.start()

    def on_stop(self) -> None:
        if self.tls is not None:
            self.tls.stop()
            self.tls = None

    def before_load(self, obj: BpfObject) -> None:
        if not self.ctx.config.probes.http.trace_agent:
            obj.set_rodata(self_tgid=os.getpid())
        obj.maps["http_aggs"].set_max_entries(self.ctx.config.probes.http.kernel_keys)
        obj.set_rodata(
            aggregate=int(self.aggregate),
            duration_bounds_ns=np.array([round(b * 1e9) for b in DURATION_BUCKETS], np.uint64),
            size_bounds=np.array(SIZE_BUCKETS, np.uint64),
        )

    def reconfigure(self, config: Config) -> None:
        """Routes, budgets and TLS capture from a reloaded config (Agent.reconfigure). Paths
        the kernel already maps to routes are forgotten with the memo, so the new patterns
        apply to the next exchange on any path; series already made stay as they are."""
        cfg = config.probes.http
        with self._lock:
            if RouteTemplater(cfg.routes).patterns != self.routes.patterns:
                self.routes = RouteTemplater(cfg.routes)
                self._memo.stale = True
                if self.obj is not None:
                    routes_map = self.map("http_routes")
                    for key in list(routes_map.keys()):
                        routes_map.delete(key)
            if cfg.max_series_per_metric != self.server_budget.max_series:
                for budget in (self.server_budget, self.client_budget, self.edge_budget,
                               self.rpc_budget):
                    budget.resize(cfg.max_series_per_metric)
                self._memo.stale = True
        if self.obj is not None:
            if cfg.tls and self.tls is None and self.obj.programs["tls_exit"].fd >= 0:
                self.tls = TlsAttacher(self.obj)
                self.tls.start()
            elif not cfg.tls and self.tls is not None:
                self.tls.stop()  # detaches every libssl uprobe
                self.tls = None

    # --- decoding --------------------------------------------------------------------------
    @functools.cached_property
    def _memo(self) -> _Memo:
        return _Memo()

    def _routes_and_methods(
        self, rec: np.ndarray
    ) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """(route names, method names, per-row method index, per-row route index).

        Route indexes are ids into the memo's route names, stable across batches: the same
        route string always has the same index.
        """
        memo = self._memo
        method = rec["method"].astype(np.int64)
        pipe_idx = rec["pipe_idx"]
        slow = (method == 0) | (pipe_idx > 0)
        any_slow = bool(slow.any())
        lens = rec["req_head_len"].astype(np.int64)
        # Slow rows' heads are read whole below; here they count as empty.
        route_idx = self._path_routes(rec["req_head"], np.where(slow, 0, lens) if any_slow
                                      else lens, METHOD_LEN[method])
        method_names = list(METHODS)
        if any_slow:
            for i in slow.nonzero()[0].tolist():
                request = (rec["req_head"][i][: int(lens[i])].tobytes(), int(pipe_idx[i]))
                known = memo.slow_requests.get(request)
                if known is None:
                    parsed = nth_request(*request)
                    if parsed is None:
                        known = (memo.route_id(UNKNOWN_ROUTE), "_OTHER")
                    else:
                        m, target = parsed
                        known = (memo.route_id(self.routes.template(target)), m)
                    memo.slow_requests[request] = known
                route_idx[i], m = known
                if m not in method_names:
                    method_names.append(m)
                method[i] = method_names.index(m)
        return memo.route_names, method_names, method, route_idx

    def _path_routes(self, heads: np.ndarray, head_lens: np.ndarray, method_lens: np.ndarray,
                     ) -> np.ndarray:
        """Route id of each row's request path (request_paths' cut, then templated).

        Each path's end is found by string searches in the first _PATH_WINDOW head bytes
        (or _LONG_PATH_WINDOW, for paths still open there); the head's words up to it and the
        path's start are then looked up whole-array in the memo's path tables, so a batch of
        known paths needs no Python per row.
        """
        memo = self._memo
        start = method_lens + 1
        end = _path_ends(_as_strings(heads, _PATH_WINDOW), start,
                         np.minimum(head_lens, _PATH_WINDOW))
        # A path reaching the window's end may go on: those rows look in the longer window
        # (and never in this one's table, where their words could pass for a shorter path).
        reach = end == _PATH_WINDOW
        words = _head_words(heads, _PATH_WINDOW, end)
        if not reach.any():
            return memo.paths.routes(words, start, self._route_of)
        longer = reach.nonzero()[0]
        shorter = (~reach).nonzero()[0]
        route = np.zeros(len(heads), dtype=np.int64)
        if len(shorter):
            route[shorter] = memo.paths.routes(words[shorter], start[shorter], self._route_of)
        if len(longer):
            width = min(_LONG_PATH_WINDOW, heads.shape[1])
            heads, start = heads[longer], start[longer]
            end = _path_ends(_as_strings(heads, width), start,
                             np.minimum(np.minimum(head_lens[longer], width), start + _PATH_MAX))
            route[longer] = memo.long_paths.routes(_head_words(heads, width, end), start,
                                                   self._route_of)
        return route

    def _route_of(self, path: bytes) -> int:
        memo = self._memo
        found = memo.path_route.get(path)
        if found is None:
            found = memo.path_route[path] = memo.route_id(self.routes.template(path))
        return found

    def _route_id(self, route: str) -> int:
        rid = self.route_ids.get(route)
        if rid is None:
            if len(self.route_names) >= ROUTE_IDS_MAX:
                route = OVERFLOW_ROUTE
                rid = self.route_ids.get(route)
            if rid is None:
                rid = self.route_ids[route] = len(self.route_names)
                self.route_names.append(route)
        return rid

    def _register_routes(self, rec: np.ndarray, routes: list[str], route_idx: np.ndarray) -> None:
        """Tell the kernel the route of each new path it shipped: later exchanges on that
        path are counted in the kernel. Only rows the kernel could have aggregated (a known
        method, first in their head) carry a hash of the path user space templated."""
        hashes = rec["path_hash"]
        fast = np.flatnonzero((hashes != 0) & (rec["method"] != 0) & (rec["pipe_idx"] == 0))
        if not len(fast) or not routes:
            return
        uniq, first = np.unique(hashes[fast], return_index=True)
        routes_map = self.map("http_routes")
        for h, i in zip(uniq.tolist(), fast[first].tolist(), strict=True):
            rid = self._route_id(routes[int(route_idx[i])])
            routes_map.update(int(h).to_bytes(8, "little"), rid.to_bytes(4, "little"))

    def on_batch(self, records: np.ndarray) -> None:
        rec = records
        n = len(rec)
        if not n:
            return
        if n > _BATCH_MAX:
            for start in range(0, n, _BATCH_MAX):
                self.on_batch(rec[start:start + _BATCH_MAX])
            return
        if self._memo.too_big():
            self._memo = _Memo()
        memo = self._memo
        role = rec["role"].astype(np.int64)
        status = rec["status"].astype(np.int64)
        flags = rec["flags"].astype(np.int64)
        aborted = (flags & FLAG_ABORTED) != 0
        duration_s = np.maximum(rec["end_ns"].astype(np.int64) - rec["start_ns"].astype(np.int64),
                                0) / 1e9
        routes, methods, method, route_idx = self._routes_and_methods(rec)
        if self.aggregate and self.obj is not None:
            self._register_routes(rec, routes, route_idx)
        is_server = role == ROLE_SERVER
        conn = self._connections(rec, is_server)
        at = memo.conns.take(conn, axis=0)
        svc = at[:, _SVC]
        self._check_services(at[:, _SVC: _PEER_SVC + 1])
        req_hdr, resp_hdr = _record_header_ends(rec)
        resp_hdr = np.where(resp_hdr < 0, rec["resp_first_write"].astype(np.int64), resp_hdr)
        req_body = np.where((req_hdr >= 0) & (rec["pipe_idx"] == 0),
                            rec["req_bytes"].astype(np.int64) - req_hdr, -1)
        resp_body = rec["resp_bytes"].astype(np.int64) - resp_hdr
        duration_bucket = self.server_duration.buckets(duration_s)
        local = at[:, _LOCAL]
        with self._lock:
            self.records += n
            self.exchanges_from_records += n
            self._add_local_addresses(local)
            lport = rec["lport"].astype(np.int64)
            self._put_endpoints(is_server, at[:, _PUT] + np.where(is_server, 0, lport << 8))
            self._series(at, flags, method, methods, status, route_idx, duration_s,
                         duration_bucket, req_body, resp_body)
            self._edges(conn, at, role, is_server, rec["rport"], aborted | (status >= 500),
                        duration_s, duration_bucket)
        if self.sinks:
            services, addresses = memo.service_names, memo.address_names
            batch = ExchangeBatch(
                records=rec,
                service=[services[i] for i in svc.tolist()],
                method=[methods[i] for i in method.tolist()],
                route=[routes[i] for i in route_idx.tolist()],
                peer_address=[addresses[i] for i in at[:, _PEER].tolist()],
                local_address=[addresses[i] for i in local.tolist()],
            )
            for sink in self.sinks:
                sink(batch)

    def _connections(self, rec: np.ndarray, is_server: np.ndarray) -> np.ndarray:
        """The memo's connection id of each row.

        A connection is the words of the record holding process, role, addresses, ports and
        peer process, less the ephemeral port (a server's client port, a client's own port:
        nothing kept per connection depends on it, and a host opening connections without
        end opens few of these). It is looked up by a hash of its words and confirmed by
        comparing them all.
        """
        memo = self._memo
        if memo.conn_count > _CONNS_MAX:
            memo.drop_connections()
        flat = rec if rec.flags.c_contiguous else np.ascontiguousarray(rec)
        words = flat.view(np.uint64).reshape(len(rec), -1)[:, _CONN_WORDS] & _CONN_MASKS
        (lcol, lclear), (rcol, rclear) = _LPORT_CLEAR, _RPORT_CLEAR
        if lcol == rcol:
            words[:, lcol] &= np.where(is_server, rclear, lclear)
        else:
            words[:, rcol] &= np.where(is_server, rclear, _KEEP_ALL)
            words[:, lcol] &= np.where(is_server, _KEEP_ALL, lclear)
        key = (words @ _CONN_MIX >> np.uint64(1)).view(np.int64)
        conn, slots = memo.conn_cache.find(key)
        # -1 reads the last row: harmless, those rows are misses already.
        conn[~_same_rows(memo.conn_words, conn, words)] = -1
        miss = (conn < 0).nonzero()[0]
        if len(miss):
            # Mostly a connection whose cache slot another took: the dict knows it (there are
            # few: ephemeral ports are left out).
            known = memo.conn_keys
            conn[miss] = [known.get(k, -1) for k in key[miss].tolist()]
            conn[miss[~_same_rows(memo.conn_words, conn[miss], words[miss])]] = -1
            new = miss[conn[miss] < 0]
            if len(new):
                conn[new] = self._new_connections(rec, new, words[new], key[new])
                # A hash another connection has: this one is made again when next seen.
                for k, c in zip(key[new].tolist(), conn[new].tolist(), strict=True):
                    known.setdefault(k, c)
            memo.conn_cache.put(key[miss], slots[miss], conn[miss])
            memo.conn_cache.fit(len(known), lambda: (
                np.fromiter(known, np.int64, len(known)),
                np.fromiter(known.values(), np.int64, len(known))))
        return conn

    def _new_connections(self, rec: np.ndarray, rows: np.ndarray, words: np.ndarray,
                         key: np.ndarray) -> np.ndarray:
        """Ids for connections the cache did not know (one per distinct connection among
        `rows`), with what each maps to, worked out for all of them at once."""
        memo = self._memo
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        # Equal hashes, different connections: those rows get connections of their own.
        odd = (~(words == words[first][inverse]).all(axis=1)).nonzero()[0]
        if len(odd):
            inverse[odd] = len(first) + np.arange(len(odd))
            first = np.concatenate([first, odd])
        at = rows[first]
        role = rec["role"][at].astype(np.int64)
        server = role == ROLE_SERVER
        lport = rec["lport"][at].astype(np.int64)
        rport = rec["rport"][at].tolist()
        peer_tgid = rec["peer_tgid"][at].astype(np.int64)
        family = rec["family"][at].tolist()
        # Service per (tgid, local port): port rules name the server side.
        svc = memo.service_ids_of((rec["tgid"][at].astype(np.int64) << 16
                                   | np.where(server, lport, 0)).tolist())
        peer_svc = memo.service_ids_of((peer_tgid << 16).tolist())
        peer_svc = [s if t else 0 for s, t in zip(peer_svc, peer_tgid.tolist(), strict=True)]
        ours = self.local_addresses
        peer = memo.address_ids_of(family, np.ascontiguousarray(rec["raddr"][at]).view(
            np.uint64), ours)
        local = memo.address_ids_of(family, np.ascontiguousarray(rec["laddr"][at]).view(
            np.uint64), ours)
        # A client's server endpoint labels its series and edges; a server's is 0.
        role_list, server_list = role.tolist(), server.tolist()
        endpoint = [0 if s else _interned_endpoint(memo, p, port)
                    for s, p, port in zip(server_list, peer, rport, strict=True)]
        cls = _interned_all(memo.class_ids, memo.classes,
                            list(zip(role_list, svc, endpoint, strict=True)))
        # Endpoint puts, keyed (service, local address, port, role) in an int; a client's
        # own port is the row's, added per row.
        put = ((np.array(svc) << _ID_BITS | np.array(local)) << 16
               | np.where(server, lport, 0)) << 8 | role
        client_edge = [_interned(memo.client_edge_ids, memo.client_edges, (s, e))
                       if r == ROLE_CLIENT else -1
                       for r, s, e in zip(role_list, svc, endpoint, strict=True)]
        base, m = memo.conn_count, len(at)
        memo.conn_count += m
        while len(memo.conn_words) < base + m:
            memo.conn_words = grown(memo.conn_words, 2 * len(memo.conn_words))
        memo.conn_words[base: base + m] = words[first]
        while len(memo.conns) < base + m:
            memo.conns = grown(memo.conns, 2 * len(memo.conns))
        rows = memo.conns[base: base + m]
        for column, values in ((_SVC, svc), (_PEER_SVC, peer_svc), (_PEER, peer),
                               (_LOCAL, local), (_CLASS, cls), (_PUT, put),
                               (_CLIENT_EDGE, client_edge)):
            rows[:, column] = values
        rows[:, _SERVER_EDGE] = -2
        return base + inverse

    def _check_services(self, services: np.ndarray) -> None:
        """Ask the resolver again for every service name of the batch (`services`: ids, a
        row's own and its peer process's) whose last answer may no longer stand, as asking
        for each on every batch would; rebuild what was built from a name that changed."""
        memo = self._memo
        resolver = self.ctx.services
        until = memo.service_until
        if resolver.generation != memo.generation:
            memo.generation = resolver.generation
            until.data[:] = 0.0
            until.data[0] = np.inf  # the "no process" service
        now = time.monotonic()
        if (until.data.take(services) > now).all():
            return
        changed = False
        for sid in _distinct(services.ravel()):
            if until.data[sid] > now:
                continue
            key = memo.service_keys[sid]
            name, until[sid] = resolver.name_until(key >> 16, key & 0xFFFF)
            changed |= memo.service_names[sid] not in ("", name)
            memo.service_names[sid] = name
        if changed:
            memo.drop_names()

    def _add_local_addresses(self, local: np.ndarray) -> None:
        """This batch's local addresses into self.local_addresses (once per address), then
        which known addresses are ours, if that set grew."""
        memo = self._memo
        added = memo.address_added.data
        if not added[local].all():
            for aid in _distinct(local[added[local] == 0]):
                self.local_addresses.add(memo.address_names[aid])
                added[aid] = 1
        if len(self.local_addresses) != memo.locals_seen:
            memo.locals_seen = len(self.local_addresses)
            ours = [name in self.local_addresses for name in memo.address_names]
            memo.address_local.data[: len(ours)] = ours
            memo.conns[:, _SERVER_EDGE] = -2  # a remote client may be local now

    def _put_endpoints(self, is_server: np.ndarray, put: np.ndarray) -> None:
        """Which service owns each local endpoint of the batch (server side: for the graph's
        client-side edges; client side: to name a server's local client).

        One put per distinct (role, local address, port, service), in the order they first
        appear, done in bulk: the tables end up as sequential puts would leave them. `put` is
        each row's key, (service, local address, port, role) packed in an int.
        """
        memo = self._memo
        made = memo.put_items
        if len(made) > _MEMO_MAX:
            made.clear()
        for side, table in ((True, self.server_endpoints), (False, self.client_endpoints)):
            keys = put[is_server] if side else put[~is_server]
            if not len(keys):
                continue
            order = dict.fromkeys(keys.tolist())
            for k in [k for k in order if k not in made]:
                local = (k >> 24) & ((1 << _ID_BITS) - 1)
                made[k] = ((memo.address_names[local], (k >> 8) & 0xFFFF),
                           memo.service_names[k >> (24 + _ID_BITS)])
            items = list(map(made.__getitem__, order))
            # Keys by their last put, latest first, each with its last value.
            puts = dict(reversed(items))
            puts.update(items)
            table.update(puts)
            collections.deque(map(table.move_to_end, reversed(puts)), maxlen=0)
            while len(table) > ENDPOINTS_MAX:
                table.popitem(last=False)

    def _series(self, at: np.ndarray, flags: np.ndarray, method: np.ndarray,
                methods: list[str], status: np.ndarray, route_idx: np.ndarray,
                duration_s: np.ndarray, duration_bucket: np.ndarray, req_body: np.ndarray,
                resp_body: np.ndarray) -> None:
        """RED series of a batch. A row's label set is its connection's class (role, service,
        and for a client its server endpoint: a server's clients, one ephemeral port each,
        do not split its series), flags, method, status and route, packed in one int64; the
        memo's entry for it holds what the budget said and its series rows, so a batch of
        known label sets is a handful of whole-array adds."""
        memo = self._memo
        if len(methods) > 32:
            raise AssertionError(f"method names beyond the key's 5 bits: {methods}")
        key = (_FLAG_CODE[flags] | method << 3 | status << 8 | route_idx << 24
               | at[:, _CLASS] << (24 + _ID_BITS))
        entry, slots = memo.entry_cache.find(key)
        miss = (entry < 0).nonzero()[0]
        made: dict[int, int] = {}
        if len(miss):
            entry[miss] = memo.entry_cache.rescue(key[miss])
            lost = miss[entry[miss] < 0]
            if len(lost):
                entry[lost] = memo.entry_of.find(key[lost])
                new = lost[entry[lost] < 0]
            else:
                new = lost
            if len(new):
                # New label sets are admitted in the order they first appear.
                made = {k: self._new_entry(int(at[i, _CLASS]), int(flags[i]),
                                           methods[int(method[i])], int(status[i]),
                                           int(route_idx[i]))
                        for k, i in _first_rows(key, new).items()}
                memo.entry_of.add(np.fromiter(made, np.int64, len(made)),
                                  np.fromiter(made.values(), np.int32, len(made)))
                entry[new] = [made[k] for k in key[new].tolist()]
            # Rescued keys stay where they were (putting them back pushes out the key they
            # share a slot with, to be rescued in turn next time).
            if len(lost):
                memo.entry_cache.put(key[lost], slots[lost], entry[lost])
                memo.entry_cache.fit(len(memo.entry_of), memo.entry_of.everything)
        table = memo.entries.take(entry, axis=0)
        kind = table[:, 0]
        if memo.any_folded:
            # Each distinct label set of a batch is one admit call (the keys made in this
            # batch had theirs): one that folded counts again.
            again = kind >= _FOLDED
            if made and again.any():
                fresh = np.sort(np.fromiter(made, np.int64, len(made)))
                at = np.minimum(np.searchsorted(fresh, key), len(fresh) - 1)
                again &= fresh[at] != key  # (np.isin would import numpy.ma: 1.3 MB)
            if again.any():
                _, first = np.unique(key[again], return_index=True)
                server = int(np.count_nonzero(kind[again][first] == _SERVER | _FOLDED))
                self.server_budget.count_overflows(server)
                self.client_budget.count_overflows(len(first) - server)
            kind = kind & ~_FOLDED
        aborted = kind == _ABORTED
        if aborted.any():
            ids, counts = np.unique(table[aborted, 3], return_counts=True)
            for a, c in zip(ids.tolist(), counts.tolist(), strict=True):
                self.aborted.add(memo.aborted_labels[a], float(c))
        for side, durations, req_sizes, resp_sizes in (
                (_SERVER, self.server_duration, self.server_req_size, self.server_resp_size),
                (_CLIENT, self.client_duration, self.client_req_size, None)):
            rows = (kind == side).nonzero()[0]
            if not len(rows):
                continue
            at = table.take(rows, axis=0)
            durations.add(at[:, 1], duration_s[rows], duration_bucket[rows])
            if resp_sizes is not None:
                resp_sizes.add(at[:, 3], np.maximum(resp_body[rows], 0).astype(np.float64))
            sizes = req_body[rows]
            measured = sizes >= 0
            req_sizes.add(at[measured, 2], sizes[measured].astype(np.float64))

    def _new_entry(self, cls: int, flags: int, method: str, status: int, route_id: int) -> int:
        """A new label set: admit it (the one admit call of this batch) and find its rows."""
        memo = self._memo
        role, svc, endpoint = memo.classes[cls]
        service = memo.service_names[svc]
        if flags & FLAG_ABORTED:
            return memo.entry(_ABORTED, aborted=(
                service, "server" if role == ROLE_SERVER else "client"))
        if flags & FLAG_GRPC:
            return memo.entry(_SKIPPED)  # gRPC has its own rpc_* metrics; it still feeds edges
        # Its histogram rows exist from here on, each exported once something lands in it.
        text = memo.status_text.setdefault(status, str(status))
        base = (service, method, text, memo.route_names[route_id],
                "https" if flags & FLAG_TLS else "http")
        if role == ROLE_SERVER:
            kind = _SERVER
            labels = self.server_budget.admit(base, SERVER_LABELS)
            folded = labels != base
            duration = self.server_duration.slot(labels)
            req = self.server_req_size.slot(labels)
            resp = self.server_resp_size.slot(labels)
        else:
            kind = _CLIENT
            peer, port = memo.endpoints[endpoint]
            full = (*base, peer, str(port))
            labels = self.client_budget.admit(full, CLIENT_LABELS)
            folded = labels != full
            duration = self.client_duration.slot(labels)
            req = self.client_req_size.slot(labels)
            resp = -1
        return memo.entry(kind | (_FOLDED if folded else 0), duration, req, resp)

    # --- HTTP/2 and gRPC ---------------------------------------------------------------------
    def on_ring(self, map_name: str, records: np.ndarray) -> None:
        exchanges = self.h2.feed(records)
        if not exchanges:
            return
        with self._lock:
            for ex in exchanges:
                if ex.grpc:
                    self._observe_rpc(ex)
        self.on_batch(self._as_records(exchanges))

    def _observe_rpc(self, ex: H2Exchange) -> None:
        service_path = ex.path.lstrip("/")
        rpc_service, _, rpc_method = service_path.partition("/")
        c = ex.conn
        if c.role == ROLE_SERVER:
            name = self.ctx.services.name_for_port(c.tgid, c.lport)
        else:
            name = self.ctx.services.name_for(c.tgid)
        code = "" if ex.grpc_status is None else str(ex.grpc_status)
        labels = self.rpc_budget.admit(
            (name, "grpc", rpc_service or UNKNOWN_ROUTE, rpc_method or UNKNOWN_ROUTE, code),
            RPC_LABELS)
        series = self.rpc_server if c.role == ROLE_SERVER else self.rpc_client
        series.observe(labels, np.array([max(ex.end_ns - ex.start_ns, 0) / 1e9]))

    @staticmethod
    def _as_records(exchanges: list[H2Exchange]) -> np.ndarray:
        """HTTP/2 streams as exchange records, so metrics, graph and sinks treat them alike."""
        rec = np.zeros(len(exchanges), dtype=HTTP_EXCHANGE)
        for i, ex in enumerate(exchanges):
            head = f"{ex.method or '_OTHER'} {ex.path or '/'} HTTP/2\r\n\r\n".encode()[:HEAD_LEN]
            resp = f"HTTP/2 {ex.status}\r\n\r\n".encode()
            r = rec[i]
            r["kind"] = 1
            c = ex.conn
            r["tgid"], r["tid"], r["role"] = c.tgid, ex.tid, c.role
            r["method"] = METHODS.index(ex.method) if ex.method in METHODS[1:] else 0
            r["status"] = ex.status
            r["family"] = c.family
            r["flags"] = ((FLAG_TLS if c.tls else 0) | FLAG_H2 | (FLAG_GRPC if ex.grpc else 0)
                          | (FLAG_ABORTED if ex.reset and not ex.status else 0))
            r["start_ns"], r["end_ns"] = ex.start_ns, ex.end_ns
            # Wire sizes as the HTTP/1 path expects them: head + body.
            r["req_bytes"] = len(head) + ex.request_bytes
            r["resp_bytes"] = len(resp) + ex.response_bytes
            r["resp_first_write"] = len(resp)
            r["conn_id"] = c.conn_id
            r["lport"], r["rport"] = c.lport, c.rport
            r["laddr"] = np.frombuffer(c.laddr, dtype=np.uint8)
            r["raddr"] = np.frombuffer(c.raddr, dtype=np.uint8)
            r["req_head"][: len(head)] = np.frombuffer(head, dtype=np.uint8)
            r["req_head_len"] = len(head)
            r["resp_head"][: len(resp)] = np.frombuffer(resp, dtype=np.uint8)
            r["resp_head_len"] = len(resp)
        return rec

    def _edges(self, conn: np.ndarray, at: np.ndarray, role: np.ndarray, is_server: np.ndarray,
               rport: np.ndarray, failed: np.ndarray, duration_s: np.ndarray,
               duration_bucket: np.ndarray) -> None:
        """Service-graph edges of a batch: per-connection memo, then whole-array adds."""
        memo = self._memo
        services = memo.service_names
        client = (role == ROLE_CLIENT).nonzero()[0]
        if len(client):
            # Client side: kept by server endpoint until a scrape can name it.
            edge = at[client, _CLIENT_EDGE]
            memo.client_edge_row.ensure(len(memo.client_edges))
            rows = memo.client_edge_row.data[edge]
            if rows.min() < 0:
                for e in _distinct(edge[rows < 0]):
                    svc, endpoint = memo.client_edges[e]
                    peer, port = memo.endpoints[endpoint]
                    while len(memo.client_edge_total) <= e:
                        memo.client_edge_total.append(None)
                    memo.client_edge_total[e] = (services[svc], (peer, port))
                    memo.client_edge_row[e] = self.edge_client_seconds.slot(
                        (services[svc], f"{peer}:{port}"))
                rows = memo.client_edge_row.data[edge]
            counts = np.bincount(edge)
            ids = counts.nonzero()[0]
            bad = np.bincount(edge, weights=failed[client], minlength=len(counts))[ids].tolist()
            for e, n, nbad in zip(ids.tolist(), counts[ids].tolist(), bad, strict=True):
                total_key = memo.client_edge_total[e]
                assert total_key is not None
                totals = self.edge_client_total.setdefault(total_key, [0.0, 0.0])
                totals[0] += float(n)
                totals[1] += float(nbad)
            self.edge_client_seconds.add(rows, duration_s[client], duration_bucket[client])
        server = is_server.nonzero()[0]
        if not len(server):
            return
        # Server side: a client on this host has its own records (and counts the edge); a
        # remote client is named by its address. Per connection its edge is worked out once,
        # but for a local client the kernel did not name: that one goes by its port, as the
        # client side last said.
        sconn = conn[server]
        # Not from `at`: a changed name or locality has dropped edges since it was read.
        edge = memo.conns[sconn, _SERVER_EDGE]
        existing = len(memo.server_edge_labels)
        if edge.min() < 0:
            client_port = rport[server]
            # Row by row, in order: a new (client, server) pair is admitted when first seen.
            for i in (edge < 0).nonzero()[0].tolist():
                c = int(sconn[i])
                known = int(memo.conns[c, _SERVER_EDGE])
                edge[i] = known if known >= 0 else self._server_edge(c, int(client_port[i]))
        table = memo.server_edges.take(edge, axis=0)
        if memo.server_edge_folded:
            again = (table[:, 3] != 0) & (edge < existing)
            if again.any():
                self.edge_budget.count_overflows(len(_distinct(edge[again])))
        far = table[:, 1] >= 0
        self.edge_server_total.add_rows(table[far, 1])
        bad = far & failed[server]
        if bad.any():
            bad_rows = table[bad, 2]
            if bad_rows.min() < 0:
                for e in _distinct(edge[bad][bad_rows < 0]):
                    memo.server_edges[e, 2] = self.edge_server_failed.slot(
                        memo.server_edge_labels[e])
                bad_rows = memo.server_edges[edge[bad], 2]
            self.edge_server_failed.add_rows(bad_rows)
        self.edge_server_seconds.add(table[:, 0], duration_s[server], duration_bucket[server])

    def _server_edge(self, conn: int, client_port: int) -> int:
        """The server edge of a row of a connection (remembered for the connection, unless
        its client is a local one named by its port: -3 then, worked out per row)."""
        memo = self._memo
        svc, peer_svc, peer = (int(v) for v in memo.conns[conn, _SVC: _PEER + 1])
        keep = True
        if peer_svc:
            name, remote = memo.service_names[peer_svc], False
        elif memo.address_local.data[peer]:
            address = memo.address_names[peer]
            found = self.client_endpoints.get((address, client_port))
            name, remote, keep = found or "unknown", False, False
        else:
            name, remote = memo.address_names[peer], True
        key = (svc, memo.name_ids.setdefault(name, len(memo.name_ids)), int(remote))
        edge = memo.server_edge_ids.get(key)
        if edge is None:
            # A new (client, server) label set: this batch's admit call.
            base = (name, memo.service_names[svc])
            labels = self.edge_budget.admit(base, EDGE_LABELS)
            edge = memo.server_edge_ids[key] = len(memo.server_edge_labels)
            memo.server_edge_labels.append(labels)
            if edge == len(memo.server_edges):
                memo.server_edges = np.concatenate(
                    [memo.server_edges, np.zeros_like(memo.server_edges)])
            folded = labels != base
            memo.server_edges[edge] = (self.edge_server_seconds.slot(labels),
                                       self.edge_server_total.slot(labels) if remote else -1,
                                       -1, folded)
            memo.server_edge_folded |= folded
        memo.conns[conn, _SERVER_EDGE] = edge if keep else -3
        return edge

    def _client_name(self, peer: str, peer_tgid: int,
                     endpoint: tuple[str, int] | None) -> tuple[str, bool]:
        """(client name, is it on this host) for the far end of a server's connection: the
        kernel names a local client's process; a remote client is named by its address."""
        if peer_tgid:
            return self.ctx.services.name_for(peer_tgid), True
        if peer in self.local_addresses:
            found = self.client_endpoints.get(endpoint) if endpoint else None
            return found or "unknown", True
        return peer, False

    # --- in-kernel aggregates ------------------------------------------------------------------
    def sync(self) -> None:
        """Add what the kernel counted since the last call (http_aggs) to the series.

        Kernel entries are cumulative and per CPU; each key's growth since its last reading is
        merged, so a series never goes down and no exchange is counted twice. A key whose
        process cannot be named yet (it exited before its exec record was read) waits a
        moment for that record. Keys of processes gone for a whole reap period are read a
        last time and deleted (nothing adds to them any more).
        """
        if self.obj is None or not self.aggregate:
            return
        with self._sync_lock:
            aggs = self.map("http_aggs")
            keys, values = aggs.read_all(HTTP_AGG_KEY, HTTP_AGG)
            n = len(keys)
            totals = (values.view(np.uint64).reshape(n, -1, _AGG_WORDS).sum(axis=1)
                      if n else np.zeros((0, _AGG_WORDS), np.uint64))
            raw_keys = [k.tobytes() for k in keys]
            last = self._agg_last
            zero = np.zeros(_AGG_WORDS, np.uint64)
            deltas = totals - np.array([last.get(raw, zero) for raw in raw_keys]
                                       ).reshape(n, _AGG_WORDS)
            now = time.monotonic()
            ready = [i for i in np.flatnonzero(deltas[:, 0] > 0).tolist()
                     if self._nameable(keys[i], raw_keys[i], now)]
            if ready:
                with self._lock:
                    self._merge_aggregates(keys[ready], deltas[ready].view(HTTP_AGG)[:, 0])
                for i in ready:
                    last[raw_keys[i]] = totals[i]
            if now - self._reaped_at >= self.reap_s:
                self._reaped_at = now
                self._reap(aggs, keys, raw_keys, totals)
            self.aggregated = self._aggregated_gone + int(sum(int(v[0]) for v in last.values()))

    def _nameable(self, key: np.void, raw: bytes, now: float) -> bool:
        """True when the key's processes have names, or waiting for them is over."""
        services = self.ctx.services
        tgids = (int(key["tgid"]), int(key["peer_tgid"]))
        if all(t == 0 or services.info_for(t) is not None for t in tgids):
            self._name_wait.pop(raw, None)
            return True
        if now - self._name_wait.setdefault(raw, now) < NAME_WAIT_S:
            return False
        del self._name_wait[raw]
        return True  # named "unknown"

    def _reap(self, aggs: Map, keys: np.ndarray, raw_keys: list[bytes],
              totals: np.ndarray) -> None:
        """Delete keys whose process (or, server side, client process) was gone at this reap
        and the one before: an exchange of theirs still in flight has landed by then."""
        pids = np.unique(np.concatenate([keys["tgid"], keys["peer_tgid"]])).tolist()
        gone = {p for p in pids if p and not os.path.exists(f"/proc/{p}")}
        dead = {raw for key, raw in zip(keys, raw_keys, strict=True)
                if int(key["tgid"]) in gone or int(key["peer_tgid"]) in gone}
        last = self._agg_last
        for i, raw in enumerate(raw_keys):
            if raw in dead and raw in self._dead_before and raw in last \
                    and np.array_equal(last[raw], totals[i]):
                aggs.delete(raw)
                # Every count of the key is merged already; `aggregated` keeps them.
                self._aggregated_gone += int(last.pop(raw)[0])
        self._dead_before = dead

    def _merge_aggregates(self, keys: np.ndarray, d: np.ndarray) -> None:
        """Kernel counts (growth per key) into the same series the records feed."""
        for k, v in zip(keys, d, strict=True):
            role, tgid, lport = int(k["role"]), int(k["tgid"]), int(k["lport"])
            service = (self.ctx.services.name_for_port(tgid, lport) if role == ROLE_SERVER
                       else self.ctx.services.name_for(tgid))
            status = int(k["status"])
            flags = int(k["flags"])
            count = float(v["count"])
            duration = v["duration"].astype(np.int64)
            seconds = float(v["duration_ns"]) / 1e9
            failed = count if (flags & FLAG_ABORTED or status >= 500) else 0.0
            peer = format_address(int(k["family"]), k["raddr"])
            rid = int(k["route"])
            route = self.route_names[rid] if rid < len(self.route_names) else UNKNOWN_ROUTE
            base = (service, METHODS[int(k["method"])], str(status), route,
                    "https" if flags & FLAG_TLS else "http")
            if role == ROLE_SERVER:
                local = format_address(int(k["family"]), k["laddr"])
                self.local_addresses.add(local)
                self.server_endpoints.put((local, lport), service)
                client, is_local = self._client_name(peer, int(k["peer_tgid"]), None)
                labels = self.edge_budget.admit((client, service), EDGE_LABELS)
                if not is_local:
                    self.edge_server_total.add(labels, count)
                    if failed:
                        self.edge_server_failed.add(labels, failed)
                self.edge_server_seconds.merge(labels, duration, seconds)
            else:
                rport = int(k["rport"])
                totals = self.edge_client_total.setdefault((service, (peer, rport)), [0.0, 0.0])
                totals[0] += count
                totals[1] += failed
                self.edge_client_seconds.merge((service, f"{peer}:{rport}"), duration, seconds)
            if flags & FLAG_ABORTED:
                self.aborted.add((service, "server" if role == ROLE_SERVER else "client"), count)
                continue
            req = v["req_body"].astype(np.int64)
            if role == ROLE_SERVER:
                labels = self.server_budget.admit(base, SERVER_LABELS)
                self.server_duration.merge(labels, duration, seconds)
                self.server_req_size.merge(labels, req, float(v["req_body_bytes"]))
                self.server_resp_size.merge(labels, v["resp_body"].astype(np.int64),
                                            float(v["resp_body_bytes"]))
            else:
                labels = self.client_budget.admit((*base, peer, str(int(k["rport"]))),
                                                  CLIENT_LABELS)
                self.client_duration.merge(labels, duration, seconds)
                self.client_req_size.merge(labels, req, float(v["req_body_bytes"]))

    # --- export ----------------------------------------------------------------------------
    def _server_name(self, endpoint: tuple[str, int]) -> str:
        name = self.server_endpoints.get(endpoint)
        if name is None and endpoint[0] in self.local_addresses:
            name = next((svc for (_, port), svc in self.server_endpoints.items()
                         if port == endpoint[1]), None)
        return name or f"{endpoint[0]}:{endpoint[1]}"

    def collect(self) -> Iterable[Metric]:
        """Families built from copies taken under the lock, so a big scrape (or a UI sample)
        does not hold up the ring reader while it renders."""
        self.sync()
        with self._lock:
            histograms = {
                ("http_server_request_duration_seconds", SERVER_LABELS,
                 "Duration of HTTP server requests: request's first byte read to response's "
                 "last byte written."): self.server_duration.snapshot(),
                ("http_client_request_duration_seconds", CLIENT_LABELS,
                 "Duration of HTTP client requests: request write to response's first byte."):
                    self.client_duration.snapshot(),
                ("http_server_request_body_size_bytes", SERVER_LABELS,
                 "Size of HTTP server request bodies."): self.server_req_size.snapshot(),
                ("http_server_response_body_size_bytes", SERVER_LABELS,
                 "Size of HTTP server response bodies."): self.server_resp_size.snapshot(),
                ("http_client_request_body_size_bytes", CLIENT_LABELS,
                 "Size of HTTP client request bodies."): self.client_req_size.snapshot(),
            }
            aborted = self.aborted.snapshot()
            total, failed, client_seconds = self._edge_totals()
            server_seconds = self.edge_server_seconds.snapshot()
            rpc_server, rpc_client = self.rpc_server.snapshot(), self.rpc_client.snapshot()
            lost_counts = sorted(self.h2.lost.items())
            budgets = [(metric, budget.overflows, budget.active_series) for metric, budget in (
                ("http_server_request_duration_seconds", self.server_budget),
                ("http_client_request_duration_seconds", self.client_budget),
                ("traces_service_graph_request", self.edge_budget))]
            via_counts = (float(self.aggregated), float(self.exchanges_from_records))
        for (name, label_names, documentation), series in histograms.items():
            yield series.family(name, documentation, label_names)
        del histograms
        yield aborted.family(
            "probewire_http_aborted",
            "HTTP requests whose connection closed before a response started.",
            ("service_name", "direction"))
        yield total.family("traces_service_graph_request", "Requests between two services.",
                           EDGE_LABELS)
        yield failed.family("traces_service_graph_request_failed",
                            "Failed requests (5xx or aborted) between two services.",
                            EDGE_LABELS)
        yield server_seconds.family(
            "traces_service_graph_request_server_seconds",
            "Server-side duration of requests between two services.", EDGE_LABELS)
        yield client_seconds.family(
            "traces_service_graph_request_client_seconds",
            "Client-side duration of requests between two services.", EDGE_LABELS)
        yield rpc_server.family(
            "rpc_server_duration_seconds", "Duration of RPCs served (gRPC over HTTP/2).",
            RPC_LABELS)
        yield rpc_client.family(
            "rpc_client_duration_seconds", "Duration of RPCs called (gRPC over HTTP/2).",
            RPC_LABELS)
        lost = CounterMetricFamily(
            "probewire_http2_connections_lost",
            "HTTP/2 connections given up (no preface seen, chunk dropped, too large).",
            labels=["reason"])
        for reason, n in lost_counts:
            lost.add_metric([reason], n)
        yield lost
        unrec = CounterMetricFamily(
            "probewire_http_unrecognized_connections",
            "Connections whose first plaintext was neither HTTP/1.x nor an HTTP/2 preface "
            "(for TLS: typically HTTP/2 opened before the agent started).",
            labels=["transport"])
        if self.obj is not None:
            _, values = self.obj.maps["tls_unrecognized"].read_all(
                np.dtype(np.uint32), np.dtype(np.uint64))
            unrec.add_metric(["tls"], float(values.sum()))
        yield unrec
        overflow = CounterMetricFamily(
            "probewire_cardinality_overflow",
            "Label sets folded into an 'other' series because a metric hit its budget.",
            labels=["metric"])
        active = GaugeMetricFamily("probewire_active_series",
                                   "Label sets held per metric family.", labels=["metric"])
        for metric, overflows, active_series in budgets:
            overflow.add_metric([metric], overflows)
            active.add_metric([metric], active_series)
        yield overflow
        yield active
        via = CounterMetricFamily(
            "probewire_http_exchanges",
            "HTTP exchanges seen: counted in kernel maps (route already known) or sent to "
            "user space as a ring record.", labels=["via"])
        via.add_metric(["kernel"], via_counts[0])
        via.add_metric(["ring"], via_counts[1])
        yield via

    def _edge_totals(self) -> tuple[CounterSeries, CounterSeries, HistogramSeries]:
        """Service-graph totals with client-side edges named by their server (under the lock:
        the server side may have named an endpoint since the edge was counted)."""
        total = CounterSeries()
        failed = CounterSeries()
        for (client, endpoint), (n, nf) in self.edge_client_total.items():
            labels = self.edge_budget.admit((client, self._server_name(endpoint)), EDGE_LABELS)
            total.add(labels, n)
            if nf:
                failed.add(labels, nf)
        for labels, v in self.edge_server_total.values.items():
            total.add(labels, v)
        for labels, v in self.edge_server_failed.values.items():
            failed.add(labels, v)
        client_seconds = HistogramSeries(DURATION_BUCKETS)
        sums = self.edge_client_seconds.sums
        for key, counts in self.edge_client_seconds.counts.items():
            client, peer = key
            host, _, port = peer.rpartition(":")
            labels = self.edge_budget.admit((client, self._server_name((host, int(port)))),
                                            EDGE_LABELS)
            client_seconds.merge(labels, counts, sums[key])
        return total, failed, client_seconds
