"""The tiers together: where each blob lives, what each tier holds, admission and eviction.

The cache keeps an in-memory view of the blobs in each tier and writes every change through
to the index; the snapshots it knows (records, pins, manifests, the chunk map) are
hostd/snapshots.py's. The view is compact (hostd/blobs.py: columns by slot, no Python object
per blob, ~130 bytes each); a `Blob` is made when asked for and follows its record until the
record is replaced or dropped. What follows a blob across awaits is therefore its `Blob`:
"still this cache's record" is `Blob.attached`.

Budget accounting charges a blob's full size from the moment it is admitted for filling, so
a tier never holds more than its budget; a partial blob found at start is charged for the
bytes it holds, until a fill resumes it.

Eviction is least recently used by bytes, from one queue per tier (core/eviction.py's Lru),
so an admission costs O(log n) per victim, not a scan of the tier: a blob leaves a tier for
the next one down, or is deleted from the last. Pinned snapshots' blobs and blobs held by a
running restore never go: the walk that meets one takes it out of the queue ("parks" it), and
the release or unpin that frees it queues it again. A partial blob no fill is using (one a
cancelled fill or a stopped daemon left) is evicted like the rest (its chunks are fetched
again if it is wanted); one being filled never is (`busy` says which a fill holds).

Shared state changes only between awaits; admission and eviction run under one lock so two
fills never count the same free bytes.

Trust in a complete blob rests on its bytes having been hashed, and on the stat of its inode
(size, mtime, ctime) being the one taken just before that hash. Before any use (a fill, a
dedup read, a promotion or demotion) `vouch` compares that stat with the inode's and re-hashes
on any difference; `settle` is the one place that acts on a re-hash. A blob hardlinked into a
tree whose owner could write to it is marked lent (see `lent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from hostd.blobs import (
    COMPLETE,
    LENT,
    LINKED,
    Blob,
    Digests,
    TierBlobs,
    Values,
    state_holds,
)
from hostd.core import manifest as mf
from hostd.core.eviction import Lru
from hostd.core.ids import HASH_LEN, file_digest
from hostd.errors import BlobUnheld, TierError
from hostd.fastcopy import Stat
from hostd.index import BATCH, UNKNOWN_CTIME, BlobRow, Index, unpack_blobs
from hostd.leases import Busy as LeaseBusy
from hostd.leases import Leases
from hostd.snapshots import DECODED_CHUNKS, Snapshot, Snapshots
from hostd.tier import BlobCopyCorrupt, BlobStat, Tier, digest_of, mode_of

log = logging.getLogger(__name__)

__all__ = ["Blob", "Cache", "Rehash", "TierUsage", "Verdict"]


# Load's state of each record, a byte by slot while it reconciles the index with the disk.
_RECORDED = 0  # read from the index, its file not found (yet)
_KEPT = 1  # its file found, its row right as it is
_CHANGED = 2  # its file found, its row to be written

# Unsized blobs found at load that are looked up through a set (few: after a crash, say);
# more (a lost index) are looked up in the columns themselves, with no set of them.
_FEW_UNSIZED = 1 << 16

# Chunks smaller than this are found for dedup only as a blob of their own (chunk_location):
# the smallest chunk size, so every full chunk of a larger blob is still looked up.
DEDUP_QUERY_MIN = mf.MIN_CHUNK_SIZE


class Verdict(enum.Enum):
    """What `check` found of a complete blob: the caller's next step differs for each."""

    INTACT = "intact"  # this cache's record, bytes verified: use it
    GONE = "gone"  # no longer this cache's record (evicted, replaced): look elsewhere
    BAD = "bad"  # its bytes did not verify and it was dropped: corrupt data, count it
    UNCHECKABLE = "uncheckable"  # no manifest gives its chunk size: cannot be vouched for


@dataclass(frozen=True, slots=True)
class Rehash:
    """A re-hash of a blob file: `why` it is bad (None: intact), and `seen`, the stat taken
    from the same descriptor before the hash, set only when the hash is good and the stat
    after it was the same (so `seen` is the stat of the bytes that were hashed)."""

    why: str | None
    seen: BlobStat | None = None


# A re-hash whose file changed under it is tried again this many times in all, then the blob
# is taken as bad: something keeps writing to it.
REHASH_ATTEMPTS = 3
# How often a tier's filesystem is asked, at most, how much it has free (statvfs): a tier may
# hold its budget, or less where its filesystem has less room (other writers on a shared
# /dev/shm, a budget over the filesystem's size).
ROOM_EVERY = 1.0
# Linked-out blobs whose link counts one walk that found too little asks again (~2 ms).
RELINK_BATCH = 1024
# Blobs in doubt re-hashed together, one thread hop (check_many): at most this many, or
# this many bytes (a batch of large blobs holds the loop's answer back for no gain).
REHASH_BATCH = 256
REHASH_BATCH_BYTES = 64 << 20
# Seconds to which the index keeps a blob's last use (see touch): the order of eviction after
# a restart may be off by that much; a restore of 10,000 blobs used within it writes no row.
TOUCH_SAVED = 60.0


@dataclass(slots=True)
class TierUsage:
    name: str
    path: str
    budget: int
    used: int
    blobs: int
    evictions: Counter[str] = field(default_factory=Counter)
    room: int = 0  # what it may hold now: its budget, or less where its filesystem is fuller


class Cache:
    def __init__(
        self,
        tiers: Sequence[Tier],
        index: Index,
        *,
        manifests_dir: Path,
        clock: Callable[[], float],
        hasher: Callable[[Path, bytes, int, int], Rehash] | None = None,
        decoded_chunks: int = DECODED_CHUNKS,
    ) -> None:
        if not tiers:
            raise TierError("at least one tier is needed")
        self.tiers = list(tiers)
        self.index = index
        self.manifests_dir = manifests_dir
        self.clock = clock
        self.snaps = Snapshots(index, manifests_dir, clock, decoded_chunks=decoded_chunks)
        # Each tier's records, compact (hostd/blobs.py). A walk takes the ones held or
        # pinned out of the queue and flags them parked: queued again when neither is true.
        self._tb: dict[str, TierBlobs] = {t.name: TierBlobs(t) for t in tiers}
        # The read leases held on blobs linked out ([access] link_checks = "lease"), by
        # (digest, tier name); None: none are taken (`guard_links`).
        self.leases: Leases | None = None
        self._used: dict[str, int] = {t.name: 0 for t in tiers}
        # By tier: (when its filesystem was measured, the most it could hold then), `_limit`.
        self._room: dict[str, tuple[float, int]] = {}
        # By tier: bytes charged with no record that are being written there (a publish's
        # reservations, demotions' copies), `_unwritten`.
        self._reserved: dict[str, int] = {t.name: 0 for t in tiers}
        # One eviction queue per tier: its complete blobs and idle partial ones.
        self.queues: dict[str, Lru] = {name: tb.queue for name, tb in self._tb.items()}
        # What each running restore holds: taking and releasing a hold is O(1) in its size.
        self._holds: list[AbstractSet[bytes]] = []
        # Partial blobs (digest, tier) admitted for a fill in this process, kept out of the
        # queues while the fill may be using them: until they complete, are abandoned or
        # replaced, or `busy` (when set) no longer names them.
        self._filling: set[tuple[bytes, str]] = set()
        # The blobs the running fills hold (Filler.filling), set by the composition root;
        # None: every partial admitted in this process counts as being filled.
        self.busy: Callable[[], Collection[bytes]] | None = None
        # Blobs parked because a restored tree links them, by tier, longest parked first
        # (_relink_check asks them again in that order).
        self._linked_out: dict[str, dict[bytes, None]] = {t.name: {} for t in tiers}
        self._lock = asyncio.Lock()
        self.evictions: Counter[tuple[str, str]] = Counter()  # (tier, "demote"|"delete")
        # Blobs re-hashed, by tier: a use that found its state in doubt, or verify.
        self.rehashes: Counter[str] = Counter()
        # rehash() by default; a test passes one it can pause mid-hash
        self.hasher = hasher if hasher is not None else rehash
        self._vouching: dict[tuple[bytes, str], asyncio.Future[Verdict | None]] = {}

    def __repr__(self) -> str:
        used = ", ".join(f"{t.name}={self._used[t.name]}/{t.budget}" for t in self.tiers)
        return f"Cache({used}, snapshots={len(self.snaps)})"

    # start-up ----------------------------------------------------------------------------
    def load(self) -> None:
        """Prepare tiers and reconcile the index with what is really on disk (blocking; once,
        on a new Cache).

        Streamed, so that start-up holds little more than the view it builds (a million blobs:
        no dict of rows or list of stats beside it): the index rows go straight into the
        columns, a batch at a time, as recorded but not yet seen; each tier's scan comes a
        directory at a time, each file reconciled with its record as it comes; the records
        no file was found for are swept, their rows deleted; blobs found with no chunk size get
        the one a known snapshot gives; only the rows that changed are written back.
        """
        for t in self.tiers:
            t.prepare()
        self.snaps.load()
        states = self._read_rows()
        for t in self.tiers:
            self._reconcile(t, states[t.name])
            self._sweep(t, states[t.name])
        self._size_unsized(states)
        for t in self.tiers:
            self._write_changed(self._tb[t.name], states[t.name])
            # (its budget is logged once chosen: Daemon.choose_budgets caps it by the room)
            log.info("tier %s at %s: %d bytes used", t.name, t.root, self._used[t.name])

    def _read_rows(self) -> dict[str, bytearray]:
        """Every index row into its tier's columns, unqueued and uncharged; each tier's load
        state by slot (all _RECORDED). Rows of no tier here (or not an id) are deleted."""
        stale: list[tuple[bytes, str]] = []
        for rows in self.index.blob_batches():
            for row in rows:
                tb = self._tb.get(row[1])
                if tb is None or len(row[0]) != HASH_LEN:
                    stale.append((row[0], row[1]))
                else:
                    tb.add_row(row)
        self.index.delete_blobs(stale)
        return {name: bytearray(len(tb.size)) for name, tb in self._tb.items()}

    def _reconcile(self, t: Tier, state: bytearray) -> None:
        """Meet each file of tier `t` with its record, as the scan finds them."""
        tb = self._tb[t.name]
        for found in t.complete_blobs():
            for digest, (size, mtime_ns, _, mode) in found:
                slot = tb.find(digest)
                if slot >= 0 and state[slot] == _RECORDED:
                    if tb.flags[slot] & COMPLETE and tb.size[slot] == size:
                        # Keep the stat recorded at completion, not today's: a blob written
                        # through while the daemon was down must fail unchanged() and be
                        # re-hashed. Its mode is not in the index: today's it is.
                        tb.mode[slot] = mode_of(mode)
                        state[slot] = _KEPT
                        continue
                    cs, last = tb.chunk_size[slot], tb.last_used[slot]
                else:  # no row (or a second file of one digest, in the wrong directory)
                    cs, last = 0, self.clock()
                # No record vouches for these bytes (a lost or rebuilt index, a death between
                # install and record): never trusted by their mtime; the unknown ctime makes
                # the first use re-hash them (vouch, lazily: see there).
                r = Values(
                    size, cs, True, mtime_ns, last, UNKNOWN_CTIME, False, size, mode_of(mode)
                )
                if slot >= 0:
                    tb.set(slot, r)
                else:
                    slot = tb.add(digest, r)
                    state.append(_RECORDED)
                state[slot] = _CHANGED
        for digest, (size, *_) in t.partial_blobs():
            slot = tb.find(digest)
            held = None
            if (
                slot >= 0
                and state[slot] == _RECORDED
                and not tb.flags[slot] & COMPLETE
                and tb.size[slot] == size
                and tb.chunk_size[slot] > 0
            ):
                held = _allocated(t.partial_path(digest), size)
            if held is None:
                t.remove_partial(digest)  # nothing to resume it with; its row goes in the sweep
                continue
            # Left by a fill the stop cut short: resumable, charged for what it holds, and
            # evictable (no fill uses it now). In memory only: its row stays as it was.
            r = Values(
                size, tb.chunk_size[slot], False, 0, tb.last_used[slot], UNKNOWN_CTIME, False, held
            )
            tb.set(slot, r)
            state[slot] = _KEPT

    def _sweep(self, t: Tier, state: bytearray) -> None:
        """Forget the records whose file is gone (and delete their rows); charge and queue
        the rest."""
        tb, name = self._tb[t.name], t.name
        gone: list[tuple[bytes, str]] = []
        used = 0
        for slot, st in enumerate(state):
            if st == _RECORDED:
                gone.append((tb.slots.key(slot), name))
                tb.remove(slot)
                if len(gone) >= BATCH:
                    self.index.delete_blobs(gone)
                    gone.clear()
            else:
                used += tb.charged[slot]
                if tb.flags[slot] & LINKED:
                    # A tree restored before the stop may still link it: asked here, on the
                    # start's thread, so that no walk stats a whole tier on the loop.
                    digest = tb.slots.key(slot)
                    if _links(t.blob_path(digest)) > 1:
                        tb.park(slot)
                        self._linked_out[name][digest] = None
                        continue
                    tb.flags[slot] &= ~LINKED & 0xFF
                tb.push(slot)
        self.index.delete_blobs(gone)
        self._used[name] += used

    def _size_unsized(self, states: dict[str, bytearray]) -> None:
        """Give the complete blobs found with no chunk size the one the first known snapshot
        naming them gives (as Snapshots.chunk_sizes does): in place, with no set or dict of
        them unless they are few (a lost index makes it every blob)."""
        tbs = [tb for tb in self._tb.values() if tb.unsized]
        if not tbs:
            return
        few: set[bytes] | None = None
        if sum(tb.unsized for tb in tbs) <= _FEW_UNSIZED:
            few = {
                tb.slots.key(slot)
                for tb in tbs
                for slot in range(len(tb.size))
                if tb.chunk_size[slot] <= 0 and tb.flags[slot] & COMPLETE
            }
        for _, cs, packed in self.index.all_snapshot_blobs():
            if cs <= 0:
                continue
            for digest, _ in unpack_blobs(packed):
                if few is not None and digest not in few:
                    continue
                for tb in tbs:
                    slot = tb.find(digest)
                    if slot >= 0 and tb.chunk_size[slot] <= 0 and tb.flags[slot] & COMPLETE:
                        tb.set_chunk_size(slot, cs)
                        states[tb.tier.name][slot] = _CHANGED
            if not any(tb.unsized for tb in tbs):
                return

    def _write_changed(self, tb: TierBlobs, state: bytearray) -> None:
        """Write back the rows that load changed, in batches."""
        slot = state.find(_CHANGED)
        rows: list[BlobRow] = []
        while slot >= 0:
            rows.append(tb.row(slot))
            if len(rows) >= BATCH:
                self.index.put_blobs(rows)
                rows.clear()
            slot = state.find(_CHANGED, slot + 1)
        if rows:
            self.index.put_blobs(rows)

    # the view ------------------------------------------------------------------------------
    def _put(
        self, tier: Tier, digest: bytes, r: Values, persist: bool = True, *, filling: bool = False
    ) -> int:
        """Record a new copy of `digest` in `tier` (`filling`: admitted for a fill),
        replacing any record there; its slot."""
        name = tier.name
        tb, key = self._tb[name], (digest, name)
        slot = tb.find(digest)
        if slot >= 0:
            self._used[name] -= tb.charged[slot]
            tb.queue.drop(slot)
            tb.detach(slot)  # a Blob of the old record keeps its values
            if self.leases is not None:
                self.leases.release(key)  # (held on the old inode)
            self._filling.discard(key)
            tb.set(slot, r)
        else:
            slot = tb.add(digest, r)
            if self.leases is not None:
                # (a lease a re-hash took as the last record went, on its removed inode,
                # must not pass for one on this new inode)
                self.leases.release(key)
        if filling:
            self._filling.add(key)
        self._used[name] += r.charged
        if key not in self._filling:
            tb.push(slot)
        if persist:
            self.index.put_blob(tb.row(slot, digest))
        return slot

    def _reput(self, tb: TierBlobs, slot: int, digest: bytes, persist: bool = True) -> None:
        """Charge and queue a record again after a change in place (completed, re-hashed)."""
        name, key = tb.tier.name, (digest, tb.tier.name)
        tb.queue.drop(slot)
        self._used[name] -= tb.charged[slot]
        if tb.complete(slot):
            tb.charged[slot] = tb.size[slot]
            self._filling.discard(key)
        self._used[name] += tb.charged[slot]
        if key not in self._filling:
            tb.push(slot)
        if persist:
            self.index.put_blob(tb.row(slot, digest))

    def _drop(self, digest: bytes, tier: str) -> Values | None:
        """Forget the record of `digest` in `tier`; what it was (None: there was none)."""
        tb = self._tb[tier]
        slot = tb.find(digest)
        if slot < 0:
            return None
        r = tb.values(slot)
        self._used[tier] -= r.charged
        tb.queue.drop(slot)
        self._filling.discard((digest, tier))
        tb.remove(slot)
        if self.leases is not None:
            # After the views are detached: a take on a thread that ran in between sees its
            # Blob detached and gives the lease up itself (Cache.lease, _hash).
            self.leases.release((digest, tier))  # (its descriptor would keep the inode)
        self.index.delete_blob(digest, tier)
        return r

    def locate(self, digest: bytes, tiers: Sequence[Tier] | None = None) -> Blob | None:
        """The complete copy of a blob in the first tier (of `tiers`, default all) holding it."""
        for t in tiers if tiers is not None else self.tiers:
            tb = self._tb[t.name]
            slot = tb.find(digest)
            if slot >= 0 and tb.flags[slot] & COMPLETE:
                return tb.view(slot, digest)
        return None

    def missing(self, digests: Iterable[bytes], tiers: Sequence[Tier]) -> bool:
        """Whether some blob of `digests` has no complete copy in `tiers` (stops at the first
        one; `locate` without making the Blobs)."""
        tbs = [self._tb[t.name] for t in tiers]
        for d in digests:
            for tb in tbs:
                slot = tb.find(d)
                if slot >= 0 and tb.flags[slot] & COMPLETE:
                    break
            else:
                return True
        return False

    def partial(self, digest: bytes) -> Blob | None:
        for tb in self._tb.values():
            slot = tb.find(digest)
            if slot >= 0 and not tb.flags[slot] & COMPLETE:
                return tb.view(slot, digest)
        return None

    def chunk_location(
        self, cid: bytes, size: int | None = None, *, small: bool = False
    ) -> tuple[Blob, int] | None:
        """A complete local blob that holds chunk `cid`, and the chunk's offset in it.

        With the chunk's `size`: first the blob that is that chunk alone (a small file's,
        its digest computed, no index read); and a chunk under DEDUP_QUERY_MIN (64 KiB) is
        looked up no further. The chunk map is a query per chunk, which a cold restore of
        100,000 small files would pay for each (their only rows name the blobs being filled);
        a small chunk that is only the tail of a large file is then fetched again. `small`
        looks those up too (the peer server: a peer asks for a chunk it knows we hold)."""
        if size is not None:
            b = self.locate(file_digest([(cid, size)]))
            if b is not None:
                return b, 0
            if size < DEDUP_QUERY_MIN and not small:
                return None
        for digest, offset in self.snaps.locations(cid):
            b = self.locate(digest)
            if b is not None:
                return b, offset
        return None

    def digests(self, tier: Tier) -> Digests:
        """Every blob (complete or partial) held in `tier` now (a compact copy)."""
        return self._tb[tier.name].digests()

    def is_held(self, digest: bytes) -> bool:
        return any(digest in h for h in self._holds)

    def pinned(self, digest: bytes) -> bool:
        return self.snaps.pinned(digest)

    def has_copy(self, digest: bytes) -> bool:
        """Whether any tier holds a copy of the blob, complete or partial (`copies`, without
        making the Blobs)."""
        return any(tb.find(digest) >= 0 for tb in self._tb.values())

    def copies(self, digest: bytes) -> list[Blob]:
        return [tb.view(slot, digest) for tb in self._tb.values() if (slot := tb.find(digest)) >= 0]

    def usage(self) -> list[TierUsage]:
        """Each tier's use; its room as last measured (`_limit`: nothing is measured here)."""
        return [
            TierUsage(
                t.name,
                str(t.root),
                t.budget,
                self._used[t.name],
                len(self._tb[t.name]),
                room=min(t.budget, self._room.get(t.name, (0, t.budget))[1]),
            )
            for t in self.tiers
        ]

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise TierError(f"no tier named {name!r} (tiers: {', '.join(t.name for t in self.tiers)})")

    # snapshots, pins, holds ------------------------------------------------------------------
    def snapshot(self, snapshot_id: str) -> Snapshot | None:
        return self.snaps.get(snapshot_id)

    def snapshots(self) -> list[Snapshot]:
        return self.snaps.all()

    async def load_manifest(self, snapshot_id: str) -> mf.Manifest | None:
        """A known snapshot's manifest (decoded in a thread if need be); see Snapshots."""
        return await self.snaps.load_manifest(snapshot_id)

    def record_snapshot(self, m: mf.Manifest, *, built: bool = False) -> Snapshot:
        """Remember a snapshot being used; cheap on the loop (see Snapshots.record; `built`:
        a publish's own)."""
        s = self.snaps.record(m, built=built)
        if any(tb.unsized for tb in self._tb.values()):
            # Blobs found on disk with no index row (a lost index) learn their chunk size
            # here, which verify needs to check them.
            learnt: list[BlobRow] = []
            for d in m.blobs():
                for tb in self._tb.values():
                    if tb.unsized and (slot := tb.find(d)) >= 0 and tb.chunk_size[slot] <= 0:
                        tb.set_chunk_size(slot, m.chunk_size)
                        learnt.append(tb.row(slot, d))
            self.index.put_blobs(learnt)
        return s

    def set_pinned(self, snapshot_id: str, pinned: bool) -> None:
        released = self.snaps.set_pinned(snapshot_id, pinned)
        if any(tb.parked for tb in self._tb.values()):
            for d in released:
                if self._is_parked(d) and not self.is_held(d):
                    self._unpark(d)

    def pinned_blobs(self) -> set[bytes]:
        return self.snaps.pinned_blobs()

    async def forget_unnamed(self) -> list[str]:
        """Forget the snapshots no ref names, no pin holds and no running restore uses."""
        return await self.snaps.forget_unnamed(
            lambda ds: any(not h.isdisjoint(ds) for h in self._holds)
        )

    async def forget(self, ids: Collection[str]) -> tuple[list[str], list[str]]:
        """Forget these unpinned snapshots unless a running restore uses one (rm, prune):
        (forgotten, in use)."""
        return await self.snaps.forget(
            ids, lambda ds: any(not h.isdisjoint(ds) for h in self._holds)
        )

    async def named_blobs(self) -> set[bytes]:
        """Every blob a known snapshot names."""
        return await self.snaps.named_blobs()

    def presence(self, snapshot_id: str) -> tuple[dict[str, int], bool]:
        """Bytes of a snapshot's blobs complete in each tier, and whether all of them are
        somewhere. Blocking (it reads the snapshot's blob list): call it in a thread."""
        per_tier = {t.name: 0 for t in self.tiers}
        complete = True
        for d, size in self.snaps.blob_sizes(snapshot_id):
            found = False
            for name, tb in self._tb.items():
                slot = tb.find(d)
                if slot >= 0 and tb.flags[slot] & COMPLETE:
                    per_tier[name] += size
                    found = True
            complete = complete and found
        return per_tier, complete

    @contextlib.contextmanager
    def holding(self, digests: Iterable[bytes] | Mapping[bytes, object]) -> Iterator[None]:
        """Keep these blobs from eviction while a restore uses them. A mapping's keys are held
        as they are, not copied (a manifest's blobs: 4 MB a 100,000): it must not change
        meanwhile, but to grow (a publish's, as it stores them)."""
        held: AbstractSet[bytes] = (
            digests.keys() if isinstance(digests, Mapping) else frozenset(digests)
        )
        self._holds.append(held)
        try:
            yield
        finally:
            del self._holds[next(i for i, h in enumerate(self._holds) if h is held)]
            if any(tb.parked for tb in self._tb.values()):
                for d in held:
                    if self._is_parked(d) and not self.is_held(d) and not self.snaps.pinned(d):
                        self._unpark(d)

    def _is_parked(self, digest: bytes) -> bool:
        return any(
            tb.parked and (slot := tb.find(digest)) >= 0 and tb.is_parked(slot)
            for tb in self._tb.values()
        )

    def _unpark(self, digest: bytes) -> None:
        for name, tb in self._tb.items():
            slot = tb.find(digest)
            if slot >= 0 and tb.is_parked(slot) and (digest, name) not in self._filling:
                tb.push(slot)

    def touch(self, digests: Iterable[bytes], now: float | None = None) -> None:
        """Mark blobs used now (or at `now`: one use, touched in batches). The queues see it
        when a walk meets them; the index rows are written by the index's writer thread.
        About a microsecond a blob: a caller with 100,000 touches them in batches."""
        if now is None:
            now = self.clock()
        ds = list(digests)
        # The index keeps each use to TOUCH_SAVED: a row is written where the use moves its
        # blob's last use into another period of it (so the row and memory are never a
        # period apart), not again for each restore of a tree used a moment ago (a cold
        # restore's blobs, written as it filled them, or a warm tree restored in a loop).
        period = now // TOUCH_SAVED
        stale: set[bytes] = set()
        for tb in self._tb.values():
            if not len(tb):
                continue
            find, last_used, flags = tb.find, tb.last_used, tb.flags
            for d in ds:
                if (slot := find(d)) >= 0:
                    if last_used[slot] // TOUCH_SAVED != period:
                        stale.add(d)
                    last_used[slot] = now
                    if flags[slot] & COMPLETE:
                        flags[slot] |= LINKED  # (a link restore's, maybe)
        if stale:
            self.index.later(self.index.touch_blobs, list(stale), now)  # (it sorts them)

    # admission and eviction ---------------------------------------------------------------
    async def admit(
        self,
        digest: bytes,
        size: int,
        chunk_size: int,
        tiers: Sequence[Tier],
        *,
        persist: bool = True,
    ) -> Tier:
        """Charge a blob about to be filled to the first of `tiers` that can make room.

        `persist=False` keeps the partial record in memory only: for a blob written whole,
        no partial file exists that a restart could resume."""
        async with self._lock:
            return await self._admit(digest, size, chunk_size, tiers, persist)

    async def admit_run(
        self, blobs: Sequence[tuple[bytes, int]], chunk_size: int, tiers: Sequence[Tier]
    ) -> list[Tier]:
        """`admit` (persist=False) for a run of blobs written whole, (digest, size) each,
        under one hold of the lock: the tier each was charged to, in order. If one cannot be
        admitted, those admitted before it are abandoned and its TierError raised."""
        got: list[Tier] = []
        async with self._lock:
            try:
                for digest, size in blobs:
                    got.append(await self._admit(digest, size, chunk_size, tiers, False))
            except BaseException:
                for (digest, _), t in zip(blobs, got, strict=False):
                    self.abandon(digest, t)
                raise
        return got

    async def _admit(
        self, digest: bytes, size: int, chunk_size: int, tiers: Sequence[Tier], persist: bool
    ) -> Tier:
        """admit's body, under the lock."""
        existing = self.partial(digest)
        if existing is not None and existing.tier in tiers and await self._resume(existing):
            return existing.tier
        why: list[str] = []
        for t in tiers:
            if size > t.budget:
                why.append(f"{t.name}: budget {t.budget} < {size}")
                continue
            limit = self._limit(t)
            need = self._used[t.name] + size - limit
            if need > 0 and not await self._make_room(t, need):
                over = "budget" if limit >= t.budget else f"its filesystem's room ({limit} bytes)"
                why.append(f"{t.name}: {need} bytes over {over}, nothing evictable")
                continue
            r = Values(size, chunk_size, False, 0, self.clock(), UNKNOWN_CTIME, False, size)
            self._put(t, digest, r, persist, filling=True)
            return t
        raise TierError(f"no tier can take blob {digest.hex()} of {size} bytes ({'; '.join(why)})")

    async def _resume(self, b: Blob) -> bool:
        """Take a partial blob up for a fill: out of the queue, charged its full size again.
        False if the tier has no room for the rest (it is removed: filled afresh elsewhere).
        Runs under the lock."""
        t, tb = b.tier, self._tb[b.tier.name]
        self._filling.add((b.digest, t.name))
        tb.queue.drop(b.slot)
        short = b.size - b.charged
        need = self._used[t.name] + short - self._limit(t)
        if short > 0 and need > 0 and not await self._make_room(t, need):
            if b.attached:
                await self._forget(b.digest, t)
            # (detached: dropped meanwhile, or replaced, say by a publish's complete copy of
            # the same bytes, which stays: dropping "its" digest would forget that one)
            return False
        if not b.attached:
            return False  # dropped meanwhile (gc): admitted afresh
        # Out of the queue again before its charge changes, and filling: a walk for room may
        # have put it back, where the filler had not claimed it yet (the queue reads charges
        # as they were when queued).
        tb.queue.drop(b.slot)
        self._filling.add((b.digest, t.name))
        self._used[t.name] += short
        tb.charged[b.slot], tb.last_used[b.slot] = b.size, self.clock()
        return True

    def _limit(self, t: Tier) -> int:
        """What `t` may hold now: its budget, or less where its filesystem has less room:
        what the tier held plus what the filesystem had free when last measured (ROOM_EVERY
        ago at most; what is admitted or evicted since moves `_used` and the free bytes
        alike)."""
        now = time.monotonic()
        room = self._room.get(t.name)
        if room is None or now - room[0] >= ROOM_EVERY:
            free = t.free_bytes()
            held = self._used[t.name] - self._unwritten(t)
            room = (now, t.budget if free is None else held + free)
            self._room[t.name] = room
        return min(t.budget, room[1])

    def _unwritten(self, t: Tier) -> int:
        """Bytes charged to `t` that its filesystem does not hold yet, so that its free bytes
        count them still: blobs being filled are charged their size when admitted, yet their
        chunks take room only as they are written (a partial file is sparse), and so with a
        publish's reservations and demotions' copies."""
        tb, charged, partial = self._tb[t.name], self._reserved[t.name], []
        for digest, name in self._filling:
            slot = tb.find(digest) if name == t.name else -1
            if slot >= 0:
                charged += tb.charged[slot]
                if tb.size[slot] > tb.chunk_size[slot]:  # (a one-chunk blob is written whole)
                    partial.append(digest)
        return max(0, charged - t.allocated(partial))

    def cramped(self, name: str) -> None:
        """Tier `name`'s filesystem filled up (ENOSPC) before its budget did: until it is
        measured again, it may hold no more than it holds now, so what is admitted next
        evicts from it, or goes to the next tier."""
        if name in self._used:
            self._room[name] = (time.monotonic(), self._used[name])
            log.warning(
                "tier %s: its filesystem is full with %d bytes of blobs in it (budget %d): "
                "it holds no more than that until it has room again",
                name,
                self._used[name],
                next(t.budget for t in self.tiers if t.name == name),
            )

    async def reserve(self, size: int, tiers: Sequence[Tier]) -> Tier | None:
        """Charge `size` bytes not yet named by a digest (publish). None if no tier has room."""
        async with self._lock:
            for t in tiers:
                need = self._used[t.name] + size - self._limit(t)
                if size <= t.budget and (need <= 0 or await self._make_room(t, need)):
                    self._used[t.name] += size
                    self._reserved[t.name] += size
                    return t
            return None

    def unreserve(self, tier: Tier, size: int) -> None:
        self._used[tier.name] -= size
        self._reserved[tier.name] -= size

    def adopt(self, tier: Tier, st: BlobStat, chunk_size: int, *, persist: bool = True) -> Blob:
        """Record a complete blob that was installed in `tier`, replacing any record of it.
        `st` is the stat of bytes we wrote and hashed ourselves (a new inode: not lent).
        `persist=False`: in memory only, for a blob not yet durable; `record_durable` writes
        its row once it is."""
        r = Values(
            st.size,
            chunk_size,
            True,
            st.mtime_ns,
            self.clock(),
            st.ctime_ns,
            False,
            st.size,
            st.mode,
        )
        return self._tb[tier.name].view(self._put(tier, st.digest, r, persist), st.digest)

    def adopt_durable(self, tier: Tier, stats: Sequence[BlobStat], chunk_size: int) -> Future[None]:
        """`adopt` for a batch of blobs already durable (a publish's synced batch), with their
        rows written in one transaction: `adopt(persist=False)` then `record_durable`,
        without a Blob each. The future is the rows' transaction."""
        now, tb = self.clock(), self._tb[tier.name]
        rows: list[BlobRow] = []
        for st in stats:
            r = Values(
                st.size, chunk_size, True, st.mtime_ns, now, st.ctime_ns, False, st.size, st.mode
            )
            rows.append(tb.row(self._put(tier, st.digest, r, persist=False), st.digest))
        return self.index.later(self.index.put_blobs, rows)

    def completed(self, digest: bytes, tier: Tier, st: BlobStat, *, persist: bool = True) -> Blob:
        """Record a blob admitted for filling as complete; `st` and `persist` as adopt's."""
        tb = self._tb[tier.name]
        slot = tb.find(digest)
        if slot < 0:
            raise KeyError(f"no blob {digest.hex()} admitted to tier {tier.name}")
        tb.queue.drop(slot)  # before finish changes what the queue reads
        tb.finish(slot, st, self.clock())
        self._reput(tb, slot, digest, persist)  # charged its full size from now
        return tb.view(slot, digest)

    def record_durable(self, blobs: Iterable[Blob]) -> Future[None]:
        """Write the index rows of blobs completed with `persist=False`, now that a sync made
        them durable: one transaction. One no longer this cache's record (evicted, dropped,
        filled again meanwhile) is skipped; its row is someone else's to write or delete."""
        # On the index's writer thread: a transaction of a few hundred rows is milliseconds
        # the loop would otherwise stall for. A row that lands after an eviction's delete
        # names a file that is gone, and the next load drops it.
        return self.index.later(
            self.index.put_blobs, [b.row() for b in blobs if b.attached and b.complete]
        )

    def abandon(self, digest: bytes, tier: Tier) -> None:
        """Forget a partial blob whose fill failed (its files are already removed)."""
        tb = self._tb[tier.name]
        slot = tb.find(digest)
        if slot >= 0 and not tb.complete(slot):
            self._drop(digest, tier.name)

    async def remove(self, digest: bytes, tier: Tier) -> None:
        """Delete a blob copy (a bad one found by verify, or gc)."""
        await self._forget(digest, tier)

    async def _forget(self, digest: bytes, tier: Tier) -> None:
        """Drop a blob's record, then remove the file it named on a thread: only that inode,
        taken now (a fill may install a new copy under the name before the thread runs)."""
        tb = self._tb[tier.name]
        slot = tb.find(digest)
        if slot < 0:
            return
        partial = not tb.complete(slot)
        ino = tier.inode(digest, partial=partial)
        self._drop(digest, tier.name)
        fn = tier.remove_partial_if if partial else tier.remove_blob_if
        await asyncio.to_thread(fn, digest, ino)

    def _keep(self, tb: TierBlobs, slot: int, busy: Collection[bytes]) -> bool:
        """Whether a queued blob must stay (a walk then takes it out of the queue)."""
        digest = tb.slots.key(slot)
        if self.is_held(digest) or self.snaps.pinned(digest):
            tb.park(slot)
            return True
        if tb.flags[slot] & LINKED:
            if _links(tb.tier.blob_path(digest)) > 1:
                # A restored tree holds its inode: removing our name would free no byte, and
                # the tier's budget is what its filesystem holds. Parked until a walk that
                # finds too little asks again (_relink_check), or a restore lets go of it.
                tb.park(slot)
                self._linked_out[tb.tier.name][digest] = None
                return True
            tb.flags[slot] &= ~LINKED & 0xFF
        if not tb.complete(slot) and digest in busy:
            # A fill holds it and is about to resume it: back in the queue once it is idle.
            self._filling.add((digest, tb.tier.name))
            return True
        return False

    async def _relink_check(self, tier: Tier) -> bool:
        """Ask again, on a thread, the link counts of the RELINK_BATCH blobs parked longest as
        linked out of `tier`; queue again those no tree links any more (a removed tree), and
        put the others last. Whether any came back. A walk that found too little calls it:
        each such admission costs one bounded batch of stats off the loop."""
        parked = self._linked_out[tier.name]
        if not parked:
            return False
        asked = list(itertools.islice(parked, RELINK_BATCH))
        counts = await asyncio.to_thread(lambda: [_links(tier.blob_path(d)) for d in asked])
        tb = self._tb[tier.name]
        back = False
        for d, n in zip(asked, counts, strict=True):
            if d not in parked:
                continue  # (gone meanwhile)
            del parked[d]
            if n > 1:
                parked[d] = None  # still linked: last in line
                continue
            slot = tb.find(d)
            if slot < 0 or not tb.is_parked(slot):
                continue
            tb.flags[slot] &= ~LINKED & 0xFF
            if not (self.is_held(d) or self.snaps.pinned(d) or (d, tier.name) in self._filling):
                tb.push(slot)
                back = True
        return back

    def _busy(self) -> Collection[bytes]:
        """What the running fills hold; idle partial blobs they let go of are queued."""
        if self.busy is None:
            return ()
        busy = self.busy()
        for key in [k for k in self._filling if k[0] not in busy]:
            # Still in the set: the record is the one admitted for that fill (a new record
            # or a drop takes the key out).
            self._filling.discard(key)
            tb = self._tb[key[1]]
            slot = tb.find(key[0])
            if slot >= 0:
                tb.push(slot)
        return busy

    async def _make_room(self, tier: Tier, need: int) -> bool:
        """Evict from `tier` until `need` bytes are free. Runs under the lock."""
        busy = self._busy()
        tb = self._tb[tier.name]
        slots = tb.queue.victims(need, lambda slot: self._keep(tb, slot, busy))
        if slots is None and await self._relink_check(tier):
            busy = self._busy()
            slots = tb.queue.victims(need, lambda slot: self._keep(tb, slot, busy))
        if slots is None:
            return False
        # Views, so that a victim replaced or dropped during an await below is told apart.
        victims = [tb.view(slot) for slot in slots]
        below = self.tiers[self.tiers.index(tier) + 1 :]
        freed = 0
        for b in victims:
            d = b.digest
            # Each await below lets a new restore take hold of a victim chosen before it (or
            # a fill resume it, or a pin name it): check again right before acting, and
            # leave such a blob where it is.
            if self._taken(b, tier):
                continue
            if not b.complete:  # a partial blob no fill uses: its chunks come again if asked
                await self._forget(d, tier)
                self.evictions[(tier.name, "delete")] += 1
                freed += b.charged
                log.info("evicted partial blob %s from tier %s", d.hex()[:16], tier.name)
                continue
            # copy_in hashes the copy before installing it, so a blob written through since
            # its last check is deleted, never laundered into a fresh record below.
            demotable = below and not any(self.locate(d, [t]) for t in below)
            if demotable and await self._demote(b, below):
                freed += b.size
                continue
            if demotable and self._taken(b, tier):  # (the demotion's awaits: as above)
                continue
            await self._forget(d, tier)
            self.evictions[(tier.name, "delete")] += 1
            freed += b.size
            log.info("evicted blob %s from tier %s", d.hex()[:16], tier.name)
        if freed >= need:
            return True
        # some victims were taken meanwhile: choose again for what is still missing
        return freed > 0 and await self._make_room(tier, need - freed)

    def _taken(self, b: Blob, tier: Tier) -> bool:
        """Whether an eviction victim chosen before an await is no longer one to evict: no
        longer the record, or now held, pinned or being filled."""
        d = b.digest
        return (
            not b.attached
            or self.is_held(d)
            or self.snaps.pinned(d)
            or (d, tier.name) in self._filling
        )

    async def _demote(self, b: Blob, below: Sequence[Tier]) -> bool:
        for t in below:
            need = self._used[t.name] + b.size - self._limit(t)
            if b.size > t.budget or (need > 0 and not await self._make_room(t, need)):
                continue
            self._used[t.name] += b.size  # charged while the copy runs
            self._reserved[t.name] += b.size
            try:
                st = await asyncio.to_thread(t.copy_in, b.path, b.digest, b.size, b.chunk_size)
            except BlobCopyCorrupt as e:
                log.warning("not demoting blob %s: %s", b.digest.hex(), e.why)
                return False  # the caller deletes it
            except TierError as e:
                log.warning("demoting blob %s to %s failed: %s", b.digest.hex()[:16], t.name, e)
                continue
            finally:  # a cancel (the admitting restore went away) returns the charge too
                self._used[t.name] -= b.size
                self._reserved[t.name] -= b.size
            # the copy was hashed: a new, verified inode, not lent
            r = Values(
                st.size,
                b.chunk_size,
                True,
                st.mtime_ns,
                b.last_used,
                st.ctime_ns,
                False,
                st.size,
                st.mode,
            )
            self._put(t, b.digest, r)
            if self.is_held(b.digest):
                return False  # a restore took it during the copy: keep both copies
            await self._forget(b.digest, b.tier)
            self.evictions[(b.tier.name, "demote")] += 1
            log.info("demoted blob %s from %s to %s", b.digest.hex()[:16], b.tier.name, t.name)
            return True
        return False

    async def enforce_budgets(self) -> None:
        """Evict from every tier that is over budget (after a reload lowered one)."""
        async with self._lock:
            for t in self.tiers:
                over = self._used[t.name] - t.budget
                if over > 0:
                    await self._make_room(t, over)

    # checks -----------------------------------------------------------------------------------
    def unchanged(self, b: Blob, seen: Stat | int | None = None) -> bool:
        """Whether a complete blob's inode still has the state recorded when its bytes were
        last verified: the cheap check that lets a use skip the re-hash.

        Size and mtime always. The ctime too for a lent blob (one a caller that can write to
        it holds a link to: root can write through a read-only bit and set the mtime back,
        but no one can set the ctime back, since utime sets it to now). Not for a blob only
        non-writers were given: they can neither write its bytes nor set its times, and a
        link or an unlink (a client's `rm` of its tree) moves the ctime of every restored
        blob, which must not cost a re-hash of the whole snapshot at the next restore. (A
        root process that reaches a non-writer's tree can write through its links: where
        one may, `[access] link_checks = "lease"` checks the ctime of every blob the daemon
        holds no unbroken read lease on, and "all" lends every linked blob.)
        Since multigrain timestamps (Linux 6.13) a change after a stat always gets a later
        ctime; on older kernels one in the same clock tick as the stat leaves it as it was,
        which this check (and rehash's before/after compare) cannot see.

        `seen`: the blob file's stat taken just before, `(size, mtime_ns, ctime_ns, mode)`, or the
        errno of a failed one (fastcopy.lstat_paths: a restore stats all its blobs at once,
        off the loop); None: stat it now.
        """
        if b.ctime_ns == UNKNOWN_CTIME:
            return False  # never verified since the index was lost or migrated
        if seen is None:
            try:
                st = os.lstat(b.file)
            except OSError:
                return False
            seen = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
        if isinstance(seen, int):
            return False
        if b.attached:
            return b.intact(seen)
        return state_holds(seen, b.size, b.mtime_ns, b.ctime_ns, b.lent, b.mode)

    async def vouch(self, b: Blob, chunk_size: int = 0, *, force: bool = False) -> bool:
        """The check before any use of a complete blob: True if `b` is still this cache's
        record of the blob and its bytes are verified; False if it is gone, was bad (then it
        is dropped: the caller fetches it again) or cannot be checked. `check` says which."""
        return await self.check(b, chunk_size, force=force) is Verdict.INTACT

    async def check(self, b: Blob, chunk_size: int = 0, *, force: bool = False) -> Verdict:
        """`vouch`, with the reason a blob cannot be used: GONE if `b` is no longer this
        cache's record, BAD if its bytes did not verify (it is dropped), UNCHECKABLE if its
        chunk size is unknown (`chunk_size` supplies it when a manifest gives it).

        Cheap when `unchanged`; otherwise, or with `force`, re-hashed in a thread, one
        re-hash per copy however many callers ask. Blobs with no trusted record (after an index
        loss) are re-hashed here on first use, not at start-up: the chunk size that hashing
        needs comes from a manifest the restore brings, blobs nobody asks for again cost
        nothing before gc or eviction removes them, and start-up and the first restores do
        not compete with a background hash of the whole cache for two cores and the disk.
        """
        self._learn_chunk_size(b, chunk_size)
        while True:
            known = self._known(b, force=force)
            if known is not None:
                return known
            key = (b.digest, b.tier.name)
            flight = self._vouching.get(key)
            if flight is None:
                break
            done = await asyncio.shield(flight)
            if done is None:  # its leader was cancelled; look again
                force = False  # a finished re-hash (if any) counts for us too
                continue
            if done is Verdict.INTACT and not self._current(b):
                return Verdict.GONE
            return done
        flight = self._vouching[key] = asyncio.get_running_loop().create_future()
        outcome: Verdict | None = None
        try:
            r = await asyncio.to_thread(self._hash, b)
            self.rehashes[b.tier.name] += 1
            outcome = await self._verdict(b, r)
            return outcome
        finally:
            del self._vouching[key]
            flight.set_result(outcome)

    async def _verdict(self, b: Blob, r: Rehash, rows: list[BlobRow] | None = None) -> Verdict:
        """Settle a re-hash of `b` (`rows`: see settle), and say what it found."""
        if r.why is not None:
            log.warning("blob %s in %s is bad: %s", b.digest.hex(), b.tier.name, r.why)
        # Nothing awaits between this look and settle's own: it says whether a False from
        # settle was a bad blob dropped or a record replaced during the hash.
        current = self._current(b)
        if await self.settle(b, r, rows=rows):
            return Verdict.INTACT
        return Verdict.BAD if current else Verdict.GONE

    def _learn_chunk_size(self, b: Blob, chunk_size: int) -> None:
        """Record the chunk size a manifest gives a blob whose record lacks it."""
        if b.chunk_size <= 0 < chunk_size and self._current(b):
            self._tb[b.tier.name].set_chunk_size(b.slot, chunk_size)
            self.index.put_blob(b.row())

    def _known(self, b: Blob, *, force: bool = False) -> Verdict | None:
        """What `check` can say of `b` without hashing it; None: it must be re-hashed."""
        if not self._current(b):
            return Verdict.GONE
        if not force and self.unchanged(b):
            return Verdict.INTACT
        if b.chunk_size <= 0:
            return Verdict.UNCHECKABLE
        return None

    async def check_many(self, blobs: Sequence[Blob], chunk_size: int = 0) -> list[Verdict]:
        """`check` of each of `blobs` (distinct records), those in doubt re-hashed together,
        REHASH_BATCH (or REHASH_BATCH_BYTES) a thread hop. One at a time, each re-hash of a
        small blob was a hop of its own: a link restore of 10,000 lent blobs whose trees had
        been deleted (which changes their ctime) re-hashed them in 5 s, not 0.2."""
        out: list[Verdict | None] = [None] * len(blobs)
        doubt: list[int] = []
        for i, b in enumerate(blobs):
            self._learn_chunk_size(b, chunk_size)
            out[i] = self._known(b)
            if out[i] is None:
                doubt.append(i)
        while doubt:
            batch: list[int] = []
            size = 0
            rest: list[int] = []
            for i in doubt:  # (a blob another check is re-hashing joins it, below)
                b = blobs[i]
                key = (b.digest, b.tier.name)
                if key in self._vouching or len(batch) >= REHASH_BATCH:
                    rest.append(i)
                    continue
                if batch and size + b.size > REHASH_BATCH_BYTES:
                    rest.append(i)
                    continue
                batch.append(i)
                size += b.size
                self._vouching[key] = asyncio.get_running_loop().create_future()
            if not batch:  # every one left is in another check's flight: join them
                for i in rest:
                    out[i] = await self.check(blobs[i], chunk_size)
                break
            done: dict[int, Verdict] = {}
            rows: list[BlobRow] = []
            try:
                hashed = await asyncio.to_thread(self._rehash_all, [blobs[i] for i in batch])
                for i in batch:
                    self.rehashes[blobs[i].tier.name] += 1
                for i, r in zip(batch, hashed, strict=True):
                    done[i] = out[i] = await self._verdict(blobs[i], r, rows)
            finally:
                self.index.put_blobs(rows)  # the batch's new stats, one transaction
                for i in batch:
                    b = blobs[i]
                    self._vouching.pop((b.digest, b.tier.name)).set_result(done.get(i))
            doubt = rest
        return [v if v is not None else Verdict.GONE for v in out]

    async def settle(self, b: Blob, r: Rehash, *, rows: list[BlobRow] | None = None) -> bool:
        """Act on a re-hash of a complete blob: the one place that does. A bad one (`r.why`
        says how) is removed; an intact one gets the stat taken before its hash recorded, so
        `unchanged` passes again until the inode changes. Returns whether `b` is intact and
        recorded. A re-hash of a record that was replaced or dropped meanwhile says nothing of
        what the tier holds now: nothing is done. `rows`: the intact one's index row goes
        there, for the caller to write with others (Index.put_blobs), not written here."""
        if not self._current(b):
            return False
        if r.why is not None or r.seen is None:
            await self.remove(b.digest, b.tier)
            return False
        tb, seen = self._tb[b.tier.name], r.seen
        tb.queue.drop(b.slot)
        tb.size[b.slot], tb.mtime_ns[b.slot], tb.ctime_ns[b.slot] = (
            seen.size,
            seen.mtime_ns,
            seen.ctime_ns,
        )
        tb.mode[b.slot] = seen.mode
        self._reput(tb, b.slot, b.digest, persist=rows is None)
        if rows is not None:
            rows.append(tb.row(b.slot, b.digest))
        return True

    def lent(self, blobs: Iterable[Blob]) -> Future[None]:
        """Mark complete blobs as lent: hardlinked (or about to be) into the tree of a caller
        that could write to the inode (root, the daemon's uid, a user namespace mapped to
        either). Persisted, for the rest of the inode's life: from now on `unchanged` checks
        the ctime too, which no one can set back, and a use re-hashes on any doubt. The
        record is left as it was, so the link's own ctime bump makes the next use re-hash.

        The mark is not dropped when st_nlink falls back to 1: nlink does not count open
        descriptors, and a writer polling its descriptor's ctime could write right after a
        re-hash that cleared it. A new inode (a refetch, a promotion, a demotion) starts
        unlent. Links to callers that cannot write get no mark unless `[access] link_checks`
        is "all": they can neither write the bytes nor set the times, though a root process
        that reaches their tree can (under "lease", the default, `lease` holds those
        instead; restore.py decides which links lend).

        Called on the loop before linking, whose caller waits for the returned future (the
        rows' transaction, on the index's writer thread) before it links: a daemon killed
        between the two cannot leave a linked blob unmarked.
        """
        changed: list[BlobRow] = []
        for b in blobs:
            tb = self._tb[b.tier.name]
            slot = tb.find(b.digest)
            if slot >= 0 and tb.flags[slot] & (COMPLETE | LENT) == COMPLETE:
                tb.flags[slot] |= LENT
                changed.append(tb.row(slot, b.digest))
        return self.index.later(self.index.put_blobs, changed)  # one commit for the tree

    def guard_links(self, leases: Leases) -> None:
        """Guard the blobs restores link out with read leases ([access] link_checks =
        "lease"): from now on a record the daemon holds no unbroken lease on is checked by
        ctime as a lent one is (hostd/leases.py)."""
        self.leases = leases
        for name, tb in self._tb.items():
            tb.leased = lambda digest, name=name: leases.holds((digest, name))

    def lease(self, blobs: Sequence[Blob]) -> int:
        """Hold a read lease on each blob before a restore links it out (blocking: on a
        thread). A new lease is checked against the record: its inode must still show the
        state last verified, or BlobUnheld (the restore checks it again, re-hashing it). A
        blob none can be held on (a filesystem that takes no leases, too many held) is
        linked without one: with no lease its ctime is checked at every use, as a lent
        blob's, until a later restore takes one (a lent mark would last the inode's life).
        The number of those."""
        leases = self.leases
        assert leases is not None
        unheld = 0
        for b in blobs:
            if not b.attached or not b.complete:
                raise BlobUnheld(b.digest, str(b.file), "it is no longer the cache's record")
        keys = [(b.digest, b.tier.name) for b in blobs]
        # Those held already, and not broken, asked all at once (take would ask each); the
        # others taken all at once (a lease each, in C).
        kept = leases.holding(keys)
        rest = [i for i, k in enumerate(kept) if not k]
        took = leases.take_many([(keys[i], blobs[i].file) for i in rest])
        done = 0
        try:
            for i, got in zip(rest, took, strict=True):
                done += 1
                b, key = blobs[i], keys[i]
                if isinstance(got, LeaseBusy):
                    raise BlobUnheld(b.digest, b.file, str(got))
                if isinstance(got, OSError):  # (gone from under its name, say: checked again)
                    raise BlobUnheld(b.digest, b.file, f"cannot hold it: {got.strerror}") from got
                if got is None:
                    unheld += 1
                    continue
                if isinstance(got, Exception):
                    raise got
                if not b.attached:  # dropped meanwhile, its lease released before it was taken
                    leases.release(key)
                    raise BlobUnheld(b.digest, b.file, "it is no longer the cache's record")
                st, new = got
                if not new or st is None:
                    continue
                seen = (st[4], st[5], st[6], st[0])
                if not state_holds(seen, b.size, b.mtime_ns, b.ctime_ns, True, b.mode):
                    leases.release(key)
                    raise BlobUnheld(b.digest, b.file, "it changed since it was verified")
                leases.vouch(key, new)  # (not before: a write before the take moved that ctime)
        except BaseException:
            # The leases this batch took for the blobs after the one that failed are given
            # up: none was checked (nor its record asked: one dropped meanwhile would keep
            # its removed inode, nothing else releasing it).
            for i, got in zip(rest[done:], took[done:], strict=True):
                if isinstance(got, tuple) and got[1]:
                    leases.release(keys[i])
            raise
        for b, k in zip(blobs, kept, strict=True):
            if k and not b.attached:  # dropped meanwhile: its lease goes with it
                raise BlobUnheld(b.digest, b.file, "it is no longer the cache's record")
        return unheld

    def lease_breaks(self) -> int:
        """The count of read leases broken so far (0 without leases): taken before blobs
        are checked, a lease broken since makes what trusted it ask again (Leases.broken_since,
        materialize.Watch)."""
        return self.leases.broken if self.leases is not None else 0

    def leased_moved(self, seen: Iterable[tuple[Blob, Stat | int]]) -> tuple[set[bytes], int]:
        """Of blobs with a fresh stat each, those not lent whose ctime moved from their
        record and whose read lease holds, asked in one native call (`unchanged` would ask
        each: after a client's `rm`, every blob of the tree); and the count of breaks before
        they were asked (blocking). The answer stands while that count does: a lease given
        up since may have let a writer in. (One the kernel broke itself is not counted, but
        its writer went on lease-break-time after the open that broke it, seconds after the
        stats these answers go with were taken: the ctime checks see its write.)"""
        leases = self.leases
        count = self.lease_breaks()
        if leases is None:
            return set(), count
        ask = [
            b
            for b, st in seen
            if not isinstance(st, int) and st[2] != b.ctime_ns and b.complete and not b.lent
        ]
        if not ask:
            return set(), count
        held = leases.holding([(b.digest, b.tier.name) for b in ask])
        return {b.digest for b, ok in zip(ask, held, strict=True) if ok}, count

    def doubt(self, keys: Iterable[tuple[bytes, str]]) -> None:
        """Blobs whose lease broke, (digest, tier name) each: someone opened them for
        writing, and may not have written yet (then the ctime has not moved, and a copy
        would read whatever they write next). Their records' ctime is made unknown, in
        memory: the next use re-hashes them, taking the lease again first, which cannot be
        taken while that writer holds them open."""
        for digest, name in keys:
            tb = self._tb.get(name)
            slot = tb.find(digest) if tb is not None else -1
            if tb is not None and slot >= 0 and tb.complete(slot):
                tb.ctime_ns[slot] = UNKNOWN_CTIME

    def record_leased(self) -> None:
        """At a clean stop (blocking): a blob whose lease still holds was not written since
        the lease was taken, however its ctime moved since (links, a client's `rm`), so its
        ctime now is recorded as its verified state. After the restart no lease holds, and
        the ctime check trusts it unless the ctime moved while the daemon was down; a stop
        that skips this (a crash) has those blobs re-hashed at their next use instead."""
        if self.leases is None:
            return
        rows: list[BlobRow] = []
        for (digest, name), st in self.leases.held():
            tb = self._tb.get(name)
            slot = tb.find(digest) if tb is not None else -1
            if tb is None or slot < 0 or tb.flags[slot] & (COMPLETE | LENT) != COMPLETE:
                continue
            if tb.ctime_ns[slot] == UNKNOWN_CTIME:
                continue  # never verified here: nothing to carry over
            seen = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
            if not state_holds(
                seen, tb.size[slot], tb.mtime_ns[slot], st.st_ctime_ns, False, tb.mode[slot]
            ):
                continue  # its size, mtime or mode moved (a utime, a chmod): checked later
            tb.ctime_ns[slot] = st.st_ctime_ns
            rows.append(tb.row(slot, digest))
        if rows:
            self.index.put_blobs(rows)

    def _rehash_all(self, blobs: list[Blob]) -> list[Rehash]:
        unsure = [b.ctime_ns == UNKNOWN_CTIME for b in blobs]
        return self._durable(blobs, unsure, [self._hash_once(b) for b in blobs])

    def _hash(self, b: Blob) -> Rehash:
        """Re-hash a blob (blocking), made durable first where no record vouched for it
        (`_durable`)."""
        unsure = b.ctime_ns == UNKNOWN_CTIME
        return self._durable([b], [unsure], [self._hash_once(b)])[0]

    @staticmethod
    def _durable(blobs: list[Blob], unsure: list[bool], hashed: list[Rehash]) -> list[Rehash]:
        """Sync the blobs that hashed right but that no record vouched for (`unsure`: found
        at start with no row, named by a fill or a publish a stop cut short before its
        sync), before settle writes their rows: what was hashed may be the page cache alone,
        and a row must not outlive the bytes ("Durability"). One sync per tier for the
        batch; a failed one makes its blobs bad (dropped, fetched again)."""
        by_tier: dict[str, tuple[Tier, list[int]]] = {}
        for i, (b, u, r) in enumerate(zip(blobs, unsure, hashed, strict=True)):
            if u and r.why is None:
                by_tier.setdefault(b.tier.name, (b.tier, []))[1].append(i)
        out = list(hashed)
        for tier, idx in by_tier.values():
            try:
                tier.sync([blobs[i].digest for i in idx])
            except TierError as e:
                for i in idx:
                    out[i] = Rehash(f"it could not be made durable: {e.message}")
        return out

    def _hash_once(self, b: Blob) -> Rehash:
        """Re-hash a blob (blocking). Where links are guarded by leases, its lease is taken
        first and kept: one that cannot be, as the blob is open for writing somewhere (a
        writable shared mapping outlives its descriptor, and its stores move no time until
        written back), makes it bad, to be fetched again into a new inode; one taken means
        no one can write it from the hash on without breaking it."""
        if self.leases is None:
            return self.hasher(b.path, b.digest, b.size, b.chunk_size)
        key = (b.digest, b.tier.name)
        got = None
        try:
            got = self.leases.take(key, str(b.path))
        except LeaseBusy:
            return Rehash("it is open for writing somewhere (a writable mapping, say)")
        except OSError:
            pass  # (gone, say: the hash says so)
        if not b.attached:
            # Dropped or replaced meanwhile (a removal unlinks the file after dropping
            # the record): a lease kept under its key would be on the wrong inode.
            self.leases.release(key)
        r = self.hasher(b.path, b.digest, b.size, b.chunk_size)
        # The lease vouches for nothing until the hash passed (Leases.vouch): taken while
        # a write just made stands, it would have the ctime that write moved taken meanwhile
        # (TierBlobs.unchanged) and a copy of the written bytes handed over.
        if got is not None and got[1] and r.why is None and b.attached:
            self.leases.vouch(key, got[1])
        return r

    async def rehash(self, b: Blob) -> Rehash:
        """Re-hash a blob in a thread (verify); act on the result with settle."""
        r = await asyncio.to_thread(self._hash, b)
        self.rehashes[b.tier.name] += 1
        return r

    def current(self, b: Blob) -> bool:
        """Whether `b` is complete and still this cache's record of its blob in its tier."""
        return self._current(b)

    def _current(self, b: Blob) -> bool:
        return b.attached and b.complete


def rehash(
    path: Path,
    digest: bytes,
    size: int,
    chunk_size: int,
    *,
    on_read: Callable[[int], None] | None = None,
) -> Rehash:
    """Re-hash a blob file against its name (blocking).

    The stat is taken from the descriptor before the hash and again after it: if they differ,
    the file changed while it was read, so the hash vouches for no stat. That attempt is
    in doubt and is tried again, up to REHASH_ATTEMPTS in all; then the blob counts as bad.
    Taking the stat after the hash instead would record a write that landed during it as good.
    `on_read(offset)` runs after each chunk is read (a test's hook into the middle of a hash).
    """
    try:  # (no symlink followed, no FIFO waited on: a tier holds regular files alone)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        return Rehash(f"cannot open: {e.strerror}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return Rehash("not a regular file")
        for _ in range(REHASH_ATTEMPTS):
            before = BlobStat.of(digest, os.fstat(fd))
            if before.size != size:
                return Rehash(f"size {before.size}, want {size}")
            if chunk_size <= 0:
                return Rehash("no manifest gives its chunk size")
            try:
                got = digest_of(fd, size, chunk_size, on_read)
            except EOFError:
                got = None  # it shrank under us: the stat after says so
            if not BlobStat.of(digest, os.fstat(fd)).same_file_state(before):
                continue
            if got != digest:
                return Rehash("content does not match its digest")
            return Rehash(None, before)
        return Rehash(f"it changed while it was hashed, {REHASH_ATTEMPTS} times")
    except OSError as e:
        return Rehash(f"cannot read: {e.strerror}")
    finally:
        os.close(fd)


def _links(path: Path) -> int:
    """A blob file's link count (0: gone). A stat on the loop: a microsecond or two where the
    inode is cached, as a recently used blob's is."""
    try:
        return os.lstat(path).st_nlink
    except OSError:
        return 0


def _allocated(path: Path, size: int) -> int | None:
    """The bytes a partial blob file holds (its allocated blocks, at most `size`); None if
    it is gone."""
    try:
        return min(size, os.lstat(path).st_blocks * 512)
    except OSError:
        return None


def blob_is_intact(path: Path, digest: bytes, size: int, chunk_size: int) -> str | None:
    """Re-hash a blob file against its name. None if intact, else what is wrong (blocking)."""
    return rehash(path, digest, size, chunk_size).why
