"""OTLP ExportTraceServiceRequest bytes straight from span records, a batch at a time.

The SDK's path makes a ReadableSpan per exchange, then a generated protobuf message per span,
attribute and value, then serializes them: near 14k spans/s per core here. This module writes
the protobuf wire format itself from :class:`~probewire.export.spans.SpanRecord` s:

- what repeats is encoded once and reused: the InstrumentationScope, each process's Resource
  (with the generated opentelemetry-proto classes, once per resource, kept on its
  :class:`~probewire.export.spans.SpanResource`), span names, tracestates, and each attribute
  (key and value) seen before (a bounded cache: a method, a route, a peer address, a status);
- an HTTP span's attributes that many spans share (method, status, peer, user agent, route;
  a :class:`~probewire.export.spans.SharedAttributes` the assembler makes once per distinct
  combination) are written as one piece, encoded once and kept on it;
- an HTTP span's own attributes (thread, ports, url) come as bytes with the record: the
  assembler writes them (:mod:`probewire.export.span_wire`) from pieces it keeps per request
  head, thread and port, so no attribute dict is made per span;
- what is new per span is written with a few byte joins: ids and parent id in one struct
  pack, times in another.

Hand-written, not the generated message classes: built from the same records in the same run,
``bench/spans.py`` measures the cost per span of this encoder, of the generated
opentelemetry-proto classes (upb) filled with pre-built Resource and scope messages and a
cached KeyValue per attribute, and of the SDK's ``encode_spans``; the row "OTLP encode only"
says the ratio. Filling a message costs a Python → C call per field and a new object per
attribute; the bytes of a KeyValue we have seen before cost one dict lookup.

The output decodes to the message the SDK would send for the same spans, field for field:
spans grouped by resource (in order of first appearance), then by scope; the span's ids,
``trace_state`` (``ot=th:…``), parent span id, name, kind, times, attributes in the same order,
an empty Status for UNSET and code 2 for ERROR, and ``flags`` with
SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE (plus IS_REMOTE for a remote parent). The records have no
events, links or dropped counts, so neither does the encoding. ``tests/unit/test_span_encoder.py``
compares both paths on random exchanges.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from itertools import islice

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.sdk.resources import Resource

from probewire.export.span_wire import (
    KEY,
    VARINTS,
    any_value,
    attribute_field,
    field,
    varint,
)
from probewire.export.span_wire import VARINT as _VARINT
from probewire.export.spans import SCOPE, SpanRecord, SpanResource

__all__ = ["SpanEncoder", "any_value", "encode_resource", "varint"]

log = logging.getLogger(__name__)

# Field tags (field number << 3 | wire type): 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
_REQUEST_RESOURCE_SPANS = b"\x0a"  # ExportTraceServiceRequest.resource_spans = 1
_RESOURCE = b"\x0a"  # ResourceSpans.resource = 1
_SCOPE_SPANS = b"\x12"  # ResourceSpans.scope_spans = 2
_SCOPE = b"\x0a"  # ScopeSpans.scope = 1
_SPAN = b"\x12"  # ScopeSpans.spans = 2
_IDS = b"\x0a\x10"  # Span.trace_id = 1, 16 bytes; Span.span_id = 2, 8 bytes follows
_SPAN_ID = b"\x12\x08"
_TRACE_STATE = b"\x1a"  # Span.trace_state = 3
_PARENT = b"\x22\x08"  # Span.parent_span_id = 4, 8 bytes
_NAME = b"\x2a"  # Span.name = 5
_KIND_SERVER = b"\x30\x02"  # Span.kind = 6: SPAN_KIND_SERVER
_KIND_CLIENT = b"\x30\x03"  # SPAN_KIND_CLIENT
_TIMES = struct.Struct("<BQBQ")  # Span.start_time_unix_nano = 7, end = 8 (fixed64)
_FIXED64 = struct.Struct("<BQ")
# trace_id (two big-endian halves) and span_id with their tags; then parent_span_id with its.
_IDS_PACK = struct.Struct(">2sQQ2sQ")
_IDS_PARENT_PACK = struct.Struct(">2sQQ2sQ2sQ")
_U64 = (1 << 64) - 1
_IDS_SIZE = _IDS_PACK.size
# Span.status = 15 (UNSET: present and empty, as the SDK sends it; ERROR: code = 3 -> 2), then
# Span.flags = 16 (fixed32): SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, | IS_REMOTE for a remote
# parent.
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
# _TAILS[error][remote parent] (bools as indexes: no key tuple per span).
_TAILS = tuple(tuple(
    (b"\x7a\x02\x18\x02" if error else b"\x7a\x00")
    + b"\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE | (_IS_REMOTE if remote else 0))
    for remote in (False, True)) for error in (False, True))
# Encoded attributes, names and tracestates kept: past this many the cache starts over. A key
# with more values than _VALUES_PER_KEY (paths, ports) is encoded afresh each time instead.
_CACHE_MAX = 16384
_VALUES_PER_KEY = 512
_VARINTS = VARINTS


def _len(n: int) -> bytes:
    return _VARINT[n] if n < _VARINTS else varint(n)


def encode_resource(resource: Resource) -> bytes:
    """A Resource message's bytes (made once per process, so the generated classes do it). An
    attribute protobuf cannot carry (a str with a lone surrogate) is left out and logged, as
    the SDK's encoder does."""
    attributes = []
    for key, value in resource.attributes.items():
        try:
            attributes.append(KeyValue(key=key, value=any_value(value)))
        except (ValueError, TypeError) as exc:
            log.warning("resource attribute %s left out: %s", key, exc)
    encoded: bytes = PbResource(attributes=attributes).SerializeToString()
    return encoded


_field = field
_attribute = attribute_field


class _Attributes(dict[tuple[str, object], bytes]):
    """(key, value) -> its encoded Span.attributes entry. A lookup that hits stays in C
    (``map(cache.__getitem__, attributes.items())``); a miss encodes, and remembers unless the
    key has shown too many values to be worth it (a path, a port, a thread id)."""

    def __init__(self) -> None:
        super().__init__()
        self.values_seen: dict[str, int] = {}
        self.key_fields: dict[str, bytes] = {}  # key -> its KeyValue.key field
        # Keys past _VALUES_PER_KEY -> all of an entry but a 3-byte varint value (a port, a
        # thread id): such a value misses every time, so its miss is made as short as can be.
        self.int3_heads: dict[str, bytes] = {}
        # ASCII keys past _VALUES_PER_KEY whose value was a str (paths, URLs, queries).
        self.uncached_str: set[str] = set()

    def __missing__(self, item: tuple[str, object]) -> bytes:
        key, value = item
        if type(value) is int and _VARINTS <= value < 1 << 21:
            head = self.int3_heads.get(key)
            if head is not None:
                return head + bytes(
                    ((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
        elif type(value) is str and key in self.uncached_str:
            # A path or URL, new nearly every time: its entry in one go when all its lengths
            # are one-byte varints (what the fast path below writes, minus its bookkeeping).
            key_field = self.key_fields[key]
            size = len(key_field) + len(value) + 4
            if size < 0x80 and value.isascii():
                return bytes((0x4A, size)) + key_field + bytes(
                    (0x12, len(value) + 2, 0x0A, len(value))) + value.encode()
        encoded = b""
        prefix = self.key_fields.get(key)
        if prefix is None and key.isascii():
            prefix = self.key_fields[key] = KEY + _len(len(key)) + key.encode()
        # Short ASCII strings and small non-negative ints (ports, thread ids), all lengths
        # below 128 (one-byte varints), are written at once; anything else the general way.
        if prefix is None:
            pass
        elif type(value) is str:
            size = len(prefix) + len(value) + 4
            if size < 0x80 and value.isascii():
                encoded = bytes((0x4A, size)) + prefix + bytes(
                    (0x12, len(value) + 2, 0x0A, len(value))) + value.encode()
        elif type(value) is int and 0 <= value < 1 << 21:
            number = _VARINT[value] if value < _VARINTS else bytes(
                ((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
            encoded = bytes((0x4A, len(prefix) + len(number) + 3)) + prefix + bytes(
                (0x12, len(number) + 1, 0x18)) + number
        if not encoded:
            encoded = _attribute(key, value)
        seen = self.values_seen.get(key, 0)
        if seen < _VALUES_PER_KEY:
            self.values_seen[key] = seen + 1
            if len(self) >= _CACHE_MAX:
                self.clear()
                self.values_seen.clear()
            self[item] = encoded
        elif prefix is None:
            pass
        elif type(value) is str:
            self.uncached_str.add(key)
        elif len(prefix) + 6 < 0x80 and key not in self.int3_heads:
            self.int3_heads[key] = bytes((0x4A, len(prefix) + 6)) + prefix + b"\x12\x04\x18"
        return encoded


_SCOPE_FIELD = _field(_SCOPE, InstrumentationScope(
    name=SCOPE.name, version=SCOPE.version or "").SerializeToString())


class SpanEncoder:
    """Records -> ExportTraceServiceRequest bytes. Not thread-safe (the span thread owns it)."""

    def __init__(self) -> None:
        self._attributes = _Attributes()
        self._names: dict[str, bytes] = {}
        self._states: dict[str, bytes] = {}

    def encode(self, records: Sequence[SpanRecord]) -> bytes:
        groups: dict[SpanResource, list[bytes]] = {}
        attribute = self._attributes.__getitem__
        names, states = self._names, self._states
        times = _TIMES.pack
        ids, ids_parent = _IDS_PACK.pack, _IDS_PARENT_PACK.pack
        for rec in records:
            name = names.get(rec.name)
            if name is None:
                if len(names) >= _CACHE_MAX:
                    names.clear()
                # A name protobuf cannot carry would cost the SDK the whole batch; here it
                # loses the odd character.
                name = names[rec.name] = _field(_NAME, rec.name.encode("utf-8", "replace")) \
                    if rec.name else b""  # proto3 leaves empty and zero fields out
            trace_id = rec.trace_id
            parent_id = rec.parent_id
            # Ids (and the parent's) in one pack: big-endian bytes, as the ids' to_bytes.
            parts = [ids_parent(_IDS, trace_id >> 64, trace_id & _U64, _SPAN_ID, rec.span_id,
                                _PARENT, parent_id) if parent_id else
                     ids(_IDS, trace_id >> 64, trace_id & _U64, _SPAN_ID, rec.span_id)]
            if rec.threshold:
                state = states.get(rec.threshold)
                if state is None:
                    state = states[rec.threshold] = _field(
                        _TRACE_STATE, f"ot=th:{rec.threshold}".encode())
                # trace_state (3) goes before parent_span_id (4), as the SDK writes them.
                if parent_id:
                    parts = [parts[0][:_IDS_SIZE], state, parts[0][_IDS_SIZE:]]
                else:
                    parts.append(state)
            start_ns, end_ns = rec.start_ns, rec.end_ns
            if start_ns and end_ns:
                parts += (name, _KIND_SERVER if rec.server else _KIND_CLIENT,
                          times(0x39, start_ns, 0x41, end_ns))
            else:
                parts += (name, _KIND_SERVER if rec.server else _KIND_CLIENT,
                          _FIXED64.pack(0x39, start_ns) if start_ns else b"",
                          _FIXED64.pack(0x41, end_ns) if end_ns else b"")
            shared = rec.shared
            own = rec.own_encoded
            if own is not None:
                encoded = shared.encoded  # type: ignore[union-attr]
                if encoded is None:
                    encoded = shared.encoded = b"".join(  # type: ignore[union-attr]
                        map(attribute, shared.attributes.items()))  # type: ignore[union-attr]
                parts += (encoded, own)
            elif shared is None:
                parts += map(attribute, rec.attributes.items())
            else:
                encoded = shared.encoded
                if encoded is None:
                    encoded = shared.encoded = b"".join(
                        map(attribute, shared.attributes.items()))
                parts.append(encoded)
                parts += map(attribute, islice(rec.attributes.items(),
                                               len(shared.attributes), None))
            parts.append(_TAILS[rec.error][rec.parent_remote and parent_id != 0])
            body = b"".join(parts)
            n = len(body)
            # The span's tag and length, then its body: joined once, with the request.
            spans = groups.get(rec.resource)
            if spans is None:
                spans = groups[rec.resource] = []
            spans += (_SPAN + (_VARINT[n] if n < _VARINTS else varint(n)), body)
        out = []
        for resource, spans in groups.items():
            if resource.encoded is None:
                resource.encoded = _field(_RESOURCE, encode_resource(resource.resource))
            scope_spans = _field(_SCOPE_SPANS, _SCOPE_FIELD + b"".join(spans))
            out.append(_field(_REQUEST_RESOURCE_SPANS, resource.encoded + scope_spans))
        return b"".join(out)
