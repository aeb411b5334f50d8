"""Filler.ensure over a real Cache (tiers in temp dirs) and a fake chunk source: fills missing
blobs and reports bytes by source, fetches each chunk once however many ensure() calls want
it, resumes what a cancelled one left, re-verifies a blob changed behind its back, and leaves
nothing behind when a tier cannot take a blob."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import os
import signal
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from chunkfakes import DEADLINE, MTIME, FakeSource, file_entry, pattern

import hostd.fastcopy
import hostd.fill
import hostd.tier
from hostd.cache import Blob, Cache
from hostd.core import manifest as mf
from hostd.core.manifest import FileEntry
from hostd.durable import Durability
from hostd.errors import ChunkMissing, TierError
from hostd.fetch import ByteBudget, Fetcher
from hostd.fill import Filler, FillProgress
from hostd.index import UNKNOWN_CTIME, BlobRow, Index
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
        durability: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        self.tiers = [mem_tier("mem", root / "mem", mem), Tier("disk", root / "disk", disk)]
        self.mem, self.disk = self.tiers
        self.index = Index(root / "index.db")
        self.cache = Cache(self.tiers, self.index, manifests_dir=root / "manifests", clock=Clock())
        self.cache.load()
        self.origin = FakeSource("origin")
        self.fetcher = Fetcher([LocalBlobSource(self.cache), self.origin], concurrency=4)
        self.durability = Durability(self.cache, **(durability or {}))
        self.filler = Filler(self.cache, self.fetcher, workers=workers, durability=self.durability)
        self.data: dict[bytes, bytes] = {}

    def file(self, path: str, data: bytes, mtime: int | None = MTIME) -> FileEntry:
        """A file whose chunks the origin holds."""
        e = dataclasses.replace(file_entry(path, data, CS), mtime=mtime)
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


def _hear(heard: list[bytes], digest: bytes, _blob: Blob) -> None:
    heard.append(digest)


async def test_each_blob_is_announced_once_cold_and_warm(rig: Rig) -> None:
    """on_ready hears of each blob once per ensure (a progressive restore places a file per
    announcement): a blob this fill made is not announced again when the fill returns it."""
    files = [rig.file(f"f{i}", pattern(f"f{i}", 1000 + i)) for i in range(40)]
    files.append(rig.file("big", pattern("big", 2 * CS + 5)))
    for source in ("origin", "mem"):  # cold, then warm
        heard: list[bytes] = []
        progress = FillProgress()
        async with asyncio.timeout(DEADLINE):
            found = await rig.filler.ensure(
                files, CS, [rig.mem], progress, functools.partial(_hear, heard)
            )
        assert sorted(heard) == sorted(found) == sorted(f.digest for f in files)
        assert set(+progress.by_source) == {source}


async def test_a_warm_blob_dropped_after_its_stat_is_fetched_again_not_announced(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob stated intact whose record goes (a failed sync of another fill drops it, a
    verify removes it) before the warm path reaches it is filled again, and only the new
    copy is announced: a placer keeps the first announcement of a blob."""
    files = [rig.file(f"f{i}", pattern(f"f{i}", 1000 + i)) for i in range(40)]
    await rig.ensure(files)
    victim = files[30]
    loop = asyncio.get_running_loop()
    lstat_paths = hostd.fastcopy.lstat_paths
    removing: list[asyncio.Future[None]] = []

    def stat_then_drop(paths: Sequence[str]) -> list[Any]:  # on the stat thread
        out = lstat_paths(paths)
        if not removing:  # record and file both gone before the warm path goes on
            removed = asyncio.run_coroutine_threadsafe(
                rig.cache.remove(victim.digest, rig.mem), loop
            )
            removing.append(asyncio.wrap_future(removed, loop=loop))
            removed.result(DEADLINE)
        return out

    monkeypatch.setattr(hostd.fill, "lstat_paths", stat_then_drop)
    stale: list[bytes] = []

    def ready(digest: bytes, b: Blob) -> None:
        if not b.attached:
            stale.append(digest)

    progress = FillProgress()
    async with asyncio.timeout(DEADLINE):
        found = await rig.filler.ensure(files, CS, [rig.mem], progress, ready)
        await asyncio.gather(*removing)
    assert removing
    assert stale == []
    assert found[victim.digest].attached
    assert_complete(rig, victim, rig.mem)
    assert progress.done_bytes == progress.total_bytes == sum(f.size for f in files)
    assert progress.by_source["origin"] == victim.size


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

    def copy_in(
        self, src: Path, digest: bytes, size: int, chunk_size: int, *, durable: bool = True
    ) -> BlobStat:
        self.copies += 1
        self.loop.call_soon_threadsafe(self.started.set)
        assert self.go.wait(DEADLINE)
        return super().copy_in(src, digest, size, chunk_size, durable=durable)


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

    def write_wholes(
        self,
        blobs: Sequence[tuple[bytes, bytes | memoryview, int | None, int]],
        doing: str = "writing a blob",
    ) -> list[BlobStat | TierError]:
        self.started.set()
        self.release.wait(DEADLINE)
        return super().write_wholes(blobs, doing)


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
        # ... and recorded in the index once its sync is through (no fill waits for it)
        async with asyncio.timeout(DEADLINE):
            while row_of(rig, small.digest, rig.mem) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert_mtime(rig, small, rig.mem, MTIME)
    finally:
        SlowTier.release.set()
        rig.close()


def _open_here(path: Path) -> bool:
    """Whether this process holds a descriptor of `path`."""
    fds = Path("/proc/self/fd")
    return any(os.path.realpath(fds / fd) == str(path) for fd in os.listdir(fds))


class SlowOpenTier(Tier):
    """A tier whose partial blobs open only once a gate opens: a big resumed blob whose
    present chunks are being re-hashed (PartialBlob.recheck), a slow disk."""

    started = threading.Event()
    release = threading.Event()

    def open_partial(self, digest: bytes, size: int, n_chunks: int) -> hostd.tier.PartialBlob:
        pb = super().open_partial(digest, size, n_chunks)
        self.started.set()
        self.release.wait(DEADLINE)
        return pb


@contextlib.asynccontextmanager
async def opening(
    tmp_path: Path, workers: int
) -> AsyncIterator[tuple[Rig, FileEntry, asyncio.Task[Any]]]:
    """A fill of one blob of several chunks (`rig.ensure`), under way, its partial blob held
    opening at SlowOpenTier's gate: (rig, the file, the fill's task)."""
    SlowOpenTier.started.clear()
    SlowOpenTier.release.clear()
    rig = Rig(tmp_path, mem_tier=SlowOpenTier, workers=workers)
    try:
        f = rig.file("f", pattern("f", 3 * CS + 5))
        job = asyncio.create_task(rig.ensure([f]))
        assert await asyncio.to_thread(SlowOpenTier.started.wait, DEADLINE)
        yield rig, f, job
    finally:
        SlowOpenTier.release.set()
        rig.close()


async def test_a_partial_blob_opened_after_its_fill_was_cancelled_stays_known(
    tmp_path: Path,
) -> None:
    """A restore cancelled (its client killed) while a partial blob is being opened: the
    thread still makes the file, so the cache must keep knowing it (charged, evictable,
    resumable, gc'able), not forget it and leave it on disk until the next restart."""
    async with opening(tmp_path, workers=1) as (rig, f, job):
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        SlowOpenTier.release.set()
        path = rig.mem.partial_path(f.digest)
        async with asyncio.timeout(DEADLINE):  # the thread made it; its done-callback closed it
            while not path.exists() or _open_here(path):  # noqa: ASYNC110
                await asyncio.sleep(0.01)

        assert rig.cache.partial(f.digest) is not None, rig.leftovers()
        await rig.cache.remove(f.digest, rig.mem)  # what gc and eviction do with it
        assert rig.leftovers() == []


async def test_a_restore_cancelled_while_workers_wait_on_one_opening_blob_is_cancelled(
    tmp_path: Path,
) -> None:
    """Several workers wait for one multi-chunk blob to open when the restore is cancelled
    (its client killed): the fill ends cancelled, not with an InvalidStateError from the
    open's shared future, which the cancelled waiters cancelled."""
    async with opening(tmp_path, workers=4) as (_, _, job):
        # (the other workers asked for the same blob at once: they wait on its open)
        job.cancel()
        SlowOpenTier.release.set()
        with pytest.raises(asyncio.CancelledError):
            await job


class TwoOpensTier(Tier):
    """A tier whose first partial-blob open waits for `first`, then fails (EIO: a disk that
    errs once), and whose second waits for `second`, then opens: two fills of one blob."""

    opens = 0
    started: ClassVar[list[threading.Event]] = [threading.Event(), threading.Event()]
    gates: ClassVar[list[threading.Event]] = [threading.Event(), threading.Event()]

    def open_partial(self, digest: bytes, size: int, n_chunks: int) -> hostd.tier.PartialBlob:
        k = min(type(self).opens, 1)
        type(self).opens += 1
        self.started[k].set()
        self.gates[k].wait(DEADLINE)
        if k == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().open_partial(digest, size, n_chunks)


async def test_a_cancelled_fills_late_failure_leaves_the_next_fills_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fill A is cancelled while its blob opens; fill B of the same blob comes and takes up
    the record A left (admit resumes it); then A's opening thread fails. A's late `forget`
    must not drop B's record: B would write a blob the cache no longer charges, and fail at
    the end (`completed`: KeyError, a 500 to a restore that did nothing wrong)."""
    TwoOpensTier.opens = 0
    for ev in (*TwoOpensTier.started, *TwoOpensTier.gates):
        ev.clear()
    closed = asyncio.Event()  # A's late callback (fill._close_result) has run
    real = hostd.fill._close_result

    def spied(forget: Callable[[], None], job: asyncio.Future[hostd.tier.PartialBlob]) -> None:
        real(forget, job)
        closed.set()

    monkeypatch.setattr(hostd.fill, "_close_result", spied)
    rig = Rig(tmp_path, mem_tier=TwoOpensTier, workers=1)
    try:
        f = rig.file("f", pattern("f", 3 * CS + 5))
        a = asyncio.create_task(rig.ensure([f]))
        assert await asyncio.to_thread(TwoOpensTier.started[0].wait, DEADLINE)
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        b = asyncio.create_task(rig.ensure([f]))
        assert await asyncio.to_thread(TwoOpensTier.started[1].wait, DEADLINE)
        TwoOpensTier.gates[0].set()  # A's thread fails now, after B took the record up
        async with asyncio.timeout(DEADLINE):
            await closed.wait()
        assert rig.cache.partial(f.digest) is not None, "B's record was dropped by A's forget"
        TwoOpensTier.gates[1].set()
        found, _ = await b
        assert f.digest in found
        assert rig.leftovers() == []
    finally:
        for ev in TwoOpensTier.gates:
            ev.set()
        rig.close()


# -- mtimes ------------------------------------------------------------------------------------

BEFORE_1970 = -86_400_000_000_001  # 1969-12-31, a nanosecond before a whole second


def row_of(rig: Rig, digest: bytes, tier: Tier) -> BlobRow | None:
    rows = [r for r in rig.index.blobs() if r.digest == digest and r.tier == tier.name]
    return rows[0] if rows else None


def assert_mtime(rig: Rig, e: FileEntry, tier: Tier, mtime: int) -> None:
    """The blob has `mtime`, its record says so, and the record holds (no re-hash)."""
    b = rig.cache.locate(e.digest, [tier])
    assert b is not None
    assert os.stat(b.path).st_mtime_ns == b.mtime_ns == mtime
    assert rig.cache.unchanged(b)
    row = row_of(rig, e.digest, tier)
    assert row is not None
    assert row.complete
    assert (row.mtime_ns, row.ctime_ns) == (b.mtime_ns, b.ctime_ns)


@pytest.mark.parametrize("mtime", [MTIME, BEFORE_1970])
async def test_a_filled_blob_has_its_file_mtime_recorded(rig: Rig, mtime: int) -> None:
    small = rig.file("small", pattern("small", 1000), mtime)
    big = rig.file("big", pattern("big", 3 * CS + 5), mtime)

    await rig.ensure([small, big])

    assert_mtime(rig, small, rig.mem, mtime)
    assert_mtime(rig, big, rig.mem, mtime)


async def test_a_promoted_blob_keeps_its_mtime(rig: Rig) -> None:
    small = rig.file("small", pattern("small", 1000), BEFORE_1970)
    big = rig.file("big", pattern("big", 2 * CS), MTIME)
    await rig.ensure([small, big], [rig.disk])

    _, progress = await rig.ensure([small, big], [rig.mem])

    assert +progress.by_source == {"disk": small.size + big.size}
    assert_mtime(rig, small, rig.mem, BEFORE_1970)
    assert_mtime(rig, big, rig.mem, MTIME)


async def test_a_format_1_entry_leaves_the_blob_its_write_time(rig: Rig) -> None:
    e = rig.file("old", pattern("old", 1000), None)
    before = os.stat(rig.mem.root).st_mtime_ns - 10**9

    await rig.ensure([e])

    b = rig.cache.locate(e.digest)
    assert b is not None
    assert b.mtime_ns >= before
    assert_mtime(rig, e, rig.mem, b.mtime_ns)


async def test_a_blob_shared_by_files_gets_the_mtime_most_of_them_have(rig: Rig) -> None:
    data = pattern("same", 1000)
    files = [rig.file(f"f{i}", data, m) for i, m in enumerate([MTIME, 7, 7, BEFORE_1970])]

    await rig.ensure(files)

    assert_mtime(rig, files[0], rig.mem, 7)


# -- durability: write, rename, one sync per batch, then the index rows -----------------------


class Log:
    """What happened, in order: each tier's syncs and each batch of index rows."""

    def __init__(self, rig: Rig) -> None:
        self.events: list[tuple[str, frozenset[bytes]]] = []
        real = rig.index.put_blobs

        def put_blobs(rows: Any) -> None:
            rows = list(rows)
            self.events.append(("rows", frozenset(r.digest for r in rows if r.complete)))
            real(rows)

        rig.index.put_blobs = put_blobs  # type: ignore[method-assign]

    def sync(self, digests: Any) -> None:
        self.events.append(("sync", frozenset(digests)))

    def check_order(self) -> None:
        """Every blob's row was written after a sync that covered it."""
        synced: set[bytes] = set()
        for what, digests in self.events:
            if what == "sync":
                synced |= digests
            else:
                assert digests <= synced, "a row was written before its blob was synced"

    @property
    def syncs(self) -> int:
        return sum(1 for what, _ in self.events if what == "sync")


class LoggedTier(Tier):
    """A tier whose syncs are logged, and held while `hold` is clear (a slow disk)."""

    log: Log | None = None
    hold = threading.Event()
    syncing = threading.Event()
    each: ClassVar[list[bool]] = []

    @classmethod
    def reset(cls, *, held: bool) -> None:
        """A test's start: no sync seen yet, none logged; syncs `held` until `hold` is set."""
        if held:
            cls.hold.clear()
        else:
            cls.hold.set()
        cls.syncing.clear()
        cls.each = []

    def sync(self, digests: Any, *, each: bool = False) -> None:
        digests = list(digests)
        self.syncing.set()
        assert self.hold.wait(DEADLINE)
        super().sync(digests, each=each)
        self.each.append(each)
        if self.log is not None:
            self.log.sync(digests)


@pytest.fixture
def logged(tmp_path: Path) -> Iterator[Rig]:
    LoggedTier.reset(held=False)
    r = Rig(tmp_path, mem=4096 * CS, mem_tier=LoggedTier)
    LoggedTier.log = Log(r)
    yield r
    LoggedTier.hold.set()
    LoggedTier.log = None
    r.close()


class EioTier(LoggedTier):
    """A logged tier whose syncfs fails with EIO while `broken` is set, as the kernel tells a
    write-back error (once, to the sync that comes first); no batch fsyncs blob by blob."""

    broken = False

    def __init__(self, name: str, root: Path, budget: int) -> None:
        super().__init__(name, root, budget, syncfs=self._syncfs_or_eio, fsync_each=0)

    @classmethod
    def _syncfs_or_eio(cls, _path: Path) -> None:
        if cls.broken:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def another_sync_fails(self) -> None:
        """Another caller's sync of this tier meets the error first."""
        type(self).broken = True
        try:
            with pytest.raises(TierError, match="syncing its blobs to disk failed"):
                Tier.sync(self, [os.urandom(32)])
        finally:
            type(self).broken = False


def fsync_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return calls


async def test_small_files_take_one_sync_per_batch_and_no_fsync_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    LoggedTier.hold.set()
    rig = Rig(
        tmp_path,
        mem=4096 * CS,
        mem_tier=LoggedTier,
        durability={"max_blobs": 100, "max_delay": 3600},
    )
    log = LoggedTier.log = Log(rig)
    writes: list[int] = []
    real_write = hostd.fill._write_wholes

    def counted(batch: Any) -> Any:
        writes.append(len(batch))
        return real_write(batch)

    monkeypatch.setattr(hostd.fill, "_write_wholes", counted)
    fsyncs = fsync_counter(monkeypatch)
    try:
        files = [rig.file(f"f{i}", pattern(f"f{i}", 100 + i)) for i in range(650)]
        big = rig.file("big", pattern("big", 3 * CS))

        found, _ = await rig.ensure([*files, big])

        assert set(found) == {e.digest for e in [*files, big]}
        # 651 blobs in batches of at least 100 (more gather while a sync runs), the last one
        # at the end of ensure: a sync per batch, not per blob, and not one for the whole fill
        sizes = [len(d) for what, d in log.events if what == "sync"]
        # No fsync of a blob, but where the last batch is of a few (Tier.sync fsyncs those
        # and their directories rather than sync the whole filesystem): it may be, on a
        # machine where the batches before it gathered more.
        few = sizes[-1] <= hostd.tier.FSYNC_EACH
        assert fsyncs == [] or (few and len(fsyncs) <= 2 * sizes[-1] + 1), (fsyncs, sizes)
        assert 2 <= len(sizes) <= 7, sizes
        assert all(n >= 100 for n in sizes[:-1]), sizes
        assert sum(sizes) == len(found)
        log.check_order()
        rows = {r.digest for r in rig.index.blobs() if r.complete and r.tier == "mem"}
        assert rows == set(found)
        # several small blobs written per thread hop
        assert sum(writes) == len(files)
        assert len(writes) < len(files) / 2, writes
        assert rig.durability.pending == 0
    finally:
        LoggedTier.log = None
        rig.close()


async def test_no_row_is_written_before_its_sync_returns(logged: Rig) -> None:
    rig = logged
    files = [rig.file(f"f{i}", pattern(f"f{i}", 1000 + i)) for i in range(20)]
    # The first sync waits for all 20 (not for a timer that a loaded machine can beat).
    rig.durability.max_blobs, rig.durability.max_delay = len(files), 60.0
    LoggedTier.hold.clear()

    job = asyncio.create_task(rig.ensure(files))
    assert await asyncio.to_thread(LoggedTier.syncing.wait, DEADLINE)

    # Every blob is written and complete in memory (a restore may use it), none recorded.
    for e in files:
        b = rig.cache.locate(e.digest)
        assert b is not None
        assert b.path.read_bytes() == rig.data[e.digest]
    assert [r for r in rig.index.blobs() if r.complete] == []
    assert not job.done()  # ensure waits for the rows

    LoggedTier.hold.set()
    async with asyncio.timeout(DEADLINE):
        await job
    assert {r.digest for r in rig.index.blobs() if r.complete} == {e.digest for e in files}
    assert LoggedTier.log is not None
    LoggedTier.log.check_order()


async def test_a_stalled_fill_has_what_it_made_recorded_within_max_delay(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, durability={"max_blobs": 10**6, "max_delay": 0.01})
    try:
        done = [rig.file(f"d{i}", pattern(f"d{i}", 500 + i)) for i in range(5)]
        stuck = rig.file("stuck", pattern("stuck", 700))
        release = rig.origin.gate(stuck.chunks[0])

        job = asyncio.create_task(rig.ensure([*done, stuck]))
        want = {e.digest for e in done}
        async with asyncio.timeout(DEADLINE):
            while {r.digest for r in rig.index.blobs() if r.complete} != want:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        assert not job.done()
        release.set()
        async with asyncio.timeout(DEADLINE):
            await job
    finally:
        rig.close()


async def test_a_failed_sync_drops_its_blobs_and_the_next_fill_checks_each(
    tmp_path: Path,
) -> None:
    EioTier.broken = True
    LoggedTier.reset(held=False)
    rig = Rig(tmp_path, mem_tier=EioTier)
    try:
        files = [rig.file(f"f{i}", pattern(f"f{i}", 1000 + i)) for i in range(5)]
        big = rig.file("big", pattern("big", 2 * CS))

        with pytest.raises(TierError, match=r"tier 'mem' .*syncing its blobs to disk failed"):
            await rig.ensure([*files, big])

        # Nothing it may have lost is kept: not in memory, not on disk, not in the index.
        for e in [*files, big]:
            assert rig.cache.copies(e.digest) == []
        assert complete_files(rig.mem) == []
        assert [r for r in rig.index.blobs() if r.complete] == []
        assert rig.durability.stats.dropped == len(files) + 1
        assert {u.name: u.used for u in rig.cache.usage()}["mem"] == 0

        EioTier.broken = False
        calls = len(rig.origin.order)
        found, _ = await rig.ensure([*files, big])
        for e in [*files, big]:
            assert_complete(rig, e, rig.mem)
        assert len(rig.origin.order) - calls == len(files) + len(big.chunks)
        # The sync after a failure fsyncs each blob too: an error the failed syncfs already
        # reported would not be reported again, a blob's own fsync still reports it.
        assert LoggedTier.each == [True]
        assert {r.digest for r in rig.index.blobs() if r.complete} == set(found)
    finally:
        EioTier.broken = False
        rig.close()


async def test_a_batch_whose_write_back_error_another_sync_was_told_is_dropped(
    tmp_path: Path,
) -> None:
    """syncfs reports a write-back error once, to the first sync after it on any descriptor:
    another caller's sync of the tier (a re-hash's, a publish's) that fails while a batch is
    written may have taken the batch's error, and the batch's own sync then passes. Its blobs
    were recorded, rows for bytes that may never have reached the disk."""
    LoggedTier.reset(held=True)
    rig = Rig(tmp_path, mem_tier=EioTier)
    try:
        files = [rig.file(f"f{i}", pattern(f"f{i}", 3000 + i)) for i in range(5)]
        job = asyncio.create_task(rig.ensure(files))
        assert await asyncio.to_thread(LoggedTier.syncing.wait, DEADLINE)  # the batch's, held
        assert isinstance(rig.mem, EioTier)
        rig.mem.another_sync_fails()
        LoggedTier.hold.set()  # the batch's own sync passes
        with pytest.raises(TierError, match="another sync of it failed"):
            await job
        assert [r for r in rig.index.blobs() if r.complete] == []
        for e in files:
            assert rig.cache.copies(e.digest) == []
        found, _ = await rig.ensure(files)  # fetched again, and recorded this time
        assert {r.digest for r in rig.index.blobs() if r.complete} == set(found)
    finally:
        LoggedTier.hold.set()
        rig.close()


async def test_a_batch_whose_error_another_sync_was_told_while_its_blobs_were_written_is_dropped(
    tmp_path: Path,
) -> None:
    """A blob's write-back error can be told to another caller's sync of the tier while the
    blob is still being written (the flusher writes pages back as they are dirtied), before
    it is handed to be made durable: the batch counts the other sync's failure from before
    its blobs' first bytes were written, not from when they were done."""
    told: list[bool] = []

    class SharedTier(EioTier):
        def write_wholes(self, blobs: Any, doing: str = "writing a blob") -> Any:
            out = super().write_wholes(blobs, doing)
            if not told:  # the first batch's blobs are written, not yet handed on
                told.append(True)
                self.another_sync_fails()
            return out

    LoggedTier.reset(held=False)
    rig = Rig(tmp_path, mem_tier=SharedTier)
    try:
        files = [rig.file(f"f{i}", pattern(f"f{i}", 3000 + i)) for i in range(5)]
        with pytest.raises(TierError, match="another sync of it failed"):
            await rig.ensure(files)
        assert [r for r in rig.index.blobs() if r.complete] == []
    finally:
        rig.close()


async def test_a_restart_between_install_and_row_rehashes_and_keeps_the_blob(
    tmp_path: Path,
) -> None:
    """A daemon dies after its blobs were renamed into place and before their sync returned
    (so before their rows). The next one finds them with no row: it re-hashes each before its
    first use and keeps it, fetching nothing."""
    LoggedTier.reset(held=True)
    first = Rig(tmp_path, mem_tier=LoggedTier)
    files = [first.file(f"f{i}", pattern(f"f{i}", 2000 + i)) for i in range(8)]
    job = asyncio.create_task(first.ensure(files))
    assert await asyncio.to_thread(LoggedTier.syncing.wait, DEADLINE)
    job.cancel()  # the sync runs on: owned by the durability, not by this fill
    with pytest.raises(asyncio.CancelledError):
        await job

    again = Rig(tmp_path)  # the next daemon, on the same tier and index
    try:
        for e in files:
            (b,) = again.cache.copies(e.digest)
            assert b.complete
            assert b.ctime_ns == UNKNOWN_CTIME  # no row vouches for it: re-hashed first
        again.data = first.data
        _, progress = await again.ensure(files)
        assert again.origin.order == []
        assert +progress.by_source == {"mem": sum(e.size for e in files)}
        for e in files:
            assert_complete(again, e, again.mem)
            assert_mtime(again, e, again.mem, MTIME)
    finally:
        LoggedTier.hold.set()
        async with asyncio.timeout(DEADLINE):
            await first.durability.flush()  # the first's sync ends; its rows land
        first.close()
        again.close()


async def test_close_records_what_waits(tmp_path: Path) -> None:
    rig = Rig(tmp_path, durability={"max_blobs": 10**6, "max_delay": 3600})
    try:
        e = rig.file("e", pattern("e", 1000))
        st = rig.mem.write_whole(e.digest, rig.data[e.digest], e.mtime, durable=False)
        rig.durability.add(rig.cache.adopt(rig.mem, st, CS, persist=False))
        assert row_of(rig, e.digest, rig.mem) is None
        await rig.filler.close()
        assert_mtime(rig, e, rig.mem, MTIME)
        assert rig.durability.pending == 0
    finally:
        rig.close()


def _alarm(_signum: int, _frame: object) -> None:
    raise TimeoutError("flush spun without yielding")


async def test_a_flush_that_finds_a_finished_sync_not_yet_landed_starts_the_next(
    rig: Rig,
) -> None:
    # The state a flush can meet for one turn of the loop: the sync task has ended (short of
    # the blobs added since) and its done-callback, which clears it, has not run yet. The
    # flush must start the next sync, not await the finished task again without yielding
    # (a spin no timeout can end: SIGALRM ends it here, as a failure).
    d = Durability(rig.cache, max_blobs=10**6, max_delay=3600)

    def blob(name: str) -> Blob:
        data = pattern(name, 700)
        e = rig.file(name, data)
        st = rig.mem.write_whole(e.digest, data, e.mtime, durable=False)
        return rig.cache.adopt(rig.mem, st, CS, persist=False)

    d.add(blob("first"))
    d.kick()
    flight = d._flight
    assert flight is not None
    await asyncio.shield(flight)
    d.add(blob("second"))
    d._flight = flight  # ended, and (as if) its callback had not run yet
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE)
    try:
        await d.flush()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not d.pending
    rig.index.flush()
    assert len([r for r in rig.index.blobs() if r.complete]) == 2


# -- the memory budget ---------------------------------------------------------------------------


async def test_bytes_in_flight_are_bounded_by_the_budget_not_the_workers(tmp_path: Path) -> None:
    """16 workers and a fetcher allowing 16 requests, but a budget of 3 chunks: at most 3
    chunks are asked for at once, and the fill still completes, every byte right."""
    rig = Rig(tmp_path, mem=256 * CS, workers=16)
    try:
        rig.fetcher = Fetcher([LocalBlobSource(rig.cache), rig.origin], concurrency=16)
        rig.filler = Filler(
            rig.cache, rig.fetcher, workers=16, durability=rig.durability, memory=3 * CS
        )
        files = [rig.file(f"f{i}", pattern(f"f{i}", 8 * CS)) for i in range(4)]
        gate = rig.origin.gate_all = asyncio.Event()
        job = asyncio.create_task(rig.ensure(files))
        await rig.origin.arrived(3)
        # Every worker is waiting for its share of the budget: none asks the origin.
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(rig.origin.order) == 3
        assert rig.filler.budget.held == 3 * CS
        gate.set()
        found, _ = await job
        assert len(found) == 4
        for e in files:
            assert_complete(rig, e, rig.mem)
        assert rig.filler.budget.held == 0
    finally:
        rig.close()


async def test_a_failed_fill_gives_its_budget_back(rig: Rig) -> None:
    rig.filler = Filler(rig.cache, rig.fetcher, workers=4, durability=rig.durability, memory=2 * CS)
    big = rig.file("big", pattern("big", 6 * CS))
    smalls = [rig.file(f"s{i}", pattern(f"s{i}", 100 + i)) for i in range(10)]
    del rig.origin.stored[big.chunks[3].id]
    with pytest.raises(ChunkMissing, match="big"):
        await rig.ensure([*smalls, big])
    assert rig.filler.budget.held == 0
    rig.origin.stored[big.chunks[3].id] = rig.data[big.digest][3 * CS : 4 * CS]
    found, _ = await rig.ensure([*smalls, big])
    assert len(found) == 11
    assert rig.filler.budget.held == 0


async def test_the_budget_serves_in_order_and_lets_an_oversized_take_through_alone() -> None:
    b = ByteBudget(100)
    await b.take(60)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        await b.take(n)
        order.append(name)

    big = asyncio.create_task(take("big", 500))  # more than the whole budget
    small = asyncio.create_task(take("small", 10))  # would fit, but waits its turn
    await asyncio.sleep(0)
    assert order == []
    b.give(60)  # nothing held: the oversized one goes, alone
    await big
    assert order == ["big"]
    assert b.held == 500
    b.give(500)
    await small
    assert order == ["big", "small"]
    assert b.held == 10


async def test_a_cancelled_take_hands_its_turn_on() -> None:
    b = ByteBudget(100)
    await b.take(90)
    first = asyncio.create_task(b.take(50))
    second = asyncio.create_task(b.take(10))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(second, DEADLINE)  # 90 + 10 fits once the one ahead left
    assert b.held == 100
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_take_cancelled_just_before_its_turn_leaks_nothing() -> None:
    b = ByteBudget(100)
    await b.take(90)
    first = asyncio.create_task(b.take(50))
    second = asyncio.create_task(b.take(60))
    await asyncio.sleep(0)
    first.cancel()  # its future is cancelled now, its task told only at its next step
    b.give(90)  # the wake-up passes over it
    await asyncio.wait_for(second, DEADLINE)
    with pytest.raises(asyncio.CancelledError):
        await first
    assert b.held == 60
    b.give(60)
    assert b.held == 0
