"""Chunk sources: where a missing chunk can come from, behind one small interface.

A source's `get(chunk)` returns the chunk's raw bytes *verified against its id*, or raises
ChunkMissing (try the next source) or ChunkCorrupt (counted, never cached; try the next
source). Ordering, single-flight and concurrency limits live in fetch.py, not here. Peers
will be another source in this list.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from hostd.cache import Cache, Verdict
from hostd.core import codec
from hostd.core.manifest import Chunk, Packed
from hostd.errors import ChunkCorrupt, ChunkMissing, unheard
from hostd.origin import Origin, PackRun, stored_at
from hostd.tier import pread_exact

# Chunks up to this size are verified on the event loop: hashing 256 KiB takes about 40 us,
# less than handing it to a thread and back.
INLINE_VERIFY = 256 * 1024


class ChunkSource(Protocol):
    name: str

    async def get(self, chunk: Chunk) -> bytes | memoryview: ...


@runtime_checkable
class BatchSource(ChunkSource, Protocol):
    """A source that also answers a batch (Fetcher.landing): one outcome per chunk, in
    order, the bytes or the exception `get` would have raised."""

    async def get_many(
        self, chunks: Sequence[Chunk]
    ) -> list[bytes | memoryview | BaseException]: ...


# What get_many answers for a chunk no local blob holds (Fetcher names the chunk itself).
_NOT_LOCAL = ChunkMissing("in no local blob")


class LocalBlobSource:
    """Another complete local blob that holds the same chunk (dedup across files/snapshots)."""

    name = "dedup"

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def __repr__(self) -> str:
        return "LocalBlobSource()"

    async def get_many(self, chunks: Sequence[Chunk]) -> list[bytes | memoryview | BaseException]:
        """`get` for a batch; a chunk no local blob holds costs a dict lookup or two."""
        out: list[bytes | memoryview | BaseException] = []
        for c in chunks:
            if self.cache.chunk_location(c.id, c.size) is None:
                out.append(_NOT_LOCAL)  # the usual answer in a cold restore: made once
                continue
            try:
                out.append(await self.get(c))
            except (ChunkMissing, ChunkCorrupt) as e:
                out.append(e)
        return out

    def holds(self, chunk: Chunk) -> bool:
        """Whether a local blob is on record with the chunk (not read, nor checked)."""
        return self.cache.chunk_location(chunk.id, chunk.size) is not None

    async def get(self, chunk: Chunk) -> bytes:
        loc = self.cache.chunk_location(chunk.id, chunk.size)
        if loc is None:
            raise ChunkMissing(f"chunk {chunk.id.hex()} is in no local blob")
        blob, offset = loc
        # The blob is checked like any other use of it (a hardlinked one may have been written
        # through); the chunk read is verified on its own as well. A blob that fails the check
        # is corrupt data (counted, and dropped by the check), not a missing one.
        verdict = await self.cache.check(blob)
        if verdict is Verdict.BAD:
            raise ChunkCorrupt(f"chunk {chunk.id.hex()}: local blob {blob.path} did not verify")
        if verdict is not Verdict.INTACT:
            raise ChunkMissing(f"chunk {chunk.id.hex()}: its local blob is {verdict.value}")
        try:
            return await asyncio.to_thread(_read_verified, str(blob.path), offset, chunk)
        except ChunkCorrupt:
            # Changed since the check: re-hash it now, so a bad blob is dropped, not kept.
            await self.cache.vouch(blob, force=True)
            raise


def _decode_all(
    chunks: Sequence[Chunk], stored: Sequence[bytes | memoryview | BaseException], url: str
) -> list[bytes | memoryview | BaseException]:
    """Decode and verify a batch (blocking): the raw bytes of each, or why not."""
    out: list[bytes | memoryview | BaseException] = []
    for chunk, got in zip(chunks, stored, strict=True):
        if isinstance(got, BaseException):
            out.append(got)
            continue
        try:
            out.append(codec.decode(chunk, got))
        except ChunkCorrupt as e:
            out.append(ChunkCorrupt(f"{e.message} ({stored_at(chunk, url)})"))
    return out


def _read_verified(path: str, offset: int, chunk: Chunk) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:  # evicted between lookup and read
        raise ChunkMissing(f"chunk {chunk.id.hex()}: its local blob is gone") from e
    except OSError as e:  # unreadable here: the next source has it
        raise ChunkMissing(f"chunk {chunk.id.hex()}: local blob {path}: {e.strerror}") from e
    try:
        data = pread_exact(fd, chunk.size, offset)
    except EOFError as e:
        raise ChunkCorrupt(f"chunk {chunk.id.hex()}: local blob {path} is short") from e
    except OSError as e:
        raise ChunkMissing(f"chunk {chunk.id.hex()}: local blob {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    codec.verify(chunk, data)
    return data


# A packed chunk is read with the window of its pack around it: one ranged GET brings the
# neighbours a restore asks for next (publish packs a tree's small files in path order, the
# order a restore fills them), so a cold restore costs about (bytes / window) requests, not
# one per file. Publish writes packs no larger than a chunk, so a window is a whole pack.
PACK_WINDOW = 8 * 1024 * 1024
# Windows kept for the chunks still to be asked of them; least recently used go first, and
# any not asked for in PACK_IDLE seconds (the restore that read them is over).
PACK_BUFFER = 64 * 1024 * 1024
PACK_IDLE = 5.0


def adjacent(a: Chunk, b: Chunk) -> bool:
    """Whether `b`'s stored bytes start, in the same pack, where `a`'s end: one ranged GET
    reads both."""
    p, q = a.packed, b.packed
    return p is not None and q is not None and p.pack == q.pack and p.offset + p.length == q.offset


class ChunkRun:
    """Adjacent packed chunks (each `adjacent` to the one before) read from the origin in
    order with one ranged GET (origin.PackRun): `next()` gives each one's raw bytes,
    verified on the thread that received them."""

    def __init__(self, run: PackRun, chunks: Sequence[Chunk], url: str) -> None:
        self._run = run
        self._chunks = chunks
        self._url = url
        self._next = 0

    def __repr__(self) -> str:
        return f"ChunkRun({self._next}/{len(self._chunks)}, {self._run!r})"

    async def next(self) -> bytes | memoryview:
        """The next chunk's raw bytes, verified: ChunkCorrupt if they are not its own (the
        run goes on with the one after), ChunkMissing if the pack is not there."""
        c = self._chunks[self._next]
        self._next += 1
        assert c.packed is not None
        try:
            return await self._run.read(c.packed.length, functools.partial(codec.decode, c))
        except ChunkCorrupt as e:
            raise ChunkCorrupt(f"{e.message} ({stored_at(c, self._url)})") from e

    def close(self) -> None:
        self._run.close()


class OriginSource:
    """The origin: the last resort, always asked last.

    `window` = 0 reads each packed chunk's own byte range: an owner's pull-through for its
    peers, whose neighbours in the pack belong to other owners (reading the window there
    would multiply the fleet's egress by the hosts sharing it)."""

    name = "origin"

    def __init__(
        self, origin: Origin, *, window: int = PACK_WINDOW, buffer: int = PACK_BUFFER
    ) -> None:
        self.origin = origin
        self.window = window
        self.buffer = buffer
        self._windows: OrderedDict[tuple[bytes, int], memoryview] = OrderedDict()
        self._used: dict[tuple[bytes, int], float] = {}  # loop time of each one's last use
        self._held = 0
        self._loading: dict[tuple[bytes, int], asyncio.Task[memoryview]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._distrusted: dict[tuple[bytes, int], float] = {}  # windows not kept, until

    def __repr__(self) -> str:
        return f"OriginSource({self.origin.url}, window={self.window})"

    async def get(self, chunk: Chunk) -> bytes | memoryview:
        stored = await self._stored(chunk)
        try:
            if chunk.size <= INLINE_VERIFY and len(stored) <= INLINE_VERIFY:
                return codec.decode(chunk, stored)  # ~20 us: cheaper than a thread hop
            return await asyncio.to_thread(codec.decode, chunk, stored)
        except ChunkCorrupt as e:
            self._spoilt(chunk)
            raise ChunkCorrupt(f"{e.message} ({stored_at(chunk, self.origin.url)})") from e

    def _spoilt(self, chunk: Chunk) -> None:
        """A chunk cut from a window did not verify: the window goes (it would serve the
        same bad bytes to every retry until idle), and for PACK_IDLE it is read for each
        ask, never kept (a read meanwhile may be as bad)."""
        key = self._span(chunk.packed) if chunk.packed is not None else None
        if key is None:
            return
        now = asyncio.get_running_loop().time()
        if len(self._distrusted) > 4096:
            self._distrusted = {k: t for k, t in self._distrusted.items() if t > now}
        self._distrusted[key] = now + PACK_IDLE
        data = self._windows.pop(key, None)
        if data is not None:
            del self._used[key]
            self._held -= len(data)

    def ranged(self, chunks: Sequence[Chunk]) -> ChunkRun:
        """A reader of `chunks`, each `adjacent` to the one before (Fetcher.streaming)."""
        first, last = chunks[0].packed, chunks[-1].packed
        assert first is not None
        assert last is not None
        length = last.offset + last.length - first.offset
        run = self.origin.pack_run(first.pack, first.offset, length, first.pack_size)
        return ChunkRun(run, chunks, self.origin.url)

    async def whole_packs(self, pack: bytes) -> bool:
        return not await self.origin.answers_ranges(pack)

    async def get_many(self, chunks: Sequence[Chunk]) -> list[bytes | memoryview | BaseException]:
        """`get` for a batch (Fetcher.landing), one outcome each: every pack window the
        batch needs is read once, and the lot is decoded and verified on one thread, so
        the event loop hashes nothing (BLAKE3 lets go of the GIL for a few KiB and takes it
        back behind every other thread: ~50 µs a small chunk on a busy loop)."""
        stored: dict[int, bytes | memoryview | BaseException] = {}  # by the chunk's index
        windows: dict[tuple[bytes, int], list[int]] = {}
        singles: list[int] = []
        for i, c in enumerate(chunks):
            p = c.packed
            span = self._span(p) if p is not None else None
            if span is None:
                singles.append(i)
            else:
                windows.setdefault(span, []).append(i)

        async def one(i: int) -> None:
            try:
                stored[i] = await self._stored(chunks[i])
            except Exception as e:
                stored[i] = e

        async def window(key: tuple[bytes, int], idx: list[int]) -> None:
            first = chunks[idx[0]].packed
            assert first is not None
            start = key[1] * self.window
            try:
                data = await self._window(key, start, first.pack_size)
            except Exception as e:
                for i in idx:
                    stored[i] = e
                return
            for i in idx:
                p = chunks[i].packed
                assert p is not None
                stored[i] = data[p.offset - start : p.offset - start + p.length]

        await asyncio.gather(
            *(window(k, idx) for k, idx in windows.items()), *(one(i) for i in singles)
        )
        got = [stored[i] for i in range(len(chunks))]  # every read filled its chunks' slots
        out = await asyncio.to_thread(_decode_all, chunks, got, self.origin.url)
        for c, r in zip(chunks, out, strict=True):
            if isinstance(r, ChunkCorrupt):
                self._spoilt(c)
        return out

    async def _stored(self, chunk: Chunk) -> bytes | memoryview:
        """A chunk's bytes as the origin stores them (raw or zstd), not verified yet."""
        if chunk.packed is not None:
            return await self._packed(chunk.packed)
        # The object may be raw or zstd whatever the manifest says, so the cap admits
        # both; a larger one is ChunkCorrupt from get_chunk, refused before it is buffered.
        return await self.origin.get_chunk(chunk.id, codec.max_stored_size(chunk.size))

    def _span(self, p: Packed) -> tuple[bytes, int] | None:
        """(pack, window number) of the window that holds all of a packed chunk; None where
        windows are off or the chunk crosses a window's edge."""
        if not self.window:
            return None
        w = p.offset // self.window
        if p.offset + p.length > min((w + 1) * self.window, p.pack_size):
            return None
        return p.pack, w

    async def _packed(self, p: Packed) -> memoryview:
        """A packed chunk's stored bytes, from its pack window (read once, shared by every
        chunk asked of it while it is buffered) or, where it crosses a window's edge or
        windows are off, from a ranged GET of its own bytes."""
        key = self._span(p)
        if key is None:
            return await self.origin.get_pack_range(p.pack, p.offset, p.length, p.pack_size)
        start = key[1] * self.window
        data = await self._window(key, start, p.pack_size)
        return data[p.offset - start : p.offset - start + p.length]

    async def _window(self, key: tuple[bytes, int], start: int, pack_size: int) -> memoryview:
        """One window of a pack: buffered, being read (joined), or read now."""
        data = self._windows.get(key)
        if data is not None:
            self._windows.move_to_end(key)
            self._used[key] = asyncio.get_running_loop().time()
            return data
        task = self._loading.get(key)
        if task is None:
            end = min(start + self.window, pack_size)
            task = asyncio.create_task(self._load(key, start, end - start, pack_size))
            task.add_done_callback(unheard)  # (a failure all its readers left is no news)
            self._loading[key] = task
        # Shielded: other chunks wait on the same window; a read this caller gives up on
        # still lands in the buffer for them (one GET of a few MiB, bounded by timeout).
        return await asyncio.shield(task)

    async def _load(
        self, key: tuple[bytes, int], start: int, length: int, pack_size: int
    ) -> memoryview:
        try:
            data = await self.origin.get_pack_range(key[0], start, length, pack_size)
        finally:
            del self._loading[key]
        loop = asyncio.get_running_loop()
        until = self._distrusted.get(key)
        if until is not None:
            if loop.time() < until:
                return data  # for the chunks waiting on this read alone
            del self._distrusted[key]
        self._windows[key] = data
        self._used[key] = loop.time()
        self._held += len(data)
        while self._held > self.buffer and len(self._windows) > 1:
            self._drop_oldest()
        if self._expiry is None:
            self._expiry = loop.call_later(PACK_IDLE, self._expire)
        return data

    def _drop_oldest(self) -> None:
        old_key, old = self._windows.popitem(last=False)
        del self._used[old_key]
        self._held -= len(old)

    def _expire(self) -> None:
        """Drop the windows no chunk was asked of for PACK_IDLE seconds (oldest first)."""
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - PACK_IDLE
        while self._windows and self._used[next(iter(self._windows))] <= cutoff:
            self._drop_oldest()
        self._expiry = loop.call_later(PACK_IDLE, self._expire) if self._windows else None
