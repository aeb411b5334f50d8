"""Packs from a server that answers no ranges (a plain web server may not): the pack is read
whole with one GET, and every range asked of it, now or while it is kept, is cut from that
read as it arrives (origin._Tap). A restore's spans, a window and an owner's pull-throughs
of single chunks all share it, so the origin sends each pack once, not once a chunk.

Against the raw HTTP server of tests/test_fastget.py, answering every GET whole: many
chunks asked at once cost one GET; a body that breaks off is asked again and the bytes had
are skipped; a missing pack fails every reader and is asked again later; at most TAPS packs
are held; one nobody reads is dropped; a probe learns whether ranges are answered without
reading a body; and peers then find an owner by the pack, not the chunk."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from test_fastget import Server, plain, serve
from test_ranged import CS, RangeServer, a_pack, ranges_of

from hostd import origin as origin_mod
from hostd.core.manifest import Chunk
from hostd.errors import ChunkMissing
from hostd.origin import Origin
from hostd.peers import Membership, PeerClient, PeerSource
from hostd.sources import OriginSource

__all__ = ["serve"]  # the fixture, used by name

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
    """Have `o` find out that its server answers no ranges (reading one chunk)."""
    assert bytes(await OriginSource(o, window=0).get(chunk))
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
    assert len(data) + origin_mod._WHOLE_PIECE <= o.stats.bytes_in <= len(data) + cut


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


async def test_at_most_taps_packs_are_held_at_once(serve: Serve) -> None:
    """Three packs asked at once, with the first two held by the server: the third waits
    for a slot; it starts once one of the first two is read, and takes that one's place."""
    packs = [a_pack(2) for _ in range(3)]
    release = [asyncio.Event() for _ in packs]
    reading = 0
    most = 0

    async def answer(path: str, headers: dict[str, str]) -> bytes:
        nonlocal reading, most
        k = next(i for i, p in enumerate(packs) if p[2][0].packed.pack.hex() in path)  # type: ignore[union-attr]
        if "range" in headers:  # (only the first, which finds out)
            return plain(packs[k][0])
        reading += 1
        most = max(most, reading)
        await release[k].wait()
        reading -= 1
        return plain(packs[k][0])

    s = RangeServer(answer)
    o = await serve(s)
    release[0].set()
    await learnt(o, packs[0][2][0])
    release[0].clear()
    o._taps.clear()  # (a fresh start: none kept)
    src = OriginSource(o, window=0)
    tasks = [asyncio.create_task(src.get(p[2][1])) for p in packs]
    async with asyncio.timeout(10):
        while reading < origin_mod.TAPS:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)
    first = next(k for k, p in enumerate(packs) if (p[2][0].packed.pack, 2 * CS) in o._taps)  # type: ignore[union-attr]
    waiting = next(k for k in range(3) if (packs[k][2][0].packed.pack, 2 * CS) not in o._taps)  # type: ignore[union-attr]
    release[first].set()
    assert bytes(await asyncio.wait_for(tasks[first], 10)) == packs[first][1][1]
    for e in release:
        e.set()
    got = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert [bytes(g) for g in got] == [p[1][1] for p in packs]
    assert most == origin_mod.TAPS
    assert waiting != first
    assert len(o._taps) <= origin_mod.TAPS


async def test_a_pack_nobody_reads_is_dropped(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(origin_mod, "TAP_IDLE", 0.05)
    data, raws, chunks = a_pack(4)
    o = await serve(RangeServer(whole(data)))
    await learnt(o, chunks[0])
    assert bytes(await OriginSource(o, window=0).get(chunks[3])) == raws[3]
    async with asyncio.timeout(10):
        while o._taps:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_the_probe_asks_for_one_byte_once(serve: Serve) -> None:
    data, _, chunks = a_pack(4)
    p = chunks[0].packed
    assert p is not None
    s = RangeServer(whole(data))
    o = await serve(s)
    assert await o.answers_ranges(p.pack) is False
    assert await o.answers_ranges(p.pack) is False
    assert s.ranges == ["bytes=0-0"]
    assert o.stats.bytes_in == 0  # the body that came with the 200 was not read

    r = RangeServer(ranges_of(data))
    o = await serve(r)
    assert await o.answers_ranges(p.pack) is True
    assert await o.answers_ranges(p.pack) is True
    assert r.ranges == ["bytes=0-0"]


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
    assert len(s.ranges) == 1  # not asked again for PROBE_AGAIN seconds
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
