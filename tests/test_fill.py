"""Filler.ensure over a real Cache (tiers in temp dirs) and a fake chunk source: fills missing
blobs and reports bytes by source, fetches each chunk once however many ensure() calls want
it, resumes what a cancelled one left, re-verifies a blob changed behind its back, and leaves
nothing behind when a tier cannot take a blob."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from chunkfakes import DEADLINE, FakeSource, file_entry, pattern

from hostd.cache import Blob, Cache
from hostd.core import manifest as mf
from hostd.core.manifest import FileEntry
from hostd.errors import ChunkMissing, TierError
from hostd.fetch import Fetcher
from hostd.fill import Filler, FillProgress
from hostd.index import Index
from hostd.sources import LocalBlobSource
from hostd.tier import BLOB_MODE, BlobStat, Tier

CS = mf.MIN_CHUNK_SIZE


class Rig:
    """A cache with a `mem` and a `disk` tier, a fake origin, a fetcher and a filler."""

    def __init__(
        self,
        root: Path,
        mem: int = 64 * CS,
        disk: int = 64 * CS,
        workers: int = 4,
        mem_tier: type[Tier] = Tier,
    ) -> None:
        self.root = root
        self.tiers = [mem_tier("mem", root / "mem", mem), Tier("disk", root / "disk", disk)]
        self.mem, self.disk = self.tiers
        self.index = Index(root / "index.db")
        self.cache = Cache(self.tiers, self.index, manifests_dir=root / "manifests", clock=Clock())
        self.cache.load()
        self.origin = FakeSource("origin")
        self.fetcher = Fetcher([LocalBlobSource(self.cache), self.origin], concurrency=4)
        self.filler = Filler(self.cache, self.fetcher, workers=workers)
        self.data: dict[bytes, bytes] = {}

    def file(self, path: str, data: bytes) -> FileEntry:
        """A file whose chunks the origin holds."""
        e = file_entry(path, data, CS)
        self.origin.add_file(e, data, CS)
        self.data[e.digest] = data
        return e

    async def ensure(
        self, entries: list[FileEntry], tiers: list[Tier] | None = None
    ) -> tuple[dict[bytes, Blob], FillProgress]:
        progress = FillProgress()
        async with asyncio.timeout(DEADLINE):
            found = await self.filler.ensure(entries, CS, tiers or [self.mem], progress)
        return found, progress

    def leftovers(self) -> list[str]:
        """Everything in the tiers' partial/ and tmp/ directories."""
        return sorted(
            f"{t.name}/{d.name}/{p.name}"
            for t in self.tiers
            for d in (t.partial_dir, t.tmp_dir)
            for p in d.iterdir()
        )

    def close(self) -> None:
        self.index.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def assert_complete(rig: Rig, e: FileEntry, tier: Tier) -> None:
    b = rig.cache.locate(e.digest, [tier])
    assert b is not None, e.path
    assert b.path.read_bytes() == rig.data[e.digest]
    assert stat.S_IMODE(os.stat(b.path).st_mode) == BLOB_MODE
    assert rig.cache.unchanged(b)


def complete_files(t: Tier) -> list[bytes]:
    return sorted(s.digest for s in t.scan()[0])


# -- filling -----------------------------------------------------------------------------------


async def test_ensure_fills_missing_blobs_and_reports_bytes_by_source(rig: Rig) -> None:
    big = rig.file("big", pattern("big", 3 * CS + 123))
    small = rig.file("small", pattern("small", 1000))
    same = FileEntry(
        "copy-of-small", 0o600, small.size, small.chunks, small.mtime
    )  # one blob for both
    empty = rig.file("empty", b"")

    found, progress = await rig.ensure([big, small, same, empty])

    assert set(found) == {big.digest, small.digest}
    assert_complete(rig, big, rig.mem)
    assert_complete(rig, small, rig.mem)
    assert progress.total_bytes == progress.done_bytes == big.size + small.size
    assert +progress.by_source == {"origin": big.size + small.size}
    assert all(n == 1 for n in rig.origin.calls.values())
    assert len(rig.origin.calls) == len(big.chunks) + 1
    assert rig.leftovers() == []
    assert {u.name: u.used for u in rig.cache.usage()} == {
        "mem": big.size + small.size,
        "disk": 0,
    }

    # Again: everything is in the tier already, nothing is fetched.
    calls = len(rig.origin.order)
    found2, progress2 = await rig.ensure([big, small])
    assert found2 == found
    assert +progress2.by_source == {"mem": big.size + small.size}
    assert len(rig.origin.order) == calls


async def test_a_blob_in_another_tier_is_copied_in_not_fetched(rig: Rig) -> None:
    f = rig.file("f", pattern("f", 2 * CS))
    await rig.ensure([f], [rig.disk])
    calls = len(rig.origin.order)

    found, progress = await rig.ensure([f], [rig.mem])

    assert found[f.digest].tier is rig.mem
    assert_complete(rig, f, rig.mem)
    assert_complete(rig, f, rig.disk)  # a copy, the lower one stays
    assert +progress.by_source == {"disk": f.size}
    assert len(rig.origin.order) == calls


async def test_chunks_shared_with_a_local_blob_come_from_it(rig: Rig) -> None:
    base = pattern("base", 3 * CS)
    old = rig.file("old", base)
    rig.cache.record_snapshot(mf.build(chunk_size=CS, files=[old]))
    await rig.ensure([old])
    # A new file whose first two chunks are the old one's: only the third is fetched.
    new_data = base[: 2 * CS] + pattern("tail", 500)
    new = file_entry("new", new_data, CS)
    rig.data[new.digest] = new_data
    rig.origin.stored[new.chunks[2].id] = new_data[2 * CS :]
    calls = len(rig.origin.order)

    _, progress = await rig.ensure([new])

    assert_complete(rig, new, rig.mem)
    assert +progress.by_source == {"dedup": 2 * CS, "origin": 500}
    assert rig.origin.order[calls:] == [new.chunks[2].id]


async def test_two_concurrent_ensures_fetch_each_chunk_once(rig: Rig) -> None:
    a = rig.file("a", pattern("a", 4 * CS))
    b = rig.file("b", pattern("b", 2 * CS + 5))
    gate = rig.origin.gate_all = asyncio.Event()

    async with asyncio.timeout(DEADLINE):
        first = asyncio.create_task(rig.ensure([a, b]))
        second = asyncio.create_task(rig.ensure([b, a]))
        await rig.origin.arrived(1)  # both are under way; the origin holds every call
        gate.set()
        (found1, p1), (found2, p2) = await asyncio.gather(first, second)

    assert found1 == found2
    assert set(found1) == {a.digest, b.digest}
    assert_complete(rig, a, rig.mem)
    assert_complete(rig, b, rig.mem)
    assert sorted(rig.origin.calls.values()) == [1] * (len(a.chunks) + len(b.chunks))
    assert p1.done_bytes == p2.done_bytes == a.size + b.size
    assert rig.filler.filling() == set()


async def test_a_blob_already_there_is_not_held_up_by_another_fill(rig: Rig) -> None:
    there = rig.file("there", pattern("there", CS))
    await rig.ensure([there])
    slow = rig.file("slow", pattern("slow", CS))
    release = rig.origin.gate(slow.chunks[0])

    first = asyncio.create_task(rig.ensure([there, slow]))
    await rig.origin.until(lambda s: slow.chunks[0].id in s.order)
    found, _ = await rig.ensure([there])  # must not wait for `slow`
    assert set(found) == {there.digest}
    assert not first.done()
    release.set()
    async with asyncio.timeout(DEADLINE):
        found1, _ = await first
    assert set(found1) == {there.digest, slow.digest}


async def test_a_blob_another_fill_makes_is_usable_once_that_blob_is_done(rig: Rig) -> None:
    """A restore that needs one blob of a big fill under way gets it when that blob completes,
    not when the whole other fill ends."""
    shared = rig.file("shared", pattern("shared", CS))
    slow = rig.file("slow", pattern("slow", CS))
    release_shared = rig.origin.gate(shared.chunks[0])
    release_slow = rig.origin.gate(slow.chunks[0])

    first = asyncio.create_task(rig.ensure([shared, slow]))
    await rig.origin.until(lambda s: {shared.chunks[0].id, slow.chunks[0].id} <= set(s.order))
    second = asyncio.create_task(rig.ensure([shared]))  # waits on the first's claim
    release_shared.set()
    async with asyncio.timeout(DEADLINE):
        found, _ = await second
    assert set(found) == {shared.digest}
    assert not first.done(), "the first fill is still held on `slow`"
    assert rig.origin.calls[shared.chunks[0].id] == 1
    release_slow.set()
    async with asyncio.timeout(DEADLINE):
        found1, _ = await first
    assert set(found1) == {shared.digest, slow.digest}


async def test_a_missing_chunk_fails_ensure_naming_it_and_keeps_the_partial(rig: Rig) -> None:
    f = rig.file("f", pattern("f", 3 * CS))
    del rig.origin.stored[f.chunks[1].id]
    with pytest.raises(ChunkMissing, match=f.chunks[1].id.hex()):
        await rig.ensure([f])
    assert rig.cache.locate(f.digest) is None
    # Kept for a later resume (this was no tier failure), still charged.
    assert rig.cache.partial(f.digest) is not None
    assert complete_files(rig.mem) == []
    assert rig.filler.filling() == set()


# -- cancellation and resume -------------------------------------------------------------------


async def test_cancelled_half_way_then_resumed_fetching_only_what_is_missing(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, workers=1)  # one worker: chunks are fetched and written in file order
    try:
        f = rig.file("f", pattern("f", 3 * CS + 999))
        g = rig.file("g", pattern("g", CS))
        rig.origin.gate(f.chunks[2])

        task = asyncio.create_task(rig.ensure([f, g]))
        await rig.origin.until(lambda s: f.chunks[2].id in s.order)  # 0 and 1 are written
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await rig.origin.until(lambda s: s.cancelled == [f.chunks[2].id])

        # Nothing looks complete; f's partial blob holds its first two chunks and is charged.
        assert complete_files(rig.mem) == []
        assert rig.cache.locate(f.digest) is None
        assert rig.cache.locate(g.digest) is None
        part = rig.cache.partial(f.digest)
        assert part is not None
        assert rig.mem.partial_path(f.digest).exists()
        have = rig.mem.partial_dir / f"{f.digest.hex()}.have"
        assert have.read_bytes() == b"\x01\x01\x00\x00"
        assert rig.cache.copies(g.digest) == []
        assert rig.filler.filling() == set()

        del rig.origin.gates[f.chunks[2].id]
        before = len(rig.origin.order)
        found, progress = await rig.ensure([f, g])

        assert set(found) == {f.digest, g.digest}
        assert_complete(rig, f, rig.mem)
        assert_complete(rig, g, rig.mem)
        assert rig.origin.order[before:] == [f.chunks[2].id, f.chunks[3].id, g.chunks[0].id]
        assert +progress.by_source == {
            "resumed": 2 * CS,
            "origin": f.size - 2 * CS + g.size,
        }
        assert rig.leftovers() == []
    finally:
        rig.close()


async def test_resume_after_a_restart_rechecks_present_chunks(tmp_path: Path) -> None:
    rig = Rig(tmp_path, workers=1)
    f = rig.file("f", pattern("f", 4 * CS))
    rig.origin.gate(f.chunks[3])
    task = asyncio.create_task(rig.ensure([f]))
    await rig.origin.until(lambda s: f.chunks[3].id in s.order)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rig.close()
    # While the daemon is down, a present chunk's bytes go bad on disk.
    path = rig.mem.partial_path(f.digest)
    assert path.with_name(path.name + ".have").read_bytes() == b"\x01\x01\x01\x00"
    with open(path, "r+b") as fh:  # noqa: ASYNC230 - a tiny write
        fh.write(b"\xff\xff")

    again = Rig(tmp_path)  # a new daemon on the same directories
    try:
        assert again.cache.partial(f.digest) is not None
        again.data = rig.data
        again.origin.stored = dict(rig.origin.stored)
        found, progress = await again.ensure([f])
        assert_complete(again, f, again.mem)
        # Chunk 0 was re-hashed, found bad and fetched again; 1 and 2 were kept.
        assert sorted(again.origin.order) == sorted([f.chunks[0].id, f.chunks[3].id])
        assert +progress.by_source == {"resumed": 2 * CS, "origin": 2 * CS}
        assert found[f.digest].tier is again.mem
    finally:
        again.close()


async def test_a_resumed_blob_already_full_is_completed_once(rig: Rig) -> None:
    f = rig.file("f", pattern("f", 4 * CS))
    t = await rig.cache.admit(f.digest, f.size, CS, [rig.mem])
    pb = t.open_partial(f.digest, f.size, len(f.chunks))
    for i in range(len(f.chunks)):
        pb.write(i, i * CS, rig.data[f.digest][i * CS : (i + 1) * CS])
    pb.close()  # every chunk written, never completed (cancelled just before)

    found, progress = await rig.ensure([f])

    assert_complete(rig, f, rig.mem)
    assert rig.origin.order == []
    assert +progress.by_source == {"resumed": f.size}
    assert rig.leftovers() == []
    assert found[f.digest].complete


# -- blobs changed behind the cache's back ----------------------------------------------------


async def test_a_touched_but_intact_blob_is_reverified_and_kept(rig: Rig) -> None:
    f = rig.file("f", pattern("f", 2 * CS))
    await rig.ensure([f])
    b = rig.cache.locate(f.digest)
    assert b is not None
    os.utime(b.path, ns=(0, 12345))
    assert not rig.cache.unchanged(b)
    calls = len(rig.origin.order)

    await rig.ensure([f])

    assert len(rig.origin.order) == calls
    assert_complete(rig, f, rig.mem)  # unchanged() again: the new mtime was recorded


async def test_a_blob_written_through_is_dropped_and_fetched_again(rig: Rig) -> None:
    f = rig.file("f", pattern("f", 2 * CS))
    await rig.ensure([f])
    b = rig.cache.locate(f.digest)
    assert b is not None
    os.chmod(b.path, 0o644)
    with open(b.path, "r+b") as fh:  # noqa: ASYNC230 - a tiny write, as root would do it
        fh.write(b"scribble")
    os.chmod(b.path, BLOB_MODE)

    _, progress = await rig.ensure([f])

    assert_complete(rig, f, rig.mem)
    assert +progress.by_source == {"origin": f.size}


# -- the poisoning attack of issue 9 (5): a linked blob written through, its mtime set back ------


def link_and_poison(rig: Rig, b: Blob, name: str = "restored") -> Path:
    """What a link restore to a writer (root in a container) allows: the caller writes "EVIL"
    through its hardlink to the blob and sets the mtime back to the recorded one."""
    restored = rig.root / name
    os.link(b.path, restored)
    rig.cache.lent([b])
    os.chmod(restored, 0o644)
    with open(restored, "r+b") as fh:
        fh.write(b"EVIL")
    os.chmod(restored, BLOB_MODE)
    os.utime(restored, ns=(b.mtime_ns, b.mtime_ns))
    st = os.stat(b.path)
    assert (st.st_size, st.st_mtime_ns) == (b.size, b.mtime_ns)
    return restored


async def test_a_poisoned_linked_blob_is_dropped_and_fetched_again(rig: Rig) -> None:
    f = rig.file("f", pattern("f", 2 * CS))
    await rig.ensure([f])
    b = rig.cache.locate(f.digest)
    assert b is not None
    restored = link_and_poison(rig, b)

    found, progress = await rig.ensure([f])

    assert +progress.by_source == {"origin": f.size}
    assert_complete(rig, f, rig.mem)
    assert os.stat(found[f.digest].path).st_ino != os.stat(restored).st_ino
    assert restored.read_bytes()[:4] == b"EVIL"  # the caller keeps what it wrote


async def poisoned_dedup_source(rig: Rig) -> tuple[FileEntry, FileEntry, Blob]:
    """f complete and indexed, g sharing f's first chunk, f's blob linked and poisoned."""
    shared = pattern("shared", CS)
    f = rig.file("f", shared + pattern("f", CS))
    g = rig.file("g", shared + pattern("g", CS))  # its first chunk is f's first chunk
    await rig.ensure([f])
    rig.cache.record_snapshot(mf.build(chunk_size=CS, files=[f]))  # its chunks are indexed
    b = rig.cache.locate(f.digest)
    assert b is not None
    assert rig.cache.chunk_location(g.chunks[0].id) == (b, 0)
    link_and_poison(rig, b)
    return f, g, b


async def test_a_poisoned_linked_blob_is_never_a_dedup_source(rig: Rig) -> None:
    f, g, _ = await poisoned_dedup_source(rig)

    _, progress = await rig.ensure([g])

    assert +progress.by_source == {"origin": g.size}
    assert_complete(rig, g, rig.mem)
    assert rig.cache.copies(f.digest) == []  # dropped when the dedup read checked it


async def test_a_dedup_read_that_fails_its_chunk_hash_drops_the_blob(rig: Rig) -> None:
    """Bytes bad with a stat that still matches the record (bit rot, or a write in the same
    clock tick as the stat on a kernel without multigrain timestamps): the chunk hash catches
    them, and the blob is re-hashed and dropped."""
    f, g, b = await poisoned_dedup_source(rig)
    tier_stat = b.tier.stat_blob(b.digest)
    assert tier_stat is not None
    b.record(tier_stat)  # as if the write left no trace in the stat

    _, progress = await rig.ensure([g])

    assert +progress.by_source == {"origin": g.size}
    assert rig.cache.copies(f.digest) == []


async def test_a_poisoned_blob_is_never_promoted(rig: Rig) -> None:
    f = rig.file("f", pattern("f", 3 * CS))
    await rig.ensure([f], [rig.disk])
    b = rig.cache.locate(f.digest, [rig.disk])
    assert b is not None
    link_and_poison(rig, b)

    found, progress = await rig.ensure([f], [rig.mem])

    assert +progress.by_source == {"origin": f.size}
    assert found[f.digest].tier is rig.mem
    assert_complete(rig, f, rig.mem)
    assert rig.cache.locate(f.digest, [rig.disk]) is None  # the bad source is dropped
    assert rig.leftovers() == []
    assert {u.name: u.used for u in rig.cache.usage()} == {"mem": f.size, "disk": 0}


async def test_a_lent_blob_that_is_intact_is_promoted_and_the_copy_is_not_lent(
    rig: Rig,
) -> None:
    f = rig.file("f", pattern("f", 3 * CS))
    await rig.ensure([f], [rig.disk])
    b = rig.cache.locate(f.digest, [rig.disk])
    assert b is not None
    os.link(b.path, rig.root / "restored")
    rig.cache.lent([b])

    found, progress = await rig.ensure([f], [rig.mem])

    assert +progress.by_source == {"disk": f.size}
    assert_complete(rig, f, rig.mem)
    assert not found[f.digest].lent  # a new, hashed inode that no one else holds
    assert b.lent


# -- tier failures -------------------------------------------------------------------------------


async def test_a_blob_no_tier_can_take_leaves_nothing_behind(tmp_path: Path) -> None:
    rig = Rig(tmp_path, mem=5 * CS, workers=2)
    try:
        fits = rig.file("fits", pattern("fits", 3 * CS + 10))
        huge = rig.file("huge", pattern("huge", 6 * CS))
        rig.origin.gate(fits.chunks[3])  # `fits` is open and half written when `huge` fails

        with pytest.raises(TierError) as info:
            await rig.ensure([fits, huge])

        msg = info.value.message
        assert huge.digest.hex() in msg
        assert f"{huge.size} bytes" in msg
        assert f"budget {5 * CS} < {huge.size}" in msg
        assert rig.leftovers() == []
        assert rig.cache.copies(fits.digest) == []
        assert rig.cache.copies(huge.digest) == []
        assert {u.name: u.used for u in rig.cache.usage()} == {"mem": 0, "disk": 0}
        assert rig.origin.calls[huge.chunks[0].id] == 0
        assert rig.filler.filling() == set()
    finally:
        rig.close()


async def test_a_copy_in_no_tier_can_take_fails_and_frees_the_other_blobs(
    tmp_path: Path,
) -> None:
    """A blob registered for filling before another one's copy-in failed must not stay
    registered: a later ensure() of it would wait forever."""
    rig = Rig(tmp_path, mem=3 * CS)
    try:
        small = rig.file("small", pattern("small", CS))
        big = rig.file("big", pattern("big", 4 * CS))
        await rig.ensure([big], [rig.disk])  # complete in disk; too big for mem

        with pytest.raises(TierError, match=f"budget {3 * CS} < {big.size}"):
            await rig.ensure([small, big], [rig.mem])

        assert rig.filler.filling() == set()
        found, _ = await rig.ensure([small], [rig.mem])
        assert_complete(rig, small, rig.mem)
        assert set(found) == {small.digest}
    finally:
        rig.close()


class GatedTier(Tier):
    """A tier whose copy_in (run in a thread) tells the loop it started, then waits for the
    test to let it go: a slow copy, so that two ensure() calls overlap on it."""

    def __init__(self, name: str, root: Path, budget: int) -> None:
        super().__init__(name, root, budget)
        self.loop = asyncio.get_running_loop()
        self.started = asyncio.Event()
        self.copies = 0
        self.go = threading.Event()

    def copy_in(self, src: Path, digest: bytes, size: int, chunk_size: int) -> BlobStat:
        self.copies += 1
        self.loop.call_soon_threadsafe(self.started.set)
        assert self.go.wait(DEADLINE)
        return super().copy_in(src, digest, size, chunk_size)


async def test_two_ensures_copying_in_one_blob_copy_it_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path, mem_tier=GatedTier)
    try:
        gated = rig.mem
        assert isinstance(gated, GatedTier)
        f = rig.file("f", pattern("f", 3 * CS))
        await rig.ensure([f], [rig.disk])

        first = asyncio.create_task(rig.ensure([f], [gated]))
        second = asyncio.create_task(rig.ensure([f], [gated]))
        async with asyncio.timeout(DEADLINE):
            await gated.started.wait()
        gated.go.set()
        (found1, _), (found2, _) = await asyncio.gather(first, second)

        assert gated.copies == 1
        assert found1 == found2
        assert_complete(rig, f, gated)
        assert rig.leftovers() == []
    finally:
        rig.close()


class SlowTier(Tier):
    """A tier whose whole-blob writes wait for a gate: a disk that is slow right now."""

    started = threading.Event()
    release = threading.Event()

    def write_whole(self, digest: bytes, data: bytes | memoryview) -> BlobStat:
        self.started.set()
        self.release.wait(DEADLINE)
        return super().write_whole(digest, data)


async def test_a_blob_completed_after_its_fill_was_cancelled_is_recorded(tmp_path: Path) -> None:
    """The thread writing a blob outlives a cancelled restore; what it completes must be
    known to the cache (and charged to the budget), not left on disk unaccounted."""
    SlowTier.started.clear()
    SlowTier.release.clear()
    rig = Rig(tmp_path, mem_tier=SlowTier)
    try:
        small = rig.file("small", pattern("small", 1000))
        job = asyncio.create_task(rig.ensure([small]))
        assert await asyncio.to_thread(SlowTier.started.wait, DEADLINE)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        SlowTier.release.set()
        # a done-callback records it once the thread is through: poll, with a deadline
        async with asyncio.timeout(DEADLINE):
            while rig.cache.locate(small.digest, [rig.mem]) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert_complete(rig, small, rig.mem)
        assert {u.name: u.used for u in rig.cache.usage()}["mem"] == small.size
    finally:
        SlowTier.release.set()
        rig.close()
