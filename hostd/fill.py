"""Making blobs complete in a tier: the part of a restore or prefetch that moves bytes.

For each blob a snapshot needs, in file order: a complete copy in an acceptable tier is used
as it is (after Cache.vouch: its size, mtime and ctime checked, re-hashed on any doubt); one
in another tier is copied in, the copy hashed before it is installed; a missing one is
admitted to a tier and filled chunk by chunk through the shared fetcher, by a bounded pool of
workers (which also bounds the bytes held in memory). A blob that another restore is filling
is waited for, not filled twice. A partial blob left by an earlier run is resumed after its
present chunks are re-hashed.

A blob gets the mtime of the file it is filled for (the one most of its files share) before
its recorded stat, so a restore can link files with that mtime to it. No blob is fsynced on
its own: each is written and renamed into place, recorded complete in memory at once, and
handed to `Durability`, which syncs the tier's filesystem once for a batch and then writes the
batch's index rows (hostd/durable.py); `ensure` returns only once every blob it made is
recorded. One-chunk blobs (most files of a compile cache) skip partial-blob state, and are
written by at most WRITERS workers at a time, up to WRITE_BATCH a thread hop, while the
others fetch.

On a full or unwritable tier the partial blob is removed (its space reclaimed); on any other
failure or cancellation it is kept, closed, so the next restore resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hostd.cache import Blob, Cache, Rehash, Verdict
from hostd.core.manifest import FileEntry
from hostd.durable import Durability
from hostd.errors import ChunkCorrupt, ChunkMissing, TierError, first_error
from hostd.fastcopy import Stat, lstat_paths
from hostd.fetch import ByteBudget, Fetcher
from hostd.sources import adjacent
from hostd.tier import BlobCopyCorrupt, BlobStat, PartialBlob, Tier, blob_mode

# A verified chunk of a blob of several chunks, as a fill writes it: (digest, offset, bytes).
Tee = Callable[[bytes, int, "bytes | memoryview"], None]

log = logging.getLogger(__name__)

# Workers writing one-chunk blobs at once (the rest fetch meanwhile): two keep a thread in
# the kernel while the other holds the GIL; more only contend for it.
WRITERS = 2
# One-chunk blobs written per thread hop, at most: a hop costs about as much as writing a
# small blob, and a batch this size is written in a few milliseconds.
WRITE_BATCH = 64
# The warm path stats this many blobs a thread hop (a stat and a path ~450 bytes each).
STAT_WINDOW = 8192
# A run of one-chunk blobs fetched together (Fetcher.get_many) holds at most this many.
RUN_FILES = 64
RUN_BYTES = 4 << 20
# Rounds of a fill that may end on a tier's full filesystem (Cache.cramped) before the
# restore fails with it.
FULL_RETRIES = 3


@dataclass
class FillProgress:
    total_bytes: int = 0
    done_bytes: int = 0
    by_source: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Whole:
    """A one-chunk blob fetched and admitted, waiting for a writer."""

    entry: FileEntry
    tier: Tier
    data: bytes | memoryview
    source: str
    failed_at: int  # the tier's failed_syncs before it was written (Durability.add)


@dataclass(frozen=True, slots=True)
class _Span:
    """Chunks start..stop-1 of a blob, adjacent in one pack; `n` is the first one's place in
    the fill."""

    entry: FileEntry
    start: int
    stop: int
    n: int


def _spans(e: FileEntry, n: int, most: int) -> list[_Span | tuple[FileEntry, int, int]]:
    """A blob's chunks as the workers take them: spans of adjacent packed chunks, each of
    at most `most` stored bytes (or one chunk), and each unpacked chunk alone (a GET of its
    own object)."""
    out: list[_Span | tuple[FileEntry, int, int]] = []
    chunks = e.chunks
    start = size = 0
    for i, c in enumerate(chunks):
        if c.packed is None:
            if i > start:
                out.append(_Span(e, start, i, n + start))
            out.append((e, i, n + i))
            start, size = i + 1, 0
            continue
        if i > start and (not adjacent(chunks[i - 1], c) or size + c.packed.length > most):
            out.append(_Span(e, start, i, n + start))
            start, size = i, 0
        size += c.packed.length
    if start < len(chunks):
        out.append(_Span(e, start, len(chunks), n + start))
    return out


@dataclass
class _Open:
    entry: FileEntry
    tier: Tier
    blob: PartialBlob
    left: int
    failed_at: int  # the tier's failed_syncs before its first chunk was written
    finishing: bool = False


class _Landed(dict[bytes, Blob]):
    """Blobs complete, by digest; each one set is announced to `on_ready` at once."""

    def __init__(self, on_ready: Callable[[bytes, Blob], None] | None) -> None:
        super().__init__()
        self.on_ready = on_ready

    def __setitem__(self, digest: bytes, blob: Blob) -> None:
        super().__setitem__(digest, blob)
        if self.on_ready is not None:
            self.on_ready(digest, blob)

    def told(self, digest: bytes, blob: Blob) -> None:
        """Set, unannounced: `on_ready` heard of this blob already (from another _Landed)."""
        super().__setitem__(digest, blob)


# The warm path checks this many blobs (a stat each) between turns of the event loop.
YIELD_EVERY = 256
# Bytes of fetched chunks the fills hold at once, by default (config `fetch_memory`).
FETCH_MEMORY = 64 << 20
# Bytes of a blob's adjacent packed chunks read with one ranged GET (config `fetch_range`).
FETCH_RANGE = 64 << 20


class Filler:
    def __init__(
        self,
        cache: Cache,
        fetcher: Fetcher,
        workers: int,
        *,
        durability: Durability | None = None,
        memory: int = FETCH_MEMORY,
        fetch_range: int = FETCH_RANGE,
    ) -> None:
        """`workers` fill at once; `memory` bounds the bytes of fetched chunks that every
        fill together holds (in flight or waiting to be written); a worker reads adjacent
        packed chunks of a blob, up to `fetch_range` bytes, with one ranged GET (where the
        fetcher `streams`)."""
        self.cache = cache
        self.fetcher = fetcher
        self.workers = workers
        self.fetch_range = fetch_range
        self.budget = ByteBudget(memory)
        self.durability = durability if durability is not None else Durability(cache)
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

    async def close(self) -> None:
        """Record what is still waiting for a sync (at shutdown)."""
        await self.durability.close()

    async def _landing(
        self, completing: Awaitable[BlobStat], tier: Tier, chunk_size: int
    ) -> BlobStat:
        """Await a thread that completes a blob. If we are cancelled meanwhile, the thread
        still finishes; the blob it completed is then recorded (once durable), not left on
        disk unaccounted (outside the budget until a restart)."""
        job = asyncio.ensure_future(completing)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:

            def landed(j: asyncio.Future[BlobStat]) -> None:
                if not j.cancelled() and j.exception() is None:
                    self._adopt([(tier, j.result())], chunk_size)

            job.add_done_callback(landed)
            raise

    def _adopt(self, landed: Iterable[tuple[Tier, BlobStat]], chunk_size: int) -> None:
        """Record blobs a thread completed after its fill was cancelled (their admissions
        already abandoned), in memory now and in the index after the next sync."""
        for tier, st in landed:
            self.durability.add(self.cache.adopt(tier, st, chunk_size, persist=False))
        self.durability.kick()

    def _completed(self, digest: bytes, tier: Tier, st: BlobStat, failed_at: int) -> Blob:
        """A blob this fill admitted is installed: complete in memory now, recorded in the
        index once a sync has made it durable. `failed_at`: the tier's `failed_syncs` from
        before its first byte was written (Durability.add)."""
        b = self.cache.completed(digest, tier, st, persist=False)
        self.durability.add(b, failed_at)
        return b

    def filling(self) -> set[bytes]:
        """Blobs being filled right now."""
        return set(self._filling)

    def __repr__(self) -> str:
        return f"Filler(filling={len(self._filling)}, workers={self.workers}, {self.durability!r})"

    async def ensure(
        self,
        entries: Sequence[FileEntry],
        chunk_size: int,
        tiers: Sequence[Tier],
        progress: FillProgress,
        on_ready: Callable[[bytes, Blob], None] | None = None,
        tee: Tee | None = None,
    ) -> dict[bytes, Blob]:
        """Make every blob of `entries` complete in one of `tiers`, durable and recorded;
        return where each is. `on_ready(digest, blob)`, where given, hears of each blob as
        soon as it is complete and verified (before its sync), in the order they complete:
        a progressive restore places its files then. A blob may be announced again.
        `tee(digest, offset, data)`, where given, is handed each verified chunk this fill
        fetches into a blob of several chunks, on the thread that writes it to the tier,
        once written (a progressive restore's ranges); it must not raise."""
        try:
            return await self._ensure(entries, chunk_size, tiers, progress, on_ready, tee)
        except BaseException:
            # What this fill made before an error or a cancel gets its sync now (it runs on,
            # owned by self.durability) rather than at the next fill's.
            self.durability.kick()
            raise

    async def _ensure(
        self,
        entries: Sequence[FileEntry],
        chunk_size: int,
        tiers: Sequence[Tier],
        progress: FillProgress,
        on_ready: Callable[[bytes, Blob], None] | None,
        tee: Tee | None,
    ) -> dict[bytes, Blob]:
        seq = next(self._seq)
        found = _Landed(on_ready)
        made = _Landed(on_ready)  # what our own fills completed
        # Pure work over the whole manifest: on a thread where it is big, so the loop (and
        # status) runs in between.
        big = len(entries) > YIELD_EVERY * 16
        wanted = await asyncio.to_thread(one_per_blob, entries) if big else one_per_blob(entries)
        pending = wanted
        progress.total_bytes = sum(e.size for e in pending)
        full_left = FULL_RETRIES
        while pending:
            mine: list[FileEntry] = []
            doubt: list[FileEntry] = []
            claims: dict[bytes, asyncio.Future[None]] = {}
            waits: list[asyncio.Future[None]] = []
            seen: dict[bytes, tuple[Blob, Stat | int]] = {}
            leased: set[bytes] = set()
            breaks = 0
            filling = self._filling
            try:
                for i, e in enumerate(pending):
                    if i % STAT_WINDOW == 0:  # (all at once: 45 MB of stats for 100,000)
                        seen, leased, breaks = await self._stats(
                            pending[i : i + STAT_WINDOW], tiers
                        )
                    if i % YIELD_EVERY == YIELD_EVERY - 1:
                        # Let status and other restores in between (the blobs are held:
                        # nothing evicts them).
                        await asyncio.sleep(0)
                    d = e.digest
                    if d in filling:
                        waits.append(filling[d])
                        continue
                    st = seen.get(d)
                    # (the leases asked with the stats, while no break was heard since)
                    held = d in leased if leased and self.cache.lease_breaks() == breaks else None
                    if st is not None and st[0].intact(st[1], held):  # the warm path, one call
                        warm = st[0]
                        progress.done_bytes += warm.size
                        progress.by_source[warm.tier.name] += warm.size
                        found[d] = warm
                        continue
                    if st is None and not self.cache.has_copy(d):
                        # the cold path: no copy anywhere, nothing to check or copy in
                        claims[d] = filling[d] = asyncio.get_running_loop().create_future()
                        mine.append(e)
                        continue
                    b = self._ready(e, tiers, progress, st)
                    if b is not None:  # the warm path: no claim, no await
                        found[d] = b
                        continue
                    # Claimed before _usable, which may copy the blob in from another tier:
                    # two copies of one blob into one tier would race on one scratch file.
                    claims[d] = filling[d] = asyncio.get_running_loop().create_future()
                    doubt.append(e)
                # Copies in doubt (a changed stat: a lent blob whose links were removed, say)
                # are re-hashed together, then what none vouched for goes the long way.
                vouched = await self._vouched(doubt, chunk_size, tiers, progress)
                for e in doubt:
                    b = vouched.get(e.digest) or await self._usable(e, chunk_size, tiers, progress)
                    if b is None:
                        mine.append(e)
                    else:
                        found[e.digest] = b
                        self._release(e.digest, claims)  # usable as it is: release it now
                try:
                    await self._fill(mine, chunk_size, tiers, progress, seq, claims, made, tee)
                except TierError as err:
                    # A tier's filesystem filled up before its budget did (another writer
                    # on a shared /dev/shm, say): what was not filled goes round again,
                    # admitted under the room it has now (evicting, or to the next tier).
                    if not err.full or err.tier is None or not full_left:
                        raise
                    full_left -= 1
                    self.cache.cramped(err.tier)
            finally:
                # Every exit (a failed copy-in, a cancel) releases every claim left: one left
                # behind would make the next ensure() of that blob wait forever.
                for digest in list(claims):
                    self._release(digest, claims)
            for w in waits:
                await asyncio.shield(w)
            for i, e in enumerate(mine):
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)
                b = made.get(e.digest)
                if b is not None and b.attached:  # (a complete record stays complete)
                    found.told(e.digest, b)  # announced as `made` got it
                    continue
                b = self.cache.locate(e.digest, tiers)
                if b is not None:
                    found[e.digest] = b
            # What others filled is usable next round; what they failed to fill, we fill then.
            pending = [e for e in pending if e.digest not in found]
            if not pending:
                # Every blob is in memory; wait for the syncs that record them. One a failed
                # sync dropped (ours, or another fill's that we found ready) is filled again.
                await self.durability.flush(found.values())
                for d, b in list(found.items()):
                    if not b.attached:  # no longer its tier's record (O(1): no lookup)
                        del found[d]
                pending = [e for e in wanted if e.digest not in found]
        return found

    async def _stats(
        self, entries: Sequence[FileEntry], tiers: Sequence[Tier]
    ) -> tuple[dict[bytes, tuple[Blob, Stat | int]], set[bytes], int]:
        """The stat of each entry's complete copy in `tiers` (the first), taken in one batch
        in a thread: a restore of 100,000 warm files would otherwise spend about a second of
        the event loop on os.stat. With them, Cache.leased_moved's answer for those copies."""
        blobs: list[Blob] = []
        for i, e in enumerate(entries):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            b = self.cache.locate(e.digest, tiers)
            if b is not None:
                blobs.append(b)
        if not blobs:
            return {}, set(), 0

        def stat_all() -> tuple[dict[bytes, tuple[Blob, Stat | int]], set[bytes], int]:
            seen = lstat_paths([b.file for b in blobs])
            out = {b.digest: (b, st) for b, st in zip(blobs, seen, strict=True)}
            return out, *self.cache.leased_moved(out.values())

        return await asyncio.to_thread(stat_all) if len(blobs) > 16 else stat_all()

    def _ready(
        self,
        e: FileEntry,
        tiers: Sequence[Tier],
        progress: FillProgress,
        seen: tuple[Blob, Stat | int] | None = None,
    ) -> Blob | None:
        """A complete copy in `tiers` whose record still holds (one stat, or the one `seen`
        took of that copy): usable as it is. Anything in doubt goes the long way, through
        _usable and a re-hash."""
        if seen is not None and self.cache.current(seen[0]):
            b, st = seen
            if self.cache.unchanged(b, st):
                progress.done_bytes += b.size
                progress.by_source[b.tier.name] += b.size
                return b
        for b in self.cache.copies(e.digest):
            if b.complete and b.tier in tiers and self.cache.unchanged(b):
                progress.done_bytes += b.size
                progress.by_source[b.tier.name] += b.size
                return b
        return None

    async def _vouched(
        self,
        entries: Sequence[FileEntry],
        chunk_size: int,
        tiers: Sequence[Tier],
        progress: FillProgress,
    ) -> dict[bytes, Blob]:
        """The complete copies in `tiers` of `entries` that check out, checked together
        (Cache.check_many), by digest; a copy that did not is dropped, as `vouch` drops it."""
        held: list[tuple[FileEntry, Blob]] = []
        for e in entries:
            for b in self.cache.copies(e.digest):
                if b.complete and b.tier in tiers:
                    held.append((e, b))
                    break
        verdicts = await self.cache.check_many([b for _, b in held], chunk_size)
        out: dict[bytes, Blob] = {}
        for (e, b), v in zip(held, verdicts, strict=True):
            if v is Verdict.INTACT:
                progress.done_bytes += b.size
                progress.by_source[b.tier.name] += b.size
                out[e.digest] = b
        return out

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
        """Promote (or demote) `src` into `tiers`; None if it was bad (then it is dropped).
        A tier whose filesystem fills up under the copy holds no more than it does from then
        on (Cache.cramped): the copy is admitted again, evicting or to the next tier."""
        for full_left in range(FULL_RETRIES, -1, -1):
            t = await self.cache.admit(src.digest, src.size, src.chunk_size, tiers)
            failed_at = t.failed_syncs
            copy = functools.partial(
                t.copy_in, src.path, src.digest, src.size, src.chunk_size, durable=False
            )
            try:
                with self.cache.holding([src.digest]):
                    st = await self._landing(asyncio.to_thread(copy), t, src.chunk_size)
                break
            except BlobCopyCorrupt as err:
                self.cache.abandon(src.digest, t)
                log.warning("blob %s in %s is bad: %s", src.digest.hex(), src.tier.name, err.why)
                await self.cache.settle(src, Rehash(err.why))
                return None
            except TierError as err:
                self.cache.abandon(src.digest, t)
                if not err.full or err.tier != t.name or not full_left:
                    raise
                self.cache.cramped(t.name)
            except BaseException:
                self.cache.abandon(src.digest, t)
                raise
        b = self._completed(src.digest, t, st, failed_at)
        progress.done_bytes += src.size
        progress.by_source[src.tier.name] += src.size
        await self.durability.step()
        return b

    def _span_bytes(self, e: FileEntry, chunk_size: int, whole_packs: bool) -> int:
        """How much of a large file one ranged GET reads (0: a chunk at a time): at most
        `fetch_range`, and no more than the file's share per worker, so that every worker
        reads a span of the first file before any starts on the next. Files then complete
        in order (a progressive restore's first file lands after about its own share of the
        fetch, and a cold copy's build starts on it), not all together at the end. From a
        server that answers no ranges (`whole_packs`), a run reads its pack from the start
        whatever its span: there a span is a whole pack, and the pack is read once."""
        if not self.fetcher.streams or self.fetch_range < 2 * chunk_size:
            return 0
        if whole_packs:
            return 1 << 62  # (spans end where packs do: `adjacent`)
        share = -(-e.size // max(self.workers, 1))
        return max(2 * chunk_size, min(self.fetch_range, share))

    async def _fill(
        self,
        entries: Sequence[FileEntry],
        chunk_size: int,
        tiers: Sequence[Tier],
        progress: FillProgress,
        seq: int,
        claims: dict[bytes, asyncio.Future[None]],
        done: dict[bytes, Blob],
        tee: Tee | None = None,
    ) -> None:
        """Fill `entries`' blobs; each one completed goes into `done`."""
        if not entries:
            return
        # What the workers take, in file order: a run of one-chunk blobs (fetched together,
        # Fetcher.get_many), one chunk of a larger blob, or a span of a larger blob's
        # adjacent packed chunks (one ranged GET, Fetcher.streaming); each with its place in
        # the fill (the fetch priority).
        work: list[list[tuple[FileEntry, int]] | tuple[FileEntry, int, int] | _Span] = []
        run: list[tuple[FileEntry, int]] = []
        run_bytes = n = 0
        whole_packs = False
        if self.fetcher.streams:
            first = next((e.chunks[0] for e in entries if len(e.chunks) > 1), None)
            whole_packs = first is not None and await self.fetcher.whole_packs(first)
        for e in entries:
            if len(e.chunks) == 1 and self.cache.partial(e.digest) is None:
                run.append((e, n))
                run_bytes += e.size
                if len(run) >= RUN_FILES or run_bytes >= RUN_BYTES:
                    work.append(run)
                    run, run_bytes = [], 0
                n += 1
                continue
            if span_bytes := self._span_bytes(e, chunk_size, whole_packs):
                work.extend(_spans(e, n, span_bytes))
                n += len(e.chunks)
                continue
            for i in range(len(e.chunks)):
                work.append((e, i, n))
                n += 1
        if run:
            work.append(run)
        opened: dict[bytes, asyncio.Future[_Open]] = {}
        cursor = iter(work)
        # One-chunk blobs fetched, waiting for a writer; their bytes are bounded like the
        # workers' own (fetchers wait while more than a worker's share each waits here).
        queue: list[_Whole] = []
        queued_bytes = 0
        writers = 0
        drained = asyncio.Event()
        most = max(self.workers, 1) * chunk_size

        async def open_blob(e: FileEntry) -> _Open:
            t = await self.cache.admit(e.digest, e.size, chunk_size, tiers)
            failed_at = t.failed_syncs
            forget = functools.partial(self.cache.abandon, e.digest, t)

            def forget_late() -> None:
                # (a fill cancelled: its claim is gone, and another fill may have claimed
                # the blob and taken up this record meanwhile, admit resuming it: that
                # fill's now, to complete or abandon)
                if e.digest not in self._filling:
                    forget()

            try:
                opening = asyncio.to_thread(_open_checked, t, e, chunk_size)
                pb = await _closing_on_cancel(opening, forget_late)
            except asyncio.CancelledError:
                raise  # (the thread's outcome decides: _closing_on_cancel)
            except BaseException:
                forget()
                raise
            present = [c.size for c, h in zip(e.chunks, pb.have, strict=True) if h]
            progress.done_bytes += sum(present)
            progress.by_source["resumed"] += sum(present)
            return _Open(e, t, pb, len(e.chunks) - len(present), failed_at)

        async def get_open(e: FileEntry) -> _Open:
            fut = opened.get(e.digest)
            if fut is None:
                fut = asyncio.get_running_loop().create_future()
                opened[e.digest] = fut
                try:
                    fut.set_result(await open_blob(e))
                except BaseException as exc:
                    # A worker awaiting `fut` that is cancelled cancels it too: a cancelled
                    # fill finds it done, and must not fail on it (InvalidStateError).
                    if not fut.done():
                        fut.set_exception(exc)
                        fut.exception()  # retrieved: other workers re-raise it themselves
                    raise
            return await fut

        async def finish(o: _Open) -> None:
            if o.finishing:  # several workers can see a resumed blob already full
                return
            o.finishing = True
            self._forget_written(o.entry)  # about to be renamed: served as a blob from now
            complete = functools.partial(
                o.blob.complete, o.entry.mtime, durable=False, mode=blob_mode(o.entry.mode)
            )
            st = await self._landing(asyncio.to_thread(complete), o.tier, chunk_size)
            done[o.entry.digest] = self._completed(o.entry.digest, o.tier, st, o.failed_at)
            # whoever waits for this blob can go on now, not when this whole fill ends
            self._release(o.entry.digest, claims)
            await self.durability.step()

        async def wholes(run: list[tuple[FileEntry, int]]) -> None:
            """A run of one-chunk blobs: fetch them together, then queue them to be written
            whole, with no partial-blob state (the chunk is the unit of resumption anyway).
            This worker writes the queue itself if fewer than WRITERS do; else it goes on
            fetching, unless the queue holds too many bytes."""
            nonlocal queued_bytes
            admitted: list[tuple[FileEntry, Tier]] = []
            waiting: set[int] = set()  # admitted, neither queued nor abandoned yet
            held = sum(e.size for e, _ in run)  # of the budget; each blob's goes on with it
            await self.budget.take(held)
            try:
                got = await self.cache.admit_run(
                    [(e.digest, e.size) for e, _ in run], chunk_size, tiers
                )
                admitted = [(e, t) for (e, _), t in zip(run, got, strict=True)]
                waiting.update(range(len(admitted)))
                chunks = [e.chunks[0] for e, _ in run]
                async with contextlib.aclosing(
                    self.fetcher.landing(chunks, (seq, run[0][1]))
                ) as landing:
                    async for i, r in landing:
                        waiting.discard(i)
                        e, t = admitted[i]
                        if isinstance(r, BaseException):
                            self.cache.abandon(e.digest, t)
                            if isinstance(r, (ChunkCorrupt, ChunkMissing)):
                                raise type(r)(f"file {e.path!r}: {r.message}") from r
                            raise r
                        data, src = r
                        queue.append(_Whole(e, t, data, src, t.failed_syncs))
                        queued_bytes += e.size
                        held -= e.size
                        if writers < WRITERS:
                            # what landed first is written, and usable, before the rest lands
                            await write_queued()
            except BaseException:
                for i in waiting:
                    e, t = admitted[i]
                    self.cache.abandon(e.digest, t)
                raise
            finally:
                self.budget.give(held)
            while queued_bytes > most:
                drained.clear()
                await drained.wait()

        async def write_queued() -> None:
            nonlocal writers, queued_bytes
            writers += 1
            try:
                while queue:
                    batch = queue[:WRITE_BATCH]
                    del queue[:WRITE_BATCH]
                    size = sum(w.entry.size for w in batch)
                    queued_bytes -= size
                    drained.set()
                    try:
                        await self._write(batch, chunk_size, progress, done, claims)
                    finally:
                        self.budget.give(size)
            finally:
                writers -= 1

        def write(o: _Open, i: int, data: bytes | memoryview) -> None:
            """Chunk i of o's blob, verified: into the tier, then to `tee` (on a thread)."""
            o.blob.write(i, i * chunk_size, data)
            if tee is not None:
                tee(o.entry.digest, i * chunk_size, data)

        async def fetch_into(o: _Open, i: int, n: int) -> str:
            """Fetch chunk i of o's blob and write it there; the source's name. The bytes go
            with this frame: a worker waiting for the budget holds none."""
            data, src = await self.fetcher.get(o.entry.chunks[i], (seq, n))
            await asyncio.to_thread(write, o, i, data)
            return src

        async def written(o: _Open, i: int, src: str) -> None:
            """Chunk i of o's blob is written (from `src`): count it, finish a full blob."""
            c = o.entry.chunks[i]
            if not o.finishing:
                self._written[c.id] = (o.tier.partial_path(o.entry.digest), i * chunk_size, c.size)
            progress.done_bytes += c.size
            progress.by_source[src] += c.size
            o.left -= 1
            if o.left == 0:
                await finish(o)

        async def span(item: _Span) -> None:
            """Adjacent packed chunks of one blob: read in order with one ranged GET, each
            written as it lands (its share of the budget taken by the fetcher, before its
            bytes are received, and given back here once they are written)."""
            e = item.entry
            o = await get_open(e)
            if o.left == 0:
                await finish(o)  # everything was already there (resumed)
            need = [i for i in range(item.start, item.stop) if not o.blob.have[i]]
            if not need:
                return
            priority = (seq, item.n + need[0] - item.start)
            chunks = [e.chunks[i] for i in need]
            async with contextlib.aclosing(
                self.fetcher.streaming(chunks, priority, self.budget)
            ) as landing:
                async for k, r, held in landing:
                    try:
                        if isinstance(r, BaseException):
                            if isinstance(r, (ChunkCorrupt, ChunkMissing)):
                                raise type(r)(f"file {e.path!r}: {r.message}") from r
                            raise r
                        i = need[k]
                        await asyncio.to_thread(write, o, i, r[0])
                        src = r[1]
                    finally:
                        self.budget.give(held)
                    del r  # the bytes: none are held while the next chunk is awaited
                    await written(o, i, src)

        async def worker() -> None:
            for item in cursor:
                if isinstance(item, list):
                    await wholes(item)
                    continue
                if isinstance(item, _Span):
                    await span(item)
                    continue
                e, i, n = item
                o = await get_open(e)
                if o.left == 0:
                    await finish(o)  # everything was already there (resumed)
                if o.blob.have[i]:
                    continue
                c = e.chunks[i]
                await self.budget.take(c.size)
                try:
                    src = await fetch_into(o, i, n)
                except (ChunkCorrupt, ChunkMissing) as err:
                    raise type(err)(f"file {e.path!r}: {err.message}") from err
                finally:
                    self.budget.give(c.size)
                await written(o, i, src)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.workers, len(work))):
                    tg.create_task(worker())
        except BaseException as exc:
            for w in queue:  # fetched, never written
                self.cache.abandon(w.entry.digest, w.tier)
            self.budget.give(sum(w.entry.size for w in queue))
            queue.clear()
            err = first_error(exc)
            failed = err if isinstance(err, TierError) else None
            await asyncio.shield(self._cleanup(opened, done, failed))
            if err is not None and not isinstance(exc, asyncio.CancelledError):
                raise err from None
            raise

    async def _write(
        self,
        batch: list[_Whole],
        chunk_size: int,
        progress: FillProgress,
        done: dict[bytes, Blob],
        claims: dict[bytes, asyncio.Future[None]],
    ) -> None:
        """Write a batch of one-chunk blobs in one thread hop and record them (in memory; in
        the index after their sync). The first failure is raised once the rest are
        recorded. Cancelled, the thread still finishes and what it wrote is recorded."""
        job = asyncio.ensure_future(asyncio.to_thread(_write_wholes, batch))
        try:
            results = await asyncio.shield(job)
        except BaseException:
            for w in batch:
                self.cache.abandon(w.entry.digest, w.tier)
            job.add_done_callback(functools.partial(self._adopt_written, batch, chunk_size))
            raise
        failure: TierError | None = None
        for w, r in zip(batch, results, strict=True):
            d = w.entry.digest
            if isinstance(r, TierError):
                self.cache.abandon(d, w.tier)  # write_whole left nothing behind
                failure = failure or r
                continue
            done[d] = self._completed(d, w.tier, r, w.failed_at)
            progress.done_bytes += w.entry.size
            progress.by_source[w.source] += w.entry.size
            self._release(d, claims)
        if failure is not None:
            raise failure
        await self.durability.step()

    def _adopt_written(
        self, batch: list[_Whole], chunk_size: int, job: asyncio.Future[list[BlobStat | TierError]]
    ) -> None:
        if job.cancelled() or job.exception() is not None:
            return
        landed = job.result()
        self._adopt(
            ((w.tier, r) for w, r in zip(batch, landed, strict=True) if isinstance(r, BlobStat)),
            chunk_size,
        )

    async def _cleanup(
        self,
        opened: dict[bytes, asyncio.Future[_Open]],
        done: dict[bytes, Blob],
        failed: TierError | None,
    ) -> None:
        """Close the partial blobs a failed fill left. Those in the tier that `failed` (all,
        where it names none) are removed: a full or unwritable tier. Those in another tier
        stay, for the next round (Filler._ensure) or a later fill to resume."""
        for digest, fut in opened.items():
            if digest in done or not fut.done() or fut.cancelled() or fut.exception():
                continue
            o = fut.result()
            self._forget_written(o.entry)
            if failed is not None and failed.tier in (None, o.tier.name):
                await asyncio.to_thread(o.blob.discard)
                self.cache.abandon(digest, o.tier)
            else:
                await asyncio.to_thread(o.blob.close)  # waits out a write still running


def one_per_blob(entries: Iterable[FileEntry]) -> list[FileEntry]:
    """The entry each non-empty blob is filled for, in file order of first appearance: of the
    files sharing a blob, one with the mtime and blob mode (tier.blob_mode) most of them have
    (the first such), since a file is linked to a blob only if both agree."""
    by_blob: dict[bytes, list[FileEntry]] = {}
    for e in entries:
        if e.size:
            by_blob.setdefault(e.digest, []).append(e)
    out = []
    for files in by_blob.values():
        if len(files) == 1:
            out.append(files[0])
            continue
        count = Counter((f.mtime, blob_mode(f.mode)) for f in files)
        out.append(max(files, key=lambda f: count[f.mtime, blob_mode(f.mode)]))
    return out


def _write_wholes(batch: list[_Whole]) -> list[BlobStat | TierError]:
    """Write one-chunk blobs (blocking), each with its file's mtime and blob mode, none
    fsynced: one outcome per blob, in order; one Tier.write_wholes call per tier the batch
    touches."""
    by_tier: dict[Tier, list[int]] = {}
    for i, w in enumerate(batch):
        by_tier.setdefault(w.tier, []).append(i)
    results: dict[int, BlobStat | TierError] = {}
    for tier, idx in by_tier.items():
        blobs = [
            (w.entry.digest, w.data, w.entry.mtime, blob_mode(w.entry.mode))
            for w in (batch[i] for i in idx)
        ]
        results.update(zip(idx, tier.write_wholes(blobs), strict=True))
    return [results[i] for i in range(len(batch))]


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


async def _closing_on_cancel(
    opening: Awaitable[PartialBlob], forget: Callable[[], None]
) -> PartialBlob:
    """Await a blob being opened in a thread; if we are cancelled meanwhile, the thread still
    finishes, and the blob it opened is closed rather than leaking its descriptors. Its record
    stays, as a cancelled fill leaves the blobs it had open (_cleanup): the file is there, to
    resume, evict or gc. `forget` drops the record where the thread failed (no file)."""
    job = asyncio.ensure_future(opening)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        job.add_done_callback(functools.partial(_close_result, forget))
        raise


def _close_result(forget: Callable[[], None], job: asyncio.Future[PartialBlob]) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result().close()
    else:
        forget()
