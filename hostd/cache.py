"""The tiers together: where each blob lives, what each tier holds, admission and eviction.

The cache keeps an in-memory view of the index (blobs per tier, snapshots, pins, chunk
locations) and writes every change through to it. Budget accounting charges a blob's full
size from the moment it is admitted for filling, so a tier never holds more than its budget.
Eviction is least-recently-used by bytes: a blob leaves a tier for the next one down, or is
deleted from the last; pinned snapshots' blobs and blobs held by a running restore never go.

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
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hostd.core import manifest as mf
from hostd.core.eviction import Candidate, choose_victims
from hostd.errors import ManifestError, TierError
from hostd.index import UNKNOWN_CTIME, BlobRow, Index
from hostd.lock import private_dir
from hostd.tier import BlobCopyCorrupt, BlobStat, Tier, digest_of

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Blob:
    """One blob in one tier."""

    digest: bytes
    tier: Tier
    size: int
    chunk_size: int
    complete: bool
    mtime_ns: int
    last_used: float
    # The inode's ctime when its bytes were last verified; UNKNOWN_CTIME: never (re-hash).
    ctime_ns: int = UNKNOWN_CTIME
    # Hardlinked into a tree whose owner could write to it: kept for this inode's life.
    lent: bool = False

    @property
    def path(self) -> Path:
        return self.tier.blob_path(self.digest)

    def row(self) -> BlobRow:
        return BlobRow(
            self.digest,
            self.tier.name,
            self.size,
            self.chunk_size,
            self.complete,
            self.mtime_ns,
            self.last_used,
            self.ctime_ns,
            self.lent,
        )

    def record(self, st: BlobStat) -> None:
        """Take `st` as the stat of this blob's verified bytes."""
        self.size, self.mtime_ns, self.ctime_ns = st.size, st.mtime_ns, st.ctime_ns


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


@dataclass(slots=True)
class Snapshot:
    manifest: mf.Manifest
    last_used: float
    pinned: bool = False

    @property
    def id(self) -> str:
        return self.manifest.snapshot_id


@dataclass(slots=True)
class TierUsage:
    name: str
    path: str
    budget: int
    used: int
    blobs: int
    evictions: Counter[str] = field(default_factory=Counter)


class Cache:
    def __init__(
        self,
        tiers: Sequence[Tier],
        index: Index,
        *,
        manifests_dir: Path,
        clock: Callable[[], float],
        hasher: Callable[[Path, bytes, int, int], Rehash] | None = None,
    ) -> None:
        if not tiers:
            raise TierError("at least one tier is needed")
        self.tiers = list(tiers)
        self.index = index
        self.manifests_dir = manifests_dir
        self.clock = clock
        self._blobs: dict[bytes, dict[str, Blob]] = {}
        self._used: dict[str, int] = {t.name: 0 for t in tiers}
        self._held: Counter[bytes] = Counter()
        self._snapshots: dict[str, Snapshot] = {}
        self._chunks: dict[bytes, tuple[bytes, int]] = {}  # chunk id -> (blob digest, offset)
        self._lock = asyncio.Lock()
        self.evictions: Counter[tuple[str, str]] = Counter()  # (tier, "demote"|"delete")
        # rehash() by default; a test passes one it can pause mid-hash
        self.hasher = hasher if hasher is not None else rehash
        self._vouching: dict[tuple[bytes, str], asyncio.Future[Verdict | None]] = {}

    def __repr__(self) -> str:
        used = ", ".join(f"{t.name}={self._used[t.name]}/{t.budget}" for t in self.tiers)
        return f"Cache({used}, snapshots={len(self._snapshots)})"

    # start-up ----------------------------------------------------------------------------
    def load(self) -> None:
        """Prepare tiers and reconcile the index with what is really on disk (blocking)."""
        private_dir(self.manifests_dir)
        for t in self.tiers:
            t.prepare()
        rows = {(r.digest, r.tier): r for r in self.index.blobs()}
        by_name = {t.name: t for t in self.tiers}
        for srow in self.index.snapshots():
            try:
                self._add_snapshot(mf.decode(srow.manifest), srow.last_used, srow.pinned)
            except ManifestError as e:
                log.warning("dropping unreadable snapshot %s from the index: %s", srow.id, e)
                self.index.delete_snapshot(srow.id)
        for p in self.manifests_dir.glob("*"):
            if p.name not in self._snapshots and len(p.name) == 64:
                with contextlib.suppress(ManifestError, OSError):
                    m = mf.decode(p.read_bytes())
                    if m.snapshot_id == p.name:
                        self._add_snapshot(m, self.clock(), False)
                        self.index.put_snapshot(m, self.clock())
        sizes = self._known_chunk_sizes()
        for t in self.tiers:
            complete, partial = t.scan()
            for st in complete:
                row = rows.pop((st.digest, t.name), None)
                cs = row.chunk_size if row else sizes.get(st.digest, 0)
                last = row.last_used if row else self.clock()
                if row is not None and row.complete and row.size == st.size:
                    # Keep the stat recorded at completion, not today's: a blob written
                    # through while the daemon was down must fail unchanged() and be re-hashed.
                    b = Blob(
                        st.digest, t, st.size, cs, True, row.mtime_ns, last, row.ctime_ns, row.lent
                    )
                else:
                    # No record vouches for these bytes (a lost or rebuilt index, a death
                    # between install and record): never trusted by their mtime; the unknown
                    # ctime makes the first use re-hash them (vouch, lazily: see there).
                    b = Blob(st.digest, t, st.size, cs, True, st.mtime_ns, last)
                self._put(b)
            for st in partial:
                row = rows.pop((st.digest, t.name), None)
                if row is None or row.complete:
                    t.remove_partial(st.digest)  # unknown leftover: nothing to resume it with
                    continue
                self._put(Blob(st.digest, t, row.size, row.chunk_size, False, 0, row.last_used))
        for digest, tier in rows:  # in the index but gone from disk
            self.index.delete_blob(digest, tier)
        for name in list(by_name):
            log.info(
                "tier %s at %s: %d bytes used of %d",
                name,
                by_name[name].root,
                self._used[name],
                by_name[name].budget,
            )

    def _known_chunk_sizes(self) -> dict[bytes, int]:
        return {
            f.digest: s.manifest.chunk_size
            for s in self._snapshots.values()
            for f in s.manifest.files
        }

    # the view ------------------------------------------------------------------------------
    def _put(self, b: Blob, persist: bool = True) -> None:
        old = self._blobs.setdefault(b.digest, {}).get(b.tier.name)
        if old is not None:
            self._used[b.tier.name] -= old.size
        self._blobs[b.digest][b.tier.name] = b
        self._used[b.tier.name] += b.size
        if persist:
            self.index.put_blob(b.row())

    def _drop(self, digest: bytes, tier: str) -> Blob | None:
        per = self._blobs.get(digest)
        b = per.pop(tier, None) if per else None
        if b is not None:
            self._used[tier] -= b.size
            self.index.delete_blob(digest, tier)
            if not per:
                del self._blobs[digest]
        return b

    def _add_snapshot(self, m: mf.Manifest, last_used: float, pinned: bool) -> None:
        self._snapshots[m.snapshot_id] = Snapshot(m, last_used, pinned)
        for f in m.files:
            for off, c in f.offsets(m.chunk_size):
                self._chunks.setdefault(c.id, (f.digest, off))

    def locate(self, digest: bytes, tiers: Sequence[Tier] | None = None) -> Blob | None:
        """The complete copy of a blob in the first tier (of `tiers`, default all) holding it."""
        per = self._blobs.get(digest, {})
        for t in tiers if tiers is not None else self.tiers:
            b = per.get(t.name)
            if b is not None and b.complete:
                return b
        return None

    def partial(self, digest: bytes) -> Blob | None:
        for b in self._blobs.get(digest, {}).values():
            if not b.complete:
                return b
        return None

    def chunk_location(self, cid: bytes) -> tuple[Blob, int] | None:
        """A complete local blob that holds chunk `cid`, and the chunk's offset in it."""
        loc = self._chunks.get(cid)
        if loc is None:
            return None
        b = self.locate(loc[0])
        return (b, loc[1]) if b is not None else None

    def snapshot(self, snapshot_id: str) -> Snapshot | None:
        return self._snapshots.get(snapshot_id)

    def snapshots(self) -> list[Snapshot]:
        return list(self._snapshots.values())

    def digests(self, tier: Tier) -> list[bytes]:
        """Every blob (complete or partial) held in `tier`."""
        return [d for d, per in self._blobs.items() if tier.name in per]

    def is_held(self, digest: bytes) -> bool:
        return self._held[digest] > 0

    def copies(self, digest: bytes) -> list[Blob]:
        return list(self._blobs.get(digest, {}).values())

    def usage(self) -> list[TierUsage]:
        return [
            TierUsage(
                t.name,
                str(t.root),
                t.budget,
                self._used[t.name],
                sum(1 for per in self._blobs.values() if t.name in per),
            )
            for t in self.tiers
        ]

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise TierError(f"no tier named {name!r} (tiers: {', '.join(t.name for t in self.tiers)})")

    # snapshots, pins, holds ------------------------------------------------------------------
    def record_snapshot(self, m: mf.Manifest) -> None:
        now = self.clock()
        # Blobs found on disk with no index row (a lost index) learn their chunk size here,
        # which verify needs to check them.
        for f in m.files:
            for b in self._blobs.get(f.digest, {}).values():
                if b.chunk_size == 0:
                    b.chunk_size = m.chunk_size
                    self.index.put_blob(b.row())
        if m.snapshot_id in self._snapshots:
            self._snapshots[m.snapshot_id].last_used = now
        else:
            self._add_snapshot(m, now, False)
            path = self.manifests_dir / m.snapshot_id
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(m.encoded)
                os.replace(tmp, path)
        self.index.put_snapshot(m, now)

    def set_pinned(self, snapshot_id: str, pinned: bool) -> None:
        s = self._snapshots[snapshot_id]
        s.pinned = pinned
        self.index.set_pinned(snapshot_id, pinned)

    def pinned_blobs(self) -> set[bytes]:
        return {f.digest for s in self._snapshots.values() if s.pinned for f in s.manifest.files}

    @contextlib.contextmanager
    def holding(self, digests: Iterable[bytes]) -> Iterator[None]:
        """Keep these blobs from eviction while a restore uses them."""
        held = list(digests)
        self._held.update(held)
        try:
            yield
        finally:
            self._held.subtract(held)
            self._held += Counter()  # drop zero counts

    def touch(self, digests: Iterable[bytes]) -> None:
        now = self.clock()
        ds = list(digests)
        for d in ds:
            for b in self._blobs.get(d, {}).values():
                b.last_used = now
        self.index.touch_blobs(ds, now)

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
            existing = self.partial(digest)
            if existing is not None and existing.tier in tiers:
                return existing.tier
            why: list[str] = []
            for t in tiers:
                if size > t.budget:
                    why.append(f"{t.name}: budget {t.budget} < {size}")
                    continue
                need = self._used[t.name] + size - t.budget
                if need > 0 and not await self._make_room(t, need):
                    why.append(f"{t.name}: {need} bytes over budget, nothing evictable")
                    continue
                self._put(Blob(digest, t, size, chunk_size, False, 0, self.clock()), persist)
                return t
            raise TierError(
                f"no tier can take blob {digest.hex()} of {size} bytes ({'; '.join(why)})"
            )

    async def reserve(self, size: int, tiers: Sequence[Tier]) -> Tier | None:
        """Charge `size` bytes not yet named by a digest (publish). None if no tier has room."""
        async with self._lock:
            for t in tiers:
                need = self._used[t.name] + size - t.budget
                if size <= t.budget and (need <= 0 or await self._make_room(t, need)):
                    self._used[t.name] += size
                    return t
            return None

    def unreserve(self, tier: Tier, size: int) -> None:
        self._used[tier.name] -= size

    def adopt(self, tier: Tier, st: BlobStat, chunk_size: int) -> None:
        """Record a complete blob that was installed in `tier`, replacing any record of it.
        `st` is the stat of bytes we wrote and hashed ourselves (a new inode: not lent)."""
        self._put(
            Blob(st.digest, tier, st.size, chunk_size, True, st.mtime_ns, self.clock(), st.ctime_ns)
        )

    def completed(self, digest: bytes, tier: Tier, st: BlobStat) -> None:
        """Record a blob admitted for filling as complete; `st` as adopt's."""
        b = self._blobs[digest][tier.name]
        b.complete, b.last_used, b.lent = True, self.clock(), False
        b.mtime_ns, b.ctime_ns = st.mtime_ns, st.ctime_ns
        self._put(b)

    def abandon(self, digest: bytes, tier: Tier) -> None:
        """Forget a partial blob whose fill failed (its files are already removed)."""
        b = self._blobs.get(digest, {}).get(tier.name)
        if b is not None and not b.complete:
            self._drop(digest, tier.name)

    async def remove(self, digest: bytes, tier: Tier) -> None:
        """Delete a blob copy (a bad one found by verify, or gc)."""
        b = self._drop(digest, tier.name)
        if b is not None:
            fn = tier.remove_blob if b.complete else tier.remove_partial
            await asyncio.to_thread(fn, digest)

    async def _make_room(self, tier: Tier, need: int) -> bool:
        """Evict from `tier` until `need` bytes are free. Runs under the lock."""
        pinned = self.pinned_blobs()
        cands = [
            Candidate(d, b.size, b.last_used)
            for d, per in self._blobs.items()
            if (b := per.get(tier.name)) is not None
            and b.complete
            and d not in pinned
            and not self._held[d]
        ]
        victims = choose_victims(cands, need)
        if victims is None:
            return False
        below = self.tiers[self.tiers.index(tier) + 1 :]
        freed = 0
        for d in victims:
            # Each await below lets a new restore take hold of a victim chosen before it:
            # check again right before acting, and leave a held blob where it is.
            b = self._blobs.get(d, {}).get(tier.name)
            if b is None or not b.complete or self._held[d]:
                continue
            # copy_in hashes the copy before installing it, so a blob written through since
            # its last check is deleted, never laundered into a fresh record below.
            demotable = below and not any(self.locate(d, [t]) for t in below)
            if demotable and await self._demote(b, below):
                freed += b.size
                continue
            if self._held[d] or self._blobs.get(d, {}).get(tier.name) is not b:
                continue
            self._drop(d, tier.name)
            await asyncio.to_thread(tier.remove_blob, d)
            self.evictions[(tier.name, "delete")] += 1
            freed += b.size
            log.info("evicted blob %s from tier %s", d.hex()[:16], tier.name)
        if freed >= need:
            return True
        # some victims were taken meanwhile: choose again for what is still missing
        return freed > 0 and await self._make_room(tier, need - freed)

    async def _demote(self, b: Blob, below: Sequence[Tier]) -> bool:
        for t in below:
            need = self._used[t.name] + b.size - t.budget
            if b.size > t.budget or (need > 0 and not await self._make_room(t, need)):
                continue
            self._used[t.name] += b.size  # charged while the copy runs
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
            # the copy was hashed: a new, verified inode, not lent
            self._put(
                Blob(
                    b.digest, t, st.size, b.chunk_size, True, st.mtime_ns, b.last_used, st.ctime_ns
                )
            )
            if self._held[b.digest]:
                return False  # a restore took it during the copy: keep both copies
            self._drop(b.digest, b.tier.name)
            await asyncio.to_thread(b.tier.remove_blob, b.digest)
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
    def unchanged(self, b: Blob) -> bool:
        """Whether a complete blob's inode still has the state recorded when its bytes were
        last verified: the cheap check that lets a use skip the re-hash.

        Size and mtime always. The ctime too for a lent blob (one a caller that can write to
        it holds a link to: root can write through a read-only bit and set the mtime back,
        but no one can set the ctime back, since utime sets it to now). Not for a blob only
        non-writers were given: they can neither write its bytes nor set its times, and a
        link or an unlink (a client's `rm` of its tree) moves the ctime of every restored
        blob, which must not cost a re-hash of the whole snapshot at the next restore.
        Since multigrain timestamps (Linux 6.13) a change after a stat always gets a later
        ctime; on older kernels one in the same clock tick as the stat leaves it as it was,
        which this check (and rehash's before/after compare) cannot see.
        """
        if b.ctime_ns == UNKNOWN_CTIME:
            return False  # never verified since the index was lost or migrated
        try:
            st = os.stat(b.path)
        except OSError:
            return False
        if not b.lent:
            return st.st_size == b.size and st.st_mtime_ns == b.mtime_ns
        return BlobStat.of(b.digest, st).same_file_state(
            BlobStat(b.digest, b.size, b.mtime_ns, b.ctime_ns)
        )

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
        if b.chunk_size <= 0 < chunk_size and self._current(b):
            b.chunk_size = chunk_size
            self.index.put_blob(b.row())
        while True:
            if not self._current(b):
                return Verdict.GONE
            if not force and self.unchanged(b):
                return Verdict.INTACT
            if b.chunk_size <= 0:
                return Verdict.UNCHECKABLE
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
            r = await asyncio.to_thread(self.hasher, b.path, b.digest, b.size, b.chunk_size)
            if r.why is not None:
                log.warning("blob %s in %s is bad: %s", b.digest.hex(), b.tier.name, r.why)
            # Nothing awaits between this look and settle's own: it says whether a False
            # from settle was a bad blob dropped or a record replaced during the hash.
            current = self._current(b)
            if await self.settle(b, r):
                outcome = Verdict.INTACT
            else:
                outcome = Verdict.BAD if current else Verdict.GONE
            return outcome
        finally:
            del self._vouching[key]
            flight.set_result(outcome)

    async def settle(self, b: Blob, r: Rehash) -> bool:
        """Act on a re-hash of a complete blob: the one place that does. A bad one (`r.why`
        says how) is removed; an intact one gets the stat taken before its hash recorded, so
        `unchanged` passes again until the inode changes. Returns whether `b` is intact and
        recorded. A re-hash of a record that was replaced or dropped meanwhile says nothing of
        what the tier holds now: nothing is done."""
        if not self._current(b):
            return False
        if r.why is not None or r.seen is None:
            await self.remove(b.digest, b.tier)
            return False
        b.record(r.seen)
        self._put(b)
        return True

    def lent(self, blobs: Iterable[Blob]) -> None:
        """Mark complete blobs as lent: hardlinked (or about to be) into the tree of a caller
        that could write to the inode (root, the daemon's uid, a user namespace mapped to
        either). Persisted, for the rest of the inode's life: from now on `unchanged` checks
        the ctime too, which no one can set back, and a use re-hashes on any doubt. The
        record is left as it was, so the link's own ctime bump makes the next use re-hash.

        The mark is not dropped when st_nlink falls back to 1: nlink does not count open
        descriptors, and a writer polling its descriptor's ctime could write right after a
        re-hash that cleared it. A new inode (a refetch, a promotion, a demotion) starts
        unlent. Links to callers that cannot write need no mark: they can neither write the
        bytes nor set the times.

        Called on the loop before linking, so a daemon killed between the two cannot leave a
        linked blob unmarked.
        """
        changed: list[BlobRow] = []
        for b in blobs:
            cur = self._blobs.get(b.digest, {}).get(b.tier.name)
            if cur is not None and cur.complete and not cur.lent:
                cur.lent = True
                changed.append(cur.row())
        self.index.put_blobs(changed)  # one commit for the whole tree

    async def rehash(self, b: Blob) -> Rehash:
        """Re-hash a blob in a thread (verify); act on the result with settle."""
        return await asyncio.to_thread(self.hasher, b.path, b.digest, b.size, b.chunk_size)

    def _current(self, b: Blob) -> bool:
        return b.complete and self._blobs.get(b.digest, {}).get(b.tier.name) is b


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
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return Rehash(f"cannot open: {e.strerror}")
    try:
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


def blob_is_intact(path: Path, digest: bytes, size: int, chunk_size: int) -> str | None:
    """Re-hash a blob file against its name. None if intact, else what is wrong (blocking)."""
    return rehash(path, digest, size, chunk_size).why
