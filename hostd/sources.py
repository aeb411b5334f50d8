"""Chunk sources: where a missing chunk can come from, behind one small interface.

A source's `get(chunk)` returns the chunk's raw bytes *verified against its id*, or raises
ChunkMissing (try the next source) or ChunkCorrupt (counted, never cached; try the next
source). Ordering, single-flight and concurrency limits live in fetch.py, not here. Peers
will be another source in this list.
"""

from __future__ import annotations

import asyncio
import os
from typing import Protocol

from hostd.cache import Cache, Verdict
from hostd.core import codec
from hostd.core.manifest import Chunk
from hostd.errors import ChunkCorrupt, ChunkMissing
from hostd.origin import Origin
from hostd.tier import pread_exact

# Chunks up to this size are verified on the event loop: hashing 256 KiB takes about 40 us,
# less than handing it to a thread and back.
INLINE_VERIFY = 256 * 1024


class ChunkSource(Protocol):
    name: str

    async def get(self, chunk: Chunk) -> bytes | memoryview: ...


class LocalBlobSource:
    """Another complete local blob that holds the same chunk (dedup across files/snapshots)."""

    name = "dedup"

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def __repr__(self) -> str:
        return "LocalBlobSource()"

    async def get(self, chunk: Chunk) -> bytes:
        loc = self.cache.chunk_location(chunk.id)
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


class OriginSource:
    """The origin: the last resort, always asked last."""

    name = "origin"

    def __init__(self, origin: Origin) -> None:
        self.origin = origin

    def __repr__(self) -> str:
        return f"OriginSource({self.origin.url})"

    async def get(self, chunk: Chunk) -> bytes | memoryview:
        # The object may be raw or zstd whatever the manifest says, so the cap admits both;
        # a larger one is ChunkCorrupt from get_chunk, refused before it is buffered.
        stored = await self.origin.get_chunk(chunk.id, codec.max_stored_size(chunk.size))
        try:
            if chunk.size <= INLINE_VERIFY and len(stored) <= INLINE_VERIFY:
                return codec.decode(chunk, stored)  # ~20 us: cheaper than a thread hop
            return await asyncio.to_thread(codec.decode, chunk, stored)
        except ChunkCorrupt as e:
            raise ChunkCorrupt(f"{e.message} (from origin {self.origin.url})") from e
