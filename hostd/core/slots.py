"""A map from fixed-width keys (32-byte digests) to slot numbers, with no Python object per
key. Pure, but for choosing at import which twin `DigestSlots` is.

A million cached blobs in a dict cost a bytes object, an int and a dict entry each (~150 B);
here a key costs its own bytes in one buffer plus ~6-12 bytes of index. A slot is a small
int that the caller uses to index its own columns (`array` module arrays); slots freed by
`remove` are given out again, the last freed first.

The index is an open-addressing hash table (linear probing, tombstones for removals) split in
SHARDS shards, each grown on its own: growing one rehashes ~1/SHARDS of the keys, so no add
ever costs a pass over all of them (a million keys: ~1,000 per shard).

Two twins: `PyDigestSlots` below, and the same structure compiled (native/slots.c,
`hostd._slots`). A cold restore of 10,000 small files calls `find` ~90,000 times: ~0.5-0.7
µs each here (a hash, array indexing, a slice compare) with 10,000 keys, ~1.7-2 µs with a
million; compiled, ~0.05-0.08 µs and ~0.4-0.6 µs, where it waits on memory as a dict's
lookup does (bench/slots.py). `DigestSlots` is the compiled one when it was built and the
environment's `HOSTD_NATIVE` is not `0` (as hostd/fastcopy.py chooses), else the twin:
`IMPLEMENTATION` says which, `WHY_NOT_NATIVE` why not. Both give the same slot for any
sequence of calls, since callers index their columns by slot (tests/test_slots.py runs them
side by side); only the order of `slots()` and the measure of `nbytes()` differ. Each hashes
keys its own way.

A slot argument out of range is an IndexError, `remove` of a slot that holds no key a
ValueError; `key` of a freed slot gives the key it held last.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from typing import Protocol

SHARD_BITS = 10
SHARDS = 1 << SHARD_BITS
_MASK = SHARDS - 1
# Index entries: slot + 1; 0 empty; -1 a removed key (a tombstone: probes go on past it).
_EMPTY = 0
_GONE = -1
_MIN_SIZE = 8
MAX_WIDTH = 1 << 16


class Slots(Protocol):
    """What both twins are (and what `DigestSlots(width)` gives)."""

    def __init__(self, width: int = 32) -> None: ...
    @property
    def width(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def capacity(self) -> int:
        """Slots ever given out (free ones included): how long the caller's columns are."""
        ...

    def __len__(self) -> int: ...
    def find(self, key: bytes, /) -> int: ...
    def add(self, key: bytes, /) -> int: ...
    def put(self, key: bytes, /) -> int: ...
    def remove(self, slot: int, /) -> None: ...
    def key(self, slot: int, /) -> bytes: ...
    def slots(self) -> Iterator[int]: ...
    def nbytes(self) -> int: ...


class PyDigestSlots:
    """Keys of `width` bytes to slots. `find` is -1 for an absent key; `add` takes an absent
    key only (the caller looks first: it also decides what a present key means)."""

    def __init__(self, width: int = 32) -> None:
        if not 1 <= width <= MAX_WIDTH:
            raise ValueError(f"a width of {width} bytes, want 1 to {MAX_WIDTH}")
        self.width = width
        self._keys = bytearray()  # slot s: _keys[s * width : (s + 1) * width]
        self._free = array("i")
        self._index = [array("i", bytes(4 * _MIN_SIZE)) for _ in range(SHARDS)]
        self._filled = array("i", bytes(4 * SHARDS))  # used entries per shard, tombstones too
        self._live = array("i", bytes(4 * SHARDS))
        self.count = 0

    def __repr__(self) -> str:
        return f"DigestSlots({self.count} keys, {self.capacity} slots)"

    def __len__(self) -> int:
        return self.count

    @property
    def capacity(self) -> int:
        """Slots ever given out (free ones included): how long the caller's columns are."""
        return len(self._keys) // self.width

    def key(self, slot: int) -> bytes:
        """The key at `slot` (of a freed slot: the last it held)."""
        if not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot} out of range (capacity {self.capacity})")
        w = self.width
        return bytes(self._keys[slot * w : (slot + 1) * w])

    def find(self, key: bytes) -> int:
        h = hash(key)
        idx = self._index[h & _MASK]
        mask = len(idx) - 1
        i = (h >> SHARD_BITS) & mask
        keys, w = self._keys, self.width
        while True:
            v = idx[i]
            if v > 0:
                o = (v - 1) * w
                if keys[o : o + w] == key:
                    return v - 1
            elif v == _EMPTY:
                return -1
            i = (i + 1) & mask

    def add(self, key: bytes) -> int:
        """Give an absent `key` a slot: a free one, else the next new one (== capacity)."""
        shard, idx, mask, i = self._adding(key)
        while idx[i] > 0:
            i = (i + 1) & mask
        return self._claim(shard, idx, i, key)

    def put(self, key: bytes) -> int:
        """The slot of `key`: its own if present, else a new one as `add` gives (then `len`
        grows by one). One hash and one probe for both: a bulk load (Cache.load) that may meet
        a key twice."""
        shard, idx, mask, i = self._adding(key)
        keys, w = self._keys, self.width
        free = -1  # the first tombstone on the way: where an absent key goes
        while True:
            v = idx[i]
            if v > 0:
                o = (v - 1) * w
                if keys[o : o + w] == key:
                    return v - 1
            elif v == _EMPTY:
                break
            elif free < 0:
                free = i
            i = (i + 1) & mask
        return self._claim(shard, idx, i if free < 0 else free, key)

    def _adding(self, key: bytes) -> tuple[int, array[int], int, int]:
        """Where adding `key` probes: its shard, the shard's index (grown first if one more
        entry would fill it past two thirds), the index's mask and the first entry to look at."""
        if len(key) != self.width:
            raise ValueError(f"a key of {len(key)} bytes, want {self.width}")
        h = hash(key)
        shard = h & _MASK
        idx = self._index[shard]
        if (self._filled[shard] + 1) * 3 > len(idx) * 2:
            idx = self._rehash(shard)
        mask = len(idx) - 1
        return shard, idx, mask, (h >> SHARD_BITS) & mask

    def _claim(self, shard: int, idx: array[int], i: int, key: bytes) -> int:
        """Give `key` a slot at entry `i` of its shard's index (empty or a tombstone)."""
        if idx[i] == _EMPTY:
            self._filled[shard] += 1
        w = self.width
        if self._free:
            slot = self._free.pop()
            self._keys[slot * w : (slot + 1) * w] = key
        else:
            slot = len(self._keys) // w
            self._keys += key
        idx[i] = slot + 1
        self._live[shard] += 1
        self.count += 1
        return slot

    def remove(self, slot: int) -> None:
        """Free `slot` and forget its key (ValueError: it holds none)."""
        key = self.key(slot)
        h = hash(key)
        shard = h & _MASK
        idx = self._index[shard]
        mask = len(idx) - 1
        i = (h >> SHARD_BITS) & mask
        # A held slot's entry is on its key's probe path, before any empty entry.
        while (v := idx[i]) != slot + 1:
            if v == _EMPTY:
                raise ValueError(f"slot {slot} holds no key")
            i = (i + 1) & mask
        idx[i] = _GONE
        self._live[shard] -= 1
        self.count -= 1
        self._free.append(slot)

    def _rehash(self, shard: int) -> array[int]:
        """Rebuild one shard's index without its tombstones, sized for twice its keys."""
        old = self._index[shard]
        size = _MIN_SIZE
        while (self._live[shard] + 1) * 3 > size:
            size *= 2
        idx = array("i", bytes(4 * size))
        mask = size - 1
        view, w = memoryview(self._keys), self.width
        for v in old:
            if v > 0:
                o = (v - 1) * w
                i = (hash(bytes(view[o : o + w])) >> SHARD_BITS) & mask
                while idx[i] != _EMPTY:
                    i = (i + 1) & mask
                idx[i] = v
        view.release()
        self._index[shard] = idx
        self._filled[shard] = self._live[shard]
        return idx

    def slots(self) -> Iterator[int]:
        """Every slot holding a key (in no useful order)."""
        for idx in self._index:
            for v in idx:
                if v > 0:
                    yield v - 1

    def nbytes(self) -> int:
        """What the structure holds in buffers (an estimate of its memory, for tests)."""
        return (
            len(self._keys)
            + 4 * len(self._free)
            + sum(4 * len(idx) for idx in self._index)
            + 8 * SHARDS
        )


def _load() -> tuple[type[Slots] | None, str]:
    """The compiled twin, or None and why not."""
    try:
        from hostd import _slots
    except ImportError as e:
        return None, f"the extension hostd._slots was not built ({e})"
    native = getattr(_slots, "DigestSlots", None)
    missing = [n for n in _API if not hasattr(native, n)]
    if missing:  # built from an older native/slots.c
        return None, f"the extension hostd._slots is stale (no {', '.join(missing)})"
    return _slots.DigestSlots, ""


_API = ("find", "add", "put", "remove", "key", "slots", "nbytes", "capacity", "count", "width")
NativeDigestSlots, WHY_NOT_NATIVE = _load()
DigestSlots: type[Slots] = (
    NativeDigestSlots
    if NativeDigestSlots is not None and os.environ.get("HOSTD_NATIVE") != "0"
    else PyDigestSlots
)
"""`DigestSlots(width=32)`: the compiled twin where it was built, unless HOSTD_NATIVE=0."""
IMPLEMENTATION = "python" if DigestSlots is PyDigestSlots else "native"
