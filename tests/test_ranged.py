"""Runs of adjacent packed chunks read with one ranged GET (Fetcher.streaming, PackRun).

Against a raw HTTP server in the test's loop (tests/test_fastget.py's) that serves one pack
and answers ranges: a run is one request, each chunk verified as it lands; a corrupt chunk
fails alone; a connection that breaks mid-body is asked again from the first byte not read;
flights are still one per chunk (joined both ways, and handed over when a run stops early);
the budget is taken a chunk at a time; and an origin without the fast path (a file://
one) reads each chunk as a range of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import blake3
import pytest
from test_fastget import Server, plain, serve

from hostd.cache import Cache
from hostd.core import manifest as mf
from hostd.core.ids import chunk_id
from hostd.core.manifest import CODEC_RAW, Chunk, FileEntry, Packed
from hostd.core.retry import RetryPolicy
from hostd.errors import ChunkCorrupt
from hostd.fetch import ByteBudget, Fetcher, Landed
from hostd.fill import Filler, FillProgress
from hostd.index import Index
from hostd.origin import Origin, _pack_key
from hostd.sources import PACK_WINDOW, LocalBlobSource, OriginSource
from hostd.tier import Tier

__all__ = ["serve"]  # the fixture, used by name

MTIME = 1_700_000_000 * 10**9

CS = 256 * 1024
FAST = RetryPolicy(attempts=2, base=0.0, cap=0.0)
Serve = Callable[[Server], Awaitable[Origin]]


def a_pack(n: int, *, size: int = CS) -> tuple[bytes, list[bytes], list[Chunk]]:
    """A pack of `n` raw chunks back to back: its bytes, the chunks' bytes, their entries."""
    raws = [os.urandom(size) for _ in range(n)]
    data = b"".join(raws)
    pid = blake3.blake3(data).digest()
    chunks = [
        Chunk(chunk_id(r), size, CODEC_RAW, Packed(pid, i * size, size, len(data)))
        for i, r in enumerate(raws)
    ]
    return data, raws, chunks


def ranges_of(data: bytes, *, cut: int | None = None) -> Callable[..., Awaitable[bytes]]:
    """An answer serving `data` by range; `cut`: the first answer sends its head and only
    `cut` bytes of its body (the server then closes, as a connection that breaks)."""
    answers = 0

    async def answer(path: str, headers: dict[str, str]) -> bytes:
        nonlocal answers
        answers += 1
        a, b = (int(x) for x in headers["range"].removeprefix("bytes=").split("-"))
        crange = f"Content-Range: bytes {a}-{b}/{len(data)}\r\n"
        body = plain(data[a : b + 1], "206 Partial Content", crange)
        if cut is not None and answers == 1:
            return body[: len(body) - (b + 1 - a) + cut]
        return body

    return answer


class RangeServer(Server):
    """The raw server, noting each request's Range header ("" for none), but for the
    one-byte probes (Origin.answers_ranges), counted apart."""

    def __init__(self, answer: Callable[..., Awaitable[bytes]], close_idle: bool = False):
        self.ranges: list[str] = []
        self.probes = 0

        async def noting(path: str, headers: dict[str, str]) -> bytes:
            if headers.get("range") == "bytes=0-0":
                self.probes += 1
            else:
                self.ranges.append(headers.get("range", ""))
            return await answer(path, headers)

        super().__init__(noting, close_idle=close_idle)


def starts(server: RangeServer) -> list[int]:
    """Each request's first byte (its Range)."""
    return [int(r.split("=")[1].split("-")[0]) for r in server.ranges]


async def no_flights(f: Fetcher) -> None:
    """Wait until every flight has been forgotten (a settled flight is dropped from the
    fetcher by its done-callback, in a later turn of the loop)."""
    async with asyncio.timeout(10):
        while f.in_flight:  # noqa: ASYNC110
            await asyncio.sleep(0)


async def read_all(
    f: Fetcher, chunks: list[Chunk], budget: ByteBudget
) -> list[Landed | BaseException]:
    """Every outcome of a run, in order, each chunk's budget given back once seen (at most
    one chunk's is held at any time, which this asserts)."""
    got: list[Landed | BaseException] = []
    async with contextlib.aclosing(f.streaming(chunks, (0, 0), budget)) as run:
        async for i, r, held in run:
            assert i == len(got)
            assert budget.held == held <= chunks[i].size
            got.append(r)
            budget.give(held)
    return got


async def test_a_run_of_adjacent_chunks_is_one_ranged_get(serve: Serve) -> None:
    data, raws, chunks = a_pack(8)
    s = RangeServer(ranges_of(data))
    o = await serve(s)
    f = Fetcher([OriginSource(o)], 4)
    assert f.streams
    budget = ByteBudget(4 * CS)
    got = await read_all(f, chunks, budget)
    assert [bytes(r[0]) for r in got if not isinstance(r, BaseException)] == raws
    assert s.ranges == [f"bytes=0-{len(data) - 1}"]
    assert budget.held == 0
    assert f.stats.chunks["origin"] == 8
    await no_flights(f)


async def test_a_corrupt_chunk_fails_alone_and_the_run_goes_on(serve: Serve) -> None:
    data, raws, chunks = a_pack(6)
    bad = bytearray(data)
    bad[3 * CS + 100] ^= 1
    s = RangeServer(ranges_of(bytes(bad)))
    f = Fetcher([OriginSource(await serve(s))], 4)
    got = await read_all(f, chunks, ByteBudget(CS))
    assert isinstance(got[3], ChunkCorrupt)
    assert chunks[3].id.hex() in str(got[3])
    for i in (0, 1, 2, 4, 5):
        r = got[i]
        assert not isinstance(r, BaseException)
        assert bytes(r[0]) == raws[i]
    assert len(s.ranges) == 1
    assert f.stats.corrupt["origin"] == 1


async def test_a_connection_that_breaks_is_asked_again_from_the_first_byte_not_read(
    serve: Serve,
) -> None:
    data, raws, chunks = a_pack(6)
    s = RangeServer(ranges_of(data, cut=2 * CS + CS // 2), close_idle=True)
    o = await serve(s)
    f = Fetcher([OriginSource(o)], 4)
    got = await read_all(f, chunks, ByteBudget(CS))
    assert [bytes(r[0]) for r in got if not isinstance(r, BaseException)] == raws
    # chunk 2 was half received when the connection closed: it is read again, whole
    assert starts(s) == [0, 2 * CS]
    assert o.stats.requests_retried == 1


async def test_runs_join_each_others_flights_and_the_budget_cannot_starve_them(
    serve: Serve,
) -> None:
    """Two restores of one file at once, with a budget of one chunk: the second joins every
    flight of the first (one GET in all), and waiting on a joined flight holds no budget,
    so the first run's reader is never kept from its next chunk."""
    data, raws, chunks = a_pack(8)
    s = RangeServer(ranges_of(data))
    f = Fetcher([OriginSource(await serve(s))], 4)
    budget = ByteBudget(CS)
    outcomes: list[list[bytes]] = [[], []]

    async def restore(k: int) -> None:
        async with contextlib.aclosing(f.streaming(chunks, (k, 0), budget)) as run:
            async for _, r, held in run:
                assert not isinstance(r, BaseException)
                outcomes[k].append(bytes(r[0]))
                await asyncio.sleep(0)  # the other run goes on meanwhile
                budget.give(held)

    async with asyncio.timeout(20):
        await asyncio.gather(restore(0), restore(1))
    assert outcomes == [raws, raws]
    assert len(s.ranges) == 1
    assert f.stats.joins == 8
    assert budget.held == 0


async def test_a_chunk_in_flight_already_is_joined_and_splits_the_run(serve: Serve) -> None:
    data, raws, chunks = a_pack(8)
    gate = asyncio.Event()
    inner = ranges_of(data)

    async def held_for_chunk_3(path: str, headers: dict[str, str]) -> bytes:
        if headers["range"] == f"bytes={3 * CS}-{4 * CS - 1}":
            await gate.wait()  # the single get of chunk 3 stays in the air meanwhile
        return await inner(path, headers)

    s = RangeServer(held_for_chunk_3)
    f = Fetcher([OriginSource(await serve(s), window=0)], 4)
    single = asyncio.create_task(f.get(chunks[3], (0, 0)))
    async with asyncio.timeout(10):
        while not s.ranges:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    budget = ByteBudget(CS)
    reading = asyncio.create_task(read_all(f, chunks, budget))
    async with asyncio.timeout(10):
        while len(s.ranges) < 2:  # noqa: ASYNC110 (the run's first GET, for chunks 0-2)
            await asyncio.sleep(0.01)
    gate.set()
    got = await reading
    assert [bytes(r[0]) for r in got if not isinstance(r, BaseException)] == raws
    assert bytes((await single)[0]) == raws[3]
    assert sorted(starts(s)) == [0, 3 * CS, 4 * CS]
    assert s.ranges[1] == f"bytes=0-{3 * CS - 1}"
    assert f.stats.joins == 1


async def test_a_run_that_stops_early_hands_its_joined_flights_over(serve: Serve) -> None:
    data, raws, chunks = a_pack(8)
    s = RangeServer(ranges_of(data))
    f = Fetcher([OriginSource(await serve(s), window=0)], 4)
    budget = ByteBudget(CS)
    run = f.streaming(chunks, (0, 0), budget)
    i, r, held = await anext(run)
    assert i == 0
    assert not isinstance(r, BaseException)
    budget.give(held)
    joiner = asyncio.create_task(f.get(chunks[5], (1, 0)))
    await asyncio.sleep(0)
    assert f.stats.joins == 1  # it waits on the run's flight ...
    await run.aclose()  # ... which stops after its first chunk
    async with asyncio.timeout(10):
        landed = await joiner
    assert bytes(landed[0]) == raws[5]
    assert budget.held == 0
    await no_flights(f)


async def test_a_file_origin_reads_each_chunk_of_a_run_as_a_range(tmp_path: Path) -> None:
    """No fast path for file:// (no server): the run still gives every chunk, verified."""
    data, raws, chunks = a_pack(5)
    pid = chunks[0].packed
    assert pid is not None
    where = tmp_path / "packs" / pid.pack.hex()[:2]
    where.mkdir(parents=True)
    (where / pid.pack.hex()).write_bytes(data)
    o = Origin(tmp_path.as_uri(), {}, retry=FAST)
    try:
        f = Fetcher([OriginSource(o)], 4)
        got = await read_all(f, chunks, ByteBudget(CS))
    finally:
        await o.close()
    assert [bytes(r[0]) for r in got if not isinstance(r, BaseException)] == raws


async def test_a_missing_pack_fails_each_chunk_as_missing(serve: Serve) -> None:
    async def not_found(path: str, headers: dict[str, str]) -> bytes:
        return plain(b"no", "404 Not Found")

    _, _, chunks = a_pack(3)
    f = Fetcher([OriginSource(await serve(RangeServer(not_found)))], 4)
    got = await read_all(f, chunks, ByteBudget(CS))
    assert all(type(r).__name__ == "ChunkMissing" for r in got)
    assert "is in no source" in str(got[0])


async def test_a_run_whose_reader_is_cancelled_leaves_nothing_held(serve: Serve) -> None:
    _, _, chunks = a_pack(4)
    stalled = asyncio.Event()
    released = asyncio.Event()

    async def stalls(path: str, headers: dict[str, str]) -> bytes:
        stalled.set()
        await released.wait()
        return b""  # (the client is gone: its connection ends the handler)

    s = RangeServer(stalls)
    f = Fetcher([OriginSource(await serve(s))], 4)
    budget = ByteBudget(CS)
    reading = asyncio.create_task(read_all(f, chunks, budget))
    await stalled.wait()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    released.set()
    assert budget.held == 0
    await no_flights(f)


# -- a fill's spans ------------------------------------------------------------------------


class FillRig:
    """A real cache (one tier), a fetcher over local blobs and the raw server's origin,
    and a filler reading spans of `fetch_range` bytes."""

    def __init__(self, root: Path, origin: Origin, fetch_range: int, window: int) -> None:
        self.tier = Tier("mem", root / "mem", 64 * CS)
        self.index = Index(root / "index.db")
        self.cache = Cache([self.tier], self.index, manifests_dir=root / "m", clock=time.time)
        self.cache.load()
        source = OriginSource(origin, window=window)
        self.fetcher = Fetcher([LocalBlobSource(self.cache), source], 4)
        self.filler = Filler(self.cache, self.fetcher, workers=4, fetch_range=fetch_range)

    async def fill(self, *entries: FileEntry) -> FillProgress:
        progress = FillProgress()
        async with asyncio.timeout(30):
            await self.filler.ensure(list(entries), CS, [self.tier], progress)
        return progress

    def blob(self, e: FileEntry) -> bytes:
        b = self.cache.locate(e.digest, [self.tier])
        assert b is not None
        return b.path.read_bytes()


@pytest.fixture
def fill_rig(tmp_path: Path) -> Iterator[Callable[..., FillRig]]:
    rigs: list[FillRig] = []

    def make(origin: Origin, fetch_range: int, window: int = PACK_WINDOW) -> FillRig:
        rigs.append(FillRig(tmp_path, origin, fetch_range, window))
        return rigs[-1]

    yield make
    for r in rigs:
        r.index.close()


def large(chunks: list[Chunk], raws: list[bytes], path: str = "w.bin") -> FileEntry:
    return FileEntry(path, 0o644, len(b"".join(raws)), tuple(chunks), 1_700_000_000 * 10**9)


async def test_a_cold_fill_reads_a_large_file_with_one_ranged_get_per_span(
    serve: Serve, fill_rig: Callable[..., FillRig]
) -> None:
    data, raws, chunks = a_pack(32)
    s = RangeServer(ranges_of(data))
    rig = fill_rig(await serve(s), 4 * CS)
    e = large(chunks, raws)
    progress = await rig.fill(e)
    assert rig.blob(e) == data
    assert sorted(starts(s)) == [k * 4 * CS for k in range(8)]  # fetch_range each
    assert progress.by_source["origin"] == len(data)
    assert rig.filler.budget.held == 0


async def test_spans_give_every_worker_a_share_of_each_file_in_turn(
    serve: Serve, fill_rig: Callable[..., FillRig]
) -> None:
    """4 workers, a fetch_range of a whole file: each file is read in 4 spans, one a worker
    (not one GET on one connection), and the first file's spans are all asked before any
    of the second's, so files complete in order."""
    data, raws, chunks = a_pack(32)
    s = RangeServer(ranges_of(data))
    rig = fill_rig(await serve(s), 64 * CS)
    first, second = large(chunks[:16], raws[:16], "a"), large(chunks[16:], raws[16:], "b")
    await rig.fill(first, second)
    assert rig.blob(first) == data[: 16 * CS]
    assert rig.blob(second) == data[16 * CS :]
    assert sorted(starts(s)) == [k * 4 * CS for k in range(8)]
    assert sorted(starts(s)[:4]) == [0, 4 * CS, 8 * CS, 12 * CS]


async def test_a_fill_with_no_range_to_speak_of_asks_a_chunk_at_a_time(
    serve: Serve, fill_rig: Callable[..., FillRig]
) -> None:
    data, raws, chunks = a_pack(4)
    s = RangeServer(ranges_of(data))
    rig = fill_rig(await serve(s), 0, window=CS)  # (packs' windows: a chunk each)
    e = large(chunks, raws)
    await rig.fill(e)
    assert rig.blob(e) == data
    assert sorted(starts(s)) == [0, CS, 2 * CS, 3 * CS]


async def test_a_chunk_a_local_blob_holds_is_taken_from_there_and_splits_the_get(
    serve: Serve, fill_rig: Callable[..., FillRig]
) -> None:
    data, raws, chunks = a_pack(8)
    s = RangeServer(ranges_of(data))
    rig = fill_rig(await serve(s), 8 * CS, window=CS)
    alone = FileEntry("five.bin", 0o644, CS, (chunks[5],), 1_700_000_000 * 10**9)
    await rig.fill(alone)
    assert starts(s) == [5 * CS]
    progress = await rig.fill(large(chunks, raws))
    assert rig.blob(large(chunks, raws)) == data
    assert progress.by_source["dedup"] == CS
    # spans of 2 chunks (8 over 4 workers); the one holding chunk 5 reads only chunk 4
    spans = [(0, 2), (2, 4), (4, 5), (6, 8)]
    assert sorted(s.ranges[1:]) == sorted(f"bytes={a * CS}-{b * CS - 1}" for a, b in spans)


async def test_a_server_that_ignores_ranges_gets_one_whole_get_per_pack(serve: Serve) -> None:
    """A plain web server that answers every GET whole: once hostd has seen it ignore a
    range, the pack is read whole once, and every run of it (now or while it is kept) is
    cut from that one read: not a whole pack per chunk, nor per run."""
    data, raws, chunks = a_pack(16)

    async def whole(path: str, headers: dict[str, str]) -> bytes:
        return plain(data)

    s = RangeServer(whole)
    o = await serve(s)
    f = Fetcher([OriginSource(o)], 4)
    first = await read_all(f, chunks[:8], ByteBudget(CS))
    assert [bytes(r[0]) for r in first if not isinstance(r, BaseException)] == raws[:8]
    assert o._ranges is False
    asked = len(s.ranges)
    assert asked < 8  # found out on the first chunk, then one GET of the whole pack
    assert s.ranges.count("") == 1
    second = await read_all(f, chunks[8:], ByteBudget(CS))
    assert [bytes(r[0]) for r in second if not isinstance(r, BaseException)] == raws[8:]
    assert len(s.ranges) == asked  # cut from the same read
    assert o.stats.bytes_in == len(data)  # what came over the wire: the pack, once


# -- found by attacking it --------------------------------------------------------------


def ranges_or_whole(data: bytes) -> Callable[..., Awaitable[bytes]]:
    """test_ranged.ranges_of, answering a GET without a Range header whole."""
    inner = ranges_of(data)

    async def answer(path: str, headers: dict[str, str]) -> bytes:
        if "range" not in headers:
            return plain(data)
        return await inner(path, headers)

    return answer


def _pending_bytes(gen: object) -> int:
    """Chunk bytes a suspended `streaming` generator holds in settled flights it has not
    yielded yet (outside any budget)."""
    flights = gen.ag_frame.f_locals["flights"]  # type: ignore[attr-defined]
    total = 0
    for fl in flights:
        if fl is None or not fl.task.done() or fl.task.cancelled():
            continue
        if fl.task.exception() is None:
            total += len(fl.task.result()[0])
    return total


async def _settles(rig: FillRig, *tasks: asyncio.Task[object]) -> None:
    """Every task ends within 10 s; else fail with the budget and flights as they are
    then (before anything is cancelled)."""
    _, pending = await asyncio.wait(tasks, timeout=10)
    if pending:
        state = f"{rig.filler.budget!r} {rig.fetcher!r}"
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(BaseException):
                await t
        pytest.fail(f"deadlock, {len(pending)} of {len(tasks)} fills stuck: {state}")
    for t in tasks:
        t.result()


# -- deadlock: a one-chunk file's run (Filler.wholes) holds budget and joins a span's
#       flight; the span's reader waits for that budget --------------------------------


async def test_wholes_holding_budget_while_joining_a_span_flight_does_not_deadlock(
    serve: Serve, fill_rig: Callable[..., FillRig]
) -> None:
    """Two restores through one Filler (fetch_memory = one chunk): restore 1 fills a large
    file (spans [0,1] and [2,3]); restore 2 a one-chunk file whose chunk is the large
    file's chunk 3 (publish points a deduped chunk at where it is: the same Chunk, the
    same flight). The span reading chunk 3 owns that flight, and the run of small files
    took the budget before joining it: the span reads on without."""
    data, raws, chunks = a_pack(4)
    gate = asyncio.Event()
    inner = ranges_or_whole(data)

    async def gated(path: str, headers: dict[str, str]) -> bytes:
        if headers.get("range", "").startswith(f"bytes={2 * CS}-"):
            await gate.wait()  # span [2,3] holds the budget for chunk 2 meanwhile
        return await inner(path, headers)

    s = RangeServer(gated)
    rig = fill_rig(await serve(s), 64 * CS)
    budget = ByteBudget(CS)
    rig.filler.budget = budget
    big = large(chunks, raws)
    small = FileEntry("three.bin", 0o644, CS, (chunks[3],), MTIME)
    fill1 = asyncio.create_task(rig.filler.ensure([big], CS, [rig.tier], FillProgress()))
    async with asyncio.timeout(10):
        while not any(r.startswith(f"bytes={2 * CS}-") for r in s.ranges):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    before = len(budget._waiting)
    fill2 = asyncio.create_task(rig.filler.ensure([small], CS, [rig.tier], FillProgress()))
    async with asyncio.timeout(10):
        while len(budget._waiting) <= before:  # noqa: ASYNC110 (wholes() queued its take)
            await asyncio.sleep(0.01)
    gate.set()
    await _settles(rig, fill1, fill2)
    assert rig.blob(big) == data


# -- memory: chunks a local blob holds are all read at the run's start, and held ---------


async def test_a_run_of_local_chunks_holds_no_more_than_one_chunk(
    serve: Serve, fill_rig: Callable[..., FillRig]
) -> None:
    """A run whose chunks another local blob holds (a new version of a file, most of it
    unchanged) reads each when it is reached, under the budget: not all at the start,
    their bytes waiting in flights outside it."""
    data, raws, chunks = a_pack(8)
    s = RangeServer(ranges_or_whole(data))
    rig = fill_rig(await serve(s), 64 * CS)
    v1 = large(chunks, raws)
    await rig.fill(v1)  # v1: its blob now holds every chunk
    rig.cache.record_snapshot(mf.build(chunk_size=CS, files=[v1]))
    budget = ByteBudget(CS)
    run = rig.fetcher.streaming(chunks, (0, 0), budget)
    try:
        i, r, held = await anext(run)
        assert i == 0
        assert held == CS  # a local chunk's share is taken too
        del r
        pending = _pending_bytes(run)
    finally:
        await run.aclose()
    assert pending <= budget.limit, f"{pending // CS} chunks held outside the budget"


# -- offsets: an error that is not `then`'s leaves PackRun behind ChunkRun -----------------


async def test_a_range_refused_for_its_length_fails_that_chunk_alone(serve: Serve) -> None:
    """Every answer for a range from the pack's start sends a byte more than the range
    (fastget leaves it to obstore, whose capped read refuses it: ChunkCorrupt for chunk
    0); every other answer is right, and every later chunk is read from its own bytes."""
    data, _, chunks = a_pack(4)
    inner = ranges_of(data)

    async def lies_once(path: str, headers: dict[str, str]) -> bytes:
        a, b = (int(x) for x in headers["range"].removeprefix("bytes=").split("-"))
        if a == 0:
            return (
                (
                    f"HTTP/1.1 206 Partial Content\r\nContent-Length: {b - a + 2}\r\n"
                    f"Content-Range: bytes {a}-{b}/{len(data)}\r\n\r\n"
                ).encode()
                + data[a : b + 1]
                + b"x"
            )
        return await inner(path, headers)

    s = RangeServer(lies_once)
    f = Fetcher([OriginSource(await serve(s))], 4)
    got = await read_all(f, chunks, ByteBudget(CS))
    assert isinstance(got[0], ChunkCorrupt)
    wrong = [i for i in (1, 2, 3) if isinstance(got[i], BaseException)]
    assert not wrong, f"chunks {wrong} failed: {[str(got[i])[:90] for i in wrong]}"


# -- memory: a server without ranges: a chunk is a view of the whole pack ----------------


async def test_a_chunk_from_a_server_without_ranges_does_not_hold_its_whole_pack(
    serve: Serve,
) -> None:
    """get_pack_range on a server that ignores ranges reads the whole pack (packs of large
    files: 64 MiB to 1 GiB): the chunk is a copy of its range, not a view that would keep
    the whole pack alive while the chunk is held."""
    data, raws, chunks = a_pack(16)

    async def whole(path: str, headers: dict[str, str]) -> bytes:
        return plain(data)

    f = Fetcher([OriginSource(await serve(RangeServer(whole)), window=0)], 4)
    got, _ = await f.get(chunks[5], (0, 0))
    assert bytes(got) == raws[5]
    base = memoryview(got.obj if isinstance(got, memoryview) else got)
    assert base.nbytes <= 2 * CS, f"a {CS}-byte chunk holds a {base.nbytes}-byte buffer"


# -- sockets: a Stream.open cancelled as its thread finishes --------------------------------


async def test_an_open_cancelled_as_it_finishes_closes_its_socket(serve: Serve) -> None:
    data, _, chunks = a_pack(4)
    o = await serve(RangeServer(ranges_or_whole(data)))
    fast = o._fast
    assert fast is not None
    p = chunks[0].packed
    assert p is not None
    st = fast.stream(_pack_key(p.pack), 0, len(data))
    task = asyncio.create_task(st.open())
    async with asyncio.timeout(10):
        while st._busy is None:  # noqa: ASYNC110
            await asyncio.sleep(0)
        job = st._busy
        while not job.done():  # noqa: ASYNC110
            await asyncio.sleep(0)
    task.cancel()  # the job is done; the task has not resumed yet
    with pytest.raises(asyncio.CancelledError):
        await task
    sock = job.result()[0]
    leaked = sock.fileno() != -1
    sock.close()
    assert not leaked, "the socket _open returned is left open (shut down, never closed)"
