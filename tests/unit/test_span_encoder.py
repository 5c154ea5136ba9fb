"""The direct OTLP span encoder against the SDK's: from the same assembler records, the bytes it
writes decode to the ExportTraceServiceRequest the SDK exporter would send, field by field."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from probewire.aggregate.http_heads import METHODS, parse_request_line
from probewire.enrich.identity import service_key
from probewire.export.span_encoder import SpanEncoder, _attribute, _Attributes
from probewire.export.spans import (
    SpanAssembler,
    SpanRecord,
    _parse_head,
    _parse_head_shared,
    readable_span,
    request_line,
)
from probewire.l7.constants import HTTP_HEAD_LEN, HttpFlag, Proto, Role
from probewire.l7.exchanges import EXCHANGE, NUMERIC_STATUSES, ExchangeBatch, ExchangeFlag
from probewire.l7.records import HTTP_EXCHANGE

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CART = service_key("cart", "shop", "deployment", "cart")
DB_PROTOS = (Proto.POSTGRESQL, Proto.MYSQL, Proto.REDIS, Proto.MEMCACHED, Proto.DNS)


def exchanges(*rows: dict[str, Any]) -> ExchangeBatch:
    """Exchange rows as the l7 family hands them to sinks: HTTP/1.x rows point at their kernel
    record (its head); HTTP/2 rows carry their path as an attribute; others their status text
    and attributes."""
    n = len(rows)
    ex = np.zeros(n, dtype=EXCHANGE)
    http = np.zeros(n, dtype=HTTP_EXCHANGE)
    index = np.full(n, -1)
    lists: dict[str, list[Any]] = {k: [] for k in ("service", "operation", "target", "status",
                                                   "peer", "local", "attributes")}
    for i, row in enumerate(rows):
        proto = int(row.get("proto", Proto.HTTP))
        ex[i]["proto"] = proto
        ex[i]["role"] = row.get("role", Role.SERVER)
        ex[i]["tgid"], ex[i]["tid"] = row.get("tgid", 10), row.get("tid", 10)
        ex[i]["start_ns"], ex[i]["end_ns"] = row.get("start_ns", 100), row.get("end_ns", 200)
        ex[i]["lport"], ex[i]["rport"] = row.get("lport", 80), row.get("rport", 40000)
        ex[i]["eflags"] = row.get("eflags", 0)
        code = row.get("status", 200)
        ex[i]["status"] = code if proto in (Proto.HTTP, Proto.HTTP2) else NUMERIC_STATUSES + 1
        head = bytes(row.get("head", b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"))[:HTTP_HEAD_LEN]
        attributes = dict(row.get("attributes", {}))
        if proto == Proto.HTTP:
            index[i] = i
            http[i]["req_head"][: len(head)] = np.frombuffer(head, np.uint8)
            http[i]["req_head_len"] = len(head)
            http[i]["pipe_idx"] = row.get("pipe_idx", 0)
            http[i]["hflags"] = row.get("hflags", 0)
        lists["service"].append(row.get("service", "svc"))
        lists["operation"].append(row.get("operation", "GET"))
        lists["target"].append(row.get("target", "/x"))
        lists["status"].append(row.get("status_text", str(code)))
        lists["peer"].append(row.get("peer", "10.0.0.2"))
        lists["local"].append(row.get("local", "10.0.0.1"))
        lists["attributes"].append(attributes)
    return ExchangeBatch(ex, lists["service"], lists["operation"], lists["target"],
                         lists["status"], lists["peer"], lists["local"], http=http,
                         http_index=index, attributes=lists["attributes"])


def assembler(ratio: float = 1.0, serves: bool = True, honor: bool = True,
              kernel: bool = False, seed: int = 1) -> SpanAssembler:
    a = SpanAssembler(
        ratio, link_wait_ns=1000, rng=random.Random(seed), honor_traceparent=honor,
        resource_attributes={"deployment.environment": "prod", "service.name": "agent"},
        process_attributes=lambda tgid, key: {"k8s.pod.name": f"pod-{tgid}",
                                              "container.id": f"{tgid:064x}"})
    a._may_serve = lambda tgid, now: serves  # type: ignore[method-assign]
    a.kernel_sampling = kernel
    return a


def both(records: list[SpanRecord]) -> tuple[ExportTraceServiceRequest, bytes,
                                              ExportTraceServiceRequest]:
    """(the direct encoder's request, its bytes, the SDK's request) for the same records."""
    direct = SpanEncoder().encode(records)
    return (ExportTraceServiceRequest.FromString(direct), direct,
            encode_spans([readable_span(r) for r in records]))


def assert_same(records: list[SpanRecord]) -> ExportTraceServiceRequest:
    direct, raw, sdk = both(records)
    # Field by field first (a readable diff), then the messages and the bytes themselves.
    assert MessageToDict(direct, preserving_proto_field_name=True) == \
        MessageToDict(sdk, preserving_proto_field_name=True)
    assert direct == sdk
    assert raw == sdk.SerializeToString()
    return direct


def test_direct_bytes_decode_to_what_the_sdk_sends_for_the_same_exchanges() -> None:
    """Servers with and without a traceparent (remote parent, its tracestate's th kept),
    a client adopted by its server (local parent), the kernel's and our own sampling
    threshold, errors, aborts, HTTP/2, databases, DNS, two processes with Kubernetes
    identity: one request, grouped by resource as the SDK groups it."""
    incoming = (f"GET /api/cart/7?x=1 HTTP/1.1\r\nHost: shop\r\ntraceparent: 00-{TRACE}-"
                f"{PARENT}-01\r\ntracestate: ot=th:c;rv:abcdef01234567,v=1\r\n"
                "User-Agent: curl/8\r\n\r\n").encode()
    a = assembler(ratio=0.5, seed=1)  # whose draws keep the rows the kernel did not decide
    a.kernel_sampling = True
    records = a.add_records(exchanges(
        {"role": Role.CLIENT, "tgid": 20, "tid": 21, "start_ns": 150, "end_ns": 180,
         "service": CART, "head": b"GET /stock/7 HTTP/1.1\r\nHost: stock:8080\r\n\r\n",
         "status": 503, "hflags": HttpFlag.SAMPLED},
        {"role": Role.SERVER, "tgid": 20, "tid": 21, "start_ns": 100, "end_ns": 200,
         "service": CART, "head": incoming, "target": "/api/cart/{id}"},
        {"role": Role.SERVER, "tgid": 20, "tid": 22, "service": CART, "status": 0,
         "eflags": ExchangeFlag.ABORTED, "hflags": HttpFlag.SAMPLED},
        {"role": Role.SERVER, "tgid": 20, "service": CART, "proto": Proto.HTTP2,
         "eflags": ExchangeFlag.H2, "operation": "POST", "attributes": {"path": "/rpc?q=ü"}},
        {"role": Role.CLIENT, "tgid": 30, "service": "worker", "proto": Proto.POSTGRESQL,
         "operation": "SELECT", "target": "shop\0orders", "status_text": "42P01\0undefined",
         "attributes": {"summary": "SELECT orders"}},
        {"role": Role.CLIENT, "tgid": 30, "service": "worker", "proto": Proto.DNS,
         "operation": "AAAA", "target": "db.shop.svc", "status_text": "NXDOMAIN"},
        {"role": Role.SERVER, "tgid": 30, "service": "worker", "proto": Proto.REDIS,
         "operation": "GET", "eflags": ExchangeFlag.ABORTED, "status_text": ""},
    ), now_ns=0) + a.flush_records(everything=True)
    assert len(records) == 7
    request = assert_same(records)

    by_service = {}
    for rs in request.resource_spans:
        attrs = {kv.key: kv.value for kv in rs.resource.attributes}
        by_service[attrs["service.name"].string_value] = (attrs, rs)
    assert set(by_service) == {"cart", "worker"}
    cart, rs = by_service["cart"]
    assert cart["k8s.namespace.name"].string_value == "shop"
    assert cart["k8s.deployment.name"].string_value == "cart"
    assert cart["k8s.pod.name"].string_value == "pod-20"
    assert cart["process.pid"].int_value == 20
    assert cart["deployment.environment"].string_value == "prod"
    assert "telemetry.sdk.language" in cart  # Resource.create's defaults, as the SDK sends
    (scope,) = rs.scope_spans
    assert scope.scope.name == "probewire"
    client, server, aborted, h2 = scope.spans
    assert server.trace_state == "ot=th:c"  # the incoming tracestate's threshold
    assert server.flags == 0x300  # parent is remote
    assert client.parent_span_id == server.span_id and client.flags == 0x100
    assert client.trace_state == "ot=th:c" and client.status.code == 2
    assert aborted.trace_state == "ot=th:8"  # our 1-in-2 threshold
    assert h2.kind == Span.SPAN_KIND_SERVER and server.HasField("status")


@st.composite
def _head(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([*METHODS, "BREW", "get"]))
    path = draw(st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=40))
    lines = [f"{method} /{path} {draw(st.sampled_from(['HTTP/1.1', 'HTTP/1.0', 'HTTP/2', 'X']))}"]
    headers = draw(st.lists(st.sampled_from([
        "Host: shop.example.com:8080", "User-Agent: Mozilla/5.0 (X11) Gecko/20100101",
        f"traceparent: 00-{TRACE}-{PARENT}-01", f"traceparent: 00-{TRACE}-{PARENT}-00",
        "traceparent: 00-garbage", "tracestate: ot=th:e6666666666666", "tracestate: x=y",
        "Content-Type: application/x-protobuf", "X-Empty:", "NoColon", " host : spaced ",
    ]), max_size=6))
    raw = "\r\n".join([*lines, *headers, "", ""]).encode("latin-1")
    return raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw


_text = st.text(max_size=150)  # any Unicode (no lone surrogates), lengths past one varint byte


@st.composite
def _row(draw: st.DrawFn) -> dict[str, Any]:
    proto = draw(st.sampled_from([Proto.HTTP, Proto.HTTP, Proto.HTTP2, *DB_PROTOS]))
    row: dict[str, Any] = {
        "proto": proto, "role": draw(st.sampled_from([Role.SERVER, Role.CLIENT])),
        "tgid": draw(st.sampled_from([10, 11, 4_000_000])),
        "tid": draw(st.integers(1, 2**32 - 1)),
        "start_ns": draw(st.integers(0, 2**60)), "end_ns": draw(st.integers(0, 2**60)),
        "lport": draw(st.integers(0, 65535)), "rport": draw(st.integers(0, 65535)),
        "status": draw(st.sampled_from([0, 200, 204, 301, 404, 499, 500, 599])),
        "eflags": draw(st.integers(0, 31)),
        "hflags": draw(st.sampled_from([0, HttpFlag.SAMPLED])),
        "service": draw(st.sampled_from(["svc", CART, "ünïcode svc",
                                         service_key("a", "b", "statefulset", "c", "c-0")])),
        "operation": draw(st.sampled_from(["GET", "POST", "SELECT", "AAAA", "", "ü"])),
        "target": draw(_text), "peer": draw(st.sampled_from(["10.0.0.2", "fd00::1", ""])),
        "local": draw(st.sampled_from(["10.0.0.1", "::1"])),
        "status_text": draw(st.sampled_from(["", "200", "42P01\0relation", "ERR\0WRONGTYPE",
                                             "NXDOMAIN"])),
    }
    if proto == Proto.HTTP:
        row["head"] = draw(_head())
        row["pipe_idx"] = draw(st.sampled_from([0, 0, 1]))
    elif proto == Proto.HTTP2:
        row["attributes"] = {"path": draw(_text)}
    elif draw(st.booleans()):
        row["attributes"] = {"summary": draw(_text)}
    return row


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(_row(), min_size=1, max_size=12),
       ratio=st.sampled_from([1.0, 0.5, 0.1, 0.0]), honor=st.booleans(),
       kernel=st.booleans(), serves=st.booleans(), seed=st.integers(0, 1000))
def test_random_exchanges_encode_as_the_sdk_encodes_them(
        rows: list[dict[str, Any]], ratio: float, honor: bool, kernel: bool, serves: bool,
        seed: int) -> None:
    a = assembler(ratio, serves, honor, kernel, seed)
    records = a.add_records(exchanges(*rows), now_ns=0) + a.flush_records(everything=True)
    if records:
        assert_same(records)
        # A second batch through the same encoder: its caches change nothing.
        encoder = SpanEncoder()
        encoder.encode(records)
        assert encoder.encode(records) == SpanEncoder().encode(records)
        # The shared attributes' bytes written as one piece are those of each attribute.
        assert SpanEncoder().encode(records) == SpanEncoder().encode(
            [r.replace(shared=None) for r in records])
        for r in records:
            if r.shared is not None:
                shared = list(r.shared.attributes.items())
                assert list(r.attributes.items())[: len(shared)] == shared


def test_equal_resources_of_two_keys_are_one_resource_group_as_in_the_sdk() -> None:
    """Two service keys of one process whose resources come out equal: the SDK groups spans by
    equal Resource, so the direct encoder must too."""
    a = assembler()
    a.process_attributes = lambda tgid, key: {"service.name": "same"}
    records = a.add_records(exchanges({"service": "x"}, {"service": "y"}), now_ns=0)
    request = assert_same(records)
    assert len(request.resource_spans) == 1 and len(request.resource_spans[0].scope_spans[0]
                                                    .spans) == 2


def test_what_protobuf_cannot_carry_is_left_out_as_the_sdk_leaves_it_out() -> None:
    """A lone surrogate (a name read with surrogateescape) cannot be UTF-8: the SDK drops such an
    attribute (and loses the whole batch over such a span name); the direct encoder drops the
    attribute the same way and writes the name with a question mark for the odd character."""
    a = assembler()
    (record,) = a.add_records(exchanges({}), now_ns=0)
    record.attributes["bad.value"] = "x\udcff"
    record.attributes["\udcffbad.key"] = "x"
    record.attributes["big"] = 1 << 64
    assert_same([record])
    record.name = "GET /\udcff"
    direct = ExportTraceServiceRequest.FromString(SpanEncoder().encode([record]))
    assert direct.resource_spans[0].scope_spans[0].spans[0].name == "GET /?"


@settings(max_examples=100, deadline=None)
@given(key=st.text(max_size=140), values=st.lists(st.integers(-(2**22), 2**22), max_size=40))
def test_a_key_with_too_many_values_to_cache_still_writes_what_the_general_path_writes(
        key: str, values: list[int]) -> None:
    """Past _VALUES_PER_KEY distinct values (ports), a key's ints take the short miss path."""
    cache = _Attributes()
    for port in range(32768, 32768 + 600):
        assert cache[key, port] == _attribute(key, port)
    for value in [*values, 0x4000, 0x1FFFFF, 0x200000, 0x3FFF]:
        assert cache[key, value] == _attribute(key, value)


@settings(max_examples=50, deadline=None)
@given(key=st.text(max_size=140), values=st.lists(st.one_of(st.text(max_size=200),
                                                            st.integers()), max_size=40))
def test_a_key_with_too_many_strings_to_cache_still_writes_what_the_general_path_writes(
        key: str, values: list[str | int]) -> None:
    """Past _VALUES_PER_KEY distinct values (paths, URLs), a key's strs take the short miss
    path; ints of the same key still take theirs."""
    cache = _Attributes()
    for i in range(600):
        assert cache[key, f"/api/items/{i}"] == _attribute(key, f"/api/items/{i}")
    for value in [*values, "", "ü" * 3, "x" * 120, "x" * 200, 0x4000]:
        assert cache[key, value] == _attribute(key, value)


@settings(max_examples=300, deadline=None)
@given(key=st.text(max_size=140), value=st.one_of(
    st.text(max_size=200), st.integers(-(2**64), 2**64), st.booleans(), st.floats(),
    st.binary(max_size=20), st.tuples(st.text(max_size=5), st.integers())))
def test_attribute_fast_path_writes_what_the_general_path_writes(key: str, value: Any) -> None:
    assert _Attributes()[(key, value)] == _attribute(key, value)


@settings(max_examples=500, deadline=None)
@given(method=st.sampled_from([*METHODS, "GETX", "", "get"]),
       target=st.binary(max_size=30),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 x", b"HTTP/3",
                                b""]),
       end=st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\r\nHost: x\r\n"]),
       cut=st.integers(0, 80))
def test_request_line_fast_path_agrees_with_parse_request_line(
        method: str, target: bytes, version: bytes, end: bytes, cut: int) -> None:
    head = method.encode() + b" " + target + b" " + version + end
    for h in (head, head[:cut]):
        assert request_line(h) == parse_request_line(h)


@settings(max_examples=300, deadline=None)
@given(heads=st.lists(_head(), min_size=1, max_size=8),
       line_end=st.sampled_from([b"\r\n", b"\n"]), pipe_idx=st.sampled_from([0, 0, 1]))
def test_heads_with_shared_header_blocks_parse_as_each_alone(
        heads: list[bytes], line_end: bytes, pipe_idx: int) -> None:
    """The assembler parses a header block once and shares it between heads that differ only
    in their request line: each head still parses as _parse_head parses it alone."""
    shared: dict[bytes, dict[bytes, bytes]] = {}
    for raw in heads:
        raw = raw.replace(b"\r\n", line_end, 1)
        for h in (raw, raw.replace(b" /", b" /other/", 1)):
            assert _parse_head_shared(h, pipe_idx, shared) == _parse_head(h, pipe_idx)
