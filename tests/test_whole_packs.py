"""Packs from a server that answers no ranges (a plain web server may not): each pack is read
whole with one GET (hostd/wholepacks.py). A restore's runs stream it, each run a whole pack;
every other read of a range (an owner's pull-throughs, windows) is cut from the pack's one
read as it arrives (Taps), so the origin sends each pack once, not once a chunk.

Against the raw HTTP server of tests/test_fastget.py, answering every GET whole: many
chunks asked at once cost one GET; so do runs and pull-throughs over more packs than are
held at once; a body that breaks off is asked again and the bytes had are skipped; a
missing pack fails every reader and is asked again later; at most TAPS packs are held; one
nobody reads is dropped, and a read nobody waits for is stopped; a probe learns whether
ranges are answered without reading a body, and a slow one holds nobody up for long; and
peers then find an owner by the pack, not the chunk."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from test_fastget import Server, plain, serve
from test_ranged import CS, FAST, FillRig, RangeServer, a_pack, fill_rig, large, ranges_of

from hostd import origin as origin_mod
from hostd import wholepacks
from hostd.core.manifest import Chunk, Packed
from hostd.errors import ChunkMissing, OriginError
from hostd.fetch import ByteBudget, Fetcher
from hostd.origin import Origin
from hostd.peers import Membership, PeerClient, PeerSource
from hostd.sources import OriginSource

__all__ = ["fill_rig", "serve"]  # the fixtures, used by name

Serve = Callable[[Server], Awaitable[Origin]]


def whole(data: bytes, *, cut: int | None = None) -> Callable[..., Awaitable[bytes]]:
    """An answer with all of `data`, whatever the Range; `cut`: the first GET without a
    range (a pack read whole) sends only that many bytes of its body, then the server
    closes (a connection that breaks)."""
    cuts = [cut] if cut is not None else []

    async def answer(path: str, headers: dict[str, str]) -> bytes:
        body = plain(data)
        if cuts and "range" not in headers:
            return body[: len(body) - len(data) + cuts.pop()]
        return body

    return answer


async def learnt(o: Origin, chunk: Chunk) -> None:
    """Have `o` find out that its server answers no ranges (its probe)."""
    assert chunk.packed is not None
    assert await o.answers_ranges(chunk.packed.pack) is False
    assert o.ignores_ranges


async def test_every_chunk_of_a_pack_asked_at_once_costs_one_get(serve: Serve) -> None:
    """An owner's pull-throughs: 16 chunks of one pack asked one by one, all at once."""
    data, raws, chunks = a_pack(16)
    s = RangeServer(whole(data))
    o = await serve(s)
    src = OriginSource(o, window=0)  # each chunk its own range, as a pull-through
    got = await asyncio.gather(*(src.get(c) for c in chunks))
    assert [bytes(g) for g in got] == raws
    assert o.ignores_ranges
    assert s.ranges.count("") == 1  # the pack read whole once; the rest were ranged tries
    assert o.stats.bytes_in == len(data)  # what the origin sent for it: the pack, once
    # asked again while it is kept: no request at all
    before = len(s.ranges)
    assert bytes(await src.get(chunks[7])) == raws[7]
    assert len(s.ranges) == before


async def test_a_body_that_breaks_off_is_asked_again_and_what_came_is_kept(
    serve: Serve,
) -> None:
    data, raws, chunks = a_pack(8)
    cut = 5 * CS + 100  # past the first piece obstore hands over (origin._WHOLE_PIECE)
    s = RangeServer(whole(data, cut=cut), close_idle=True)
    o = await serve(s)
    src = OriginSource(o, window=0)
    got = await asyncio.gather(*(src.get(c) for c in chunks))
    assert [bytes(g) for g in got] == raws
    assert s.ranges.count("") == 2  # the broken read, then the whole body again
    assert o.stats.requests_retried >= 1
    # both bodies count, as the origin sent them (the broken one as far as it came)
    assert len(data) + wholepacks.PIECE <= o.stats.bytes_in <= len(data) + cut


async def test_a_missing_pack_fails_every_reader_and_is_asked_again(serve: Serve) -> None:
    data, _, chunks = a_pack(2)
    other, _, lost = a_pack(4)
    gone = True

    async def answer(path: str, headers: dict[str, str]) -> bytes:
        if lost[0].packed is not None and lost[0].packed.pack.hex() in path:
            return plain(b"no such key", "404 Not Found") if gone else plain(other)
        return plain(data)

    s = RangeServer(answer)
    o = await serve(s)
    await learnt(o, chunks[0])
    src = OriginSource(o, window=0)
    got = await asyncio.gather(*(src.get(c) for c in lost), return_exceptions=True)
    assert all(isinstance(g, ChunkMissing) for g in got), got
    assert lost[0].packed is not None
    assert all(lost[0].packed.pack.hex() in str(g) for g in got)
    gone = False  # (published meanwhile): the next reader asks again
    assert bytes(await src.get(lost[2])) == other[2 * CS : 3 * CS]


def pack_of(packs: list[Pack], path: str) -> int:
    """Which of `packs` a request's path names."""
    return next(i for i, p in enumerate(packs) if packed(p[2][0]).pack.hex() in path)


def packed(c: Chunk) -> Packed:
    assert c.packed is not None
    return c.packed


Pack = tuple[bytes, list[bytes], list[Chunk]]


class WholePacks(RangeServer):
    """A server without ranges for `packs`, counting each one's GETs without a range (read
    whole) in `gets`, by its place in `packs`."""

    def __init__(self, packs: list[Pack]) -> None:
        self.gets: Counter[int] = Counter()

        async def answer(path: str, headers: dict[str, str]) -> bytes:
            k = pack_of(packs, path)
            if "range" not in headers:
                self.gets[k] += 1
            return plain(packs[k][0])

        super().__init__(answer)


async def test_at_most_taps_packs_are_held_at_once(serve: Serve) -> None:
    """Three packs asked at once, with the first two held by the server: the third waits
    for a slot; it starts once one of the first two is read and left for TAP_GRACE."""
    packs = [a_pack(2) for _ in range(3)]
    release = [asyncio.Event() for _ in packs]
    reading = 0
    most = 0

    async def answer(path: str, headers: dict[str, str]) -> bytes:
        nonlocal reading, most
        k = pack_of(packs, path)
        if "range" in headers:  # (the probe)
            return plain(packs[k][0])
        reading += 1
        most = max(most, reading)
        await release[k].wait()
        reading -= 1
        return plain(packs[k][0])

    o = await serve(RangeServer(answer))
    await learnt(o, packs[0][2][0])
    src = OriginSource(o, window=0)
    tasks = [asyncio.create_task(src.get(p[2][1])) for p in packs]
    async with asyncio.timeout(10):
        while reading < wholepacks.TAPS:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)
    keys = [(packed(p[2][0]).pack, 2 * CS) for p in packs]
    first = next(k for k in range(3) if keys[k] in o._taps)
    waiting = next(k for k in range(3) if keys[k] not in o._taps)
    release[first].set()
    assert bytes(await asyncio.wait_for(tasks[first], 10)) == packs[first][1][1]
    for e in release:
        e.set()
    got = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert [bytes(g) for g in got] == [p[1][1] for p in packs]
    assert most == wholepacks.TAPS
    assert waiting != first
    assert len(o._taps) <= wholepacks.TAPS


async def test_a_pack_nobody_reads_is_dropped(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wholepacks, "TAP_IDLE", 0.05)
    data, raws, chunks = a_pack(4)
    o = await serve(RangeServer(whole(data)))
    await learnt(o, chunks[0])
    assert bytes(await OriginSource(o, window=0).get(chunks[3])) == raws[3]
    assert len(o._taps) == 1
    async with asyncio.timeout(10):
        while len(o._taps):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# -- found by attacking it ----------------------------------------------------------------


async def test_runs_over_more_packs_than_taps_read_each_pack_once(serve: Serve) -> None:
    """A restore's runs over three packs at once, each writing its chunks as it goes: each
    run streams its pack with a GET of its own, and no pack is read twice (with runs
    cutting their pieces from the held packs, a pack read but not yet consumed was dropped
    for another and read again: 11 GETs a pack)."""
    packs = [a_pack(16) for _ in range(3)]
    s = WholePacks(packs)
    o = await serve(s)
    await learnt(o, packs[0][2][0])
    f = Fetcher([OriginSource(o)], 8)
    budget = ByteBudget(64 * CS)

    async def run(k: int) -> list[bytes]:
        out = []
        async with contextlib.aclosing(f.streaming(packs[k][2], (0, k), budget)) as it:
            async for _, r, held in it:
                assert not isinstance(r, BaseException), r
                out.append(bytes(r[0]))
                budget.give(held)
                await asyncio.sleep(0.002)  # writing the chunk
        return out

    got = await asyncio.wait_for(asyncio.gather(*(run(k) for k in range(3))), 60)
    assert got == [p[1] for p in packs]
    assert s.gets == {0: 1, 1: 1, 2: 1}
    assert o.stats.bytes_in == sum(len(p[0]) for p in packs)


async def test_an_owners_pull_throughs_over_more_packs_than_taps_read_each_once(
    serve: Serve,
) -> None:
    """Three hosts' pull-throughs, each walking its own pack a chunk at a time: each pack
    stays held while its chunks keep being asked for."""
    packs = [a_pack(16) for _ in range(3)]
    s = WholePacks(packs)
    o = await serve(s)
    await learnt(o, packs[0][2][0])
    src = OriginSource(o, window=0)

    async def host(k: int) -> None:
        for c, raw in zip(packs[k][2], packs[k][1], strict=True):
            assert bytes(await src.get(c)) == raw
            await asyncio.sleep(0.002)

    await asyncio.wait_for(asyncio.gather(*(host(k) for k in range(3))), 60)
    assert s.gets == {0: 1, 1: 1, 2: 1}


async def test_a_read_nobody_waits_for_gives_its_place_up(serve: Serve) -> None:
    """Reads of two packs whose readers all left (cancelled restores) hold both places:
    another pack is read once TAP_GRACE has passed, and the abandoned reads are stopped."""
    packs = [a_pack(4) for _ in range(3)]
    slow = asyncio.Event()

    async def answer(path: str, headers: dict[str, str]) -> bytes:
        k = pack_of(packs, path)
        if k in (0, 1) and "range" not in headers:
            await slow.wait()
        return plain(packs[k][0])

    o = await serve(RangeServer(answer))
    await learnt(o, packs[2][2][0])
    readers = [
        asyncio.create_task(o.get_pack_range(q.pack, q.offset, q.length, q.pack_size))
        for q in (packed(packs[k][2][0]) for k in (0, 1))
    ]
    async with asyncio.timeout(10):
        while len(o._taps) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    q = packed(packs[2][2][1])
    try:
        got = await asyncio.wait_for(
            o.get_pack_range(q.pack, q.offset, q.length, q.pack_size), 3 + wholepacks.TAP_GRACE
        )
        assert bytes(got) == packs[2][1][1]
        abandoned = [(packed(packs[k][2][0]).pack, 4 * CS) for k in (0, 1)]
        assert sum(key in o._taps for key in abandoned) == 1  # one stopped, for its place
    finally:
        slow.set()


async def test_a_read_stopped_before_it_began_fails_its_readers(serve: Serve) -> None:
    data, _, chunks = a_pack(4)
    o = await serve(RangeServer(whole(data)))
    await learnt(o, chunks[0])
    q = packed(chunks[2])
    reader = asyncio.create_task(o.get_pack_range(q.pack, q.offset, q.length, q.pack_size))
    async with asyncio.timeout(10):
        while not len(o._taps):  # noqa: ASYNC110
            await asyncio.sleep(0)
    await o.close()  # before the read's task first ran
    with pytest.raises(OriginError):
        await asyncio.wait_for(reader, 5)


async def test_a_pack_too_large_to_read_whole_is_refused_by_name(serve: Serve) -> None:
    """The size a manifest (or a peer's pull) claims is not taken on trust: a pack larger
    than any publish makes is refused, not mapped."""
    data, _, chunks = a_pack(4)
    o = await serve(RangeServer(whole(data)))
    await learnt(o, chunks[0])
    q = packed(chunks[1])
    with pytest.raises(OriginError, match="read whole"):
        await o.get_pack_range(q.pack, q.offset, q.length, 1 << 50)


async def test_a_probe_that_hangs_holds_a_peer_fetch_up_for_probe_wait_at_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(origin_mod, "PROBE_WAIT", 0.3)
    done = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()  # an origin that takes the request and never answers
        writer.close()

    srv = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    o = Origin(f"http://127.0.0.1:{port}/o", {}, retry=FAST, timeout=30.0)
    client = PeerClient("n1", None, 1.0, 2.0)
    source = PeerSource(Membership((), (), 10.0, client), client, 0.2, origin=o)
    _, _, chunks = a_pack(4)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(ChunkMissing):  # no peer: the origin's turn
            await source.get(chunks[1])
        assert loop.time() - started < origin_mod.PROBE_WAIT + 1.0
        started = loop.time()
        with pytest.raises(ChunkMissing):  # the same probe, still under way
            await source.get(chunks[2])
        assert loop.time() - started < origin_mod.PROBE_WAIT + 1.0
    finally:
        done.set()
        await client.close()
        await o.close()
        srv.close()
        await srv.wait_closed()


async def test_the_probe_asks_for_one_byte_once(serve: Serve) -> None:
    data, _, chunks = a_pack(4)
    p = chunks[0].packed
    assert p is not None
    s = RangeServer(whole(data))
    o = await serve(s)
    assert await o.answers_ranges(p.pack) is False
    assert await o.answers_ranges(p.pack) is False
    assert (s.probes, s.ranges) == (1, [])
    assert o.stats.bytes_in == 0  # the body that came with the 200 was not read

    r = RangeServer(ranges_of(data))
    o = await serve(r)
    assert await o.answers_ranges(p.pack) is True
    assert await o.answers_ranges(p.pack) is True
    assert (r.probes, r.ranges) == (1, [])


async def test_a_probe_that_fails_tells_nothing_and_waits_to_be_tried_again(
    serve: Serve,
) -> None:
    _, _, chunks = a_pack(1)
    p = chunks[0].packed
    assert p is not None

    async def missing(path: str, headers: dict[str, str]) -> bytes:
        return plain(b"no such key", "404 Not Found")

    s = RangeServer(missing)
    o = await serve(s)
    assert await o.answers_ranges(p.pack) is True  # assumed
    assert await o.answers_ranges(p.pack) is True
    assert s.probes == 1  # not asked again for PROBE_AGAIN seconds
    assert not o.ignores_ranges


async def test_peers_find_a_packed_chunks_owner_by_its_pack_where_ranges_are_ignored(
    serve: Serve,
) -> None:
    data, _, chunks = a_pack(4)
    o = await serve(RangeServer(whole(data)))
    client = PeerClient("n1", None, 1.0, 2.0)
    source = PeerSource(Membership((), (), 10.0, client), client, 0.2, origin=o)
    assert [source.owner_key(c) for c in chunks] == [c.id for c in chunks]  # not known yet
    await learnt(o, chunks[0])
    assert chunks[0].packed is not None
    assert {source.owner_key(c) for c in chunks} == {chunks[0].packed.pack}
    # a chunk that is its whole pack is found by its own id
    _, _, alone = a_pack(1)
    assert source.owner_key(alone[0]) == alone[0].id
    # where ranges are answered, every chunk has an owner of its own
    r = await serve(RangeServer(ranges_of(data)))
    ranged = PeerSource(Membership((), (), 10.0, client), client, 0.2, origin=r)
    assert chunks[1].packed is not None
    assert await r.answers_ranges(chunks[1].packed.pack)
    assert [ranged.owner_key(c) for c in chunks] == [c.id for c in chunks]
    await client.close()


async def test_a_fill_reads_each_pack_of_a_large_file_with_one_get(
    serve: Serve, fill_rig: Callable[..., FillRig]
) -> None:
    """A large file in two packs, a fetch_range of 4 chunks: from a server that answers
    ranges, 8 spans; from one that does not (found by the fill's probe), a span a pack,
    each one GET from the pack's first byte, not a GET from byte 0 per span."""
    packs = [a_pack(16) for _ in range(2)]
    s = WholePacks(packs)
    rig = fill_rig(await serve(s), 4 * CS)
    e = large(packs[0][2] + packs[1][2], packs[0][1] + packs[1][1])
    await rig.fill(e)
    assert rig.blob(e) == packs[0][0] + packs[1][0]
    assert s.gets == {0: 1, 1: 1}
    assert s.probes == 1
    assert s.ranges == ["", ""]  # no other range was tried


async def test_a_whole_pack_fastget_cannot_take_is_read_through_obstore(serve: Serve) -> None:
    """A body in chunked encoding (with a Content-Length too, which obstore wants): fastget
    hands the GET to obstore, whose stream reads it, still one GET per pack."""
    data, raws, chunks = a_pack(8)

    async def chunked(path: str, headers: dict[str, str]) -> bytes:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head % len(data) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)

    s = RangeServer(chunked)
    o = await serve(s)
    await learnt(o, chunks[0])
    src = OriginSource(o, window=0)
    got = await asyncio.gather(*(src.get(c) for c in chunks))
    assert [bytes(g) for g in got] == raws
    assert s.ranges.count("") == 2  # fastget's try, then obstore's GET
    assert o.stats.bytes_in == len(data)
    assert o.fast_reads is not None
    assert o.fast_reads[0] == 0  # none taken by fastget


# -- found by attacking it, a second time ------------------------------------------------


async def test_a_whole_pack_slower_than_the_request_timeout_still_arrives() -> None:
    """obstore's client timeout covers a whole body: a pack that takes longer than it broke
    off at the same byte every time it was asked again. Whole packs go through a store
    without that timeout; each piece of the body is timed instead (here: 1 s a piece, the
    body 1.6 s, in chunked encoding, which fastget leaves to obstore)."""
    data, raws, chunks = a_pack(8)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" % len(data)
                )
                if b"range:" in head.lower():  # the probe: a whole answer, at once
                    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
                    await writer.drain()
                    continue
                q = len(data) // 4
                for i in range(4):
                    part = data[i * q : (i + 1) * q]
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
                    await asyncio.sleep(0.4)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    o = Origin(f"http://127.0.0.1:{port}/o", {}, retry=FAST, timeout=1.0)
    try:
        await learnt(o, chunks[0])
        got = await asyncio.gather(*(OriginSource(o, window=0).get(c) for c in chunks))
        assert [bytes(g) for g in got] == raws
    finally:
        await o.close()
        srv.close()
        await srv.wait_closed()


async def test_ranges_answered_whole_do_not_turn_the_fast_path_off(serve: Serve) -> None:
    """Many first reads at once, each answered with the whole object: the server answers no
    ranges, which is no fault of fastget; it stays on, and reads the pack whole."""
    data, raws, chunks = a_pack(8)
    o = await serve(RangeServer(whole(data)))
    got = await asyncio.gather(*(OriginSource(o, window=0).get(c) for c in chunks))
    assert [bytes(g) for g in got] == raws
    fast = o._fast
    assert fast is not None
    assert fast.on
    assert o.fast_reads == (1, 0)  # the whole pack, taken; no fallback


async def test_a_stopped_read_frees_its_pack_without_the_cycle_collector(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wholepacks, "TAP_IDLE", 0.1)
    data, _, chunks = a_pack(64)
    half = len(data) // 2

    async def stalls(path: str, headers: dict[str, str]) -> bytes:
        body = plain(data)
        return body if "range" in headers else body[: len(body) - len(data) + half]

    o = await serve(RangeServer(stalls))
    await learnt(o, chunks[0])
    q = packed(chunks[1])
    await o.get_pack_range(q.pack, q.offset, q.length, q.pack_size)
    tap = weakref.ref(o._taps._taps[(q.pack, q.pack_size)])
    gc.disable()
    try:
        async with asyncio.timeout(10):
            while len(o._taps) or tap() is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # dropped after TAP_IDLE unread, its read stopped
    finally:
        gc.enable()


async def test_a_file_that_reuses_part_of_an_old_pack_reads_it_at_most_twice(
    serve: Serve, fill_rig: Callable[..., FillRig]
) -> None:
    """A new snapshot's file: chunks 0-7 and 9-15 of an older pack, a new chunk between.
    Two spans in the old pack: the first streams it, the second (and any further) cut from
    one shared read; before, each span read the pack from its first byte."""
    old, new = a_pack(16), a_pack(1)
    (_, r1, c1), (_, r2, c2) = old, new
    s = WholePacks([old, new])
    rig = fill_rig(await serve(s), 4 * CS)
    e = large(c1[:8] + c2 + c1[9:], r1[:8] + r2 + r1[9:])
    await rig.fill(e)
    assert rig.blob(e) == b"".join(r1[:8] + r2 + r1[9:])
    assert s.gets == {0: 2, 1: 1}  # the old pack twice, the new one once


async def test_a_run_read_after_its_origin_closed_fails_by_name(serve: Serve) -> None:
    data, raws, chunks = a_pack(8)  # two pieces of the body (wholepacks.PIECE)
    o = await serve(RangeServer(whole(data)))
    await learnt(o, chunks[0])
    run = o.pack_run(packed(chunks[0]).pack, 0, len(data), len(data))
    for i in range(4):  # the first piece's chunks
        assert bytes(await run.read(CS, bytes)) == raws[i]
    await o.close()
    with pytest.raises(OriginError, match="closed"):
        await run.read(CS, bytes)
    run.close()


async def test_a_pull_naming_its_pack_with_another_size_does_not_read_the_pack_again(
    serve: Serve,
) -> None:
    """On an origin that answers no ranges, an owner's pull-through is cut from one whole
    read of the pack (wholepacks.Taps), whose size is the asker's `psize`. The peer API
    charges a pull `max(size, len)` (api_peer._origin_bytes) and a pull that verifies wastes
    nothing, so a tap kept by (pack, size) alone would let an asker naming the right chunk
    with psize real+1, real+2, ... make the owner GET the whole pack (64 MiB by default,
    1 GiB at most) once per request, for a chunk's charge: a tap of the pack opened under
    another size that holds the range serves it."""
    data, raws, chunks = a_pack(16)
    s = RangeServer(whole(data))
    o = await serve(s)
    await learnt(o, chunks[0])
    src = OriginSource(o, window=0)  # as the owner's pull fetcher reads
    c = chunks[3]
    assert c.packed is not None
    for k in range(4):
        lie = dataclasses.replace(c.packed, pack_size=c.packed.pack_size + k)
        got = await asyncio.wait_for(src.get(dataclasses.replace(c, packed=lie)), 30)
        assert bytes(got) == raws[3]
    assert s.ranges.count("") == 1, f"the pack was read whole {s.ranges.count('')} times"
    assert o.stats.bytes_in <= len(data) + 4 * c.size


async def test_packs_read_without_a_pause_do_not_keep_a_third_waiting(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TAPS packs whose chunks are asked for without a pause (pull-throughs of a popular
    snapshot) are never unread for TAP_GRACE; a reader of another pack takes a finished
    one's place once it has waited that long, rather than for as long as they stay
    popular."""
    monkeypatch.setattr(wholepacks, "TAP_GRACE", 0.2)
    packs = [a_pack(2) for _ in range(wholepacks.TAPS + 1)]
    gets: Counter[int] = Counter()

    async def answer(path: str, headers: dict[str, str]) -> bytes:
        k = pack_of(packs, path)
        if "range" not in headers:
            gets[k] += 1
        return plain(packs[k][0])

    o = await serve(RangeServer(answer))
    await learnt(o, packs[0][2][0])
    src = OriginSource(o, window=0)
    stop = asyncio.Event()
    reads = Counter[int]()

    async def hot(k: int) -> None:
        while not stop.is_set():
            assert bytes(await src.get(packs[k][2][1])) == packs[k][1][1]
            reads[k] += 1
            await asyncio.sleep(0)  # (a finished pack's cut need not wait for anything)

    hots = [asyncio.create_task(hot(k)) for k in range(wholepacks.TAPS)]
    try:
        async with asyncio.timeout(10):
            while min(reads[k] for k in range(wholepacks.TAPS)) < 10:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        third = packs[wholepacks.TAPS]
        got = await asyncio.wait_for(src.get(third[2][0]), 10 * wholepacks.TAP_GRACE)
        assert bytes(got) == third[1][0]
        assert all(not t.done() for t in hots)  # the others were still being read
    finally:
        stop.set()
        await asyncio.gather(*hots)
    assert gets[wholepacks.TAPS] == 1
