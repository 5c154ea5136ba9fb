"""The lean HPACK decoder (l7/hpack.py) against the `hpack` library, block after block: the same
fields out, the same table state kept, memoised blocks and all; garbage raises only its own
error."""

from __future__ import annotations

import contextlib

import hpack
from hypothesis import given, settings
from hypothesis import strategies as st

from probewire.l7.hpack import Decoder, HpackError

NAMES = [b":method", b":path", b":status", b"content-type", b"grpc-status", b"date", b"etag",
         b"x-request-id", b"user-agent", b"server", b"set-cookie", b"te"]
WANTED = frozenset([*NAMES[:5], b"x-request-id"])
VALUES = st.one_of(st.sampled_from([b"GET", b"/", b"/a/b?c=1", b"200", b"404", b"0", b"13",
                                    b"application/grpc", b"nginx", b"Fri, 04 Dec 2026"]),
                   st.binary(min_size=0, max_size=40))
FIELD = st.tuples(st.sampled_from(NAMES), VALUES)
# A block: its fields, whether each is Huffman-coded, and whether the encoder may index it.
BLOCK = st.tuples(st.lists(FIELD, min_size=1, max_size=12), st.booleans(), st.booleans())


def reference(decoder: hpack.Decoder, block: bytes) -> dict[bytes, bytes]:
    return {bytes(k): bytes(v) for k, v in decoder.decode(block, raw=True) if bytes(k) in WANTED}


@settings(max_examples=200, deadline=None)
@given(st.lists(BLOCK, min_size=1, max_size=25), st.sampled_from([0, 64, 256, 4096]),
       st.data())
def test_blocks_decode_as_the_library_decodes_them(blocks: list, table_size: int,
                                                   data: st.DataObject) -> None:
    encoder = hpack.Encoder()
    ours, theirs = Decoder(), hpack.Decoder()
    theirs.max_allowed_table_size = 1 << 16
    if table_size != 4096:
        encoder.header_table_size = table_size
    for fields, huffman, index in blocks:
        # Repeat some blocks as they were: the memoised path must give the same answers.
        repeats = data.draw(st.integers(1, 3))
        for _ in range(repeats):
            encoded = encoder.encode([(k, v) if index else hpack.NeverIndexedHeaderTuple(k, v)
                                      for k, v in fields], huffman=huffman)
            assert ours.decode(encoded, WANTED) == reference(theirs, encoded)
            assert list(ours.table) == [(bytes(k), bytes(v)) for k, v in
                                        theirs.header_table.dynamic_entries]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=8))
def test_garbage_raises_only_a_decoding_error(blocks: list[bytes]) -> None:
    decoder = Decoder()
    for block in blocks:
        with contextlib.suppress(HpackError):
            decoder.decode(block, WANTED)
