"""The fetch scheduler shared by every restore: one flight per chunk, bounded, ordered.

`Fetcher.get(chunk, priority)` returns a chunk's verified raw bytes and the source name.
Callers that want the same chunk at once join one flight (groupcache's single-flight), so 8
restores of one snapshot fetch each chunk once. Flights run under a priority limiter: the
lowest (restore sequence, file order) goes first, so fetch order follows load order. A flight
is owned by the fetcher and cancelled when its last waiter leaves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import heapq
import itertools
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from hostd.core.manifest import Chunk
from hostd.errors import ChunkCorrupt, ChunkMissing, unheard
from hostd.sources import BatchSource, ChunkRun, ChunkSource, adjacent

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


class ByteBudget:
    """Bytes held at once, whatever the number of requests: `take(n)` waits until n more
    fit under the limit (first come, first served), `give(n)` hands them back. A take larger
    than the whole limit is let through alone, when nothing else is held, so no request can
    wait forever."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def __repr__(self) -> str:
        return f"ByteBudget({self.held}/{self.limit}, waiting={len(self._waiting)})"

    async def take(self, n: int) -> None:
        if not self._waiting and self._fits(n):
            self.held += n
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiting.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.give(n)  # granted as we were cancelled: hand it on
            else:
                with contextlib.suppress(ValueError):  # (_wake may have dropped it)
                    self._waiting.remove(entry)
                self._wake()  # those behind us may fit now
            raise

    def give(self, n: int) -> None:
        self.held -= n
        self._wake()

    def _fits(self, n: int) -> bool:
        return self.held + n <= self.limit or self.held == 0

    def _wake(self) -> None:
        while self._waiting:
            n, fut = self._waiting[0]
            if fut.done():  # cancelled, its task not yet told
                self._waiting.popleft()
                continue
            if not self._fits(n):
                return
            self._waiting.popleft()
            self.held += n
            fut.set_result(None)


@dataclass
class FetchStats:
    chunks: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    missing: Counter[str] = field(default_factory=Counter)
    corrupt: Counter[str] = field(default_factory=Counter)
    joins: int = 0


@runtime_checkable
class RangedSource(BatchSource, Protocol):
    """A source that reads adjacent packed chunks with one request (the origin)."""

    def ranged(self, chunks: Sequence[Chunk]) -> ChunkRun: ...

    async def whole_packs(self, pack: bytes) -> bool:
        """Whether a run reads its pack whole (a server that answers no ranges)."""
        ...


@runtime_checkable
class HoldingSource(ChunkSource, Protocol):
    """A source that tells, without reading, whether it may hold a chunk (local blobs)."""

    def holds(self, chunk: Chunk) -> bool: ...


Landed = tuple[bytes | memoryview, str]
"""A chunk's verified raw bytes and the name of the source that gave them."""


@dataclass
class _Flight:
    # get's own task, or a future a batch of get_many sets
    task: asyncio.Future[Landed]
    waiters: int = 0
    abandoned: bool = False  # cancelled by its last waiter leaving; may still be unwinding
    # A streaming run's flight: set when anyone joins one of the run's flights
    joined: asyncio.Event | None = None


class Fetcher:
    def __init__(self, sources: Sequence[ChunkSource], concurrency: int) -> None:
        self.sources = list(sources)
        # The sources as batch sources, when every one answers batches (get_many); else None.
        self._batched: list[BatchSource] | None = (
            [s for s in self.sources if isinstance(s, BatchSource)]
            if all(isinstance(s, BatchSource) for s in self.sources)
            else None
        )
        # The last source, where it reads adjacent packed chunks with one request and every
        # source before it tells whether it holds a chunk without reading it (local blobs;
        # not peers, which answer a chunk at a time); else None.
        last = self.sources[-1] if self.sources else None
        local = self.sources[:-1]
        self._ranged = (
            last
            if isinstance(last, RangedSource) and all(isinstance(s, HoldingSource) for s in local)
            else None
        )
        self._local: list[HoldingSource] = [s for s in local if isinstance(s, HoldingSource)]
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
            if fl.joined is not None:
                fl.joined.set()
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

    @property
    def streams(self) -> bool:
        """Whether `streaming` reads runs of adjacent packed chunks with one request."""
        return self._ranged is not None

    async def whole_packs(self, chunk: Chunk) -> bool:
        """Whether `streaming` reads the pack of a run that starts with `chunk` whole (its
        server answers no ranges): then a run had best be the whole pack."""
        p = chunk.packed
        return self._ranged is not None and p is not None and await self._ranged.whole_packs(p.pack)

    async def streaming(
        self, chunks: Sequence[Chunk], priority: Priority, budget: ByteBudget
    ) -> AsyncGenerator[tuple[int, Landed | BaseException, int], None]:
        """`get` for a run of packed chunks in pack order, most `adjacent` to the one before
        (a large file's, where `streams`; a gap starts another ranged GET): yields (index,
        outcome, held) in order, the outcome as `landing`'s, `held` the bytes of `budget`
        taken for it, which the caller gives back once done with the bytes. Use it under
        contextlib.aclosing.

        Each chunk has its own flight, as with `get`: one in the air is joined, and anyone
        asking for one of these meanwhile joins it. The run's own chunks that no local blob
        holds are read from the origin with one ranged GET, received a chunk at a time and
        only when the caller asks for the next one (a local one is read then, too): a chunk's
        share of `budget` is taken (then a limiter slot, as `get` does) before its bytes are
        received, so a run holds one chunk's bytes at a time, and no more than `budget` is
        held whatever the number of runs. Two exceptions keep anyone from waiting on budget
        that those waiting on it hold: a chunk joined from another flight takes none, and
        once anyone joins one of this run's flights, the run reads on without (its joiners,
        a batch of small files or another run, hold budget or bytes for it)."""
        ranged = self._ranged
        assert ranged is not None
        loop = asyncio.get_running_loop()
        joined = asyncio.Event()
        flights: list[_Flight | None] = []  # None once left (its bytes are the caller's)
        owned: list[int] = []  # the chunks whose flights this run settles
        for i, c in enumerate(chunks):
            flight, fresh = self._join(c, loop.create_future)
            flights.append(flight)
            if fresh:
                flight.joined = joined
                owned.append(i)
        problems: dict[int, list[str]] = collections.defaultdict(list)
        # owned, and in no local blob (a local one is read when reached, and the origin
        # asked for it alone if it is gone by then)
        remote = {i for i in owned if not any(s.holds(chunks[i]) for s in self._local)}
        run: ChunkRun | None = None
        run_to = -1  # the last chunk `run` reads
        try:
            for i, c in enumerate(chunks):
                fl = flights[i]
                assert fl is not None
                held = 0
                if not fl.task.done() and fl.joined is joined:  # ours to read
                    held = await _take(budget, c.size, joined)
                    try:
                        if i not in remote:
                            await self._read_local(c, fl, problems[i], priority)
                        if not fl.task.done():
                            if run is None or i > run_to:
                                if run is not None:
                                    run.close()
                                run_to = _run_end(chunks, flights, remote, i)
                                run = ranged.ranged(chunks[i : run_to + 1])
                            await self._read_next(ranged.name, run, c, fl, problems[i], priority)
                    except BaseException:
                        budget.give(held)
                        raise
                try:
                    outcome: Landed | BaseException = await asyncio.shield(fl.task)
                except asyncio.CancelledError:
                    budget.give(held)
                    if fl.task.cancelled():
                        raise asyncio.CancelledError() from None  # the fetcher is closing
                    raise
                except Exception as e:
                    outcome = e
                # Left at once: the flight, and so the bytes, are not kept for the run.
                flights[i] = None
                self._leave(fl)
                yield i, outcome, held
                del outcome, fl
        finally:
            if run is not None:
                run.close()
            for i in owned:
                left = flights[i]
                if left is not None and not left.task.done() and left.waiters > 1:
                    self._hand_over(chunks[i], left, priority)
            for left in flights:
                if left is not None:
                    self._leave(left)

    async def _read_local(
        self, chunk: Chunk, fl: _Flight, problems: list[str], priority: Priority
    ) -> None:
        """Settle a run's flight from a local blob, if one still holds the chunk; else note
        why not (the origin is asked next)."""
        for src in self._local:
            try:
                async with self.limiter.slot(priority):
                    data = await src.get(chunk)
            except (ChunkMissing, ChunkCorrupt) as e:
                self._passed(src.name, e, problems)
                continue
            except Exception as e:
                fl.task.set_exception(e)
                return
            fl.task.set_result(self._landed_from(src.name, data))
            return

    async def _read_next(
        self,
        name: str,
        run: ChunkRun,
        chunk: Chunk,
        fl: _Flight,
        problems: list[str],
        priority: Priority,
    ) -> None:
        """Receive `run`'s next chunk (`chunk`) under a limiter slot and settle its flight."""
        fut = fl.task
        try:
            async with self.limiter.slot(priority):
                data = await run.next()
        except (ChunkMissing, ChunkCorrupt) as e:
            corrupt = self._passed(name, e, problems)
            if not fut.done():
                fut.set_exception(_nowhere(chunk, problems, corrupt))
        except Exception as e:
            if not fut.done():
                fut.set_exception(e)
        else:
            if not fut.done():
                fut.set_result(self._landed_from(name, data))

    def _hand_over(self, chunk: Chunk, fl: _Flight, priority: Priority) -> None:
        """A run's flight that others wait on, left unread as the run stops: a `get` of its
        own settles it."""
        fut = fl.task
        task = asyncio.create_task(self._load(chunk, priority))

        def settle(t: asyncio.Task[Landed]) -> None:
            if fut.done():
                return
            if t.cancelled():
                fut.cancel()
            elif (exc := t.exception()) is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(t.result())

        task.add_done_callback(settle)
        fut.add_done_callback(lambda f: task.cancel() if f.cancelled() else None)

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

    def _landed(self, key: Chunk, fl: _Flight, task: asyncio.Future[Landed]) -> None:
        if self._flights.get(key) is fl:
            del self._flights[key]
        unheard(task)  # its waiters get its outcome; one that all of them left, nobody

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


async def _take(budget: ByteBudget, n: int, joined: asyncio.Event) -> int:
    """`n` bytes of `budget` for a chunk a run reads: what was taken, 0 if anyone joins one
    of the run's flights first (or had)."""
    if joined.is_set():
        return 0
    take = asyncio.ensure_future(budget.take(n))
    wake = asyncio.ensure_future(joined.wait())
    try:
        await asyncio.wait({take, wake}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        wake.cancel()
        if not take.done():
            take.cancel()  # (a take granted as it is cancelled gives its bytes back)
    await asyncio.wait({take})  # (its cancel unwound; ours would still raise here)
    return 0 if take.cancelled() else n


def _run_end(
    chunks: Sequence[Chunk], flights: Sequence[_Flight | None], remote: set[int], i: int
) -> int:
    """The last of the chunks from `i` on that one ranged GET reads: adjacent, each one's
    flight this run's to settle from the origin (`remote`) and not settled yet."""
    j = i
    while j + 1 < len(chunks) and adjacent(chunks[j], chunks[j + 1]) and j + 1 in remote:
        nxt = flights[j + 1]
        if nxt is None or nxt.task.done():
            break
        j += 1
    return j


def _nowhere(chunk: Chunk, problems: list[str], corrupt: bool) -> ChunkMissing | ChunkCorrupt:
    """What a chunk no source gave intact raises, with each source's reason."""
    detail = "; ".join(problems)
    if corrupt:
        return ChunkCorrupt(f"chunk {chunk.id.hex()} could not be fetched intact ({detail})")
    return ChunkMissing(f"chunk {chunk.id.hex()} is in no source ({detail})")
