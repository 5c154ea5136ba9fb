"""Ring draining over a memfd laid out like a kernel BPF ring buffer (no root, no BPF).

The memfd holds the consumer page, the producer page and the data area once, which is all the
reader maps; the writer here plays the kernel, including records that wrap past the end of
the data area (the kernel writes those through its second mapping, i.e. they land at the start).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from probewire.runtime.bpf import BPF_MAP_TYPE_RINGBUF
from probewire.runtime.ring import (
    PAGE_SIZE,
    RINGBUF_BUSY_BIT,
    RINGBUF_DISCARD_BIT,
    RINGBUF_HDR_SZ,
    Ring,
)

# 4 + 4 + 20 = 28 bytes, a 40-byte stride: records straddle the end of a 4096-byte area.
RECORD = np.dtype([("kind", np.uint32), ("seq", np.uint32), ("payload", np.uint8, (20,))])
OTHER = np.dtype([("kind", np.uint32), ("seq", np.uint32)])  # 8 bytes: a 16-byte stride


@dataclass
class FakeMap:
    name: str
    fd: int
    max_entries: int
    type: int = BPF_MAP_TYPE_RINGBUF


class KernelSide:
    """Writes records the way the kernel does: header (len | BUSY) first, body, then commit."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("ring-test")
        os.ftruncate(self.fd, 2 * PAGE_SIZE + size)
        self.mem = mmap.mmap(self.fd, 2 * PAGE_SIZE + size)
        self.prod = 0

    def consumer_pos(self) -> int:
        return int(struct.unpack_from("<Q", self.mem, 0)[0])

    def _write(self, pos: int, data: bytes) -> None:
        base = 2 * PAGE_SIZE
        off = pos % self.size
        first = min(len(data), self.size - off)
        self.mem[base + off : base + off + first] = data[:first]
        self.mem[base : base + len(data) - first] = data[first:]

    def reserve(self, body: bytes) -> int:
        """Write a record still BUSY; returns its position (for commit)."""
        pos = self.prod
        self._write(pos, struct.pack("<II", len(body) | RINGBUF_BUSY_BIT, 0) + body)
        self.prod += (RINGBUF_HDR_SZ + len(body) + 7) & ~7
        struct.pack_into("<Q", self.mem, PAGE_SIZE, self.prod)
        return pos

    def commit(self, pos: int, length: int, discard: bool = False) -> None:
        self._write(pos, struct.pack("<I", length | (RINGBUF_DISCARD_BIT if discard else 0)))

    def put(self, body: bytes, discard: bool = False) -> None:
        self.commit(self.reserve(body), len(body), discard)

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


@pytest.fixture
def kernel() -> Iterator[KernelSide]:
    side = KernelSide(4096)
    yield side
    side.close()


@pytest.fixture
def ring(kernel: KernelSide) -> Iterator[Ring]:
    r = Ring(FakeMap("events", kernel.fd, kernel.size), RECORD, "test")  # type: ignore[arg-type]
    yield r
    r.close()


def record(seq: int, dtype: np.dtype = RECORD) -> bytes:
    rec = np.zeros(1, dtype)
    rec["kind"], rec["seq"] = 7, seq
    if "payload" in dtype.names:
        rec["payload"] = seq % 251
    return rec.tobytes()


def test_ring_maps_its_data_area_once(ring: Ring, kernel: KernelSide) -> None:
    # The kernel maps every page at mmap time: a second copy would count twice in RSS.
    assert len(ring._data) == PAGE_SIZE + kernel.size


def test_records_that_wrap_past_the_end_come_out_whole_and_in_order(
    ring: Ring, kernel: KernelSide
) -> None:
    seq = 0
    # Several laps, drained at uneven points, so spans start and end everywhere in the area,
    # including records whose header is before the end and body after it.
    for batch in (50, 90, 101, 3, 102, 77, 99):
        for _ in range(batch):
            kernel.put(record(seq))
            seq += 1
        out = ring.drain()
        assert out["seq"].tolist() == list(range(seq - batch, seq))
        assert (out["payload"][:, 0] == out["seq"] % 251).all()
        assert kernel.consumer_pos() == kernel.prod
    assert ring.records_read == seq


def test_drain_stops_at_a_busy_record_and_resumes_once_it_commits(
    ring: Ring, kernel: KernelSide
) -> None:
    for i in range(100):  # the next records straddle the end of the area
        kernel.put(record(i))
    ring.drain()
    kernel.put(record(100))
    pending = kernel.reserve(record(101))
    kernel.put(record(102))
    assert ring.drain()["seq"].tolist() == [100]
    kernel.commit(pending, RECORD.itemsize)
    assert ring.drain()["seq"].tolist() == [101, 102]
    assert kernel.consumer_pos() == kernel.prod


def test_discarded_records_are_skipped_and_their_space_released(
    ring: Ring, kernel: KernelSide
) -> None:
    for i in range(60):
        kernel.put(record(i))
    ring.drain()
    for i in range(100):  # a span that wraps
        kernel.put(record(i), discard=i % 3 == 0)
    assert ring.drain()["seq"].tolist() == [i for i in range(100) if i % 3]
    assert kernel.consumer_pos() == kernel.prod


def test_records_of_another_size_are_skipped_across_the_wrap(
    ring: Ring, kernel: KernelSide
) -> None:
    for i in range(100):
        kernel.put(record(i))
    ring.drain()
    kernel.put(record(100))
    # Stray sizes send the drain down the record-by-record walk; record 101 then straddles.
    kernel.put(record(0, OTHER))
    kernel.put(record(1, OTHER))
    for i in range(101, 110):
        kernel.put(record(i))
    assert ring.drain()["seq"].tolist() == list(range(100, 110))
    assert kernel.consumer_pos() == kernel.prod
