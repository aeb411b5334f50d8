"""The cache view at scale: an admission walks only its victims, not every blob; recording a
big snapshot leaves the per-chunk work to the index's writer thread; a known chunk costs no
Python memory once its snapshot is indexed. Counted, not timed, so a loaded machine cannot
make these flaky."""

from __future__ import annotations

import asyncio
import gc
import shutil
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

import hostd.snapshots
from hostd.cache import TOUCH_SAVED, Cache
from hostd.core import manifest as mf
from hostd.core.manifest import Chunk, FileEntry
from hostd.index import Index
from hostd.snapshots import DECODED_CHUNKS
from hostd.tier import BlobStat, Tier

CS = mf.MIN_CHUNK_SIZE
MTIME = 1_700_000_000_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def fast_tmp() -> Iterator[Path]:
    """tmpfs where there is one: these tests write many index rows."""
    root = Path(
        tempfile.mkdtemp(prefix="hd-scale-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    yield root
    shutil.rmtree(root, ignore_errors=True)


def ids(prefix: str, n: int) -> list[bytes]:
    return [blake3.blake3(f"{prefix}/{i}".encode()).digest() for i in range(n)]


def manifest(prefix: str, files: int, chunks_per_file: int = 1) -> mf.Manifest:
    """A manifest of `files` files of `chunks_per_file` distinct chunks each (no data)."""
    cids = ids(prefix, files * chunks_per_file)
    entries = [
        FileEntry(
            f"d{i % 64}/f{i:07d}",
            0o644,
            CS * chunks_per_file,
            tuple(Chunk(cids[i * chunks_per_file + j], CS) for j in range(chunks_per_file)),
            MTIME,
        )
        for i in range(files)
    ]
    m = mf.build(chunk_size=CS, files=entries)
    # What decoding in a thread leaves computed (hostd.snapshots.decode_manifest).
    _ = m.snapshot_id
    m.blobs()
    return m


def open_cache(root: Path, budget: int, decoded_chunks: int = DECODED_CHUNKS) -> Cache:
    tier = Tier("only", root / "only", budget)
    cache = Cache(
        [tier],
        Index(root / "index.db"),
        manifests_dir=root / "manifests",
        clock=Clock(),
        decoded_chunks=decoded_chunks,
    )
    cache.load()
    return cache


async def admissions(cache: Cache, n: int, prefix: str) -> int:
    """Admit `n` blobs of 100 bytes into a full tier, each one evicting one; the entries the
    eviction queue walked, in all."""
    (tier,) = cache.tiers
    queue = cache.queues[tier.name]
    before = queue.walked
    for d in ids(prefix, n):
        t = await cache.admit(d, 100, CS, [tier])
        cache.abandon(d, t)
        cache.adopt(t, BlobStat(d, 100, 1, 1), CS, persist=False)
    return queue.walked - before


@pytest.mark.parametrize("blobs", [1_000, 50_000])
async def test_an_admission_walks_its_victims_not_the_tier(fast_tmp: Path, blobs: int) -> None:
    cache = open_cache(fast_tmp, blobs * 100)
    try:
        (tier,) = cache.tiers
        # A full tier (no files: a victim's removal is a no-op) whose 100 oldest blobs a
        # pinned snapshot names.
        pinned = manifest("pinned", 100)
        olds = ids("old", blobs - 100)
        for d in [*pinned.blobs(), *olds]:
            cache.adopt(tier, BlobStat(d, 100, 1, 1), CS, persist=False)
        cache.record_snapshot(pinned)
        cache.set_pinned(pinned.snapshot_id, True)
        assert cache.usage()[0].used == tier.budget

        # The pinned ones are met once, then out of the queue; after that each admission
        # looks at the one blob it evicts, the least recently used, whatever the count.
        assert await admissions(cache, 1, "a") == 100 + 1
        assert await admissions(cache, 199, "b") == 199
        assert cache.evictions[("only", "delete")] == 200
        assert cache.usage()[0].blobs == blobs
        assert [cache.locate(d) is None for d in olds[199:201]] == [True, False]

        # A restore holds the oldest left: the same.
        held = olds[200:300]
        with cache.holding(held):
            assert await admissions(cache, 10, "c") == 100 + 10
            assert await admissions(cache, 10, "d") == 10
        assert all(cache.locate(d) is not None for d in [*held, *pinned.blobs()])
        # Released or unpinned: queued again in their place (the oldest), so they go first.
        assert await admissions(cache, 1, "e") == 1
        assert cache.locate(held[0]) is None
        cache.set_pinned(pinned.snapshot_id, False)
        assert await admissions(cache, 1, "f") == 1
        assert cache.locate(next(iter(pinned.blobs()))) is None
    finally:
        cache.index.close()


async def test_recording_a_big_snapshot_leaves_per_chunk_work_to_the_writer(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where: list[str] = []
    rows = hostd.snapshots.chunk_rows

    def spying(m: mf.Manifest) -> Iterator[tuple[bytes, bytes, int]]:
        where.append(threading.current_thread().name)
        return rows(m)

    monkeypatch.setattr(hostd.snapshots, "chunk_rows", spying)
    cache = open_cache(fast_tmp, 1 << 40)
    try:
        big = manifest("big", 10_000)
        touched: list[str] = []
        writes = cache.index.touch_blobs

        def touch_blobs(digests: list[bytes], when: float) -> None:
            touched.append(threading.current_thread().name)
            writes(digests, when)

        monkeypatch.setattr(cache.index, "touch_blobs", touch_blobs)

        s = cache.record_snapshot(big)
        first = big.files[0]  # (a blob touched is written where it is cached)
        cache.adopt(cache.tiers[0], BlobStat(first.digest, first.size, 1, 1), CS, persist=False)
        with cache.holding(big.blobs()):
            cache.touch(big.blobs(), cache.clock() + TOUCH_SAVED)
        cache.set_pinned(s.id, True)  # its blob list, before the writer is done
        assert cache.pinned_blobs() == set(big.blobs())

        await asyncio.to_thread(cache.index.flush)
        assert where == ["hostd-index_0"]
        assert touched == ["hostd-index_0"]
        assert cache.index.count_chunks() == 10_000
        assert (fast_tmp / "manifests" / s.id).exists()
        # Its chunks are found once a blob holds them.
        f = big.files[7]
        cache.adopt(cache.tiers[0], BlobStat(f.digest, f.size, 1, 1), CS, persist=False)
        loc = cache.chunk_location(f.chunks[0].id)
        assert loc is not None
        assert (loc[0].digest, loc[1]) == (f.digest, 0)

        # A small one's chunks are found at once, before the writer gets to them.
        small = manifest("small", 10)
        g = small.files[3]
        cache.adopt(cache.tiers[0], BlobStat(g.digest, g.size, 1, 1), CS, persist=False)
        where.clear()
        cache.record_snapshot(small)
        assert cache.chunk_location(g.chunks[0].id) is not None
    finally:
        cache.index.close()


def test_a_known_chunk_costs_no_python_memory_once_indexed(fast_tmp: Path) -> None:
    """Recording 100,000 chunks' worth of snapshots grows the Python heap by a bounded
    amount, not per chunk: the chunk map and blob lists are in the index, and decoded
    manifests are kept only up to a bound (set small here). The first 50,000 are recorded
    untraced (tracing triples the writer's time); the rest are what is measured."""
    cache = open_cache(fast_tmp, 1 << 40, decoded_chunks=4_096)
    try:
        ms = [manifest(f"m{k}", 100, 100) for k in range(10)]  # 10,000 chunks each
        for m in ms[:5]:
            cache.record_snapshot(m)
        cache.index.flush()
        traced = ms[5:]
        del ms, m
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for m in traced:
                cache.record_snapshot(m)
            cache.index.flush()
            assert cache.chunk_location(traced[0].files[0].chunks[0].id) is None  # settles
            del traced, m
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert cache.index.count_chunks() == 100_000
        assert grown / 50_000 <= 64, f"{grown / 50_000:.0f} bytes per known chunk"
        # ... and they are all still there, from the index and the manifests directory.
        assert len(cache.snapshots()) == 10
        assert all(s.manifest.chunk_count == 10_000 for s in cache.snapshots()[::3])
    finally:
        cache.index.close()


@pytest.mark.parametrize("shape", ["many entries", "one long value"])
def test_manifests_without_chunks_are_kept_within_the_bound_too(fast_tmp: Path, shape: str) -> None:
    """Decoded manifests are kept up to a bound counted in chunks. One of no chunks but
    many meta pairs (or directories, or empty files: what a hostile origin can serve, up to
    256 MiB each) counted nothing, and the last 8 used were kept until a restart: 1.3 GB
    after three restores of 28 MB manifests; so did one of a single 32 MiB meta value. Each
    entry without chunks now counts one, and each TEXT_PER_CHUNK characters of text one."""
    cache = open_cache(fast_tmp, 1 << 40, decoded_chunks=4_096)
    try:

        def hollow(k: int) -> mf.Manifest:  # 2,500 entries, or one of 2 MB; no chunk
            if shape == "one long value":
                return mf.build(chunk_size=CS, files=[], meta={"k": str(k) * 2_000_000})
            meta = {f"k{k}-{i:05d}": "v" * 40 for i in range(1_000)}
            dirs = [f"d{k}/{i:05d}" for i in range(1_000)]
            empty = [FileEntry(f"e{k}/{i:05d}", 0o644, 0, (), MTIME) for i in range(500)]
            return mf.build(chunk_size=CS, files=empty, dirs=dirs, meta=meta)

        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            one = hollow(0)
            cost = tracemalloc.get_traced_memory()[0] - base  # one decoded, as a restore has
            del one
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
            for k in range(1, 9):
                cache.record_snapshot(hollow(k))
            cache.index.flush()
            cache.record_snapshot(manifest("settle", 1))  # (lets go of what was indexed)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert grown < 3 * cost, f"{grown / cost:.1f} manifests' worth kept"
        assert len(cache.snapshots()) == 9  # (each still known, read again when used)
    finally:
        cache.index.close()


def test_a_cached_blob_costs_its_record_and_little_more(fast_tmp: Path) -> None:
    """A million cached blobs must fit the daemon in < 300 MiB: the records, their index
    map and their eviction queue hold no Python object per blob. Measured with tracemalloc
    over 30,000 blobs, with the cache owning its digests (as when read from the index) and
    every blob queued: ~119 bytes (arrays grow ahead of need; 131 while each record had a
    `charged` column of its own and a 64-bit chunk size)."""
    cache = open_cache(fast_tmp, 1 << 40)
    try:
        (tier,) = cache.tiers
        n = 30_000
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                d = blake3.blake3(i.to_bytes(4, "little")).digest()
                cache.adopt(tier, BlobStat(d, 100, 1, 1), CS, persist=False)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert cache.usage()[0].blobs == n
        assert len(cache.queues[tier.name]) == n
        assert grown / n < 125, f"{grown / n:.0f} bytes per cached blob"
    finally:
        cache.index.close()


async def test_a_published_manifest_is_let_go_once_indexed_unless_it_is_small(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish's own manifest is kept decoded only up to BUILT_KEPT_CHUNKS: its objects lie
    among the publish's garbage, and kept, they pinned as much again of the heap. It is let
    go as soon as the writer has indexed it, not at the next call (a publish's). A restore's
    is kept, and the big one is read again from its file when asked for. A restore handed
    the publish's own copy while it is being indexed does not keep it either."""
    monkeypatch.setattr(hostd.snapshots, "BUILT_KEPT_CHUNKS", 5_000)
    cache = open_cache(fast_tmp, 1 << 40)
    writer = threading.Event()
    try:
        big, small = manifest("big", 10_000), manifest("small", 600)
        restored = manifest("restored", 10_000)
        cache.index.later(writer.wait)  # the writer is busy: big stays being indexed
        for m in (big, small):
            cache.record_snapshot(m, built=True)
        cache.record_snapshot(restored)
        snaps = cache.snaps
        assert await snaps.load_manifest(big.snapshot_id) is big  # a restore, meanwhile
        cache.record_snapshot(big)
        writer.set()
        async with asyncio.timeout(30):
            while snaps._indexing:  # noqa: ASYNC110 - settled by a call the writer queues
                await asyncio.sleep(0.01)
        assert snaps._kept(big.snapshot_id) is None
        assert snaps._kept(small.snapshot_id) is small
        assert snaps._kept(restored.snapshot_id) is restored
        cache.record_snapshot(big, built=True)  # the same tree published again
        assert snaps._kept(big.snapshot_id) is None
        again = await snaps.load_manifest(big.snapshot_id)
        assert again is not None
        assert again.files == big.files
    finally:
        writer.set()  # (a failure above must not leave the writer waiting: close joins it)
        cache.index.close()
