"""One tier's blob records, held compactly; `Blob`, a view of one, made on demand.

A cache of a million blobs must not hold a Python object per blob: each record is a slot in
`array` columns (sizes, times, flags) under a digest → slot map (core/slots.py), and the
tier's eviction queue (core/eviction.py's Lru) orders the slots with no object per entry
either. About 105-120 bytes a blob in all (`TierBlobs.nbytes`; arrays grow ahead of need).

A `Blob` is what the rest of hostd handles. It is made when asked for and shared while
anyone holds it (a weak registry by slot), so `is` still tells one record from another and a
Blob reflects its record's changes (completion, a lent mark, a use). When its record is
replaced (a new inode: a refetch, a promotion) or dropped (evicted, removed), the Blob is
detached: it keeps the values its record had then, like a copy taken at that moment, and no
longer counts as the tier's record (`attached` is False).

This module holds state only; what a change means for budgets, the queue and the index is
the cache's (hostd/cache.py).
"""

from __future__ import annotations

import stat
import weakref
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from hostd.core.eviction import Lru
from hostd.core.ids import HASH_LEN
from hostd.core.slots import DigestSlots
from hostd.fastcopy import Stat
from hostd.index import UNKNOWN_CTIME, BlobRow, BlobValues
from hostd.tier import BLOB_MODE, BlobStat, Tier, mode_of

# Entries of the Blob registry kept before dead ones are swept (then twice the live ones).
_SWEEP_MIN = 4096

# flags
COMPLETE = 1
LENT = 2  # hardlinked into a tree whose owner could write to it: kept for the inode's life
PARKED = 4  # held or pinned when a walk met it: out of the queue until both are over
# Maybe hardlinked outside the tier (a restore used it, or it was there at start): an eviction
# walk that meets it asks its link count, and one with other links is not evicted (its bytes
# stay in use: removing our name would free nothing). Cleared when the count is 1.
LINKED = 8


class Values(NamedTuple):
    """A record's values, as a detached Blob keeps them."""

    size: int
    chunk_size: int
    complete: bool
    mtime_ns: int
    last_used: float
    ctime_ns: int
    lent: bool
    charged: int
    mode: int = BLOB_MODE


def state_holds(seen: Stat, size: int, mtime_ns: int, ctime_ns: int, lent: bool, mode: int) -> bool:
    """Whether a stat `seen` (size, mtime_ns, ctime_ns, st_mode) of a blob's file shows the
    state recorded when its bytes were last verified: size, mtime and mode always, the
    ctime too for a lent blob; never for a record not verified since its index was lost
    (Cache.unchanged says why)."""
    return (
        ctime_ns != UNKNOWN_CTIME
        and stat.S_ISREG(seen[3])  # (an lstat: a symlink put at its name is no blob)
        and seen[0] == size
        and seen[1] == mtime_ns
        and mode_of(seen[3]) == mode
        and (not lent or seen[2] == ctime_ns)
    )


class Charged:
    """Each slot's charge (what it counts against the tier's budget): its size, but for the
    few records charged otherwise (a partial blob found at start, charged for what it holds),
    kept aside: a column of its own cost 8 MB a million blobs for nearly all copies of
    `size`. Set a record's size before its charge."""

    __slots__ = ("_other", "_size")

    def __init__(self, size: array[int]) -> None:
        self._size = size
        self._other: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._size)

    def __getitem__(self, slot: int) -> int:
        other = self._other
        return other[slot] if slot in other else self._size[slot]

    def __setitem__(self, slot: int, charged: int) -> None:
        if charged == self._size[slot]:
            self._other.pop(slot, None)
        else:
            self._other[slot] = charged

    def forget(self, slot: int) -> None:
        self._other.pop(slot, None)


def _chunk_size(n: int) -> int:
    """A chunk size as its column holds it (32 bits): 0, unknown, for anything out of range
    (a manifest refuses any over 256 MiB; an index row could say anything)."""
    return n if 0 < n <= 0xFFFFFFFF else 0


class TierBlobs:
    """The records of one tier's blobs (complete and partial), by digest.

    Columns by slot: `size`, `chunk_size` (0: no manifest gave it yet), `mtime_ns`, `ctime_ns`
    and `mode` (the stat of the bytes when last verified; UNKNOWN_CTIME: never; the mode is
    not in the index: every start stats every blob, and takes it then), `last_used`,
    `charged` (bytes counted against the budget: the size, except for a partial blob found
    at start, charged for what it holds until a fill resumes it) and `flags`.
    """

    def __init__(self, tier: Tier) -> None:
        self.tier = tier
        self.slots = DigestSlots(HASH_LEN)
        self.size = array("q")
        self.chunk_size = array("I")
        self.mtime_ns = array("q")
        self.ctime_ns = array("q")
        self.mode = array("H")
        self.last_used = array("d")
        self.charged = Charged(self.size)
        self.flags = bytearray()
        self.queue = Lru(self.last_used, self.charged)
        self.unsized = 0  # records with no chunk size (a blob found on disk with no row)
        self.parked = 0  # records flagged PARKED
        # The Blobs someone holds, by slot, weakly: the entries of those no one holds any
        # more are swept once they outnumber the rest (no callback per Blob: they are many).
        self._views: dict[int, weakref.ReferenceType[Blob]] = {}
        self._sweep_at = _SWEEP_MIN
        # Set where links are guarded by leases ([access] link_checks = "lease"): whether
        # the daemon holds an unbroken read lease on a digest's blob here. A record with
        # none is then checked by ctime too, as a lent one is (hostd/leases.py says why).
        self.leased: Callable[[bytes], bool] | None = None

    def __repr__(self) -> str:
        return f"TierBlobs({self.tier.name}: {len(self)} blobs, {self.queue!r})"

    def __len__(self) -> int:
        return len(self.slots)

    def find(self, digest: bytes) -> int:
        """The slot of the tier's record of `digest`; -1 if none."""
        return self.slots.find(digest)

    def get(self, digest: bytes) -> Blob | None:
        slot = self.slots.find(digest)
        return None if slot < 0 else self.view(slot, digest)

    def view(self, slot: int, digest: bytes | None = None) -> Blob:
        """The Blob of the record at `slot`: the one someone holds already, else a new one."""
        ref = self._views.get(slot)
        if ref is not None and (b := ref()) is not None:
            return b
        b = Blob(self, slot, self.slots.key(slot) if digest is None else digest)
        self._views[slot] = weakref.ref(b)
        if len(self._views) > self._sweep_at:
            self._views = {k: r for k, r in self._views.items() if r() is not None}
            self._sweep_at = max(_SWEEP_MIN, 2 * len(self._views))
        return b

    def complete(self, slot: int) -> bool:
        return bool(self.flags[slot] & COMPLETE)

    def add(self, digest: bytes, r: Values) -> int:
        """Record `digest` (absent: `find` said so) with values `r`; its new slot."""
        slot = self.slots.add(digest)
        if slot == len(self.size):
            self.size.append(0)
            self.chunk_size.append(0)
            self.mtime_ns.append(0)
            self.ctime_ns.append(0)
            self.mode.append(BLOB_MODE)
            self.last_used.append(0.0)
            self.flags.append(0)
        self._write(slot, r)
        self.unsized += _chunk_size(r.chunk_size) == 0
        return slot

    def add_row(self, row: BlobValues) -> int:
        """Record an index row as it stands (charged its size, not queued): how Cache.load
        reads the index, with no object per row. A digest recorded already takes the row's
        values (a table with no key may hold two rows of one blob: the later one counts).
        Its mode is BLOB_MODE until the scan finds its file. Its slot."""
        digest, _, size, chunk_size, complete, mtime_ns, last_used, ctime_ns, lent = row
        known = len(self.slots)
        slot = self.slots.put(digest)
        if slot < len(self.size):  # recorded already, or a slot freed before
            self.unsized -= len(self.slots) == known and self.chunk_size[slot] == 0
            self._write(
                slot,
                Values(
                    size,
                    chunk_size,
                    bool(complete),
                    mtime_ns,
                    last_used,
                    ctime_ns,
                    bool(lent),
                    size,
                ),
            )
        else:
            self.size.append(size)
            self.chunk_size.append(_chunk_size(chunk_size))
            self.mtime_ns.append(mtime_ns)
            self.ctime_ns.append(ctime_ns)
            self.mode.append(BLOB_MODE)
            self.last_used.append(last_used)
            self.flags.append((COMPLETE | LINKED if complete else 0) | (LENT if lent else 0))
        self.unsized += _chunk_size(chunk_size) == 0
        return slot

    def set(self, slot: int, r: Values) -> None:
        """Overwrite a record's values (out of the queue: the queue reads `charged`). Its
        Blob sees the new values: `detach` it first if this is a new record."""
        self.unsized += (_chunk_size(r.chunk_size) == 0) - (self.chunk_size[slot] == 0)
        self._write(slot, r)

    def _write(self, slot: int, r: Values) -> None:
        self._unpark(slot)
        self.size[slot] = r.size
        self.chunk_size[slot] = _chunk_size(r.chunk_size)
        self.mtime_ns[slot] = r.mtime_ns
        self.ctime_ns[slot] = r.ctime_ns
        self.last_used[slot] = r.last_used
        self.charged[slot] = r.charged
        self.mode[slot] = r.mode
        self.flags[slot] = (COMPLETE | LINKED if r.complete else 0) | (LENT if r.lent else 0)

    def finish(self, slot: int, st: BlobStat, now: float) -> None:
        """Mark a partial record complete with the stat `st` of its bytes, used at `now`: a
        new inode, so not lent (out of the queue, as `set`)."""
        self._unpark(slot)
        self.mtime_ns[slot] = st.mtime_ns
        self.ctime_ns[slot] = st.ctime_ns
        self.mode[slot] = st.mode
        self.last_used[slot] = now
        self.flags[slot] = COMPLETE | LINKED  # (filled for a restore, which may link it)

    def unchanged(self, slot: int, seen: Stat, leased: bool | None = None) -> bool:
        """Whether a complete record's file, as a fresh stat `seen` shows it, still has the
        state recorded when its bytes were last verified. `leased`: whether its read lease
        holds, where the caller asked already (Cache.leased_moved); else asked here."""
        f = self.flags[slot]
        strict = bool(f & LENT)
        ctime = self.ctime_ns[slot]
        if not strict and seen[2] != ctime and (ask := self.leased) is not None:
            # Asked only where the ctime moved (a system call). A lease that holds vouches
            # that links and unlinks alone moved it: the record takes it, so the next check
            # asks nothing (Cache.record_leased writes it at a clean stop).
            held = leased if leased is not None else ask(self.slots.key(slot))
            if f & COMPLETE and held and ctime != UNKNOWN_CTIME:
                self.ctime_ns[slot] = seen[2]
            else:
                strict = True
        return bool(f & COMPLETE) and state_holds(
            seen,
            self.size[slot],
            self.mtime_ns[slot],
            self.ctime_ns[slot],
            strict,
            self.mode[slot],
        )

    def set_chunk_size(self, slot: int, chunk_size: int) -> None:
        self.unsized += (_chunk_size(chunk_size) == 0) - (self.chunk_size[slot] == 0)
        self.chunk_size[slot] = _chunk_size(chunk_size)

    def push(self, slot: int) -> None:
        """Queue a record for eviction (no longer parked)."""
        self._unpark(slot)
        self.queue.push(slot)

    def park(self, slot: int) -> None:
        """Mark a record a walk took out of the queue because it is held or pinned."""
        if not self.flags[slot] & PARKED:
            self.flags[slot] |= PARKED
            self.parked += 1

    def is_parked(self, slot: int) -> bool:
        return bool(self.flags[slot] & PARKED)

    def _unpark(self, slot: int) -> None:
        if self.flags[slot] & PARKED:
            self.flags[slot] &= ~PARKED & 0xFF
            self.parked -= 1

    def values(self, slot: int) -> Values:
        f = self.flags[slot]
        return Values(
            self.size[slot],
            self.chunk_size[slot],
            bool(f & COMPLETE),
            self.mtime_ns[slot],
            self.last_used[slot],
            self.ctime_ns[slot],
            bool(f & LENT),
            self.charged[slot],
            self.mode[slot],
        )

    def row(self, slot: int, digest: bytes | None = None) -> BlobRow:
        f = self.flags[slot]
        return BlobRow(
            self.slots.key(slot) if digest is None else digest,
            self.tier.name,
            self.size[slot],
            self.chunk_size[slot],
            bool(f & COMPLETE),
            self.mtime_ns[slot],
            self.last_used[slot],
            self.ctime_ns[slot],
            bool(f & LENT),
        )

    def detach(self, slot: int) -> None:
        """The record at `slot` is about to be replaced or dropped: its Blob keeps its values."""
        ref = self._views.pop(slot, None)
        if ref is not None and (b := ref()) is not None:
            b._detach(self.values(slot))

    def remove(self, slot: int) -> None:
        """Forget the record at `slot` (out of the queue: the caller's to do first)."""
        self.detach(slot)
        self.unsized -= self.chunk_size[slot] == 0
        self._unpark(slot)
        self.charged.forget(slot)
        self.flags[slot] = 0
        self.slots.remove(slot)

    def digests(self) -> Digests:
        """Every digest recorded now, in a compact copy that later changes do not touch."""
        out = bytearray()
        for slot in self.slots.slots():
            out += self.slots.key(slot)
        return Digests(bytes(out))

    def nbytes(self) -> int:
        """What the records hold in buffers (an estimate of their memory, for tests)."""
        cols = 8 * 5 + 4 + 2 + 1
        return self.slots.nbytes() + cols * len(self.size) + self.queue.nbytes()


class Digests:
    """A list of digests in one bytes object (32 bytes each): what a walk over a tier takes."""

    def __init__(self, packed: bytes) -> None:
        self._packed = packed

    def __len__(self) -> int:
        return len(self._packed) // HASH_LEN

    def __iter__(self) -> Iterator[bytes]:
        p = self._packed
        return (p[o : o + HASH_LEN] for o in range(0, len(p), HASH_LEN))

    def __contains__(self, digest: object) -> bool:
        return any(d == digest for d in self)

    def __repr__(self) -> str:
        return f"Digests({len(self)})"


class Blob:
    """One blob in one tier: a view of its record (see the module docstring)."""

    __slots__ = ("__weakref__", "_at", "_slot", "_was", "digest", "tier")

    def __init__(self, at: TierBlobs, slot: int, digest: bytes) -> None:
        self.digest = digest
        self.tier = at.tier
        self._at: TierBlobs | None = at
        self._slot = slot
        self._was: Values | None = None

    def _detach(self, values: Values) -> None:
        self._at, self._was = None, values

    @property
    def attached(self) -> bool:
        """Whether this is still the tier's record of the blob."""
        return self._at is not None

    @property
    def slot(self) -> int:
        return self._slot

    def _values(self) -> Values:
        at = self._at
        if at is not None:
            return at.values(self._slot)
        assert self._was is not None
        return self._was

    @property
    def size(self) -> int:
        at = self._at
        return at.size[self._slot] if at is not None else self._values().size

    @property
    def chunk_size(self) -> int:
        at = self._at
        return at.chunk_size[self._slot] if at is not None else self._values().chunk_size

    @property
    def complete(self) -> bool:
        at = self._at
        return bool(at.flags[self._slot] & COMPLETE) if at is not None else self._values().complete

    @property
    def mtime_ns(self) -> int:
        at = self._at
        return at.mtime_ns[self._slot] if at is not None else self._values().mtime_ns

    @property
    def ctime_ns(self) -> int:
        at = self._at
        return at.ctime_ns[self._slot] if at is not None else self._values().ctime_ns

    @property
    def last_used(self) -> float:
        at = self._at
        return at.last_used[self._slot] if at is not None else self._values().last_used

    @property
    def lent(self) -> bool:
        at = self._at
        return bool(at.flags[self._slot] & LENT) if at is not None else self._values().lent

    @property
    def charged(self) -> int:
        at = self._at
        return at.charged[self._slot] if at is not None else self._values().charged

    @property
    def mode(self) -> int:
        """Its file's mode (tier.mode_of), as last verified: BLOB_MODE or EXEC_BLOB_MODE
        where hostd made it."""
        at = self._at
        return at.mode[self._slot] if at is not None else self._values().mode

    @property
    def path(self) -> Path:
        return self.tier.blob_path(self.digest)

    @property
    def file(self) -> str:
        """`path` as a string: cheaper where every blob of a snapshot is looked at."""
        return self.tier.blob_file(self.digest)

    def row(self) -> BlobRow:
        at = self._at
        if at is not None:
            return at.row(self._slot, self.digest)
        r = self._values()
        return BlobRow(
            self.digest,
            self.tier.name,
            r.size,
            r.chunk_size,
            r.complete,
            r.mtime_ns,
            r.last_used,
            r.ctime_ns,
            r.lent,
        )

    def record(self, st: BlobStat) -> None:
        """Take `st` as the stat of this blob's verified bytes, in memory only (the cache's
        settle also writes the row)."""
        at = self._at
        if at is None:
            assert self._was is not None
            self._was = self._was._replace(
                size=st.size, mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns, mode=st.mode
            )
            return
        at.size[self._slot], at.mtime_ns[self._slot] = st.size, st.mtime_ns
        at.ctime_ns[self._slot], at.mode[self._slot] = st.ctime_ns, st.mode

    def intact(self, seen: Stat | int, leased: bool | None = None) -> bool:
        """Whether this is still its tier's record, complete, and `seen` (a stat of its file
        taken just before, or the errno of one that failed) shows the state recorded when
        its bytes were last verified: a warm restore's check of each blob, in one call.
        `leased` as TierBlobs.unchanged's."""
        at = self._at
        if at is None or isinstance(seen, int):
            return False
        return at.unchanged(self._slot, seen, leased)

    def state(self) -> tuple[int, int, int]:
        """(size, mtime_ns, ctime_ns) of its verified bytes, as recorded: one call."""
        at = self._at
        if at is None:
            r = self._values()
            return r.size, r.mtime_ns, r.ctime_ns
        s = self._slot
        return at.size[s], at.mtime_ns[s], at.ctime_ns[s]

    def stat(self) -> BlobStat:
        """The recorded stat of its verified bytes."""
        return BlobStat(self.digest, self.size, self.mtime_ns, self.ctime_ns, self.mode)

    def __repr__(self) -> str:
        r = self._values()
        state = "complete" if r.complete else f"partial {r.charged}/{r.size}"
        gone = "" if self.attached else ", detached"
        return f"Blob({self.tier.name}:{self.digest.hex()[:12]} {state}{gone})"


__all__ = ["UNKNOWN_CTIME", "Blob", "Digests", "TierBlobs", "Values"]
