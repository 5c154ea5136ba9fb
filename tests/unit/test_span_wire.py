"""The assembler's short writers of an HTTP span's own attributes (thread, ports, url) write
the bytes of the general attribute encoder, and a record whose attributes were read (and maybe
changed) is encoded from its dict, not from the bytes made with it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tests.unit.test_span_encoder import exchanges

from probewire.export.span_encoder import SpanEncoder
from probewire.export.span_wire import IntAttributes, StrAttribute, attribute_field
from probewire.export.spans import SpanAssembler
from probewire.l7.constants import Role

_keys = st.sampled_from(["thread.id", "network.peer.port", "client.port", "k" * 120, "ü", ""])


@given(keys=st.lists(_keys, min_size=1, max_size=3),
       value=st.one_of(st.integers(-(2**70), 2**70), st.integers(0, 1 << 22),
                       st.sampled_from([0, 0x7F, 0x80, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000])))
def test_int_attributes_write_what_the_general_encoder_writes(keys: list[str],
                                                              value: int) -> None:
    assert IntAttributes(*keys)(value) == b"".join(attribute_field(k, value) for k in keys)


@given(key=_keys, value=st.one_of(st.text(max_size=300), st.text("/?a=&%", max_size=140),
                                  st.just("/\udcff")))
def test_str_attribute_writes_what_the_general_encoder_writes(key: str, value: str) -> None:
    assert StrAttribute(key)(value) == attribute_field(key, value)


def test_a_record_whose_attributes_were_changed_is_encoded_from_its_dict() -> None:
    a = SpanAssembler(1.0, link_wait_ns=0)
    (record,) = a.add_records(exchanges(
        {"role": Role.SERVER, "head": b"GET /a?b=1 HTTP/1.1\r\nHost: h\r\n\r\n"}), now_ns=0)
    assert record.own_encoded is not None  # the fast path: bytes made with the record
    fast = SpanEncoder().encode([record])
    record.attributes["url.path"] = "/changed"
    assert record.own_encoded is None
    (span,) = ExportTraceServiceRequest.FromString(
        SpanEncoder().encode([record])).resource_spans[0].scope_spans[0].spans
    got = {kv.key: kv.value.string_value or kv.value.int_value for kv in span.attributes}
    assert got["url.path"] == "/changed" and got["url.query"] == "b=1"
    (before,) = ExportTraceServiceRequest.FromString(fast).resource_spans[0].scope_spans[0].spans
    assert [kv.key for kv in before.attributes] == [kv.key for kv in span.attributes]
