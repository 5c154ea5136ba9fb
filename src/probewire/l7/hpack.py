"""A lean HPACK decoder (RFC 7541) for the HTTP/2 parser: the same table state as any decoder,
only the header fields the parser asks for returned.

Every field of every header block must be decoded to keep the dynamic table in step with the
peer's encoder, but the parser reads a handful of them (:method, :path, :status, content-type,
grpc-status, grpc-timeout). The `hpack` library's decoder builds a tuple per field, decodes
every value to text and logs each field, which made header blocks most of an HTTP/2
exchange's cost; this one walks the block with integer arithmetic on the bytes and keeps table
entries as bytes. Huffman strings (decoded with the library's table-driven decoder, a Python
loop per byte) are the remaining cost: a value no one reads and the table does not keep is
skipped undecoded, and decoded strings are remembered per connection direction, because
servers repeat them byte for byte (nginx sends date, etag, content-length as Huffman literals
in every response).

Whole blocks repeat too: a client sending the same request again sends it as indexed fields,
and nginx sends the same response headers as literals added to the table (which it never
refers to). A block decodes the same way while the dynamic entries it read are unchanged, so
each block is remembered with its fields, the entries it added, and the table's version it
read (None: it read no dynamic entry); a repeat only adds those entries again. A block is
walked only when it is new, resizes the table, or read entries that changed since.
"""

from __future__ import annotations

from collections import deque

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

STATIC: tuple[tuple[bytes, bytes], ...] = tuple(HeaderTable.STATIC_TABLE)
STATIC_LEN = len(STATIC)
ENTRY_OVERHEAD = 32  # RFC 7541 section 4.1
HUFFMAN_MEMO = 512  # decoded Huffman strings remembered per decoder
BLOCK_MEMO = 256  # decoded blocks remembered per decoder
# The largest table a peer may ask for with SETTINGS we do not parse (peers do raise it).
MAX_TABLE_SIZE = 1 << 16


class HpackError(ValueError):
    """The block does not decode: the connection's table state cannot be trusted any more."""


class Decoder:
    def __init__(self) -> None:
        self.table: deque[tuple[bytes, bytes]] = deque()  # newest first
        self.size = 0
        self.max_size = 4096
        self.version = 0  # moves whenever the dynamic table changes
        self._huffman: dict[bytes, bytes] = {}
        # block -> (table version it read, or None; its wanted fields; entries it added)
        self._blocks: dict[bytes, tuple[int | None, dict[bytes, bytes],
                                        tuple[tuple[bytes, bytes], ...]]] = {}
        self._added: list[tuple[bytes, bytes]] = []
        self._resized = False

    def _string(self, data: bytes, pos: int, needed: bool = True) -> tuple[bytes, int]:
        """A string literal at `pos` (decoded, or b"" when not `needed`), and the end."""
        if pos >= len(data):
            raise HpackError("string cut off")
        huffman = data[pos] & 0x80
        length, pos = _integer(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HpackError("string longer than the block")
        if not needed:
            return b"", end
        raw = data[pos:end]
        if not huffman:
            return raw, end
        memo = self._huffman
        text = memo.get(raw)
        if text is None:
            try:
                text = decode_huffman(raw)
            except Exception as exc:  # the library raises its own error type
                raise HpackError(f"bad Huffman string ({exc})") from None
            if len(memo) >= HUFFMAN_MEMO:
                memo.clear()
            memo[raw] = text
        return text, end

    def _add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        self._added.append((name, value))
        entry = len(name) + len(value) + ENTRY_OVERHEAD
        if entry > self.max_size:
            self.table.clear()
            self.size = 0
            return
        self.table.appendleft((name, value))
        self.size += entry
        if self.size > self.max_size:
            self._shrink()

    def _shrink(self) -> None:
        self.version += 1
        table = self.table
        while self.size > self.max_size and table:
            name, value = table.pop()
            self.size -= len(name) + len(value) + ENTRY_OVERHEAD

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if index <= 0:
            raise HpackError("index 0")
        if index <= STATIC_LEN:
            return STATIC[index - 1]
        self._dynamic_read = True
        try:
            return self.table[index - STATIC_LEN - 1]
        except IndexError:
            raise HpackError(f"index {index} beyond the table") from None

    def decode(self, block: bytes, wanted: frozenset[bytes]) -> dict[bytes, bytes]:
        """The fields of `block` whose names are in `wanted` (the last of each name); `wanted`
        is the same for every call on one decoder."""
        known = self._blocks.get(block)
        if known is not None and (known[0] is None or known[0] == self.version):
            for name, value in known[2]:
                self._add(name, value)
            return known[1]
        version = self.version
        self._dynamic_read = False
        self._resized = False
        self._added = []
        out = self._walk(block, wanted)
        if not self._resized:
            if len(self._blocks) >= BLOCK_MEMO:
                self._blocks.clear()
            self._blocks[block] = (version if self._dynamic_read else None, out,
                                   tuple(self._added))
        return out

    def _walk(self, block: bytes, wanted: frozenset[bytes]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        pos, end = 0, len(block)
        while pos < end:
            b = block[pos]
            if b & 0x80:  # indexed field
                index, pos = _integer(block, pos, 7)
                name, value = self._entry(index)
                if name in wanted:
                    out[name] = value
                continue
            if b & 0xC0 == 0x40:  # literal, incremental indexing
                prefix, indexed = 6, True
            elif b & 0xE0 == 0x20:  # dynamic table size update
                size, pos = _integer(block, pos, 5)
                if size > MAX_TABLE_SIZE:
                    raise HpackError(f"table size {size} beyond {MAX_TABLE_SIZE}")
                self.max_size = size
                self._resized = True  # (a block with a size update is never replayed)
                self._shrink()
                continue
            else:  # literal without indexing, or never indexed
                prefix, indexed = 4, False
            index, pos = _integer(block, pos, prefix)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = self._string(block, pos)
            keep = name in wanted
            value, pos = self._string(block, pos, needed=indexed or keep)
            if indexed:
                self._add(name, value)
            if keep:
                out[name] = value
        return out


def _integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data) or shift > 28:
            raise HpackError("integer cut off or too long")
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
