"""Whole-column id machinery for the record path: ints in, dense ids out, a column at a time.

The stages after decoding (connections, services, label sets, paths) keep deterministic
answers per key; these structures find a whole batch's keys at once (a direct-mapped cache,
then sorted arrays or a dict for the few misses), so a steady stream of known keys costs
whole-array work only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from probewire.aggregate.series import grown

MIX = np.uint64(0x9E3779B97F4A7C15)
ALL_EQUAL = np.uint64(0x0101010101010101)
# Keys a cache keeps after other keys took their slots (see IdCache).
VICTIMS_MAX = 256


def same_rows(table: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Whether table[ids[i]] equals rows[i] for each i. -1 ids read the last row of the
    table; callers treat those rows as misses anyway."""
    equal = table.take(ids, axis=0) == rows
    # Rows of 8 words: all 8 bytes of a row of the bool array are 1, one compare per row
    # where a reduction along a short axis costs ~10 ns a row.
    same: np.ndarray = (equal.view(np.uint64)[:, 0] == ALL_EQUAL if equal.shape[1] == 8
                        else equal.all(axis=1))
    return same


def distinct(values: np.ndarray) -> list[int]:
    """Distinct values in order of first appearance (np.unique without index or counts
    imports numpy.ma on first use: 1.3 MB)."""
    return list(dict.fromkeys(values.tolist()))


def first_rows(keys: np.ndarray, rows: np.ndarray) -> dict[int, int]:
    """Distinct keys among `rows`, in order of first appearance, each with its first row."""
    first: dict[int, int] = {}
    for key, row in zip(keys[rows].tolist(), rows.tolist(), strict=True):
        first.setdefault(key, row)
    return first


class IdCache:
    """A direct-mapped cache of int64 keys (>= 0) to ids, looked up a whole column at once.

    A slot holds the last key stored in it; a key whose slot another key took is a miss like a
    new key, answered by the caller's authority (a dict, sorted arrays) and stored again.
    Slots hold key+1 (0: empty). The cache starts small and grows, up to `max_bits`, to keep
    itself at most an eighth full (`fit`; a slot then holds a key another wants about one time
    in eight): its memory follows what it holds. A key pushed out of its slot by another goes
    to a small dict (`rescue`): a batch of a few hundred keys nearly always has a pair that
    share a slot, and a dict lookup for its few misses is cheaper than asking the authority.
    """

    def __init__(self, max_bits: int, bits: int = 10, victims: bool = True) -> None:
        self._max_bits = max_bits
        self._victims: dict[int, int] | None = {} if victims else None
        self._size(min(bits, max_bits))

    def _size(self, bits: int) -> None:
        self._bits = bits
        self._shift = np.uint64(64 - bits)
        self._keys = np.zeros(1 << bits, dtype=np.int64)
        self._ids = np.zeros(1 << bits, dtype=np.int64)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(id per key, -1 where not cached; slot per key, for `put`)."""
        slots = ((keys.view(np.uint64) * MIX) >> self._shift).astype(np.intp)
        return np.where(self._keys[slots] == keys + 1, self._ids[slots], -1), slots

    def put(self, keys: np.ndarray, slots: np.ndarray, ids: np.ndarray) -> None:
        if self._victims is None:
            self._keys[slots] = keys + 1
            self._ids[slots] = ids
            return
        held = self._keys[slots]
        out = (held != 0) & (held != keys + 1)
        if out.any():
            if len(self._victims) > VICTIMS_MAX:
                self._victims.clear()
            self._victims.update(zip((held[out] - 1).tolist(), self._ids[slots[out]].tolist(),
                                     strict=True))
        self._keys[slots] = keys + 1
        self._ids[slots] = ids

    def rescue(self, keys: np.ndarray) -> list[int]:
        """Ids of keys pushed out of their slots (-1: not among them)."""
        get = (self._victims or {}).get
        return [get(k, -1) for k in keys.tolist()]

    def fit(self, count: int, everything: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
        """Grow for an authority of `count` keys; `everything()` gives all its (keys, ids)."""
        bits = self._bits
        while count * 8 > 1 << bits and bits < self._max_bits:
            bits += 1
        if bits != self._bits:
            self._size(bits)
            if self._victims is not None:
                self._victims.clear()
            keys, ids = everything()
            self.put(keys, self.find(keys)[1], ids)


class SortedIds:
    """int64 keys -> ids, as sorted arrays: a tenth of a dict's memory for the many series
    entries a big host has, looked up a column at a time (on cache misses only). New keys go
    to a small sorted level, merged into the big one when it has grown by an eighth: the big
    arrays are reallocated a few times in all, not on every batch with a new key."""

    def __init__(self) -> None:
        keys, ids = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        self._levels = [(keys, ids), (keys, ids)]

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self._levels)

    def everything(self) -> tuple[np.ndarray, np.ndarray]:
        (big, big_ids), (small, small_ids) = self._levels
        return np.concatenate([big, small]), np.concatenate([big_ids, small_ids])

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Id per key, -1 for keys not here."""
        found = np.full(len(keys), -1, dtype=np.int64)
        for known, ids in self._levels:
            if len(known):
                at = np.minimum(np.searchsorted(known, keys), len(known) - 1)
                found = np.where(known[at] == keys, ids[at], found)
        return found

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """Add distinct keys not here yet."""
        (big, big_ids), (small, small_ids) = self._levels
        small, small_ids = merged(small, small_ids, keys, ids)
        if len(small) > max(1024, len(big) // 8):
            big, big_ids = merged(big, big_ids, small, small_ids)
            small, small_ids = small[:0], small_ids[:0]
        self._levels = [(big, big_ids), (small, small_ids)]


def merged(keys: np.ndarray, ids: np.ndarray, more: np.ndarray, more_ids: np.ndarray,
            ) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(more)
    more, more_ids = more[order], more_ids[order]
    at = np.searchsorted(keys, more)
    return np.insert(keys, at, more), np.insert(ids, at, more_ids)


class Column:
    """An append-only int64 (or float64) column, grown by doubling."""

    def __init__(self, fill: float = -1, dtype: type = np.int64) -> None:
        self.fill = fill
        self.data: np.ndarray = np.full(64, fill, dtype=dtype)

    def __setitem__(self, index: int, value: float) -> None:
        self.ensure(index + 1)
        self.data[index] = value

    def ensure(self, size: int) -> None:
        """Room for `size` entries (new ones hold the fill value)."""
        if size > len(self.data):
            old = len(self.data)
            self.data = grown(self.data, max(2 * old, size))
            self.data[old:] = self.fill


_K = TypeVar("_K")


def interned(table: dict[_K, int], items: list[_K], key: _K) -> int:
    found = table.get(key)
    if found is None:
        found = table[key] = len(items)
        items.append(key)
    return found


def interned_all(table: dict[_K, int], items: list[_K], keys: list[_K]) -> list[int]:
    get = table.get
    ids = [get(k, -1) for k in keys]
    if -1 in ids:
        ids = [interned(table, items, k) for k in keys]
    return ids
