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
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from hostd.core.manifest import Chunk
from hostd.errors import ChunkCorrupt, ChunkMissing
from hostd.sources import BatchSource, ChunkSource

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


Landed = tuple[bytes | memoryview, str]
"""A chunk's verified raw bytes and the name of the source that gave them."""


@dataclass
class _Flight:
    # get's own task, or a future a batch of get_many sets
    task: asyncio.Future[Landed]
    waiters: int = 0
    abandoned: bool = False  # cancelled by its last waiter leaving; may still be unwinding


class Fetcher:
    def __init__(self, sources: Sequence[ChunkSource], concurrency: int) -> None:
        self.sources = list(sources)
        # The sources as batch sources, when every one answers batches (get_many); else None.
        self._batched: list[BatchSource] | None = (
            [s for s in self.sources if isinstance(s, BatchSource)]
            if all(isinstance(s, BatchSource) for s in self.sources)
            else None
        )
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

    async def get(self, chunk: Chunk, priority: Priority) -> Landed:
        fl, _ = self._join(chunk, functools.partial(self._start, chunk, priority))
        try:
            return await asyncio.shield(fl.task)
        finally:
            self._leave(fl)

    def _join(
        self, chunk: Chunk, start: Callable[[], asyncio.Future[Landed]]
    ) -> tuple[_Flight, bool]:
        """The flight of `chunk`, with one more waiter: the one in the air, or a new one that
        `start` makes (then True)."""
        fl = self._flights.get(chunk)
        # An abandoned flight stays registered until its cancellation has unwound: joining it
        # would raise CancelledError in a caller nobody cancelled. Start a new one instead.
        fresh = fl is None or fl.abandoned
        if fl is None or fl.abandoned:
            fl = _Flight(start())
            self._flights[chunk] = fl
            fl.task.add_done_callback(functools.partial(self._landed, chunk, fl))
        else:
            self.stats.joins += 1
        fl.waiters += 1
        return fl, fresh

    def _start(self, chunk: Chunk, priority: Priority) -> asyncio.Task[Landed]:
        return asyncio.create_task(self._load(chunk, priority))

    @staticmethod
    def _leave(fl: _Flight) -> None:
        fl.waiters -= 1
        if fl.waiters == 0 and not fl.task.done():
            fl.abandoned = True
            fl.task.cancel()  # nobody wants it any more

    async def landing(
        self, chunks: Sequence[Chunk], priority: Priority
    ) -> AsyncGenerator[tuple[int, Landed | BaseException], None]:
        """`get` for several distinct chunks (a run of small files): yields (index, outcome)
        as each lands, the outcome being the landed bytes or the exception `get` would have
        raised for that chunk. Use it under contextlib.aclosing: leaving early is a waiter
        leaving each chunk still in flight.

        Each chunk still has its own flight, which anyone asking for it meanwhile joins,
        and a chunk already in flight is joined. The others are asked of each source
        together, under one limiter slot: a source with `get_many` answers the lot in one
        go (the origin reads a pack window once and verifies the lot on one thread), and
        costs the event loop a few µs a chunk where one `get` each costs ~100."""
        loop = asyncio.get_running_loop()
        batched = self._batched
        flights: list[_Flight] = []
        new: list[tuple[Chunk, asyncio.Future[Landed]]] = []
        for c in chunks:
            if batched is None:  # a source answers one chunk at a time: each chunk flies
                fl, _ = self._join(c, functools.partial(self._start, c, priority))
            else:  # alone, as get makes it; else the batch below settles the new flights
                fl, fresh = self._join(c, loop.create_future)
                if fresh:
                    new.append((c, fl.task))
            flights.append(fl)
        if new and batched is not None:
            batch = asyncio.create_task(self._load_many(batched, new, priority))
            open_flights = len(new)

            def gone(_fut: object) -> None:  # every flight of the batch ended: stop it
                nonlocal open_flights
                open_flights -= 1
                if not open_flights and not batch.done():
                    batch.cancel()

            for _, f in new:
                f.add_done_callback(gone)
        waiting = {fl.task: i for i, fl in enumerate(flights)}
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=waiting.__getitem__):
                    i = waiting.pop(task)
                    if task.cancelled():
                        raise asyncio.CancelledError()  # the fetcher is closing
                    exc = task.exception()
                    yield i, (task.result() if exc is None else exc)
        finally:
            for fl in flights:
                self._leave(fl)

    async def _load_many(
        self,
        sources: Sequence[BatchSource],
        items: list[tuple[Chunk, asyncio.Future[Landed]]],
        priority: Priority,
    ) -> None:
        """Settle every future of `items`: `_load` for a batch."""
        try:
            async with self.limiter.slot(priority):
                problems: dict[Chunk, list[str]] = {}
                corrupt: set[Chunk] = set()
                left = items
                for src in sources:
                    left = [(c, f) for c, f in left if not f.done()]
                    if not left:
                        break
                    got = await src.get_many([c for c, _ in left])
                    keep: list[tuple[Chunk, asyncio.Future[Landed]]] = []
                    for (c, f), r in zip(left, got, strict=True):
                        if f.done():
                            continue
                        if isinstance(r, ChunkMissing | ChunkCorrupt):
                            if self._passed(src.name, r, problems.setdefault(c, [])):
                                corrupt.add(c)
                            keep.append((c, f))
                        elif isinstance(r, BaseException):
                            f.set_exception(r)  # as get would raise it
                        else:
                            f.set_result(self._landed_from(src.name, r))
                    left = keep
                for c, f in left:
                    if not f.done():
                        f.set_exception(_nowhere(c, problems.get(c, []), c in corrupt))
        except BaseException as exc:
            for _, f in items:
                if not f.done():
                    if isinstance(exc, asyncio.CancelledError):
                        f.cancel()
                    else:
                        f.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def _landed(self, key: Chunk, fl: _Flight, _task: object) -> None:
        if self._flights.get(key) is fl:
            del self._flights[key]

    async def _load(self, chunk: Chunk, priority: Priority) -> Landed:
        async with self.limiter.slot(priority):
            problems: list[str] = []
            corrupt = False
            for src in self.sources:
                try:
                    data = await src.get(chunk)
                except (ChunkMissing, ChunkCorrupt) as e:
                    corrupt |= self._passed(src.name, e, problems)
                    continue
                return self._landed_from(src.name, data)
        raise _nowhere(chunk, problems, corrupt)

    def _landed_from(self, name: str, data: bytes | memoryview) -> Landed:
        self.stats.chunks[name] += 1
        self.stats.bytes[name] += len(data)
        return data, name

    def _passed(self, name: str, e: ChunkMissing | ChunkCorrupt, problems: list[str]) -> bool:
        """Count a source that did not have a chunk, or had it bad (returns True then), and
        note why: the next source is asked."""
        problems.append(f"{name}: {e.message}")
        if isinstance(e, ChunkMissing):
            self.stats.missing[name] += 1
            return False
        self.stats.corrupt[name] += 1
        log.warning("corrupt chunk from %s: %s", name, e.message)
        return True

    async def close(self) -> None:
        for fl in list(self._flights.values()):
            fl.task.cancel()
        await asyncio.gather(*(f.task for f in self._flights.values()), return_exceptions=True)


def _nowhere(chunk: Chunk, problems: list[str], corrupt: bool) -> ChunkMissing | ChunkCorrupt:
    """What a chunk no source gave intact raises, with each source's reason."""
    detail = "; ".join(problems)
    if corrupt:
        return ChunkCorrupt(f"chunk {chunk.id.hex()} could not be fetched intact ({detail})")
    return ChunkMissing(f"chunk {chunk.id.hex()} is in no source ({detail})")
