"""The tiers together: where each blob lives, what each tier holds, admission and eviction.

The cache keeps an in-memory view of the index (blobs per tier, snapshots, pins, chunk
locations) and writes every change through to it. Budget accounting charges a blob's full
size from the moment it is admitted for filling, so a tier never holds more than its budget.
Eviction is least-recently-used by bytes: a blob leaves a tier for the next one down, or is
deleted from the last; pinned snapshots' blobs and blobs held by a running restore never go.

Shared state changes only between awaits; admission and eviction run under one lock so two
fills never count the same free bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hostd.core import manifest as mf
from hostd.core.eviction import Candidate, choose_victims
from hostd.core.ids import chunk_id, file_digest
from hostd.errors import ManifestError, TierError
from hostd.index import BlobRow, Index
from hostd.tier import BlobStat, Tier, pread_exact

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
        )


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

    def __repr__(self) -> str:
        used = ", ".join(f"{t.name}={self._used[t.name]}/{t.budget}" for t in self.tiers)
        return f"Cache({used}, snapshots={len(self._snapshots)})"

    # start-up ----------------------------------------------------------------------------
    def load(self) -> None:
        """Prepare tiers and reconcile the index with what is really on disk (blocking)."""
        self.manifests_dir.mkdir(parents=True, exist_ok=True)
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
                # Keep the mtime recorded at completion, not today's: a blob written through
                # while the daemon was down must still fail unchanged() and be re-verified.
                mtime = row.mtime_ns if row and row.complete else st.mtime_ns
                self._put(Blob(st.digest, t, st.size, cs, True, mtime, last))
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
        """Record a complete blob that was installed in `tier`, replacing any record of it."""
        self._put(Blob(st.digest, tier, st.size, chunk_size, True, st.mtime_ns, self.clock()))

    def completed(self, digest: bytes, tier: Tier, st: BlobStat) -> None:
        b = self._blobs[digest][tier.name]
        b.complete, b.mtime_ns, b.last_used = True, st.mtime_ns, self.clock()
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
            # A blob written through since completion is not copied down: the copy would get
            # a fresh size and mtime and pass unchanged() with bytes nobody verified.
            demotable = below and self.unchanged(b) and not any(self.locate(d, [t]) for t in below)
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
                st = await asyncio.to_thread(t.copy_in, b.path, b.digest)
            except TierError as e:
                log.warning("demoting blob %s to %s failed: %s", b.digest.hex()[:16], t.name, e)
                continue
            finally:  # a cancel (the admitting restore went away) returns the charge too
                self._used[t.name] -= b.size
            self._put(Blob(b.digest, t, st.size, b.chunk_size, True, st.mtime_ns, b.last_used))
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
    async def settle(self, b: Blob, why: str | None) -> None:
        """Act on a re-hash of a complete blob: a bad one (`why` says how) is removed; an
        intact one whose size or mtime moved (a touch, a chmod) gets them recorded anew, so
        the cheap unchanged() check passes again."""
        if why is not None:
            await self.remove(b.digest, b.tier)
        elif not self.unchanged(b):
            st = b.tier.stat_blob(b.digest)
            if st is not None:
                self.completed(b.digest, b.tier, st)

    def unchanged(self, b: Blob) -> bool:
        """Whether a complete blob's size and mtime are still those recorded at completion.

        A hardlinked blob shares its inode with restored files, and root can write through a
        read-only bit; a blob that changed must be re-verified before it is used again.
        """
        try:
            st = os.stat(b.path)
        except FileNotFoundError:
            return False
        return st.st_size == b.size and st.st_mtime_ns == b.mtime_ns


def blob_is_intact(path: Path, digest: bytes, size: int, chunk_size: int) -> str | None:
    """Re-hash a blob file against its name. None if intact, else what is wrong (blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open: {e.strerror}"
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            return f"size {actual}, want {size}"
        if chunk_size <= 0:
            return "no manifest gives its chunk size"
        ids = []
        for off in range(0, size, chunk_size):
            n = min(chunk_size, size - off)
            ids.append((chunk_id(pread_exact(fd, n, off)), n))
        if file_digest(ids) != digest:
            return "content does not match its digest"
        return None
    finally:
        os.close(fd)
