"""A chunk source in memory for fetch and fill tests, and helpers to make chunked content.

`FakeSource` keeps the ChunkSource contract that test_fetch.py checks it against, beside the
real sources: `get` returns bytes verified against the chunk id, or raises ChunkMissing or
ChunkCorrupt naming the chunk. It also counts calls, records the order calls arrive in, and
can hold a call on an asyncio.Event gate, so tests order concurrent events without sleeps.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import blake3

from hostd.core import codec
from hostd.core.ids import chunk_id
from hostd.core.manifest import Chunk, FileEntry
from hostd.errors import ChunkMissing

DEADLINE = 5.0  # every wait in these tests ends well inside this, or the test fails


def pattern(seed: str, size: int) -> bytes:
    """`size` bytes that differ from every other seed's (so no two test files dedup)."""
    out = bytearray()
    n = 0
    while len(out) < size:
        out += blake3.blake3(f"{seed}/{n}".encode()).digest(length=4096)
        n += 1
    return bytes(out[:size])


# The mtime test entries record: a fixed, recognisable moment (2023-11-14 22:13:20 UTC).
MTIME = 1_700_000_000_123_456_789


def file_entry(
    path: str, data: bytes, chunk_size: int, mode: int = 0o644, mtime: int = MTIME
) -> FileEntry:
    chunks = tuple(
        Chunk(chunk_id(data[o : o + chunk_size]), len(data[o : o + chunk_size]))
        for o in range(0, len(data), chunk_size)
    )
    return FileEntry(path, mode, len(data), chunks, mtime)


class FakeSource:
    """Chunks held in a dict of stored bytes; gates, counters and an arrival log for tests."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.stored: dict[bytes, bytes] = {}
        self.calls: Counter[bytes] = Counter()
        self.order: list[bytes] = []  # chunk ids, in the order calls arrived
        self.cancelled: list[bytes] = []  # chunk ids whose call was cancelled while held
        self.gates: dict[bytes, asyncio.Event] = {}  # a gated chunk waits for its event
        self.gate_all: asyncio.Event | None = None  # when set up, every call waits for it
        self._changed = asyncio.Condition()

    def __repr__(self) -> str:
        return f"FakeSource({self.name!r}, {len(self.stored)} chunks, {len(self.order)} calls)"

    # content -------------------------------------------------------------------------------
    def add(self, data: bytes) -> Chunk:
        c = Chunk(chunk_id(data), len(data))
        self.stored[c.id] = data
        return c

    def add_file(self, e: FileEntry, data: bytes, chunk_size: int) -> None:
        for i, c in enumerate(e.chunks):
            self.stored[c.id] = data[i * chunk_size : i * chunk_size + c.size]

    def spoil(self, c: Chunk) -> None:
        """Keep the chunk, but with one byte flipped: it no longer hashes to its id."""
        good = self.stored[c.id]
        self.stored[c.id] = bytes([good[0] ^ 0xFF]) + good[1:]

    def gate(self, c: Chunk) -> asyncio.Event:
        ev = self.gates[c.id] = asyncio.Event()
        return ev

    # waiting on what happened --------------------------------------------------------------
    async def until(self, what: Callable[[FakeSource], bool]) -> None:
        async with asyncio.timeout(DEADLINE), self._changed:
            await self._changed.wait_for(lambda: what(self))

    async def arrived(self, n: int) -> None:
        """Until at least `n` calls have arrived (held ones included)."""
        await self.until(lambda s: len(s.order) >= n)

    async def _note(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # the contract ------------------------------------------------------------------------------
    async def get(self, chunk: Chunk) -> bytes:
        self.calls[chunk.id] += 1
        self.order.append(chunk.id)
        await self._note()
        gate = self.gates.get(chunk.id, self.gate_all)
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(chunk.id)
                await asyncio.shield(self._note())
                raise
        stored = self.stored.get(chunk.id)
        if stored is None:
            raise ChunkMissing(f"chunk {chunk.id.hex()} is not in {self.name}")
        codec.verify(chunk, stored)  # ChunkCorrupt naming the chunk
        return stored
