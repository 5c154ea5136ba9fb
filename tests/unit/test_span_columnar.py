"""The assembler's column-by-column decode against a row-by-row reference (the decode it
replaced): for random batches of HTTP/1.x rows (real heads, cut heads, empty heads, garbage
bytes, pipelined requests, rows without a kernel record), HTTP/2 rows, database, cache and DNS
rows, the same seed gives the same span records, field by field, and the same OTLP bytes."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.unit.test_span_encoder import _row, exchanges

from probewire.export.span_encoder import SpanEncoder
from probewire.export.spans import (
    OTLP_GRPC_PREFIX,
    OTLP_HTTP_PATHS,
    SpanAssembler,
    SpanRecord,
    _Exchange,
    _Head,
    _http_shared,
    _parse_head,
    is_otlp_export,
)
from probewire.l7.constants import HTTP_HEAD_LEN, HttpFlag, Proto, Role
from probewire.l7.exchanges import NUMERIC_STATUSES, ExchangeBatch, ExchangeFlag
from probewire.l7.registry import protocol_by_id


def _is_otlp_reference(target: bytes, method: str | None, content_type: bytes | None) -> bool:
    """is_otlp_export as it was written before its one-search shortcut."""
    path = target.split(b"?", 1)[0]
    if path.startswith(OTLP_GRPC_PREFIX):
        return True
    if method != "POST" or not path.endswith(OTLP_HTTP_PATHS):
        return False
    return path in OTLP_HTTP_PATHS or (content_type or b"").startswith(b"application/x-protobuf")


def _reference_head(head: _Head) -> _Head:
    head.otlp = _is_otlp_reference(head.target, head.method, head.headers.get(b"content-type"))
    return head


class RowByRow(SpanAssembler):
    """The assembler with its former decode and record steps: a Python loop over rows, every
    head parsed alone (no cache, no shared header blocks), its text made per span."""

    def _decode(self, batch: ExchangeBatch, now_ns: int) -> list[_Exchange]:
        rows = batch.rows
        out: list[_Exchange] = []
        http, index = batch.http, batch.http_index
        head_len = http.dtype["req_head"].itemsize if http is not None and len(http) else 0
        for i, row in enumerate(rows):
            protocol = protocol_by_id(int(row["proto"]))
            status = int(row["status"])
            eflags = int(row["eflags"])
            head = _Head()
            kernel_kept = None
            if protocol.kind == "http":
                at = int(index[i]) if index is not None else -1
                if head_len and at >= 0:
                    record = http[at]  # type: ignore[index]
                    if self.kernel_sampling:
                        kernel_kept = bool(int(record["hflags"]) & HttpFlag.SAMPLED)
                    raw = record["req_head"].tobytes()[: min(int(record["req_head_len"]),
                                                             head_len)]
                    head = _reference_head(_parse_head(raw, int(record["pipe_idx"])))
                else:
                    path = str(batch.attributes[i].get("path", "")) if batch.attributes else ""
                    head = _reference_head(_Head(batch.operation[i],
                                                 path.encode("latin-1", "replace")))
            out.append(_Exchange(
                protocol.kind, protocol.name, int(row["role"]) == Role.SERVER, int(row["tgid"]),
                int(row["tid"]), int(row["start_ns"]), int(row["end_ns"]),
                status if status < NUMERIC_STATUSES else 0,
                bool(eflags & ExchangeFlag.ABORTED), bool(eflags & ExchangeFlag.H2),
                batch.service[i], batch.operation[i], batch.target[i], head,
                batch.peer_address[i], int(row["rport"]), batch.local_address[i],
                int(row["lport"]), now_ns, batch.status[i],
                dict(batch.attributes[i]) if batch.attributes else {},
                kernel_kept=kernel_kept))
        return out

    def _record(self, ex: _Exchange) -> SpanRecord:
        """The former record step: the head's text made per span."""
        head = ex.head
        user_agent = head.headers.get(b"user-agent")
        server = ex.server
        key = (True, ex.method, ex.h2, ex.peer, ex.status, ex.aborted, user_agent, ex.route,
               ex.local, ex.local_port) if server else \
            (False, ex.method, ex.h2, ex.peer, ex.status, ex.aborted, user_agent, ex.peer_port)
        shared = self._shared.get(key)
        if shared is None:
            if len(self._shared) >= 4096:
                self._shared.clear()
            shared = self._shared[key] = _http_shared(ex, user_agent)
        attrs = shared.attributes.copy()
        attrs["thread.id"] = ex.tid
        target = head.target.decode("latin-1")
        if server:
            path, query_sep, query = target.partition("?")
            attrs["network.peer.port"] = ex.peer_port
            attrs["client.port"] = ex.peer_port
            attrs["url.path"] = path
            if query_sep:
                attrs["url.query"] = query
        else:
            host = head.headers.get(b"host", b"").decode("latin-1") or (
                f"{ex.peer}:{ex.peer_port}")
            attrs["url.full"] = f"http://{host}{target}" if target.startswith("/") else target
        offset_ns = self.offset_ns
        return SpanRecord(
            shared.name, server, ex.trace_id, ex.span_id, ex.parent_id, ex.parent_remote,
            ex.threshold, ex.start_ns + offset_ns, max(ex.end_ns, ex.start_ns) + offset_ns,
            attrs, shared.error, self._resource(ex.service, ex.tgid), shared)


def _assembler(cls: type[SpanAssembler], ratio: float, serves: bool, honor: bool,
               kernel: bool, seed: int) -> SpanAssembler:
    a = cls(ratio, link_wait_ns=1000, rng=random.Random(seed), honor_traceparent=honor,
            resource_attributes={"deployment.environment": "prod"},
            process_attributes=lambda tgid, key: {"k8s.pod.name": f"pod-{tgid}"})
    a._may_serve = lambda tgid, now: serves  # type: ignore[method-assign]
    a.kernel_sampling = kernel
    return a


def _fields(rec: SpanRecord) -> tuple[Any, ...]:
    shared = None if rec.shared is None else (rec.shared.name, list(rec.shared.attributes.items()),
                                              rec.shared.error)
    return (rec.name, rec.server, rec.trace_id, rec.span_id, rec.parent_id, rec.parent_remote,
            rec.threshold, rec.start_ns, rec.end_ns, list(rec.attributes.items()), rec.error,
            rec.resource.resource, shared)


@st.composite
def _batch(draw: st.DrawFn) -> ExchangeBatch:
    rows = draw(st.lists(_row(), max_size=14))
    for row in rows:
        if row["proto"] == Proto.HTTP and draw(st.integers(0, 3)) == 0:
            row["head"] = draw(st.sampled_from([b"", b"\x00" * 8])) if draw(st.booleans()) \
                else draw(st.binary(max_size=HTTP_HEAD_LEN))
        # A head the agent's own export makes: never a span, in both paths.
        if row["proto"] == Proto.HTTP and draw(st.integers(0, 9)) == 0:
            row["head"] = draw(st.sampled_from([
                b"POST /v1/traces HTTP/1.1\r\nHost: c\r\n\r\n",
                b"POST /otlp/v1/logs HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n\r\n",
                b"POST /api/v1/logs HTTP/1.1\r\nContent-Type: application/json\r\n\r\n",
                b"POST /opentelemetry.proto.collector.trace.v1.TraceService/Export HTTP/2\r\n"]))
        if row.get("hflags") and row["proto"] == Proto.HTTP:
            row["hflags"] = HttpFlag.SAMPLED
    batch = exchanges(*rows)
    if batch.http_index is not None and len(rows) and draw(st.booleans()):
        # HTTP rows whose kernel record is missing: they read their path attribute instead.
        batch.http_index[np.asarray(draw(st.lists(st.booleans(), min_size=len(rows),
                                                   max_size=len(rows))))] = -1
    if draw(st.integers(0, 7)) == 0:
        batch = dataclasses.replace(batch, http=None, http_index=None)
    return batch


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(_batch(), min_size=1, max_size=4),
       ratio=st.sampled_from([1.0, 0.5, 0.0]), honor=st.booleans(), kernel=st.booleans(),
       serves=st.booleans(), seed=st.integers(0, 1000))
def test_columnar_decode_gives_the_spans_the_row_by_row_decode_gives(
        batches: list[ExchangeBatch], ratio: float, honor: bool, kernel: bool, serves: bool,
        seed: int) -> None:
    fast = _assembler(SpanAssembler, ratio, serves, honor, kernel, seed)
    slow = _assembler(RowByRow, ratio, serves, honor, kernel, seed)
    slow.offset_ns = fast.offset_ns  # each measured the clocks by itself
    for step, batch in enumerate(batches):
        got = fast.add_records(batch, now_ns=step * 500) + fast.flush_records(now_ns=step * 500)
        want = slow.add_records(batch, now_ns=step * 500) + slow.flush_records(now_ns=step * 500)
        # Encoded first: reading a record's attributes makes its dict, and then the encoder
        # writes that dict instead of the bytes the assembler made for the span's own ones.
        assert SpanEncoder().encode(got) == SpanEncoder().encode(want)
        assert [_fields(r) for r in got] == [_fields(r) for r in want]
        assert fast.pending == slow.pending
    got, want = fast.flush_records(everything=True), slow.flush_records(everything=True)
    assert [_fields(r) for r in got] == [_fields(r) for r in want]
    assert (fast.unsampled, fast.linked, fast.export_calls) == \
        (slow.unsampled, slow.linked, slow.export_calls)


@given(target=st.one_of(st.binary(max_size=60), st.sampled_from([
    b"/v1/traces", b"/v1/traces?x=1", b"/a/v1/metrics", b"/v1/logsx", b"/?/v1/traces",
    OTLP_GRPC_PREFIX + b"trace.v1.TraceService/Export", b"/x" + OTLP_GRPC_PREFIX])),
    method=st.sampled_from(["POST", "GET", None]),
    content_type=st.sampled_from([None, b"application/x-protobuf", b"application/json"]))
def test_otlp_export_shortcut_decides_as_the_full_rule(
        target: bytes, method: str | None, content_type: bytes | None) -> None:
    assert is_otlp_export(target, method, content_type) == \
        _is_otlp_reference(target, method, content_type)


def test_heads_parsed_once_per_distinct_head_are_the_heads_parsed_alone() -> None:
    """The cache keys a pipe_idx-0 head by its bytes alone; a pipelined request's by both."""
    a = SpanAssembler(1.0)
    raw = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    assert a._head(raw, 0) == _parse_head(raw, 0)
    assert a._head(raw, 1) == _parse_head(raw, 1)
    assert a._head(raw, 0).target == b"/a" and a._head(raw, 1).target == b"/b"
