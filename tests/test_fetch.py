"""Chunk sources and the fetcher.

One contract, run against the fake source the other tests use and against the real ones
(another local blob through a real Cache, the origin through a real file:// Origin): a get
returns raw bytes verified against the chunk id, or raises ChunkMissing or ChunkCorrupt
naming the chunk. Then the fetcher over fakes: single flight, the priority limiter's order,
cancellation of a flight when (and only when) its last waiter leaves, falling through
corrupt and missing sources, and what it raises when every source fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from chunkfakes import DEADLINE, FakeSource, file_entry, pattern

from hostd.cache import Cache
from hostd.core import manifest as mf
from hostd.core.manifest import CODEC_ZSTD, Chunk
from hostd.core.retry import RetryPolicy
from hostd.errors import ChunkCorrupt, ChunkMissing, OriginError
from hostd.fetch import Fetcher, PriorityLimiter
from hostd.index import Index
from hostd.origin import Origin
from hostd.sources import ChunkSource, LocalBlobSource, OriginSource
from hostd.tier import BlobStat, Tier

CS = mf.MIN_CHUNK_SIZE

# -- the ChunkSource contract -------------------------------------------------------------------


@dataclass
class Backend:
    """One source under test and the means to give it good, bad and short chunks.

    `put(data)` stores a file of `data` and returns its last chunk, which the source must then
    serve (at a non-zero offset when `data` spans chunks); `spoil(data)` stores it so that the
    last chunk's bytes no longer match its id; `shorten(data)` stores too few bytes of it.
    """

    source: ChunkSource
    put: Callable[[bytes], Awaitable[Chunk]]
    spoil: Callable[[bytes], Awaitable[Chunk]]
    shorten: Callable[[bytes], Awaitable[Chunk]]


def last_chunk(data: bytes) -> tuple[Chunk, bytes]:
    e = file_entry("f", data, CS)
    return e.chunks[-1], data[(len(e.chunks) - 1) * CS :]


def flip(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 0xFF])


async def fake_backend(_tmp: Path) -> AsyncIterator[Backend]:
    fake = FakeSource()

    async def put(data: bytes) -> Chunk:
        c, raw = last_chunk(data)
        fake.stored[c.id] = raw
        return c

    async def spoil(data: bytes) -> Chunk:
        c, raw = last_chunk(data)
        fake.stored[c.id] = flip(raw)
        return c

    async def shorten(data: bytes) -> Chunk:
        c, raw = last_chunk(data)
        fake.stored[c.id] = raw[:-1]
        return c

    yield Backend(fake, put, spoil, shorten)


async def local_backend(tmp: Path) -> AsyncIterator[Backend]:
    """Another complete blob in a real cache that holds the chunk (dedup)."""
    tier = Tier("disk", tmp / "disk", budget=1 << 30)
    index = Index(tmp / "index.db")
    cache = Cache([tier], index, manifests_dir=tmp / "manifests", clock=lambda: 1.0)
    cache.load()
    n = 0

    async def store(data: bytes, on_disk: bytes) -> Chunk:
        nonlocal n
        n += 1
        e = file_entry(f"f{n}", data, CS)
        cache.record_snapshot(mf.build(chunk_size=CS, files=[e]))
        t = await cache.admit(e.digest, e.size, CS, [tier])

        def write() -> BlobStat:
            pb = t.open_partial(e.digest, e.size, len(e.chunks))
            for i in range(len(e.chunks)):
                pb.write(i, i * CS, on_disk[i * CS : (i + 1) * CS])
            return pb.complete()

        cache.completed(e.digest, t, await asyncio.to_thread(write))
        return e.chunks[-1]

    async def put(data: bytes) -> Chunk:
        return await store(data, data)

    async def spoil(data: bytes) -> Chunk:
        return await store(data, flip(data))

    async def shorten(data: bytes) -> Chunk:
        c = await store(data, data)
        loc = cache.chunk_location(c.id, c.size)
        assert loc is not None
        path = loc[0].path
        os.chmod(path, 0o644)
        os.truncate(path, len(data) - 1)  # behind the cache's back
        return c

    try:
        yield Backend(LocalBlobSource(cache), put, spoil, shorten)
    finally:
        index.close()


async def origin_backend(tmp: Path) -> AsyncIterator[Backend]:
    origin = Origin(f"file://{tmp}/origin", {}, retry=RetryPolicy(3, 0.01, 0.05))

    async def put(data: bytes) -> Chunk:
        c, raw = last_chunk(data)
        await origin.put_chunk(c.id, raw)
        return c

    async def spoil(data: bytes) -> Chunk:
        c, raw = last_chunk(data)
        await origin.put_chunk(c.id, flip(raw))
        return c

    async def shorten(data: bytes) -> Chunk:
        c, raw = last_chunk(data)
        await origin.put_chunk(c.id, raw[:-1])
        return c

    try:
        yield Backend(OriginSource(origin), put, spoil, shorten)
    finally:
        await origin.close()


BACKENDS = {"fake": fake_backend, "local": local_backend, "origin": origin_backend}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async for b in BACKENDS[request.param](tmp_path):
        yield b


async def test_contract_get_returns_the_verified_raw_bytes(backend: Backend) -> None:
    one = pattern("one", 1000)
    # The chunk asked for sits at offset CS, and is a full chunk: a dedup source looks up
    # chunks of less than the smallest chunk size only as blobs of their own.
    two = pattern("two", 2 * CS)
    c1 = await backend.put(one)
    c2 = await backend.put(two)
    assert bytes(await backend.source.get(c1)) == one
    assert bytes(await backend.source.get(c2)) == two[CS:]
    assert bytes(await backend.source.get(c2)) == two[CS:]  # asking twice is fine


async def test_contract_many_gets_at_once(backend: Backend) -> None:
    datas = [pattern(f"many{i}", 500 + i) for i in range(8)]
    chunks = [await backend.put(d) for d in datas]
    got = await asyncio.gather(*(backend.source.get(c) for c in chunks * 2))
    assert [bytes(g) for g in got] == datas * 2


async def test_contract_an_absent_chunk_is_missing_and_named(backend: Backend) -> None:
    await backend.put(pattern("present", 1000))
    absent, _ = last_chunk(pattern("absent", 1000))
    with pytest.raises(ChunkMissing, match=absent.id.hex()):
        await backend.source.get(absent)


async def test_contract_bad_bytes_are_corrupt_and_named(backend: Backend) -> None:
    c = await backend.spoil(pattern("spoiled", 2 * CS))
    with pytest.raises(ChunkCorrupt, match=c.id.hex()):
        await backend.source.get(c)


async def test_contract_too_few_bytes_are_corrupt_and_named(backend: Backend) -> None:
    c = await backend.shorten(pattern("short", 2 * CS))
    with pytest.raises(ChunkCorrupt, match=c.id.hex()):
        await backend.source.get(c)


async def test_origin_source_decodes_zstd_and_checks_the_raw_bytes(tmp_path: Path) -> None:
    origin = Origin(f"file://{tmp_path}/origin", {}, retry=RetryPolicy(3, 0.01, 0.05))
    src = OriginSource(origin)
    raw = b"compressible " * 1000
    plain, _ = last_chunk(raw)
    c = Chunk(plain.id, plain.size, CODEC_ZSTD)
    packed = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)
    await origin.put_chunk(c.id, packed)
    assert bytes(await src.get(c)) == raw

    other = b"other " * 1000
    o_plain, _ = last_chunk(other)
    o = Chunk(o_plain.id, o_plain.size, CODEC_ZSTD)
    wrong = zstandard.ZstdCompressor(level=3).compress(raw)  # a valid frame, other content
    await origin.put_chunk(o.id, wrong)
    with pytest.raises(ChunkCorrupt, match=rf"{o.id.hex()}.*from origin"):
        await src.get(o)
    await origin.close()


# -- the fetcher ------------------------------------------------------------------------------


def chunk_of(seed: str, size: int = 1000) -> tuple[Chunk, bytes]:
    data = pattern(seed, size)
    c, _ = last_chunk(data)
    return c, data


async def test_concurrent_gets_of_one_chunk_share_one_flight() -> None:
    fake = FakeSource()
    c, data = chunk_of("single")
    fake.stored[c.id] = data
    release = fake.gate(c)
    fetcher = Fetcher([fake], concurrency=4)

    tasks = [asyncio.create_task(fetcher.get(c, (0, i))) for i in range(8)]
    await fake.arrived(1)  # every get above ran before the flight they share
    assert fetcher.stats.joins == 7
    assert fetcher.in_flight == 1
    release.set()
    async with asyncio.timeout(DEADLINE):
        results = await asyncio.gather(*tasks)

    assert results == [(data, "fake")] * 8
    assert fake.calls[c.id] == 1
    assert fetcher.stats.chunks["fake"] == 1
    assert fetcher.stats.bytes["fake"] == len(data)
    assert fetcher.in_flight == 0
    # The fetcher is no cache: a later get is a new flight.
    assert await fetcher.get(c, (1, 0)) == (data, "fake")
    assert fake.calls[c.id] == 2
    assert fetcher.stats.joins == 7


async def test_the_limiter_admits_the_lowest_priority_first() -> None:
    limiter = PriorityLimiter(1)
    admitted: list[str] = []
    arrived = {name: asyncio.Event() for name in "bcd"}

    async def want(name: str, prio: tuple[int, ...]) -> None:
        arrived[name].set()  # the slot request below queues before this task next yields
        async with limiter.slot(prio):
            admitted.append(name)

    async with asyncio.timeout(DEADLINE):
        async with limiter.slot((0,)):
            tasks = [
                asyncio.create_task(want("b", (3,))),
                asyncio.create_task(want("c", (1, 5))),
                asyncio.create_task(want("d", (1, 2))),
            ]
            for ev in arrived.values():
                await ev.wait()
            assert repr(limiter) == "PriorityLimiter(1/1, waiting=3)"
        await asyncio.gather(*tasks)
    assert admitted == ["d", "c", "b"]
    assert repr(limiter) == "PriorityLimiter(0/1, waiting=0)"


async def test_the_limiter_passes_on_a_slot_handed_to_a_waiter_cancelled_meanwhile() -> None:
    limiter = PriorityLimiter(1)
    admitted: list[str] = []
    arrived = {name: asyncio.Event() for name in ("first", "second", "gone")}

    async def want(name: str, prio: tuple[int, ...]) -> None:
        arrived[name].set()
        async with limiter.slot(prio):
            admitted.append(name)

    async with asyncio.timeout(DEADLINE):
        async with limiter.slot((0,)):
            first = asyncio.create_task(want("first", (1,)))
            second = asyncio.create_task(want("second", (2,)))
            gone = asyncio.create_task(want("gone", (0,)))
            for ev in arrived.values():
                await ev.wait()
            gone.cancel()  # cancelled while queued: skipped, never admitted
            with pytest.raises(asyncio.CancelledError):
                await gone
        # Leaving the block handed the slot to `first`; it is cancelled before it runs.
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await second
    assert admitted == ["second"]
    assert repr(limiter) == "PriorityLimiter(0/1, waiting=0)"


async def test_fetch_order_follows_priority_once_the_slots_are_taken() -> None:
    fake = FakeSource()
    a, b, c, d = (chunk_of(n) for n in "abcd")
    for ch, data in (a, b, c, d):
        fake.stored[ch.id] = data
    release = fake.gate(a[0])
    fetcher = Fetcher([fake], concurrency=1)

    async with asyncio.timeout(DEADLINE):
        ta = asyncio.create_task(fetcher.get(a[0], (5,)))  # takes the free slot
        rest = [
            asyncio.create_task(fetcher.get(b[0], (3,))),
            asyncio.create_task(fetcher.get(c[0], (1,))),
            asyncio.create_task(fetcher.get(d[0], (2,))),
        ]
        await fake.arrived(1)
        assert repr(fetcher.limiter) == "PriorityLimiter(1/1, waiting=3)"
        release.set()
        await asyncio.gather(ta, *rest)
    assert fake.order == [a[0].id, c[0].id, d[0].id, b[0].id]


async def test_cancelling_the_only_waiter_cancels_the_flight() -> None:
    fake = FakeSource()
    c, data = chunk_of("lonely")
    fake.stored[c.id] = data
    fake.gate(c)
    fetcher = Fetcher([fake], concurrency=2)

    t = asyncio.create_task(fetcher.get(c, (0,)))
    await fake.arrived(1)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    await fake.until(lambda s: s.cancelled == [c.id])  # the source's call was cancelled
    assert fetcher.stats.chunks == {}


async def test_a_get_just_after_the_last_waiter_left_gets_a_new_flight() -> None:
    """The abandoned flight is still registered while its cancellation unwinds; a newcomer
    must not join it (it would get CancelledError without having been cancelled)."""
    fake = FakeSource()
    c, data = chunk_of("again")
    fake.stored[c.id] = data
    fake.gate(c)
    fetcher = Fetcher([fake], concurrency=2)

    t = asyncio.create_task(fetcher.get(c, (0,)))
    await fake.arrived(1)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    del fake.gates[c.id]
    async with asyncio.timeout(DEADLINE):
        assert await fetcher.get(c, (1,)) == (data, "fake")
    assert fake.calls[c.id] == 2
    assert fetcher.in_flight == 0


async def test_cancelling_one_of_two_waiters_keeps_the_flight() -> None:
    fake = FakeSource()
    c, data = chunk_of("shared")
    fake.stored[c.id] = data
    release = fake.gate(c)
    fetcher = Fetcher([fake], concurrency=2)

    t1 = asyncio.create_task(fetcher.get(c, (0,)))
    t2 = asyncio.create_task(fetcher.get(c, (1,)))
    await fake.arrived(1)
    t1.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t1
    release.set()
    async with asyncio.timeout(DEADLINE):
        assert await t2 == (data, "fake")
    assert fake.cancelled == []
    assert fake.calls[c.id] == 1


async def test_a_corrupt_source_falls_through_to_the_next() -> None:
    bad, missing, good = FakeSource("bad"), FakeSource("missing"), FakeSource("good")
    c, data = chunk_of("fallthrough")
    bad.stored[c.id] = flip(data)
    good.stored[c.id] = data
    fetcher = Fetcher([bad, missing, good], concurrency=2)

    assert await fetcher.get(c, (0,)) == (data, "good")

    assert fetcher.stats.corrupt == {"bad": 1}
    assert fetcher.stats.missing == {"missing": 1}
    assert fetcher.stats.chunks == {"good": 1}
    assert fetcher.stats.bytes == {"good": len(data)}
    assert [s.calls[c.id] for s in (bad, missing, good)] == [1, 1, 1]


async def test_the_first_source_that_has_it_wins() -> None:
    first, second = FakeSource("first"), FakeSource("second")
    c, data = chunk_of("first")
    first.stored[c.id] = second.stored[c.id] = data
    fetcher = Fetcher([first, second], concurrency=2)
    assert await fetcher.get(c, (0,)) == (data, "first")
    assert second.calls[c.id] == 0


async def test_every_source_missing_raises_chunk_missing_naming_the_chunk() -> None:
    a, b = FakeSource("a"), FakeSource("b")
    c, data = chunk_of("nowhere")
    fetcher = Fetcher([a, b], concurrency=2)
    with pytest.raises(ChunkMissing) as info:
        await fetcher.get(c, (0,))
    msg = info.value.message
    assert c.id.hex() in msg
    assert "a: " in msg
    assert "b: " in msg
    assert fetcher.stats.missing == {"a": 1, "b": 1}
    # A failure is not remembered: once a source has it, it is fetched.
    b.stored[c.id] = data
    assert await fetcher.get(c, (0,)) == (data, "b")


async def test_a_corrupt_copy_and_no_good_one_raises_chunk_corrupt_naming_the_chunk() -> None:
    bad, empty = FakeSource("bad"), FakeSource("empty")
    c, data = chunk_of("spoiled")
    bad.stored[c.id] = flip(data)
    fetcher = Fetcher([bad, empty], concurrency=2)
    with pytest.raises(ChunkCorrupt, match=rf"chunk {c.id.hex()} could not be fetched intact"):
        await fetcher.get(c, (0,))
    assert fetcher.stats.corrupt == {"bad": 1}


async def test_every_waiter_of_a_failed_flight_sees_the_failure() -> None:
    fake = FakeSource()
    c, _ = chunk_of("absent")
    release = fake.gate(c)
    fetcher = Fetcher([fake], concurrency=2)
    tasks = [asyncio.create_task(fetcher.get(c, (0, i))) for i in range(3)]
    await fake.arrived(1)
    release.set()
    async with asyncio.timeout(DEADLINE):
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ChunkMissing) for r in results)
    assert fake.calls[c.id] == 1


async def test_a_source_failing_otherwise_fails_the_flight() -> None:
    """Only missing and corrupt fall through; anything else (origin down) is the answer."""

    class Down:
        name = "origin"

        async def get(self, chunk: Chunk) -> bytes:
            raise OriginError(f"origin file:///x: get chunk {chunk.id.hex()} failed: down")

    after = FakeSource("after")
    c, data = chunk_of("down")
    after.stored[c.id] = data
    fetcher = Fetcher([Down(), after], concurrency=1)
    with pytest.raises(OriginError, match="down"):
        await fetcher.get(c, (0,))
    assert after.calls[c.id] == 0
    # The limiter's slot came back.
    assert repr(fetcher.limiter) == "PriorityLimiter(0/1, waiting=0)"


async def test_close_cancels_flights_in_progress() -> None:
    fake = FakeSource()
    c, data = chunk_of("closing")
    fake.stored[c.id] = data
    fake.gate(c)
    fetcher = Fetcher([fake], concurrency=2)
    t = asyncio.create_task(fetcher.get(c, (0,)))
    await fake.arrived(1)
    async with asyncio.timeout(DEADLINE):
        await fetcher.close()
        with pytest.raises(asyncio.CancelledError):
            await t
    assert fake.cancelled == [c.id]
    assert fetcher.in_flight == 0


# -- batches (Fetcher.landing) -----------------------------------------------------------------


class BatchFake(FakeSource):
    """A FakeSource that also answers batches, logging each batch it is asked."""

    def __init__(self, name: str = "fake") -> None:
        super().__init__(name)
        self.batches: list[list[bytes]] = []

    async def get_many(self, chunks: Sequence[Chunk]) -> list[bytes | memoryview | BaseException]:
        self.batches.append([c.id for c in chunks])
        got: list[bytes | memoryview | BaseException] = []
        got += await asyncio.gather(*(self.get(c) for c in chunks), return_exceptions=True)
        return got


async def landed(
    fetcher: Fetcher, chunks: list[Chunk], priority: tuple[int, ...] = (0,)
) -> dict[int, object]:
    out: dict[int, object] = {}
    async with asyncio.timeout(DEADLINE):
        async for i, r in fetcher.landing(chunks, priority):
            out[i] = r
    return out


async def test_a_batch_asks_each_source_once_for_what_is_still_missing() -> None:
    local, origin = BatchFake("dedup"), BatchFake("origin")
    got = [chunk_of(f"batch{i}") for i in range(5)]
    chunks = [c for c, _ in got]
    local.stored[chunks[1].id] = got[1][1]
    for c, data in got[:4]:
        origin.stored[c.id] = data
    origin.spoil(chunks[3])
    fetcher = Fetcher([local, origin], concurrency=1)

    out = await landed(fetcher, chunks)
    assert out[0] == (got[0][1], "origin")
    assert out[1] == (got[1][1], "dedup")
    assert out[2] == (got[2][1], "origin")
    bad, absent = out[3], out[4]
    assert isinstance(bad, ChunkCorrupt)
    assert chunks[3].id.hex() in bad.message
    assert isinstance(absent, ChunkMissing)
    assert chunks[4].id.hex() in absent.message
    assert local.batches == [[c.id for c in chunks]]
    assert origin.batches == [[c.id for i, c in enumerate(chunks) if i != 1]]
    assert fetcher.stats.chunks == {"dedup": 1, "origin": 2}
    assert fetcher.stats.corrupt == {"origin": 1}
    assert fetcher.in_flight == 0
    assert repr(fetcher.limiter) == "PriorityLimiter(0/1, waiting=0)"


async def test_a_batch_joins_flights_in_progress_and_gets_join_the_batch() -> None:
    src = BatchFake()
    (a, da), (b, db) = chunk_of("joined-a"), chunk_of("joined-b")
    src.stored[a.id], src.stored[b.id] = da, db
    release_a, release_b = src.gate(a), src.gate(b)
    fetcher = Fetcher([src], concurrency=4)

    first = asyncio.create_task(fetcher.get(a, (0,)))  # a is in flight before the batch
    await src.arrived(1)
    batch = asyncio.create_task(landed(fetcher, [a, b]))
    await src.arrived(2)
    late = asyncio.create_task(fetcher.get(b, (1,)))  # joins the batch's flight of b
    await asyncio.sleep(0)
    assert src.batches == [[b.id]]
    release_b.set()
    async with asyncio.timeout(DEADLINE):
        assert await late == (db, "fake")
    assert not first.done()
    release_a.set()
    async with asyncio.timeout(DEADLINE):
        assert await batch == {0: (da, "fake"), 1: (db, "fake")}
        assert await first == (da, "fake")
    assert src.calls == {a.id: 1, b.id: 1}
    assert fetcher.stats.joins == 2


async def test_what_lands_first_is_yielded_before_the_rest_lands() -> None:
    """A one-at-a-time source (a peer) under a batch: each chunk its own flight, yielded as
    it lands."""
    src = FakeSource()
    (a, da), (b, db) = chunk_of("first-a"), chunk_of("first-b")
    src.stored[a.id], src.stored[b.id] = da, db
    src.gate(a)
    fetcher = Fetcher([src], concurrency=4)
    async with asyncio.timeout(DEADLINE):
        async with contextlib.aclosing(fetcher.landing([a, b], (0,))) as landing:
            i, r = await anext(landing)
            assert (i, r) == (1, (db, "fake"))  # b, while a is still held
    # Leaving early left a's flight with no waiter: it is cancelled.
    await src.until(lambda s: s.cancelled == [a.id])
    async with asyncio.timeout(DEADLINE):
        # the flight is a task, gone once its cancel has unwound: polled, it has no event
        while fetcher.in_flight:  # noqa: ASYNC110
            await asyncio.sleep(0)
    assert fetcher.in_flight == 0


async def test_leaving_a_batch_cancels_it_unless_someone_else_waits() -> None:
    src = BatchFake()
    (a, da), (b, db) = chunk_of("left-a"), chunk_of("left-b")
    src.stored[a.id], src.stored[b.id] = da, db
    src.gate_all = asyncio.Event()
    fetcher = Fetcher([src], concurrency=4)

    leaver = asyncio.create_task(landed(fetcher, [a, b]))
    await src.arrived(2)
    stayer = asyncio.create_task(fetcher.get(b, (1,)))
    await asyncio.sleep(0)
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    await asyncio.sleep(0)
    assert src.cancelled == []  # b is still wanted: the batch goes on
    src.gate_all.set()
    async with asyncio.timeout(DEADLINE):
        assert await stayer == (db, "fake")

    src.gate_all = asyncio.Event()
    alone = asyncio.create_task(landed(fetcher, [a]))
    await src.arrived(3)
    alone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alone
    await src.until(lambda s: s.cancelled == [a.id])  # nobody wanted it: the batch stopped
    async with asyncio.timeout(DEADLINE):
        # its slot comes back as the cancel unwinds: polled, the limiter has no event for it
        while fetcher.limiter.active:  # noqa: ASYNC110
            await asyncio.sleep(0)
    assert fetcher.in_flight == 0


async def test_a_batch_source_failing_otherwise_fails_each_chunk_of_the_batch() -> None:
    class Down(BatchFake):
        async def get_many(
            self, chunks: Sequence[Chunk]
        ) -> list[bytes | memoryview | BaseException]:
            raise OriginError("origin file:///x: list failed: down")

    c1, _ = chunk_of("down-1")
    c2, _ = chunk_of("down-2")
    fetcher = Fetcher([Down("origin")], concurrency=1)
    out = await landed(fetcher, [c1, c2])
    assert all(isinstance(r, OriginError) and "down" in r.message for r in out.values())
    assert repr(fetcher.limiter) == "PriorityLimiter(0/1, waiting=0)"
