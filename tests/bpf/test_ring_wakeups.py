"""Ring hand-off on the real kernel: the wake-up policy every probe's records follow
(bpf/include/common.h wakeup_flags) and the RingReader that drains them.

Records are written by bench/ring_flood.bpf.c (built and run by bench/ring_flood.py's helpers)
through BPF_PROG_TEST_RUN, which reserves, fills and submits them exactly as the probes do. An
edge-triggered epoll, as RingReader's, shows which writes woke the reader: the record that lands
in an empty ring and each one that makes a multiple of the batch size wait, no other (under a
backlog, a wake-up per record costs the traced writer an irq_work each).
Needs: BPF_PROG_TYPE_SYSCALL with BPF_PROG_TEST_RUN and bpf_loop (Linux 5.17+), clang.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from bench import ring_flood

from probewire.probes.base import events_dropped
from probewire.runtime.bpf import BpfObject
from probewire.runtime.ring import Ring, RingReader

pytestmark = pytest.mark.bpf

RECORD = np.dtype([("seq", np.uint32), ("pad", np.uint8, (60,))])
BATCH = 128
HANDOFF_TIMEOUT_S = 30  # a safety net against a stuck reader, not a speed claim


class Flood:
    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.prog = obj.programs["flood"]
        self.first = 0

    def write(self, count: int) -> tuple[int, int]:
        """(written, dropped) of `count` records with consecutive sequence numbers."""
        written, dropped = ring_flood.write(self.prog, count, self.first)
        self.first += count
        return written, dropped


def _flood(tmp: Path, ring_bytes: int) -> Iterator[Flood]:
    with ring_flood.flood_object(tmp, ring_bytes, BATCH, RECORD.itemsize) as obj:
        templates = np.zeros(ring_flood.TEMPLATES, RECORD)
        templates["seq"] = np.arange(ring_flood.TEMPLATES)
        ring_flood.fill_templates(obj, templates)
        yield Flood(obj)


@pytest.fixture
def flood(tmp_path: Path) -> Iterator[Flood]:
    yield from _flood(tmp_path, 1 << 20)  # 16,384 records of 64 bytes


@pytest.fixture
def small_flood(tmp_path: Path) -> Iterator[Flood]:
    yield from _flood(tmp_path, 1 << 16)  # 1,024 records: floods drop


def _wakes(flood: Flood, ep: select.epoll, n: int) -> list[int]:
    """Write n records one at a time; the 1-based indexes of those that woke the reader."""
    woke = []
    for i in range(1, n + 1):
        assert flood.write(1) == (1, 0)
        if ep.poll(0):  # the kernel's irq_work wake-up has run by the time the syscall returns
            woke.append(i)
    return woke


def test_a_record_wakes_the_reader_only_into_an_empty_ring_or_at_each_batch(
        flood: Flood) -> None:
    ring = Ring(flood.obj.maps["events"], RECORD, "test")
    ep = select.epoll()
    try:
        ep.register(ring.fd, select.EPOLLIN | select.EPOLLET)
        assert _wakes(flood, ep, 3 * BATCH + 5) == [1, BATCH, 2 * BATCH, 3 * BATCH]
        batch = ring.drain()
        assert list(batch["seq"]) == list(range(3 * BATCH + 5))
        # Drained to empty: the next record is again the first after a quiet spell.
        assert _wakes(flood, ep, BATCH + 5) == [1, BATCH]
        # Not drained: the count goes on from what waits, the next wake-up at 2 * BATCH.
        assert _wakes(flood, ep, BATCH) == [BATCH - 5]
    finally:
        ep.close()
        ring.close()


def test_reader_hands_off_every_record_and_a_full_ring_drops_and_counts(
        small_flood: Flood) -> None:
    """Bursts larger than the ring, written while the real RingReader drains it: every record
    written reaches the handler once, and every one the kernel could not write is in the drop
    counter the agent exports. One burst comes while the reader is held in its handler (a
    slow consumer): the kernel drops, never waits."""
    got: list[np.ndarray] = []
    running = threading.Event()
    running.set()

    def handle(batch: np.ndarray) -> None:
        got.append(batch["seq"].copy())
        running.wait(HANDOFF_TIMEOUT_S)

    def handed_off(n: int) -> bool:
        deadline = time.monotonic() + HANDOFF_TIMEOUT_S
        while sum(map(len, got)) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return sum(map(len, got)) >= n

    reader = RingReader(BATCH, 0.005)
    reader.add(Ring(small_flood.obj.maps["events"], RECORD, "test"), handle)
    reader.start()
    written = dropped = 0

    def write(burst: int) -> None:
        nonlocal written, dropped
        w, d = small_flood.write(burst)
        written, dropped = written + w, dropped + d

    try:
        for burst in (1, 5, BATCH - 1, BATCH, 4000):
            write(burst)
        # Whether these overflow depends on how fast the reader runs; the next one does not:
        # the reader takes one record and stays in its handler while 20,000 more come.
        running.clear()
        write(1)
        assert handed_off(written)
        write(20_000)
        running.set()
        write(3)
        handed_off(written)
    finally:
        running.set()
        reader.stop()
    assert dropped > 0, "the bursts should overflow a 1,024-record ring"
    assert events_dropped(small_flood.obj) == dropped
    seqs = np.concatenate(got)
    assert len(seqs) == written
    # The first bursts fit: they come out whole and in order.
    assert list(seqs[:1 + 5 + BATCH - 1 + BATCH]) == list(range(1 + 5 + BATCH - 1 + BATCH))
