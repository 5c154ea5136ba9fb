"""Spans from exchanges: one span per server or client exchange the l7 family decoded (HTTP
with its heads; databases, caches and DNS with their operation, target and status).

Kernel records carry CLOCK_MONOTONIC timestamps, the thread that started the exchange and the
first bytes of the request head. From those this module builds OpenTelemetry spans:

- start/end are the kernel timestamps moved to wall clock (an offset sampled from both clocks);
- a client exchange started by a thread while that thread was serving a request (its start lies
  within [server.start, server.end] of a server exchange of the same tgid and tid) is the server
  span's child. The server record only arrives when its response is complete, after the records
  of its outgoing calls, so client records of processes that serve wait up to ``link_wait_ms``;
- a W3C ``traceparent`` in a server's request head makes the server span join that trace with
  that parent; one in a client's request head (the application propagates) gives the client
  span its trace id and span id, so the downstream server's span points at it;
- head sampling is parent-based: a traceparent's sampled flag decides, else the trace-id ratio
  (the same rule as the SDK's ``ParentBased(TraceIdRatioBased)``). Tail sampling belongs in the
  collector (deploy/otel-collector/).

The assembler's output is a light :class:`SpanRecord` per finished span (its name, kind, ids,
trace state, wall-clock times, attributes, status and resource). The direct OTLP encoder
(:mod:`probewire.export.span_encoder`) turns batches of them into protobuf bytes; ``add`` and
``flush`` also make them into the SDK's ``ReadableSpan`` for any other ``SpanExporter``. Both come
from the same record, so the two paths cannot disagree.

Nothing here does I/O except reading /proc once per new process to learn whether it listens.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import repeat
from types import MappingProxyType

import numpy as np
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from probewire import __version__
from probewire.aggregate.http_heads import METHODS, nth_request, parse_request_line
from probewire.enrich.identity import resource_attributes as key_attributes
from probewire.export.span_wire import IntAttributes, StrAttribute
from probewire.l7.constants import HttpFlag, Role
from probewire.l7.exchanges import NUMERIC_STATUSES, ExchangeBatch, ExchangeFlag, split_db_target
from probewire.l7.registry import protocol_by_id

__all__ = ["SpanAssembler", "Traceparent", "parse_traceparent", "sampling_threshold",
           "wall_clock_offset_ns"]

SCOPE = InstrumentationScope("probewire", __version__)
_TRACEPARENT = re.compile(
    rb"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-|$)"
)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# Processes whose "do I listen?" answer is cached, and for how long (ns).
_LISTEN_CACHE_MAX = 4096
_LISTEN_TTL_NS = 10_000_000_000
# Parsed request heads kept (a repeated head is parsed once).
_HEAD_CACHE_MAX = 4096
_ID_POOL_BYTES = 4096
_U64S = struct.Struct(f">{_ID_POOL_BYTES // 8}Q")
_TCP_LISTEN = "0A"


def wall_clock_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, read as tightly as two calls allow."""
    best = None
    for _ in range(3):
        a = time.monotonic_ns()
        wall = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, wall - (a + b) // 2)
    assert best is not None
    return best[1]


# OpenTelemetry's consistent probability sampling (trace state "ot" vendor key, "th" field):
# the trace id's rightmost 56 bits are the randomness R, a span is kept when R >= T, and T, the
# rejection threshold, is written in the span's tracestate as up to 14 hex digits without
# trailing zeros, so a collector can extrapolate counts (adjusted count 1/p).
RANDOMNESS_BITS = 56
_MAX_T = 1 << RANDOMNESS_BITS
_OT_TH = re.compile(r"(?:^|;)th:([0-9a-f]{1,14})(?:;|$)")


def sampling_threshold(probability: float) -> int:
    """T for a sampling probability p in (0, 1]: round((1 - p) * 2^56), in exact arithmetic
    (1-in-N as the fraction 1/N: a float 0.1 times 2^56 is off in its last digits)."""
    exact = Fraction(probability).limit_denominator(1 << 24)
    return min(_MAX_T - 1, max(0, round((1 - exact) * _MAX_T)))


def threshold_text(threshold: int) -> str:
    return f"{threshold:014x}".rstrip("0") or "0"


def _ot_threshold(tracestate: bytes | None) -> str | None:
    """The th value of an incoming tracestate's ot entry, if any."""
    if not tracestate:
        return None
    for member in tracestate.decode("latin-1").split(","):
        key, _, value = member.strip().partition("=")
        if key == "ot":
            m = _OT_TH.search(value)
            return m.group(1) if m else None
    return None


@dataclass(frozen=True)
class Traceparent:
    trace_id: int
    span_id: int
    sampled: bool


def parse_traceparent(value: bytes) -> Traceparent | None:
    """A W3C trace-context ``traceparent`` value (version 00), None if invalid."""
    m = _TRACEPARENT.match(value.strip().lower())
    if not m:
        return None
    trace_id, span_id = int(m[1], 16), int(m[2], 16)
    if not trace_id or not span_id:
        return None  # all-zero ids are invalid by the spec
    return Traceparent(trace_id, span_id, bool(int(m[3], 16) & 1))


# An HTTP span's own attributes (after its shared ones), in the order they are written.
_SERVER_OWN = ("thread.id", "network.peer.port", "client.port", "url.path")
_SERVER_OWN_QUERY = (*_SERVER_OWN, "url.query")
_CLIENT_OWN = ("thread.id", "url.full")
_OWN_KEYS = {len(keys): keys for keys in (_SERVER_OWN, _SERVER_OWN_QUERY, _CLIENT_OWN)}
_OWN_FIELDS_MAX = 16384
_THREAD_ID = IntAttributes("thread.id")
_PEER_PORTS = IntAttributes("network.peer.port", "client.port")
_URL_PATH = StrAttribute("url.path")
_URL_QUERY = StrAttribute("url.query")
_URL_FULL = StrAttribute("url.full")


@dataclass(slots=True, init=False)
class _Head:
    """A parsed request head (slots and a plain __init__, no default factory: one is made per
    distinct head, often once per request when paths carry ids), with what spans read of it
    as text and protobuf bytes made once per head, when a span first reads it, rather than
    once per span."""

    method: str | None
    target: bytes
    headers: dict[bytes, bytes]
    otlp: bool
    user_agent: bytes | None
    # Made at the first span that needs them (see _server_url, _client_url).
    server_url: tuple[str, str | None, bytes] | None = field(
        default=None, compare=False)
    client_url: tuple[str | None, bytes] | None = field(default=None, compare=False)

    def __init__(self, method: str | None = None, target: bytes = b"",
                 headers: dict[bytes, bytes] | None = None) -> None:
        self.method = method
        self.target = target
        self.headers = headers = {} if headers is None else headers
        self.otlp = False  # is_otlp_export: an OTLP export call, never a span
        self.user_agent = headers.get(b"user-agent")
        self.server_url = self.client_url = None


def _server_url(head: _Head) -> tuple[str, str | None, bytes]:
    """A server span's url.path and url.query (None without a "?") and their bytes."""
    path, query_sep, query = head.target.decode("latin-1").partition("?")
    if query_sep:
        return path, query, _URL_PATH(path) + _URL_QUERY(query)
    return path, None, _URL_PATH(path)


def _peer_url(ex: _Exchange) -> str:
    """url.full of a client request whose head has no Host: the peer's address instead."""
    target = ex.head.target.decode("latin-1")
    return f"http://{ex.peer}:{ex.peer_port}{target}" if target.startswith("/") else target


def _client_url(head: _Head) -> tuple[str | None, bytes]:
    """A client span's url.full and its bytes; None when it needs the peer (no Host)."""
    host = head.headers.get(b"host", b"").decode("latin-1")
    if not host:
        return None, b""
    text = head.target.decode("latin-1")
    url_full = f"http://{host}{text}" if text.startswith("/") else text
    return url_full, _URL_FULL(url_full)


_NO_HEAD = _Head()
_NO_ATTRIBUTES: Mapping[str, object] = MappingProxyType({})


# A whole request line as parse_request_line reads it (a known method, a target of visible
# bytes, HTTP/1.0, 1.1 or 2, then the line's end), matched in C; anything else (a cut line,
# junk) goes to parse_request_line itself. tests/unit/test_span_encoder.py checks they agree.
_REQUEST_LINE = re.compile(
    rb"(" + b"|".join(m.encode() for m in METHODS) + rb") ([^\x00-\x20\x7f]+) "
    rb"HTTP/(?:1\.[01]|2)\r?\n")


# _REQUEST_LINE ended by CRLF only: the header lines after it are then split at CRLF.
_REQUEST_LINE_CRLF = re.compile(_REQUEST_LINE.pattern[:-len(rb"\r?\n")] + rb"\r\n")


def request_line(head: bytes) -> tuple[str, bytes] | None:
    """parse_request_line, with the common case in one regex match."""
    m = _REQUEST_LINE.match(head)
    if m is not None:
        return m[1].decode("ascii"), m[2]
    return parse_request_line(head)


def _parse_head(head: bytes, pipe_idx: int) -> _Head:
    """Request line and headers of the request this exchange answered (cut heads are fine)."""
    if pipe_idx:
        parsed = nth_request(head, pipe_idx)
        # Headers of later pipelined requests are rarely inside the captured bytes.
        return _Head(parsed[0], parsed[1]) if parsed else _Head()
    parsed = request_line(head)
    if parsed is None:
        return _Head()
    return _Head(parsed[0], parsed[1], _header_lines(head.split(b"\r\n")[1:-1]))


def _header_lines(lines: list[bytes]) -> dict[bytes, bytes]:
    """Header lines up to the head's end (the last piece of a cut head is left out by the
    caller: it may be cut mid-line)."""
    headers: dict[bytes, bytes] = {}
    for line in lines:
        if not line:
            break
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _parse_head_shared(head: bytes, pipe_idx: int,
                       header_sets: dict[bytes, dict[bytes, bytes]]) -> _Head:
    """_parse_head, with the headers parsed once per distinct header block and the dict shared
    (never changed once made): a client sends the same headers with each request, only its
    request line (a path with an id) differs."""
    m = _REQUEST_LINE_CRLF.match(head) if not pipe_idx else None
    if m is None:
        return _parse_head(head, pipe_idx)
    block = head[m.end():]
    headers = header_sets.get(block)
    if headers is None:
        if len(header_sets) >= _HEAD_CACHE_MAX:
            header_sets.clear()
        headers = header_sets[block] = _header_lines(block.split(b"\r\n")[:-1])
    return _Head(m[1].decode("ascii"), m[2], headers)


# OTLP export calls: gRPC methods of the collector services, and OTLP/HTTP's signal paths.
OTLP_GRPC_PREFIX = b"/opentelemetry.proto.collector."
OTLP_HTTP_PATHS = (b"/v1/traces", b"/v1/metrics", b"/v1/logs")


def is_otlp_export(target: bytes, method: str | None = "POST",
                   content_type: bytes | None = None) -> bool:
    """True for a request that carries telemetry to an OTLP receiver. Such exchanges never
    become spans: the agent's own export to a collector on this host is traced at the
    collector's end, so each export would make a span for the next export, which makes
    another, for as long as the agent runs (183 spans/s at idle, measured). Their metrics
    are kept; only spans of span transport are left out (probewire_otlp_spans_total counts
    them as result="export_call").

    OTLP/HTTP: a POST to /v1/traces, /v1/metrics or /v1/logs, or to a path ending so under a
    prefix (an endpoint such as http://collector/otlp) when the body is protobuf, so an
    application's own JSON API at /api/v1/logs still has its spans."""
    if b"/v1/" not in target and not target.startswith(OTLP_GRPC_PREFIX):
        return False  # most requests: one search decides
    path = target.split(b"?", 1)[0]
    if path.startswith(OTLP_GRPC_PREFIX):
        return True
    if method != "POST" or not path.endswith(OTLP_HTTP_PATHS):
        return False
    return path in OTLP_HTTP_PATHS or (content_type or b"").startswith(b"application/x-protobuf")


def _with_otlp(head: _Head) -> _Head:
    target = head.target
    # is_otlp_export's first test, here: it decides for nearly every head.
    if b"/v1/" in target or target.startswith(OTLP_GRPC_PREFIX):
        head.otlp = is_otlp_export(target, head.method, head.headers.get(b"content-type"))
    return head


@dataclass(slots=True)
class _Exchange:
    kind: str  # the protocol's kind: "http", "db", "dns"
    protocol: str
    server: bool
    tgid: int
    tid: int
    start_ns: int
    end_ns: int
    status: int
    aborted: bool
    h2: bool
    service: str
    method: str
    route: str
    head: _Head
    peer: str
    peer_port: int
    local: str
    local_port: int
    arrived_ns: int
    status_text: str = ""
    attributes: Mapping[str, object] = field(default_factory=dict)
    kernel_kept: bool | None = None  # the kernel's sampling decision (HTTP/1.x records)
    trace_id: int = 0
    span_id: int = 0
    parent_id: int = 0
    parent_remote: bool = False
    sampled: bool = True
    propagated: Traceparent | None = None
    threshold: str | None = None  # the "th" of the sampling decision, when known


class SpanResource:
    """The OpenTelemetry resource of one process's spans, shared by all its records. The direct
    encoder keeps the resource's protobuf bytes here (`encoded`), made once."""

    __slots__ = ("encoded", "resource")

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.encoded: bytes | None = None


class SharedAttributes:
    """Attributes that many spans carry alike (with the span name and error status they
    imply), made once. A record that points at one has these attributes first in its own
    dict, in this order and with these values, and only other keys after them; the direct
    encoder keeps their protobuf bytes here (`encoded`), made once."""

    __slots__ = ("attributes", "encoded", "error", "name")

    def __init__(self, name: str, attributes: dict[str, str | int], error: bool) -> None:
        self.name = name
        self.attributes = attributes
        self.error = error
        self.encoded: bytes | None = None


class SpanRecord:
    """One finished span, as both export paths take it. Times are wall-clock ns; a zero
    `parent_id` is a root; `threshold` is the "th" of the span's tracestate ("ot=th:<it>").
    Attribute values are str or int, never bool (the encoder caches by (key, value), and
    True == 1).

    An HTTP span from the assembler has its attributes as the `shared` ones followed by its
    own few (thread, ports, path: `own_values`, whose keys their count says, see _OWN_KEYS),
    with the protobuf bytes of those own ones already written (`own_encoded`): the direct
    encoder writes shared and own bytes as they are and no dict is made. Reading `attributes`
    makes the dict (once); from then on the dict is what counts (it may be changed) and
    `own_encoded` is dropped.

    A record holds nothing per span that the garbage collector keeps visiting (a tuple of
    ints and strs is untracked at the first collection it survives; the exchange it came from
    is not kept): records wait up to an export's 2,048 spans, long enough to reach the oldest
    generation, and each object there is traversed by every full collection."""

    __slots__ = ("_attributes", "end_ns", "error", "name", "own_encoded", "own_values",
                 "parent_id", "parent_remote", "resource", "server", "shared", "span_id",
                 "start_ns", "threshold", "trace_id")

    def __init__(self, name: str, server: bool, trace_id: int, span_id: int, parent_id: int,
                 parent_remote: bool, threshold: str | None, start_ns: int, end_ns: int,
                 attributes: dict[str, str | int] | None, error: bool, resource: SpanResource,
                 shared: SharedAttributes | None = None, own_values: tuple[str | int, ...] = (),
                 own_encoded: bytes | None = None) -> None:
        self.name = name
        self.server = server  # SpanKind SERVER, else CLIENT
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.parent_remote = parent_remote
        self.threshold = threshold
        self.start_ns = start_ns
        self.end_ns = end_ns
        self._attributes = attributes  # None: shared + own, made when read
        self.error = error  # StatusCode ERROR, else UNSET
        self.resource = resource
        self.shared = shared  # the first of `attributes`, made once (see SharedAttributes)
        self.own_values = own_values
        # Only with attributes None (the encoder writes these bytes and never the dict).
        self.own_encoded = own_encoded

    @property
    def attributes(self) -> dict[str, str | int]:
        attributes = self._attributes
        if attributes is None:
            attributes = self._attributes = {} if self.shared is None \
                else self.shared.attributes.copy()
            if self.own_values:
                attributes.update(zip(_OWN_KEYS[len(self.own_values)], self.own_values,
                                      strict=True))
            self.own_encoded = None  # the dict may be changed: it is what counts now
        return attributes

    @attributes.setter
    def attributes(self, value: dict[str, str | int]) -> None:
        self._attributes = value
        self.own_encoded = None

    def replace(self, **changes: object) -> SpanRecord:
        """A copy with some fields changed (as dataclasses.replace); its attributes are a
        dict of their own."""
        fields: dict[str, object] = {
            "name": self.name, "server": self.server, "trace_id": self.trace_id,
            "span_id": self.span_id, "parent_id": self.parent_id,
            "parent_remote": self.parent_remote, "threshold": self.threshold,
            "start_ns": self.start_ns, "end_ns": self.end_ns,
            "attributes": dict(self.attributes), "error": self.error,
            "resource": self.resource, "shared": self.shared}
        fields.update(changes)
        return SpanRecord(**fields)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        attributes = self._attributes if self._attributes is not None else \
            f"shared + {self.own_values!r}"
        return (f"SpanRecord({self.name!r}, server={self.server}, trace_id={self.trace_id:x}, "
                f"span_id={self.span_id:x}, parent_id={self.parent_id:x}, "
                f"attributes={attributes})")


def readable_span(rec: SpanRecord) -> ReadableSpan:
    """The SDK's ReadableSpan of a record (for any SpanExporter)."""
    state = TraceState([("ot", f"th:{rec.threshold}")]) if rec.threshold else None
    ctx = SpanContext(rec.trace_id, rec.span_id, is_remote=False, trace_flags=_SAMPLED,
                      trace_state=state)
    parent = (SpanContext(rec.trace_id, rec.parent_id, is_remote=rec.parent_remote,
                          trace_flags=_SAMPLED) if rec.parent_id else None)
    return ReadableSpan(
        name=rec.name, context=ctx, parent=parent, resource=rec.resource.resource,
        attributes=rec.attributes, kind=SpanKind.SERVER if rec.server else SpanKind.CLIENT,
        status=Status(StatusCode.ERROR) if rec.error else Status(StatusCode.UNSET),
        instrumentation_scope=SCOPE, start_time=rec.start_ns, end_time=rec.end_ns,
    )


def _listening_tgids_probe(tgid: int) -> bool:
    """Whether the process has a listening TCP socket (so it may serve requests)."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{tgid}/fd"):
            try:
                target = os.readlink(f"/proc/{tgid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        if not inodes:
            return False
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{tgid}/net/{table}") as f:
                    next(f, None)
                    for line in f:
                        cols = line.split()
                        if len(cols) > 9 and cols[3] == _TCP_LISTEN and cols[9] in inodes:
                            return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def _http_shared(ex: _Exchange, user_agent: bytes | None) -> SharedAttributes:
    """The attributes of an HTTP span that are the same for every span of its _record key:
    all but the thread, the ports that change per connection and the request's target."""
    attrs: dict[str, str | int] = {
        "http.request.method": ex.method,
        "network.protocol.name": "http",
        "network.protocol.version": "2" if ex.h2 else "1.1",
        "network.peer.address": ex.peer,
    }
    if not ex.aborted:
        attrs["http.response.status_code"] = ex.status
    if user_agent:
        attrs["user_agent.original"] = user_agent.decode("latin-1")
    if ex.server:
        name = f"{ex.method} {ex.route}"
        attrs["http.route"] = ex.route
        attrs["url.scheme"] = "http"
        attrs["server.address"] = ex.local
        attrs["server.port"] = ex.local_port
        attrs["client.address"] = ex.peer
        failed = ex.aborted or ex.status >= 500
    else:
        name = ex.method
        attrs["network.peer.port"] = ex.peer_port
        attrs["server.address"] = ex.peer
        attrs["server.port"] = ex.peer_port
        failed = ex.aborted or ex.status >= 400
    if failed:
        attrs["error.type"] = "aborted" if ex.aborted else str(ex.status)
    return SharedAttributes(name, attrs, failed)


class SpanAssembler:
    """Turns ExchangeBatches into finished spans; not thread-safe (one exporter thread owns it)."""

    def __init__(
        self,
        sampling_ratio: float = 1.0,
        link_wait_ns: int = 2_000_000_000,
        resource_attributes: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
        process_attributes: Callable[[int, str], Mapping[str, str]] | None = None,
        honor_traceparent: bool = True,
    ) -> None:
        self.set_sampling(sampling_ratio, honor_traceparent)
        # (tgid, service key) -> resource attributes of the process (pod, container, ...).
        self.process_attributes = process_attributes
        self.link_wait_ns = link_wait_ns
        self.resource_attributes = dict(resource_attributes or {})
        self.host_name = socket.gethostname()
        self.offset_ns = wall_clock_offset_ns()
        self._offset_at = time.monotonic_ns()
        self._rng = rng or random.SystemRandom()
        # Ids come from a pool of OS random 64-bit words (one getrandom call per 512, not one
        # per id; a 128-bit id is two); a given rng (tests) draws them itself, so its ids are
        # reproducible.
        self._pool: list[int] = []
        self._from_pool = rng is None
        self._pending: OrderedDict[tuple[int, int], list[_Exchange]] = OrderedDict()
        self._listens: OrderedDict[int, tuple[bool, int]] = OrderedDict()
        self._resources: dict[tuple[str, int], SpanResource] = {}
        # The same resource under another (service, tgid): one entry, as the SDK groups them.
        self._resource_entries: dict[Resource, SpanResource] = {}
        self._heads: dict[bytes | tuple[bytes, int], _Head] = {}
        self._header_sets: dict[bytes, dict[bytes, bytes]] = {}
        self._shared: dict[tuple[object, ...], SharedAttributes] = {}
        self._tid_fields: dict[int, bytes] = {}  # thread id -> its thread.id attribute's bytes
        # Peer port -> its network.peer.port and client.port attributes' bytes (a keep-alive
        # connection's requests share one).
        self._port_fields: dict[int, bytes] = {}
        self.unsampled = 0
        self.linked = 0
        self.export_calls = 0  # OTLP export exchanges, never made spans (is_otlp_export)

    # Set when the kernel decides which traces to keep (probes/l7.py sample_spans): HTTP/1.x
    # records then say so (HttpFlag.SAMPLED) and new trace ids are drawn to agree with it.
    kernel_sampling = False

    def set_sampling(self, probability: float, honor_traceparent: bool = True) -> None:
        """Keep new traces with this probability (consistently with the trace id, as
        OpenTelemetry's probability sampling does); an incoming sampled flag decides for its
        own trace when `honor_traceparent`."""
        self.probability = probability
        self.honor_traceparent = honor_traceparent
        self.threshold = sampling_threshold(probability) if probability > 0 else _MAX_T
        self.threshold_text = threshold_text(self.threshold) if 0 < probability < 1 else None

    def _decide(self, ex: _Exchange) -> None:
        if ex.kernel_kept is not None:
            # The kernel drew (with the same probability); a new trace id agrees with it.
            ex.sampled = ex.kernel_kept
        else:
            ex.sampled = (ex.trace_id & (_MAX_T - 1)) >= self.threshold and self.probability > 0
        ex.threshold = self.threshold_text

    def _new_trace_id(self, ex: _Exchange) -> int:
        """A random trace id; when the kernel decided, one whose randomness (its low 56 bits)
        is on the side of the threshold the decision says, as a collector will read it."""
        pool = self._pool
        # The pool's common case here, not in a call: it runs for nearly every span.
        trace_id = pool.pop() << 64 | pool.pop() if self._from_pool and len(pool) > 2 \
            else self._new_id(128)
        if ex.kernel_kept is None:
            return trace_id
        low, span = (self.threshold, _MAX_T - self.threshold) if ex.kernel_kept \
            else (0, self.threshold)
        if span <= 0:
            return trace_id
        randomness = low + self._rng.randrange(span)
        return (trace_id & ~(_MAX_T - 1)) | randomness or 1

    # --- public ------------------------------------------------------------------------------
    def add(self, batch: ExchangeBatch, now_ns: int | None = None) -> list[ReadableSpan]:
        """Spans finished by this batch (in order); client spans may wait for their parent."""
        return [readable_span(r) for r in self.add_records(batch, now_ns)]

    def flush(self, now_ns: int | None = None, everything: bool = False) -> list[ReadableSpan]:
        """Client spans that waited long enough (or all of them) as spans without a parent."""
        return [readable_span(r) for r in self.flush_records(now_ns, everything)]

    def add_records(self, batch: ExchangeBatch, now_ns: int | None = None) -> list[SpanRecord]:
        """`add`, as records (what the direct OTLP encoder takes)."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        if now_ns - self._offset_at > 60_000_000_000:  # follow NTP slews
            self.offset_ns, self._offset_at = wall_clock_offset_ns(), now_ns
        done: list[_Exchange] = []
        for ex in self._decode(batch, now_ns):
            if ex.head.otlp:
                self.export_calls += 1
                continue
            if ex.server:
                self._start_trace(ex, ex.head.headers.get(b"traceparent"))
                self._adopt_children(ex, done)
                done.append(ex)
            else:
                self._client_ids(ex)
                if self.link_wait_ns and self._may_serve(ex.tgid, now_ns):
                    self._pending.setdefault((ex.tgid, ex.tid), []).append(ex)
                else:
                    self._finish_root_client(ex)
                    done.append(ex)
        done.extend(self._expire(now_ns))
        return self._to_records(done)

    def flush_records(self, now_ns: int | None = None,
                      everything: bool = False) -> list[SpanRecord]:
        """`flush`, as records."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        return self._to_records(self._expire(now_ns, everything))

    @property
    def pending(self) -> int:
        return sum(len(v) for v in self._pending.values())

    # --- internals ---------------------------------------------------------------------------
    def _decode(self, batch: ExchangeBatch, now_ns: int) -> list[_Exchange]:
        """The batch's exchanges, built column by column: numpy does the flags, statuses and
        head offsets of the whole batch, and the rows are made by one ``map`` over the
        columns' lists (a Python-level loop over rows costs more than all of that). Only a
        request head not seen before is parsed by itself."""
        rows = batch.rows
        n = len(rows)
        if not n:
            return []
        proto = rows["proto"]
        # Protocol ids are small (uint8): a count per id finds the batch's few protocols
        # faster than np.unique's sort.
        protocols = {p: protocol_by_id(p) for p in np.flatnonzero(np.bincount(proto)).tolist()}
        if len(protocols) == 1:
            (protocol,) = protocols.values()
            kinds, names = [protocol.kind] * n, [protocol.name] * n
        else:
            by_row = [protocols[p] for p in proto.tolist()]
            kinds, names = [p.kind for p in by_row], [p.name for p in by_row]
        eflags = rows["eflags"]
        statuses = rows["status"]
        heads: list[_Head] = [_NO_HEAD] * n
        kept: list[bool | None] = [None] * n
        http_ids = [p for p, protocol in protocols.items() if protocol.kind == "http"]
        if len(http_ids) == len(protocols):
            self._http_heads(batch, np.ones(n, dtype=bool), heads, kept)
        elif http_ids:
            is_http = np.zeros(max(protocols) + 1, dtype=bool)
            is_http[http_ids] = True
            self._http_heads(batch, is_http[proto], heads, kept)
        attributes = batch.attributes
        # A row's attributes are only read, never changed: rows without any share one dict.
        row_attributes = [a or _NO_ATTRIBUTES for a in attributes] if attributes \
            else [_NO_ATTRIBUTES] * n
        return list(map(
            _Exchange, kinds, names, (rows["role"] == int(Role.SERVER)).tolist(),
            rows["tgid"].tolist(), rows["tid"].tolist(), rows["start_ns"].tolist(),
            rows["end_ns"].tolist(),
            np.where(statuses < NUMERIC_STATUSES, statuses, 0).tolist(),
            (eflags & int(ExchangeFlag.ABORTED) != 0).tolist(),
            (eflags & int(ExchangeFlag.H2) != 0).tolist(),
            batch.service, batch.operation, batch.target, heads, batch.peer_address,
            rows["rport"].tolist(), batch.local_address, rows["lport"].tolist(),
            repeat(now_ns, n), batch.status, row_attributes, kept))

    def _http_heads(self, batch: ExchangeBatch, is_http: np.ndarray, heads: list[_Head],
                    kept: list[bool | None]) -> None:
        """Fill in the parsed request head (and the kernel's sampling decision) of each HTTP
        row: from its kernel record's head bytes (HTTP/1.x), else from its path attribute."""
        http, index = batch.http, batch.http_index
        at = index if index is not None else np.full(len(is_http), -1)
        with_record = is_http & (at >= 0)
        if http is None or not len(http):
            with_record[:] = False
        rows_with = np.flatnonzero(with_record)
        if len(rows_with):
            head_len = http.dtype["req_head"].itemsize  # type: ignore[union-attr]
            # Field by field: the whole records (response head and all) are twice the bytes.
            at_with = at[rows_with]
            raw = http["req_head"][at_with].tobytes()  # type: ignore[index]
            ends = np.minimum(http["req_head_len"][at_with],  # type: ignore[index]
                              head_len).astype(np.int64)
            starts = np.arange(len(rows_with), dtype=np.int64) * head_len
            head = self._head
            parsed = list(map(head, map(raw.__getitem__, map(
                slice, starts.tolist(), (starts + ends).tolist())),
                http["pipe_idx"][at_with].tolist()))  # type: ignore[index]
            every_row = len(rows_with) == len(heads)
            row_ids = rows_with.tolist()
            if every_row:
                heads[:] = parsed
            else:
                for i, h in zip(row_ids, parsed, strict=True):
                    heads[i] = h
            if self.kernel_sampling:
                flags = (http["hflags"][at_with]  # type: ignore[index]
                         & int(HttpFlag.SAMPLED) != 0).tolist()
                if every_row:
                    kept[:] = flags
                else:
                    for i, k in zip(row_ids, flags, strict=True):
                        kept[i] = k
        attributes = batch.attributes
        for i in np.flatnonzero(is_http & ~with_record).tolist():
            path = str(attributes[i].get("path", "")) if attributes else ""
            heads[i] = _with_otlp(_Head(batch.operation[i], path.encode("latin-1", "replace")))

    def _head(self, raw: bytes, pipe_idx: int) -> _Head:
        """_parse_head, remembered: a client sends the same head again and again (heads are
        never changed once parsed). The first request of a connection's head (pipe_idx 0, by
        far the most) is keyed by its bytes alone."""
        heads = self._heads
        key: bytes | tuple[bytes, int] = (raw, pipe_idx) if pipe_idx else raw
        head = heads.get(key)
        if head is None:
            if len(heads) >= _HEAD_CACHE_MAX:
                heads.clear()
            head = heads[key] = _with_otlp(_parse_head_shared(raw, pipe_idx, self._header_sets))
        return head

    def _new_id(self, bits: int) -> int:
        """`bits` (64 or 128) random bits, never all zero: from the pool (one call, it runs
        for every span), or drawn from the given rng."""
        if self._from_pool:
            pool = self._pool
            if len(pool) < 2:
                # Zero words are left out, so every id taken here is valid as it comes.
                pool.extend(filter(None, _U64S.unpack(os.urandom(_ID_POOL_BYTES))))
            return pool.pop() if bits == 64 else pool.pop() << 64 | pool.pop()
        value = 0
        while not value:
            value = self._rng.getrandbits(bits)
        return value

    def _start_trace(self, ex: _Exchange, header: bytes | None) -> None:
        pool = self._pool
        ex.span_id = pool.pop() if self._from_pool and len(pool) > 2 else self._new_id(64)
        parent = parse_traceparent(header) if header else None
        if parent is not None:
            ex.trace_id, ex.parent_id, ex.parent_remote = parent.trace_id, parent.span_id, True
            if self.honor_traceparent:
                ex.sampled = parent.sampled
                ex.threshold = _ot_threshold(ex.head.headers.get(b"tracestate"))
            else:
                self._decide(ex)
        else:
            ex.trace_id = self._new_trace_id(ex)
            self._decide(ex)

    def _client_ids(self, ex: _Exchange) -> None:
        header = ex.head.headers.get(b"traceparent")
        ex.propagated = parse_traceparent(header) if header else None

    def _finish_root_client(self, ex: _Exchange) -> None:
        if ex.propagated is not None:
            ex.trace_id, ex.span_id = ex.propagated.trace_id, ex.propagated.span_id
            if self.honor_traceparent:
                ex.sampled = ex.propagated.sampled
                ex.threshold = _ot_threshold(ex.head.headers.get(b"tracestate"))
            else:
                self._decide(ex)
        else:
            self._start_trace(ex, None)

    def _adopt_children(self, server: _Exchange, done: list[_Exchange]) -> None:
        key = (server.tgid, server.tid)
        waiting = self._pending.get(key)
        if not waiting:
            return
        keep = []
        for child in waiting:
            if server.start_ns <= child.start_ns <= server.end_ns:
                if child.propagated is not None:
                    # The application chose the ids; it is our child only if it kept the trace.
                    child.trace_id, child.span_id = (child.propagated.trace_id,
                                                     child.propagated.span_id)
                    if child.trace_id == server.trace_id:
                        child.parent_id = server.span_id
                else:
                    child.trace_id, child.span_id = server.trace_id, self._new_id(64)
                    child.parent_id = server.span_id
                child.sampled = server.sampled
                child.threshold = server.threshold
                self.linked += 1
                done.append(child)
            else:
                keep.append(child)
        if keep:
            self._pending[key] = keep
        else:
            del self._pending[key]

    def _expire(self, now_ns: int, everything: bool = False) -> list[_Exchange]:
        out: list[_Exchange] = []
        for key in list(self._pending):
            waiting = self._pending[key]
            old = [c for c in waiting if everything or now_ns - c.arrived_ns >= self.link_wait_ns]
            if not old:
                continue
            for c in old:
                self._finish_root_client(c)
            out.extend(old)
            rest = [c for c in waiting if c not in old]
            if rest:
                self._pending[key] = rest
            else:
                del self._pending[key]
        return out

    def _may_serve(self, tgid: int, now_ns: int) -> bool:
        cached = self._listens.get(tgid)
        if cached is not None and now_ns - cached[1] < _LISTEN_TTL_NS:
            return cached[0]
        answer = _listening_tgids_probe(tgid)
        self._listens[tgid] = (answer, now_ns)
        self._listens.move_to_end(tgid)
        if len(self._listens) > _LISTEN_CACHE_MAX:
            self._listens.popitem(last=False)
        return answer

    def _resource(self, service: str, tgid: int) -> SpanResource:
        entry = self._resources.get((service, tgid))
        if entry is None:
            if len(self._resources) > _LISTEN_CACHE_MAX:
                self._resources.clear()
                self._resource_entries.clear()
            attrs: dict[str, str | int] = {
                "service.name": service, "host.name": self.host_name, "process.pid": tgid,
                "telemetry.distro.name": "probewire", "telemetry.distro.version": __version__,
            }
            try:
                attrs["process.executable.path"] = os.readlink(f"/proc/{tgid}/exe")
                attrs["process.executable.name"] = os.path.basename(
                    str(attrs["process.executable.path"]))
            except OSError:
                pass
            # The key's own attributes (service.name, k8s.namespace.name, workload), then
            # the process's (pod, container), then the configured ones (except service.name,
            # which names the agent itself, not the services it observes).
            attrs.update(key_attributes(service))
            if self.process_attributes is not None:
                # A vanished process: its key still names it.
                with contextlib.suppress(Exception):
                    attrs.update(self.process_attributes(tgid, service))
            attrs.update({k: v for k, v in self.resource_attributes.items()
                          if k != "service.name"})
            res = Resource.create(attrs)
            entry = self._resource_entries.setdefault(res, SpanResource(res))
            self._resources[(service, tgid)] = entry
        return entry

    def _to_records(self, done: list[_Exchange]) -> list[SpanRecord]:
        records = []
        for ex in done:
            if not ex.sampled:
                self.unsampled += 1
                continue
            records.append(self._record(ex) if ex.kind == "http" else self._db_record(ex))
        return records

    def _record(self, ex: _Exchange) -> SpanRecord:
        # What many spans share (method, status, peer, user agent, route, ...) is one
        # SharedAttributes made once per distinct combination; a span adds only what is new per
        # request (ports, thread, path), whose bytes are made here from pieces kept per head,
        # thread and port. No dict per span: the encoder writes the shared part's bytes and the
        # span's own as they are (SpanRecord.attributes makes the dict if anyone asks).
        head = ex.head
        user_agent = head.user_agent
        server = ex.server
        key = (True, ex.method, ex.h2, ex.peer, ex.status, ex.aborted, user_agent, ex.route,
               ex.local, ex.local_port) if server else \
            (False, ex.method, ex.h2, ex.peer, ex.status, ex.aborted, user_agent, ex.peer_port)
        shared = self._shared.get(key)
        if shared is None:
            if len(self._shared) >= _HEAD_CACHE_MAX:
                self._shared.clear()
            shared = self._shared[key] = _http_shared(ex, user_agent)
        tid = ex.tid
        tid_field = self._tid_fields.get(tid)
        if tid_field is None:
            if len(self._tid_fields) >= _OWN_FIELDS_MAX:
                self._tid_fields.clear()
            tid_field = self._tid_fields[tid] = _THREAD_ID(tid)
        resource = self._resources.get((ex.service, ex.tgid)) or \
            self._resource(ex.service, ex.tgid)
        offset_ns = self.offset_ns
        if server:
            port = ex.peer_port
            server_url = head.server_url
            if server_url is None:
                server_url = head.server_url = _server_url(head)
            path, query, url = server_url
            values: tuple[str | int, ...] = (tid, port, port, path) if query is None \
                else (tid, port, port, path, query)
            port_fields = self._port_fields.get(port)
            if port_fields is None:
                if len(self._port_fields) >= _OWN_FIELDS_MAX:
                    self._port_fields.clear()
                port_fields = self._port_fields[port] = _PEER_PORTS(port)
            own = tid_field + port_fields + url
        else:
            client_url = head.client_url
            if client_url is None:
                client_url = head.client_url = _client_url(head)
            url_full, url = client_url
            if url_full is None:
                url_full = _peer_url(ex)
                url = _URL_FULL(url_full)
            values = (tid, url_full)
            own = tid_field + url
        start_ns, end_ns = ex.start_ns, ex.end_ns
        return SpanRecord(
            shared.name, server, ex.trace_id, ex.span_id, ex.parent_id, ex.parent_remote,
            ex.threshold, start_ns + offset_ns,
            (end_ns if end_ns > start_ns else start_ns) + offset_ns,
            None, shared.error, resource, shared, values, own)

    def _db_record(self, ex: _Exchange) -> SpanRecord:
        """A database, cache or DNS exchange: OpenTelemetry's database span conventions
        (db.*; DNS questions as dns.question.*). Query text never leaves: the name is the
        literal-free summary. (No tracestate: only HTTP spans carry the sampling threshold.)"""
        code, _, error = ex.status_text.partition("\0")
        error = error or ("aborted" if ex.aborted else code)
        attrs: dict[str, str | int] = {"thread.id": ex.tid}
        if ex.kind == "dns":
            name = f"DNS {ex.method} {ex.route}".strip()
            attrs.update({"dns.question.name": ex.route, "dns.question.type": ex.method,
                          "server.address": ex.peer, "server.port": ex.peer_port})
            if error:
                error = error.lower()
        else:
            collection, namespace = split_db_target(ex.route)
            summary = str(ex.attributes.get("summary") or
                          " ".join(x for x in (ex.method, collection) if x))
            name = summary or ex.protocol
            attrs.update({"db.system.name": ex.protocol, "db.operation.name": ex.method,
                          "db.query.summary": summary})
            if collection:
                attrs["db.collection.name"] = collection
            if namespace:
                attrs["db.namespace"] = namespace
            if code:
                attrs["db.response.status_code"] = code
            if ex.server:
                attrs.update({"client.address": ex.peer, "client.port": ex.peer_port,
                              "server.address": ex.local, "server.port": ex.local_port})
            else:
                attrs.update({"server.address": ex.peer, "server.port": ex.peer_port})
        if error:
            attrs["error.type"] = error
        return SpanRecord(
            name, ex.server, ex.trace_id, ex.span_id, ex.parent_id, ex.parent_remote, None,
            ex.start_ns + self.offset_ns, max(ex.end_ns, ex.start_ns) + self.offset_ns, attrs,
            bool(error), self._resource(ex.service, ex.tgid))
