"""Reading packed chunks from the origin (sources.OriginSource on a real file:// origin):
one ranged read per pack window shared by its chunks, a chunk's own range where windows
are off or it crosses a window's edge, and every chunk verified on its own."""

from __future__ import annotations

import asyncio
import functools
import random
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import blake3
import pytest

from hostd import sources
from hostd.core import codec
from hostd.core import manifest as mf
from hostd.core.ids import chunk_id
from hostd.core.retry import RetryPolicy
from hostd.errors import ChunkCorrupt, ChunkMissing
from hostd.origin import Origin
from hostd.sources import OriginSource


def make_origin(tmp_path: Path) -> Origin:
    return Origin(
        (tmp_path / "origin").as_uri(),
        {},
        retry=RetryPolicy(attempts=1, base=0.0, cap=0.0),
        rng=random.Random(0),
    )


async def put_pack(
    origin: Origin, parts: list[bytes], zstd: frozenset[int] = frozenset()
) -> list[mf.Chunk]:
    """Store `parts` as one pack (those in `zstd` compressed); the chunks that name them."""
    stored = [codec.compress(p) if i in zstd else p for i, p in enumerate(parts)]
    data = b"".join(stored)
    pack = blake3.blake3(data).digest()
    await origin.put_pack(pack, data)
    out, off = [], 0
    for i, (raw, s) in enumerate(zip(parts, stored, strict=True)):
        kind = mf.CODEC_ZSTD if i in zstd else mf.CODEC_RAW
        out.append(mf.Chunk(chunk_id(raw), len(raw), kind, mf.Packed(pack, off, len(s), len(data))))
        off += len(s)
    return out


async def test_chunks_of_one_pack_share_one_ranged_read(tmp_path: Path) -> None:
    origin = make_origin(tmp_path)
    rng = random.Random(1)
    parts = [rng.randbytes(rng.randint(1, 9000)) for _ in range(50)]
    chunks = await put_pack(origin, parts, zstd=frozenset({3, 7}))
    src = OriginSource(origin)
    before = origin.stats.requests_ok  # the upload
    got = await asyncio.gather(*(src.get(c) for c in chunks))
    assert [bytes(g) for g in got] == parts
    assert origin.stats.requests_ok - before == 1  # one read for the 50 chunks asked at once
    assert bytes(await src.get(chunks[10])) == parts[10]
    assert origin.stats.requests_ok - before == 1  # still buffered


async def test_a_batch_reads_each_window_once_and_answers_each_chunk_on_its_own(
    tmp_path: Path,
) -> None:
    """get_many (Fetcher.landing's batches): one read per window, every chunk verified, and
    a chunk that is bad or absent is that chunk's outcome, not the batch's."""
    origin = make_origin(tmp_path)
    parts = [bytes([i]) * 1000 for i in range(12)]  # 12 KB: 3 windows of 4 KB
    chunks = await put_pack(origin, parts, zstd=frozenset({5}))
    own = mf.Chunk(chunk_id(b"own object"), 10)
    await origin.put_chunk(own.id, b"own object")
    p0 = chunks[0].packed
    assert p0 is not None
    lying = mf.Chunk(chunk_id(b"x" * 1000), 1000, 0, p0)  # chunk 0's bytes, another id
    gone = mf.Chunk(chunk_id(b"gone"), 4, 0, mf.Packed(b"\x07" * 32, 0, 4, 4))
    src = OriginSource(origin, window=4096)
    before = origin.stats.requests_ok
    got = await src.get_many([*chunks, own, lying, gone])
    assert [bytes(g) for g in got[:12]] == parts  # type: ignore[arg-type]
    assert bytes(got[12]) == b"own object"  # type: ignore[arg-type]
    assert isinstance(got[13], ChunkCorrupt)
    assert "from origin" in got[13].message
    assert isinstance(got[14], ChunkMissing)
    crossing = sum(
        1 for c in chunks if c.packed and c.packed.offset // 4096 != (c.packed.offset + 999) // 4096
    )
    # 3 windows, the chunks crossing an edge, the chunk of its own (the absent pack failed)
    assert origin.stats.requests_ok - before == 3 + crossing + 1
    assert await src.get_many([]) == []


async def test_without_windows_each_chunk_reads_its_own_range(tmp_path: Path) -> None:
    origin = make_origin(tmp_path)
    parts = [b"a" * 100, b"b" * 200, b"c" * 300]
    chunks = await put_pack(origin, parts)
    src = OriginSource(origin, window=0)
    before = origin.stats.requests_ok
    assert [bytes(await src.get(c)) for c in chunks] == parts
    assert origin.stats.requests_ok - before == 3
    assert origin.stats.bytes_in == 600  # nothing read beyond the chunks asked for


async def test_windows_are_read_once_each_and_evicted_oldest_first(tmp_path: Path) -> None:
    origin = make_origin(tmp_path)
    parts = [bytes([i]) * 1000 for i in range(40)]  # 40 KB: 10 windows of 4 KB
    chunks = await put_pack(origin, parts)
    src = OriginSource(origin, window=4096, buffer=8192)
    before = origin.stats.requests_ok
    for c, p in zip(chunks, parts, strict=True):
        assert bytes(await src.get(c)) == p
    # Every chunk that crosses a window's edge is read on its own; each window once.
    crossing = sum(
        1 for c in chunks if c.packed and c.packed.offset // 4096 != (c.packed.offset + 999) // 4096
    )
    windows = -(-40_000 // 4096)
    assert origin.stats.requests_ok - before == windows + crossing
    assert src._held <= 8192  # the buffer keeps its bound


async def test_bad_bytes_in_a_pack_are_corrupt_and_a_short_pack_too(tmp_path: Path) -> None:
    origin = make_origin(tmp_path)
    (good,) = await put_pack(origin, [b"good bytes"])
    assert good.packed is not None
    lying = mf.Chunk(chunk_id(b"other bytes"), 10, 0, good.packed)
    with pytest.raises(ChunkCorrupt, match="from origin"):
        await OriginSource(origin).get(lying)
    assert good.packed is not None
    longer = mf.Packed(good.packed.pack, 0, 10, 20)  # the manifest says the pack is longer
    with pytest.raises((ChunkCorrupt, ChunkMissing)):
        await OriginSource(origin).get(mf.Chunk(good.id, 10, 0, longer))
    gone = mf.Packed(b"\x07" * 32, 0, 10, 10)
    with pytest.raises(ChunkMissing, match="not at origin"):
        await OriginSource(origin).get(mf.Chunk(good.id, 10, 0, gone))


@pytest.mark.parametrize("batch", [False, True])
async def test_a_window_that_did_not_verify_is_read_again(tmp_path: Path, batch: bool) -> None:
    """A pack read with a flipped byte (a flaky proxy, a bad disk at the origin) fails its
    chunks, and the next ask reads the window again: the bad bytes are not kept to fail
    every retry while the window stays in use."""
    origin = make_origin(tmp_path)
    parts = [bytes([i]) * 1000 for i in range(4)]
    chunks = await put_pack(origin, parts)
    assert chunks[0].packed is not None
    [stored] = [
        p for p in (tmp_path / "origin").rglob("*") if p.name == chunks[0].packed.pack.hex()
    ]
    good = stored.read_bytes()
    stored.write_bytes(good[:1500] + bytes([good[1500] ^ 1]) + good[1501:])  # in chunk 1
    src = OriginSource(origin)

    async def ask() -> list[bytes | BaseException]:
        if batch:
            got = await src.get_many(chunks)
        else:
            got = []
            for c in chunks:
                try:
                    got.append(await src.get(c))
                except ChunkCorrupt as e:
                    got.append(e)
        return [g if isinstance(g, BaseException) else bytes(g) for g in got]

    first = await ask()
    assert isinstance(first[1], ChunkCorrupt)
    stored.write_bytes(good)  # the origin answers right again
    assert await ask() == parts


@pytest.fixture
def plain_web_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain static web server (Python's http.server: it answers ranges with the whole
    file), serving a directory as an http:// origin."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


async def test_an_origin_that_cannot_answer_ranges_is_read_whole(
    tmp_path: Path, plain_web_server: tuple[str, Path]
) -> None:
    url, root = plain_web_server
    local = make_origin(tmp_path)
    parts = [b"x" * 3000, b"y" * 4000, b"z" * 5000]
    chunks = await put_pack(local, parts)
    # the same objects, served by the plain web server
    shutil.copytree(tmp_path / "origin", root, dirs_exist_ok=True)
    web = Origin(url, {}, retry=RetryPolicy(attempts=1, base=0.0, cap=0.0))
    assert [bytes(await OriginSource(web).get(c)) for c in chunks] == parts  # a whole pack
    exact = OriginSource(web, window=0)  # ranges: refused, then whole packs, sliced
    assert [bytes(await exact.get(c)) for c in reversed(chunks)] == parts[::-1]
    assert not web._ranges  # it learnt that the server cannot answer ranges
    await web.close()


async def test_windows_no_chunk_was_asked_of_for_a_while_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "PACK_IDLE", 0.05)
    origin = make_origin(tmp_path)
    chunks = await put_pack(origin, [b"a" * 1000, b"b" * 2000])
    src = OriginSource(origin)
    assert bytes(await src.get(chunks[0])) == b"a" * 1000
    assert src._held > 0  # kept for the next chunk of the restore
    deadline = asyncio.get_running_loop().time() + 10
    while src._held:  # the restore is over: nothing asks, the window goes
        assert asyncio.get_running_loop().time() < deadline, "the idle window was kept"
        await asyncio.sleep(0.01)
    assert bytes(await src.get(chunks[1])) == b"b" * 2000  # read again when asked again
