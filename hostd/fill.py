"""Making blobs complete in a tier: the part of a restore or prefetch that moves bytes.

For each blob a snapshot needs, in file order: a complete copy in an acceptable tier is used
as it is (after Cache.vouch: its size, mtime and ctime checked, re-hashed on any doubt); one
in another tier is copied in, the copy hashed before it is installed; a missing one is
admitted to a tier and filled chunk by chunk through the shared fetcher, by a bounded pool of
workers (which also bounds the bytes held in memory). A blob that another restore is filling
is waited for, not filled twice. A partial blob left by an earlier run is resumed after its
present chunks are re-hashed.

On a full or unwritable tier the partial blob is removed (its space reclaimed); on any other
failure or cancellation it is kept, closed, so the next restore resumes it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hostd.cache import Blob, Cache, Rehash
from hostd.core.manifest import FileEntry
from hostd.errors import ChunkCorrupt, TierError, first_error
from hostd.fetch import Fetcher
from hostd.tier import BlobCopyCorrupt, BlobStat, PartialBlob, Tier

log = logging.getLogger(__name__)


@dataclass
class FillProgress:
    total_bytes: int = 0
    done_bytes: int = 0
    by_source: Counter[str] = field(default_factory=Counter)


@dataclass
class _Open:
    entry: FileEntry
    tier: Tier
    blob: PartialBlob
    left: int
    finishing: bool = False


class Filler:
    def __init__(self, cache: Cache, fetcher: Fetcher, workers: int) -> None:
        self.cache = cache
        self.fetcher = fetcher
        self.workers = workers
        self._filling: dict[bytes, asyncio.Future[None]] = {}
        self._seq = itertools.count()
        # Chunks written (and verified) into partial blobs still filling: chunk id -> (the
        # partial file, offset). The peer server serves them from there.
        self._written: dict[bytes, tuple[Path, int, int]] = {}  # + the chunk's size

    def written(self, cid: bytes) -> tuple[Path, int, int] | None:
        """Where a verified chunk of a blob still filling lies, if one holds it."""
        return self._written.get(cid)

    def _forget_written(self, entry: FileEntry) -> None:
        for c in entry.chunks:
            self._written.pop(c.id, None)

    def _release(self, digest: bytes, claims: dict[bytes, asyncio.Future[None]]) -> None:
        """Drop our claim on a blob and wake whoever waits on it."""
        fut = claims.pop(digest)
        if self._filling.get(digest) is fut:
            del self._filling[digest]
        fut.set_result(None)

    async def _landing(
        self, completing: Awaitable[BlobStat], tier: Tier, chunk_size: int
    ) -> BlobStat:
        """Await a thread that completes a blob. If we are cancelled meanwhile, the thread
        still finishes; the blob it completed is then recorded, not left on disk unaccounted
        (outside the budget until a restart)."""
        job = asyncio.ensure_future(completing)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:

            def landed(j: asyncio.Future[BlobStat]) -> None:
                if not j.cancelled() and j.exception() is None:
                    self.cache.adopt(tier, j.result(), chunk_size)

            job.add_done_callback(landed)
            raise

    def filling(self) -> set[bytes]:
        """Blobs being filled right now."""
        return set(self._filling)

    def __repr__(self) -> str:
        return f"Filler(filling={len(self._filling)}, workers={self.workers})"

    async def ensure(
        self,
        entries: Sequence[FileEntry],
        chunk_size: int,
        tiers: Sequence[Tier],
        progress: FillProgress,
    ) -> dict[bytes, Blob]:
        """Make every blob of `entries` complete in one of `tiers`; return where each is."""
        seq = next(self._seq)
        found: dict[bytes, Blob] = {}
        pending = list({e.digest: e for e in entries if e.size}.values())
        progress.total_bytes = sum(e.size for e in pending)
        while pending:
            mine: list[FileEntry] = []
            claims: dict[bytes, asyncio.Future[None]] = {}
            waits: list[asyncio.Future[None]] = []
            try:
                for e in pending:
                    if e.digest in self._filling:
                        waits.append(self._filling[e.digest])
                        continue
                    b = self._ready(e, tiers, progress)
                    if b is not None:  # the warm path: no claim, no await
                        found[e.digest] = b
                        continue
                    # Claimed before _usable, which may copy the blob in from another tier:
                    # two copies of one blob into one tier would race on one scratch file.
                    claims[e.digest] = self._filling[e.digest] = (
                        asyncio.get_running_loop().create_future()
                    )
                    b = await self._usable(e, chunk_size, tiers, progress)
                    if b is None:
                        mine.append(e)
                    else:
                        found[e.digest] = b
                        self._release(e.digest, claims)  # usable as it is: release it now
                await self._fill(mine, chunk_size, tiers, progress, seq, claims)
            finally:
                # Every exit (a failed copy-in, a cancel) releases every claim left: one left
                # behind would make the next ensure() of that blob wait forever.
                for digest in list(claims):
                    self._release(digest, claims)
            for w in waits:
                await asyncio.shield(w)
            for e in mine:
                b = self.cache.locate(e.digest, tiers)
                if b is not None:
                    found[e.digest] = b
            # What others filled is usable next round; what they failed to fill, we fill then.
            pending = [e for e in pending if e.digest not in found]
        return found

    def _ready(self, e: FileEntry, tiers: Sequence[Tier], progress: FillProgress) -> Blob | None:
        """A complete copy in `tiers` whose record still holds (one stat): usable as it is.
        Anything in doubt goes the long way, through _usable and a re-hash."""
        for b in self.cache.copies(e.digest):
            if b.complete and b.tier in tiers and self.cache.unchanged(b):
                progress.done_bytes += b.size
                progress.by_source[b.tier.name] += b.size
                return b
        return None

    async def _usable(
        self, e: FileEntry, chunk_size: int, tiers: Sequence[Tier], progress: FillProgress
    ) -> Blob | None:
        """A complete, verified copy in `tiers`, copying one in from another tier if need be.
        None: no copy is usable (any that failed its check is dropped): fill it."""
        for b in self.cache.copies(e.digest):
            if b.complete and b.tier in tiers and await self.cache.vouch(b, chunk_size):
                progress.done_bytes += b.size
                progress.by_source[b.tier.name] += b.size
                return b
        for b in self.cache.copies(e.digest):
            # copy_in hashes the copy against the digest, so the source need not be vouched
            # for first (that would hash it twice).
            if b.complete and b.tier not in tiers and b.chunk_size > 0:
                got = await self._copy_in(b, tiers, progress)
                if got is not None:
                    return got
        return None

    async def _copy_in(
        self, src: Blob, tiers: Sequence[Tier], progress: FillProgress
    ) -> Blob | None:
        """Promote (or demote) `src` into `tiers`; None if it was bad (then it is dropped)."""
        t = await self.cache.admit(src.digest, src.size, src.chunk_size, tiers)
        try:
            with self.cache.holding([src.digest]):
                st = await self._landing(
                    asyncio.to_thread(t.copy_in, src.path, src.digest, src.size, src.chunk_size),
                    t,
                    src.chunk_size,
                )
        except BlobCopyCorrupt as err:
            self.cache.abandon(src.digest, t)
            log.warning("blob %s in %s is bad: %s", src.digest.hex(), src.tier.name, err.why)
            await self.cache.settle(src, Rehash(err.why))
            return None
        except BaseException:
            self.cache.abandon(src.digest, t)
            raise
        self.cache.completed(src.digest, t, st)
        progress.done_bytes += src.size
        progress.by_source[src.tier.name] += src.size
        b = self.cache.locate(src.digest, [t])
        assert b is not None
        return b

    async def _fill(
        self,
        entries: Sequence[FileEntry],
        chunk_size: int,
        tiers: Sequence[Tier],
        progress: FillProgress,
        seq: int,
        claims: dict[bytes, asyncio.Future[None]],
    ) -> None:
        if not entries:
            return
        work = [(e, i) for e in entries for i in range(len(e.chunks))]
        opened: dict[bytes, asyncio.Future[_Open]] = {}
        cursor = iter(range(len(work)))
        done: set[bytes] = set()

        async def open_blob(e: FileEntry) -> _Open:
            t = await self.cache.admit(e.digest, e.size, chunk_size, tiers)
            try:
                pb = await _closing_on_cancel(asyncio.to_thread(_open_checked, t, e, chunk_size))
            except BaseException:
                self.cache.abandon(e.digest, t)
                raise
            present = [c.size for c, h in zip(e.chunks, pb.have, strict=True) if h]
            progress.done_bytes += sum(present)
            progress.by_source["resumed"] += sum(present)
            return _Open(e, t, pb, len(e.chunks) - len(present))

        async def get_open(e: FileEntry) -> _Open:
            fut = opened.get(e.digest)
            if fut is None:
                fut = asyncio.get_running_loop().create_future()
                opened[e.digest] = fut
                try:
                    fut.set_result(await open_blob(e))
                except BaseException as exc:
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: other workers re-raise it themselves
                    raise
            return await fut

        async def finish(o: _Open) -> None:
            if o.finishing:  # several workers can see a resumed blob already full
                return
            o.finishing = True
            self._forget_written(o.entry)  # about to be renamed: served as a blob from now
            st = await self._landing(asyncio.to_thread(o.blob.complete), o.tier, chunk_size)
            self.cache.completed(o.entry.digest, o.tier, st)
            done.add(o.entry.digest)
            # whoever waits for this blob can go on now, not when this whole fill ends
            self._release(o.entry.digest, claims)

        async def whole(e: FileEntry, n: int) -> None:
            """A one-chunk blob: fetch it and write it whole, with no partial-blob state (the
            chunk is the unit of resumption anyway); a third of the syscalls and thread hops
            per small file."""
            c = e.chunks[0]
            t = await self.cache.admit(e.digest, e.size, chunk_size, tiers, persist=False)
            try:
                try:
                    data, src = await self.fetcher.get(c, (seq, n))
                except ChunkCorrupt as err:
                    raise ChunkCorrupt(f"file {e.path!r}: {err.message}") from err
                st = await self._landing(
                    asyncio.to_thread(t.write_whole, e.digest, data), t, chunk_size
                )
            except BaseException:
                self.cache.abandon(e.digest, t)
                raise
            self.cache.completed(e.digest, t, st)
            progress.done_bytes += c.size
            progress.by_source[src] += c.size
            done.add(e.digest)
            self._release(e.digest, claims)

        async def worker() -> None:
            for n in cursor:
                e, i = work[n]
                if len(e.chunks) == 1 and self.cache.partial(e.digest) is None:
                    await whole(e, n)
                    continue
                o = await get_open(e)
                if o.left == 0:
                    await finish(o)  # everything was already there (resumed)
                if o.blob.have[i]:
                    continue
                c = e.chunks[i]
                try:
                    data, src = await self.fetcher.get(c, (seq, n))
                except ChunkCorrupt as err:
                    raise ChunkCorrupt(f"file {e.path!r}: {err.message}") from err
                await asyncio.to_thread(o.blob.write, i, i * chunk_size, data)
                if not o.finishing:
                    self._written[c.id] = (o.tier.partial_path(e.digest), i * chunk_size, c.size)
                progress.done_bytes += c.size
                progress.by_source[src] += c.size
                o.left -= 1
                if o.left == 0:
                    await finish(o)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.workers, len(work))):
                    tg.create_task(worker())
        except BaseException as exc:
            err = first_error(exc)
            await asyncio.shield(self._cleanup(opened, done, isinstance(err, TierError)))
            if err is not None and not isinstance(exc, asyncio.CancelledError):
                raise err from None
            raise

    async def _cleanup(
        self, opened: dict[bytes, asyncio.Future[_Open]], done: set[bytes], discard: bool
    ) -> None:
        for digest, fut in opened.items():
            if digest in done or not fut.done() or fut.cancelled() or fut.exception():
                continue
            o = fut.result()
            self._forget_written(o.entry)
            if discard:
                await asyncio.to_thread(o.blob.discard)
                self.cache.abandon(digest, o.tier)
            else:
                await asyncio.to_thread(o.blob.close)  # waits out a write still running


def _open_checked(t: Tier, e: FileEntry, chunk_size: int) -> PartialBlob:
    """Open (or resume) a partial blob; a resumed one has its present chunks re-hashed."""
    pb = t.open_partial(e.digest, e.size, len(e.chunks))
    try:
        if pb.resumed:
            bad = pb.recheck(e.chunks, chunk_size)
            if bad:
                log.warning("resumed blob %s: %d chunks did not verify", e.digest.hex(), bad)
    except BaseException:
        pb.close()
        raise
    return pb


async def _closing_on_cancel(opening: Awaitable[PartialBlob]) -> PartialBlob:
    """Await a blob being opened in a thread; if we are cancelled meanwhile, the thread still
    finishes, and the blob it opened is closed rather than leaking its descriptors."""
    job = asyncio.ensure_future(opening)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        job.add_done_callback(_close_result)
        raise


def _close_result(job: asyncio.Future[PartialBlob]) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result().close()
