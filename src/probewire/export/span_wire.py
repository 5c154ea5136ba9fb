"""Protobuf wire-format pieces of OTLP span attributes, shared by the assembler (which writes a
span's own per-request attributes as it makes the record, from bytes it keeps per head, thread
and port) and the direct encoder (:mod:`probewire.export.span_encoder`), so both write the
same bytes for the same attribute."""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue

__all__ = ["IntAttributes", "StrAttribute", "any_value", "attribute_field", "key_field", "length",
           "varint"]

log = logging.getLogger(__name__)

ATTRIBUTE = b"\x4a"  # Span.attributes = 9
KEY = b"\x0a"  # KeyValue.key = 1
VALUE = b"\x12"  # KeyValue.value = 2
STRING = b"\x0a"  # AnyValue.string_value = 1
INT = b"\x18"  # AnyValue.int_value = 3
VARINTS = 1 << 14  # lengths below this have their varint ready


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (a negative int64 as its 10 bytes)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


VARINT = [varint(i) for i in range(VARINTS)]


def length(n: int) -> bytes:
    return VARINT[n] if n < VARINTS else varint(n)


def any_value(value: object) -> AnyValue:
    """An attribute value as OTLP's AnyValue (the types the SDK accepts, in its order)."""
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    raise TypeError(f"invalid attribute value type {type(value).__name__}")


def field(tag: bytes, payload: bytes) -> bytes:
    return tag + length(len(payload)) + payload


def attribute_field(key: str, value: object) -> bytes:
    """One Span.attributes entry, tag and length included; empty (left out, logged, as the SDK
    does) if protobuf cannot carry it."""
    try:
        if type(value) is str:
            raw = value.encode()
            any_bytes = STRING + length(len(raw)) + raw
        elif type(value) is int and -(1 << 63) <= value < 1 << 63:
            any_bytes = INT + (VARINT[value] if 0 <= value < VARINTS else varint(value))
        else:
            any_bytes = any_value(value).SerializeToString()
        raw_key = key.encode()
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        log.warning("span attribute %s left out: %s", key, exc)
        return b""
    return field(ATTRIBUTE, KEY + length(len(raw_key)) + raw_key + field(VALUE, any_bytes))


def key_field(key: str) -> bytes:
    """KeyValue.key of an ASCII key, tag and length included."""
    raw = key.encode()
    return KEY + length(len(raw)) + raw


class StrAttribute:
    """Writes one key's str attributes: a value new nearly every time (a path, a URL) in one
    go when it is ASCII and the whole entry is under 128 bytes (every length a one-byte
    varint), else the general way."""

    __slots__ = ("head", "key", "key_field", "room")

    def __init__(self, key: str) -> None:
        self.key = key
        self.key_field = key_field(key)
        self.room = 0x80 - 4 - len(self.key_field)  # the longest value written in one go
        # Tag, entry length, key, value tag, AnyValue length, string tag, string length.
        self.head = struct.Struct(f"BB{len(self.key_field)}sBBBB")

    def __call__(self, value: str) -> bytes:
        n = len(value)
        if n < self.room and value.isascii():
            return self.head.pack(0x4A, n + 4 + len(self.key_field), self.key_field, 0x12,
                                  n + 2, 0x0A, n) + value.encode()
        return attribute_field(self.key, value)


class IntAttributes:
    """Writes the attributes of some keys that all take the same int value (a port as both
    network.peer.port and client.port, a thread id): what precedes the value's varint is made
    once per key and varint length (values below 2^21: up to 3 bytes), else the general way."""

    __slots__ = ("heads", "keys")

    def __init__(self, *keys: str) -> None:
        self.keys = keys
        self.heads = [[ATTRIBUTE + length(len(k) + size + 3) + k + bytes((0x12, size + 1, 0x18))
                       for k in map(key_field, keys)] for size in (1, 2, 3)]

    def __call__(self, value: int) -> bytes:
        if 0 <= value < 0x80:
            number, heads = bytes((value,)), self.heads[0]
        elif 0 <= value < 0x4000:
            number, heads = bytes(((value & 0x7F) | 0x80, value >> 7)), self.heads[1]
        elif 0 <= value < 0x200000:
            number, heads = bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80,
                                   value >> 14)), self.heads[2]
        else:
            return b"".join(attribute_field(key, value) for key in self.keys)
        if len(heads) == 1:
            return heads[0] + number
        return number.join(heads) + number
