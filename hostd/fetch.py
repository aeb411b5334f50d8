"""The fetch scheduler shared by every restore: one flight per chunk, bounded, ordered.

`Fetcher.get(chunk, priority)` returns a chunk's verified raw bytes and the source name.
Callers that want the same chunk at once join one flight (groupcache's single-flight), so 8
restores of one snapshot fetch each chunk once. Flights run under a priority limiter: the
lowest (restore sequence, file order) goes first, so fetch order follows load order. A flight
is owned by the fetcher and cancelled when its last waiter leaves.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from hostd.core.manifest import Chunk
from hostd.errors import ChunkCorrupt, ChunkMissing
from hostd.sources import ChunkSource

log = logging.getLogger(__name__)

Priority = tuple[int, ...]


class PriorityLimiter:
    """At most `limit` holders; waiters are admitted lowest priority first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: list[tuple[Priority, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __repr__(self) -> str:
        return f"PriorityLimiter({self.active}/{self.limit}, waiting={len(self._waiters)})"

    @asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        if self.active < self.limit and not self._waiters:
            self.active += 1
        else:
            fut = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (priority, next(self._seq), fut))
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release()  # the slot was handed to us as we were cancelled
                else:
                    fut.cancel()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        self.active -= 1


@dataclass
class FetchStats:
    chunks: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    missing: Counter[str] = field(default_factory=Counter)
    corrupt: Counter[str] = field(default_factory=Counter)
    joins: int = 0


@dataclass
class _Flight:
    task: asyncio.Task[tuple[bytes | memoryview, str]]
    waiters: int = 0
    abandoned: bool = False  # cancelled by its last waiter leaving; may still be unwinding


class Fetcher:
    def __init__(self, sources: Sequence[ChunkSource], concurrency: int) -> None:
        self.sources = list(sources)
        self.limiter = PriorityLimiter(concurrency)
        self.stats = FetchStats()
        self._flights: dict[Chunk, _Flight] = {}  # by id, size and codec: a flight asked
        # with a wrong size (a peer's pull) must not fail the right one

    def __repr__(self) -> str:
        names = ",".join(s.name for s in self.sources)
        return f"Fetcher([{names}], in_flight={len(self._flights)}, {self.limiter})"

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def get(self, chunk: Chunk, priority: Priority) -> tuple[bytes | memoryview, str]:
        fl = self._flights.get(chunk)
        # An abandoned flight stays registered until its cancellation has unwound: joining it
        # would raise CancelledError in a caller nobody cancelled. Start a new one instead.
        if fl is None or fl.abandoned:
            fl = _Flight(asyncio.create_task(self._load(chunk, priority)))
            self._flights[chunk] = fl
            fl.task.add_done_callback(functools.partial(self._landed, chunk, fl))
        else:
            self.stats.joins += 1
        fl.waiters += 1
        try:
            return await asyncio.shield(fl.task)
        finally:
            fl.waiters -= 1
            if fl.waiters == 0 and not fl.task.done():
                fl.abandoned = True
                fl.task.cancel()  # nobody wants it any more

    def _landed(self, key: Chunk, fl: _Flight, _task: object) -> None:
        if self._flights.get(key) is fl:
            del self._flights[key]

    async def _load(self, chunk: Chunk, priority: Priority) -> tuple[bytes | memoryview, str]:
        async with self.limiter.slot(priority):
            problems: list[str] = []
            corrupt = False
            for src in self.sources:
                try:
                    data = await src.get(chunk)
                except ChunkMissing as e:
                    self.stats.missing[src.name] += 1
                    problems.append(f"{src.name}: {e.message}")
                    continue
                except ChunkCorrupt as e:
                    self.stats.corrupt[src.name] += 1
                    corrupt = True
                    log.warning("corrupt chunk from %s: %s", src.name, e.message)
                    problems.append(f"{src.name}: {e.message}")
                    continue
                self.stats.chunks[src.name] += 1
                self.stats.bytes[src.name] += len(data)
                return data, src.name
        detail = "; ".join(problems)
        if corrupt:
            raise ChunkCorrupt(f"chunk {chunk.id.hex()} could not be fetched intact ({detail})")
        raise ChunkMissing(f"chunk {chunk.id.hex()} is in no source ({detail})")

    async def close(self) -> None:
        for fl in list(self._flights.values()):
            fl.task.cancel()
        await asyncio.gather(*(f.task for f in self._flights.values()), return_exceptions=True)
