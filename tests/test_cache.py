"""Cache: tiers + index. Admission charges budget, a tier never goes over it, LRU eviction
demotes down the tiers and deletes from the last, pinned and held blobs never go, and the
view survives a restart (load reconciles the index with the disk, rebuilding a stale one)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

import hostd.maintain
from hostd import cache as cache_mod
from hostd.blobs import TierBlobs, Values
from hostd.cache import (
    REHASH_ATTEMPTS,
    TOUCH_SAVED,
    Blob,
    Cache,
    Rehash,
    Verdict,
    blob_is_intact,
    rehash,
)
from hostd.core import manifest as mf
from hostd.core.ids import chunk_id
from hostd.core.manifest import Chunk, FileEntry
from hostd.errors import TierError
from hostd.index import UNKNOWN_CTIME, Index
from hostd.tier import BLOB_MODE, BlobStat, Tier

CS = mf.MIN_CHUNK_SIZE
DEADLINE = 5.0
MTIME = 1_700_000_000_000_000_000  # what the test entries record (format 2 records one)


class Clock:
    """The injected clock: moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self) -> float:
        self.now += 1.0
        return self.now


def content(name: str, size: int) -> bytes:
    """Bytes that differ between names from the first 8 on (equal content is one blob)."""
    seed = blake3.blake3(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def entry_of(name: str, data: bytes) -> FileEntry:
    chunks = tuple(
        Chunk(chunk_id(data[o : o + CS]), len(data[o : o + CS])) for o in range(0, len(data), CS)
    )
    return FileEntry(name, 0o644, len(data), chunks, MTIME)


def write_blob(tier: Tier, e: FileEntry, data: bytes) -> BlobStat:
    pb = tier.open_partial(e.digest, e.size, len(e.chunks))
    for i, c in enumerate(e.chunks):
        pb.write(i, i * CS, data[i * CS : i * CS + c.size])
    return pb.complete()


def write_through(path: Path, data: bytes, *, append: bool) -> None:
    """What root can do to a read-only blob: write into it, leaving it read-only again."""
    os.chmod(path, 0o644)
    with open(path, "ab" if append else "r+b") as f:
        f.write(data)
    os.chmod(path, BLOB_MODE)


class Env:
    """Tiers, index and manifests under one root; `open()` is a daemon start on them."""

    def __init__(self, root: Path, budgets: dict[str, int]) -> None:
        self.root = root
        self.budgets = budgets
        self.clock = Clock()
        self.data: dict[bytes, bytes] = {}
        self._indexes: list[Index] = []

    def open(self, budgets: dict[str, int] | None = None) -> Cache:
        tiers = [Tier(n, self.root / n, b) for n, b in (budgets or self.budgets).items()]
        index = Index(self.root / "index.db")
        self._indexes.append(index)
        cache = Cache(tiers, index, manifests_dir=self.root / "manifests", clock=self.clock)
        cache.load()
        return cache

    def close(self) -> None:
        for index in self._indexes:
            index.close()
        self._indexes.clear()

    def file(self, name: str, size: int) -> FileEntry:
        data = content(name, size)
        e = entry_of(name, data)
        self.data[e.digest] = data
        return e

    async def put(self, cache: Cache, e: FileEntry, tiers: list[Tier] | None = None) -> Tier:
        """Admit, fill and complete one blob, as a fill would; the clock ticks first."""
        self.clock.tick()
        t = await cache.admit(e.digest, e.size, CS, tiers if tiers is not None else cache.tiers)
        st_ = await asyncio.to_thread(write_blob, t, e, self.data[e.digest])
        cache.completed(e.digest, t, st_)
        return t

    async def one_of_two_in_mem(self) -> tuple[Cache, FileEntry, FileEntry, Blob]:
        """A cache whose mem tier holds blob a (600 bytes) alone, and blob b (600 bytes)
        not yet put, which sends a down when it is: (cache, a, b, a's blob in mem)."""
        cache = self.open()
        a, b = self.file("a", 600), self.file("b", 600)
        await self.put(cache, a)
        blob = cache.locate(a.digest, [cache.tiers[0]])
        assert blob is not None
        return cache, a, b, blob


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, {"mem": 1000, "disk": 2000})
    yield e
    e.close()


@pytest.fixture
def big_env(tmp_path: Path) -> Iterator[Env]:
    """Room on disk for blobs of several chunks."""
    e = Env(tmp_path, {"mem": 1000, "disk": 4 * CS})
    yield e
    e.close()


def used(cache: Cache) -> dict[str, int]:
    return {u.name: u.used for u in cache.usage()}


def where(cache: Cache, e: FileEntry) -> list[tuple[str, bool]]:
    return sorted((b.tier.name, b.complete) for b in cache.copies(e.digest))


def view(cache: Cache) -> dict[tuple[bytes, str], tuple[Any, ...]]:
    return {
        (b.digest, b.tier.name): (
            b.size,
            b.chunk_size,
            b.complete,
            b.mtime_ns,
            b.last_used,
            b.ctime_ns,
            b.lent,
        )
        for t in cache.tiers
        for d in cache.digests(t)
        for b in cache.copies(d)
        if b.tier is t
    }


# -- admission ----------------------------------------------------------------------------------


async def test_admission_charges_the_full_size_before_any_byte_is_written(env: Env) -> None:
    cache = env.open()
    mem, disk = cache.tiers
    a = env.file("a", 400)

    t = await cache.admit(a.digest, a.size, CS, [mem, disk])

    assert t is mem
    assert used(cache) == {"mem": 400, "disk": 0}
    assert where(cache, a) == [("mem", False)]
    assert cache.partial(a.digest) is not None
    assert cache.locate(a.digest) is None
    # Admitting it again while it fills charges nothing more.
    assert await cache.admit(a.digest, a.size, CS, [mem, disk]) is mem
    assert used(cache) == {"mem": 400, "disk": 0}

    st_ = await asyncio.to_thread(write_blob, mem, a, env.data[a.digest])
    cache.completed(a.digest, mem, st_)
    assert used(cache) == {"mem": 400, "disk": 0}
    b = cache.locate(a.digest)
    assert b is not None
    assert (b.tier, b.complete, b.mtime_ns) == (mem, True, st_.mtime_ns)


async def test_missing_is_true_until_every_blob_is_complete_in_the_tiers_asked(env: Env) -> None:
    cache = env.open()
    mem, disk = cache.tiers
    a, b = env.file("a", 300), env.file("b", 300)
    assert cache.missing([a.digest, b.digest], [mem, disk])
    await env.put(cache, a, [mem])
    await cache.admit(b.digest, b.size, CS, [disk])  # filling, not complete
    assert cache.missing([a.digest, b.digest], [mem, disk])
    assert not cache.missing([a.digest], [mem, disk])
    assert cache.missing([a.digest], [disk])  # complete, but not where asked
    await env.put(cache, b, [disk])
    assert not cache.missing([a.digest, b.digest], [mem, disk])
    assert not cache.missing([], [mem])


async def test_abandon_returns_the_charge(env: Env) -> None:
    cache = env.open()
    mem = cache.tiers[0]
    a = env.file("a", 400)
    await cache.admit(a.digest, a.size, CS, [mem])
    cache.abandon(a.digest, mem)
    assert used(cache) == {"mem": 0, "disk": 0}
    assert cache.copies(a.digest) == []


async def test_admission_goes_to_the_first_tier_with_room(env: Env) -> None:
    cache = env.open()
    _mem, disk = cache.tiers
    big = env.file("big", 1500)  # over mem's budget, within disk's
    assert await env.put(cache, big) is disk
    assert used(cache) == {"mem": 0, "disk": 1500}


async def test_a_blob_bigger_than_every_budget_is_refused_naming_sizes(env: Env) -> None:
    cache = env.open()
    huge = env.file("huge", 5000)
    with pytest.raises(TierError) as info:
        await cache.admit(huge.digest, huge.size, CS, cache.tiers)
    msg = info.value.message
    assert huge.digest.hex() in msg
    assert "5000 bytes" in msg
    assert "mem: budget 1000 < 5000" in msg
    assert "disk: budget 2000 < 5000" in msg
    assert used(cache) == {"mem": 0, "disk": 0}


async def test_reserve_and_adopt_account_like_admission(env: Env) -> None:
    cache = env.open()
    mem, disk = cache.tiers
    assert await cache.reserve(5000, cache.tiers) is None
    t = await cache.reserve(600, cache.tiers)
    assert t is mem
    assert used(cache)["mem"] == 600
    cache.unreserve(mem, 600)
    assert used(cache)["mem"] == 0

    a = env.file("a", 500)
    t = await cache.reserve(a.size, [disk])
    assert t is disk
    st_ = await asyncio.to_thread(write_blob, disk, a, env.data[a.digest])
    cache.unreserve(disk, a.size)
    cache.adopt(disk, st_, CS)
    assert used(cache) == {"mem": 0, "disk": 500}
    assert where(cache, a) == [("disk", True)]


# -- eviction -----------------------------------------------------------------------------------


async def test_a_use_is_kept_in_the_index_to_the_period_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    """A blob used again within TOUCH_SAVED of its last use writes no row (a restore of a
    tree just filled, or a warm one in a loop, costs the index nothing); a use in a later
    period does, and a restart reads it back: the last use known after a restart is never a
    period behind."""
    env = Env(tmp_path, {"only": 1000})
    try:
        cache = env.open()
        a, b = env.file("a", 300), env.file("b", 300)
        await env.put(cache, a)
        await env.put(cache, b)
        await asyncio.to_thread(cache.index.flush)
        rows = {r.digest: r.last_used for r in cache.index.blobs()}

        env.clock.now += 1  # the same period (the clock starts at 1000: period 16)
        assert env.clock.now // TOUCH_SAVED == rows[a.digest] // TOUCH_SAVED
        cache.touch([a.digest])
        await asyncio.to_thread(cache.index.flush)
        assert {r.digest: r.last_used for r in cache.index.blobs()} == rows  # no row written
        held = cache.locate(a.digest)
        assert held is not None
        assert held.last_used == env.clock.now  # (in memory, it moved)

        env.clock.now += TOUCH_SAVED  # a later period
        cache.touch([a.digest])
        await asyncio.to_thread(cache.index.flush)
        now = {r.digest: r.last_used for r in cache.index.blobs()}
        assert now == {a.digest: env.clock.now, b.digest: rows[b.digest]}

        again = env.open()  # a restart: b is the least recently used, and goes first
        c = env.file("c", 600)
        await env.put(again, c)
        assert again.locate(b.digest) is None
        assert again.locate(a.digest) is not None
    finally:
        env.close()


async def test_eviction_is_least_recently_used_first(tmp_path: Path) -> None:
    env = Env(tmp_path, {"only": 1000})
    try:
        cache = env.open()
        (only,) = cache.tiers
        a, b, c, d = (env.file(n, 300) for n in "abcd")
        for x in (a, b, c):
            await env.put(cache, x)
        env.clock.tick()
        cache.touch([a.digest])  # a is now more recent than b and c

        await env.put(cache, d)  # needs 200 bytes: the LRU blob, b, goes

        assert cache.locate(b.digest) is None
        assert not only.blob_path(b.digest).exists()
        assert {x.path for x in (a, c, d) if cache.locate(x.digest)} == {"a", "c", "d"}
        assert cache.evictions[("only", "delete")] == 1

        big = env.file("big", 600)  # 900 + 600 - 1000 = 500 needed: c (300), then a (300)
        await env.put(cache, big)
        assert cache.locate(c.digest) is None
        assert cache.locate(a.digest) is None
        assert cache.locate(d.digest) is not None
        assert used(cache) == {"only": 900}
        assert cache.evictions[("only", "delete")] == 3
        assert sorted(s.digest for s in only.scan()[0]) == sorted([d.digest, big.digest])
    finally:
        env.close()


async def test_equally_old_blobs_are_evicted_biggest_first(tmp_path: Path) -> None:
    env = Env(tmp_path, {"only": 1000})
    try:
        cache = env.open()
        small, big, newer = env.file("small", 200), env.file("big", 400), env.file("newer", 300)
        for x in (small, big, newer):
            await env.put(cache, x)
        env.clock.tick()
        cache.touch([small.digest, big.digest])  # the same last use: a tie on age
        cache.touch([newer.digest])  # no tick: a tie with them too, but smallest then
        await env.put(cache, env.file("next", 400))  # 300 over: big goes, alone
        assert [cache.locate(x.digest) is not None for x in (small, big, newer)] == [
            True,
            False,
            True,
        ]
    finally:
        env.close()


async def test_a_blob_is_one_object_while_held_and_keeps_its_values_once_replaced(
    env: Env,
) -> None:
    """Blob records are compact; a Blob is made on demand. While someone holds it, asking
    again gives the same object, which follows its record; once the record is replaced (a
    new inode) or dropped, the old Blob keeps what it was and no longer vouches."""
    cache = env.open()
    mem, _ = cache.tiers
    a = env.file("a", 300)
    await env.put(cache, a, [mem])
    b = cache.locate(a.digest)
    assert b is not None
    assert cache.locate(a.digest) is b
    assert cache.copies(a.digest) == [b]
    cache.lent([b])
    assert b.lent  # followed its record
    old_mtime = b.mtime_ns

    st_ = await asyncio.to_thread(write_blob, mem, a, env.data[a.digest])  # a new inode
    fresh = cache.adopt(mem, st_, CS)
    assert fresh is not b
    assert cache.locate(a.digest) is fresh
    assert (b.lent, b.mtime_ns, b.size, b.complete) == (True, old_mtime, 300, True)
    assert (fresh.lent, fresh.mtime_ns) == (False, st_.mtime_ns)
    assert await cache.check(b) is Verdict.GONE
    assert await cache.check(fresh) is Verdict.INTACT

    await cache.remove(a.digest, mem)
    assert cache.copies(a.digest) == []
    assert (fresh.size, fresh.complete) == (300, True)
    assert await cache.check(fresh) is Verdict.GONE
    assert used(cache) == {"mem": 0, "disk": 0}


async def test_a_removal_leaves_the_copy_a_fill_made_after_its_record_went(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal drops the record, then unlinks on a thread. A fill that starts in between
    (nothing recorded any more) may install a new copy under the same name first (a rename
    over it): the removal must leave that one, which the fill's record will vouch for."""
    cache = env.open()
    mem = cache.tiers[0]
    a = env.file("a", 900)  # several chunks, the last one short
    await env.put(cache, a, [mem])
    path = mem.blob_path(a.digest)
    real = asyncio.to_thread
    made: list[int] = []

    def new_copy() -> None:
        write_blob(mem, a, env.data[a.digest])
        made.append(os.stat(path).st_ino)

    async def late(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if getattr(fn, "__name__", "").startswith("remove_blob"):
            await real(new_copy)  # the fill got there before the removal's thread ran
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", late)
    await cache.remove(a.digest, mem)
    assert made, "the removal took no thread"
    assert os.stat(path).st_ino == made[0]  # the fill's copy is still there, intact
    assert blob_is_intact(path, a.digest, a.size, CS) is None


async def test_a_blob_a_restored_tree_still_links_is_not_evicted_for_room_it_cannot_free(
    env: Env, tmp_path: Path
) -> None:
    """A link restore's tree holds the blob's inode: removing the tier's name would free no
    byte of the tier's filesystem (tmpfs: memory), yet count the blob's size as freed. So the
    walk passes it by, and the tier's budget stays what its filesystem really holds."""
    cache = env.open()
    mem, disk = cache.tiers
    a, b, c = env.file("a", 600), env.file("b", 600), env.file("c", 600)
    await env.put(cache, a, [mem])
    tree = tmp_path / "restored"
    tree.mkdir()
    os.link(mem.blob_path(a.digest), tree / "a.bin")  # as a link restore leaves it
    # (not touched: a restore that failed and kept what it placed touches nothing)

    assert await env.put(cache, b) is disk  # mem cannot make room: a's bytes are in use
    assert [x.tier for x in cache.copies(a.digest)] == [mem]
    assert mem.blob_path(a.digest).exists()
    assert used(cache)["mem"] == 600
    # parked, not walked again by every admission (each one a stat on the loop)
    walked = cache.queues["mem"].walked
    assert await env.put(cache, env.file("d", 600)) is disk
    assert cache.queues["mem"].walked == walked
    # after a restart too: found linked at start, parked there, not walked on the loop
    again = env.open()
    assert await env.put(again, env.file("e", 600)) is not again.tiers[0]
    assert again.queues["mem"].walked == 0

    (tree / "a.bin").unlink()  # the tree is gone: a's bytes are the tier's alone again
    assert await env.put(cache, c) is mem
    assert mem.blob_path(c.digest).exists()
    assert not mem.blob_path(a.digest).exists()  # evicted (demoted) for c
    assert used(cache)["mem"] == 600
    got = cache.locate(a.digest)
    assert got is not None
    assert got.tier is disk
    assert blob_is_intact(got.path, a.digest, a.size, CS) is None


async def test_eviction_demotes_to_the_next_tier_with_content_intact(env: Env) -> None:
    cache = env.open()
    mem, disk = cache.tiers
    a, b = env.file("a", 600), env.file("b", 600)
    await env.put(cache, a)
    a_used = cache.locate(a.digest)
    assert a_used is not None
    a_last = a_used.last_used

    await env.put(cache, b)  # mem: 600 + 600 > 1000, so a moves down to disk

    assert where(cache, a) == [("disk", True)]
    assert where(cache, b) == [("mem", True)]
    assert used(cache) == {"mem": 600, "disk": 600}
    assert cache.evictions[("mem", "demote")] == 1
    assert not mem.blob_path(a.digest).exists()
    moved = cache.locate(a.digest)
    assert moved is not None
    assert moved.tier is disk
    assert moved.last_used == a_last  # demotion is not a use
    assert moved.path.read_bytes() == env.data[a.digest]
    assert stat.S_IMODE(os.stat(moved.path).st_mode) == BLOB_MODE
    assert blob_is_intact(moved.path, a.digest, a.size, CS) is None
    assert cache.unchanged(moved)
    assert list(disk.tmp_dir.iterdir()) == []


async def test_eviction_from_the_last_tier_deletes(env: Env) -> None:
    cache = env.open()
    _mem, disk = cache.tiers
    files = [env.file(f"f{i}", 800) for i in range(3)]
    for f in files:
        await env.put(cache, f, [disk])
    # disk held 1600; the third needed 400 more: f0, the oldest, was deleted.
    assert cache.locate(files[0].digest) is None
    assert not disk.blob_path(files[0].digest).exists()
    assert cache.evictions[("disk", "delete")] == 1
    assert used(cache) == {"mem": 0, "disk": 1600}


async def test_demotion_cascades_down_and_deletes_at_the_bottom(env: Env) -> None:
    cache = env.open()
    mem, disk = cache.tiers
    d1, d2 = env.file("d1", 900), env.file("d2", 900)
    await env.put(cache, d1, [disk])
    await env.put(cache, d2, [disk])  # disk: 1800 of 2000
    m1, m2 = env.file("m1", 700), env.file("m2", 700)
    await env.put(cache, m1, [mem])

    await env.put(cache, m2, [mem])  # m1 must leave mem; disk must make room for it: d1 goes

    assert where(cache, m1) == [("disk", True)]
    assert cache.locate(d1.digest) is None
    assert where(cache, d2) == [("disk", True)]
    assert used(cache) == {"mem": 700, "disk": 1600}
    assert cache.evictions[("mem", "demote")] == 1
    assert cache.evictions[("disk", "delete")] == 1


async def test_a_victim_already_in_a_lower_tier_is_just_deleted(env: Env) -> None:
    cache = env.open()
    mem, disk = cache.tiers
    a = env.file("a", 600)
    await env.put(cache, a, [disk])
    await env.put(cache, a, [mem])  # the same blob in both tiers
    b = env.file("b", 600)
    await env.put(cache, b, [mem])
    assert where(cache, a) == [("disk", True)]
    assert cache.evictions[("mem", "delete")] == 1
    assert cache.evictions[("mem", "demote")] == 0
    assert used(cache) == {"mem": 600, "disk": 600}


async def test_a_victim_pinned_while_its_demotion_failed_is_kept(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eviction chose a blob, tried to demote it (awaits: the copy runs on a thread), and
    the copy failed (its bytes were bad): the blob was deleted, checked for a hold but not
    for a pin that came meanwhile. A pinned blob stays (its bad bytes are the next use's
    re-hash to find)."""
    cache = env.open()
    mem, disk = cache.tiers
    a = env.file("a", 600)
    await env.put(cache, a, [mem])
    m = mf.build(chunk_size=CS, files=[a])
    cache.record_snapshot(m)
    write_through(mem.blob_path(a.digest), b"X", append=False)  # the copy's hash fails
    loop = asyncio.get_running_loop()
    real_copy_in = disk.copy_in

    def pinned_meanwhile(*args: Any, **kw: Any) -> BlobStat:
        async def pin() -> None:
            cache.set_pinned(m.snapshot_id, True)

        asyncio.run_coroutine_threadsafe(pin(), loop).result()
        return real_copy_in(*args, **kw)

    monkeypatch.setattr(disk, "copy_in", pinned_meanwhile)
    b = env.file("b", 600)
    with contextlib.suppress(TierError):  # (mem: nothing else to evict)
        await env.put(cache, b, [mem])
    assert where(cache, a) == [("mem", True)]
    assert mem.blob_path(a.digest).exists()


async def test_pinned_snapshot_blobs_are_never_evicted(tmp_path: Path) -> None:
    env = Env(tmp_path, {"only": 1000})
    try:
        cache = env.open()
        a, b = env.file("a", 500), env.file("b", 400)
        await env.put(cache, a)
        await env.put(cache, b)
        m = mf.build(chunk_size=CS, files=[a])
        cache.record_snapshot(m)
        cache.set_pinned(m.snapshot_id, True)
        assert a.digest in cache.pinned_blobs()

        c = env.file("c", 500)  # 900 + 500 - 1000 = 400: b alone frees enough
        await env.put(cache, c)
        assert cache.locate(b.digest) is None
        assert cache.locate(a.digest) is not None

        d = env.file("d", 600)  # 1000 + 600 - 1000 = 600: only c (500) may go: not enough
        with pytest.raises(TierError) as info:
            await env.put(cache, d)
        msg = info.value.message
        assert f"blob {d.digest.hex()} of 600 bytes" in msg
        assert "only: 600 bytes over budget, nothing evictable" in msg
        # Nothing was evicted for nothing.
        assert cache.locate(c.digest) is not None
        assert cache.locate(a.digest) is not None
        assert used(cache) == {"only": 1000}

        cache.set_pinned(m.snapshot_id, False)
        await env.put(cache, d)
        assert cache.locate(a.digest) is None  # unpinned, and the least recently used
    finally:
        env.close()


async def test_held_blobs_are_never_evicted(tmp_path: Path) -> None:
    env = Env(tmp_path, {"only": 1000})
    try:
        cache = env.open()
        a, b = env.file("a", 600), env.file("b", 600)
        await env.put(cache, a)
        with cache.holding([a.digest]), cache.holding([a.digest]):
            assert cache.is_held(a.digest)
            with pytest.raises(TierError, match=rf"blob {b.digest.hex()} of 600 bytes"):
                await env.put(cache, b)
        # Held twice, released twice: evictable again.
        assert not cache.is_held(a.digest)
        await env.put(cache, b)
        assert cache.locate(a.digest) is None
        assert cache.locate(b.digest) is not None
    finally:
        env.close()


async def test_partial_blobs_being_filled_are_never_evicted(tmp_path: Path) -> None:
    env = Env(tmp_path, {"only": 1000})
    try:
        cache = env.open()
        a, b = env.file("a", 600), env.file("b", 600)
        await cache.admit(a.digest, a.size, CS, cache.tiers)  # being filled
        with pytest.raises(TierError, match="nothing evictable"):
            await cache.admit(b.digest, b.size, CS, cache.tiers)
        assert where(cache, a) == [("only", False)]
    finally:
        env.close()


async def test_a_partial_blob_no_fill_holds_is_evicted_by_its_last_use(tmp_path: Path) -> None:
    """A partial blob a cancelled fill kept (the fills' `busy` no longer names it) is an
    eviction candidate like a complete one; while a fill holds it, it is not."""
    env = Env(tmp_path, {"only": 1000})
    try:
        cache = env.open()
        (only,) = cache.tiers
        busy: set[bytes] = set()
        cache.busy = lambda: busy
        a, b, c, d = (env.file(n, 400) for n in "abcd")
        await env.put(cache, b)
        env.clock.tick()
        busy.add(a.digest)  # a fill claims a, then admits it and writes a chunk
        await cache.admit(a.digest, a.size, CS, cache.tiers)
        pb = only.open_partial(a.digest, a.size, 1)
        pb.write(0, 0, env.data[a.digest])
        pb.close()

        await env.put(cache, c)  # 200 bytes short: b goes, a is being filled
        assert cache.locate(b.digest) is None
        assert where(cache, a) == [("only", False)]

        busy.discard(a.digest)  # the fill was cancelled, its partial kept for a resume
        await env.put(cache, d)  # 200 short: a, older than c, goes with its files
        assert cache.copies(a.digest) == []
        assert not only.partial_path(a.digest).exists()
        assert list(only.partial_dir.iterdir()) == []
        assert {x.path for x in (c, d) if cache.locate(x.digest)} == {"c", "d"}
        assert cache.evictions[("only", "delete")] == 2
        assert used(cache) == {"only": 800}
    finally:
        env.close()


async def left_partial(env: Env, cache: Cache, tier: Tier, name: str) -> FileEntry:
    """A blob of three chunks admitted to `tier` with one written, as a daemon stopped mid-fill
    leaves it (its row flushed)."""
    p = env.file(name, 3 * CS)
    await cache.admit(p.digest, p.size, CS, [tier])
    pb = tier.open_partial(p.digest, p.size, len(p.chunks))
    pb.write(0, 0, env.data[p.digest][:CS])
    pb.close()
    cache.index.flush()
    return p


async def test_a_partial_blob_left_at_a_stop_is_charged_what_it_holds(big_env: Env) -> None:
    """After a restart a partial blob is charged the bytes it holds and can be evicted; a
    resume charges its full size again, and keeps it from eviction while it fills."""
    env = big_env
    cache = env.open()
    _mem, disk = cache.tiers
    p = await left_partial(env, cache, disk, "p")
    assert used(cache)["disk"] == 3 * CS
    env.close()

    again = env.open()
    disk = again.tiers[1]
    assert where(again, p) == [("disk", False)]
    assert used(again)["disk"] == CS
    assert await again.admit(p.digest, p.size, CS, [disk]) is disk  # a fill resumes it
    assert used(again)["disk"] == 3 * CS
    q = env.file("q", 2 * CS)
    with pytest.raises(TierError, match="nothing evictable"):
        await again.admit(q.digest, q.size, CS, [disk])
    env.close()

    third = env.open()
    disk = third.tiers[1]
    assert used(third)["disk"] == CS
    big = env.file("big", 3 * CS + 1)  # one byte short: the idle partial goes
    assert await third.admit(big.digest, big.size, CS, [disk]) is disk
    assert third.copies(p.digest) == []
    assert not disk.partial_path(p.digest).exists()
    assert used(third)["disk"] == 3 * CS + 1
    assert third.evictions[("disk", "delete")] == 1


async def test_a_resume_that_makes_room_before_its_fill_is_claimed_keeps_the_queue_true(
    big_env: Env,
) -> None:
    """A partial blob found at start, resumed where room must be made for the rest while no
    fill names it busy yet: the walk for room queued it again at its partial charge, and the
    resume then charged it its full size while queued (the queue's byte count drifted from
    the charges it holds). It leaves the queue, and counts as filling, whatever the walk did."""
    env = big_env
    cache = env.open()
    _mem, disk = cache.tiers
    r = env.file("r", CS)
    await env.put(cache, r, [disk])
    env.clock.tick()
    p = await left_partial(env, cache, disk, "p")
    env.close()

    again = env.open({"mem": 1000, "disk": 3 * CS})
    disk = again.tiers[1]
    again.busy = lambda: ()  # no fill names p (yet)
    assert used(again)["disk"] == 2 * CS  # p's resume needs one more: r, older, must go
    assert await again.admit(p.digest, p.size, CS, [disk]) is disk
    assert again.copies(r.digest) == []
    queue = again.queues["disk"]
    assert (len(queue), queue.bytes) == (0, 0)  # p filling: nothing queued
    assert used(again)["disk"] == 3 * CS
    st_ = await asyncio.to_thread(write_blob, disk, p, env.data[p.digest])
    again.completed(p.digest, disk, st_)
    assert (len(queue), queue.bytes) == (1, 3 * CS)


async def test_a_resume_that_finds_no_room_leaves_a_complete_copy_made_meanwhile(
    big_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial blob's resume that cannot make room for the rest gives it up. Where a
    complete copy of the same bytes took its record while room was sought (a publish's,
    installed during the walk's awaits), that copy stays recorded: the resume dropped the
    digest's record, whatever it was by then."""
    env = big_env
    cache = env.open()
    _mem, disk = cache.tiers
    p = await left_partial(env, cache, disk, "p")
    env.close()

    again = env.open({"mem": 1000, "disk": 2 * CS})  # no room for the rest of p
    disk = again.tiers[1]
    seeking = again._make_room

    async def published_meanwhile(tier: Tier, need: int) -> bool:
        st_ = await asyncio.to_thread(write_blob, disk, p, env.data[p.digest])
        again.adopt(disk, st_, CS)
        return await seeking(tier, need)

    monkeypatch.setattr(again, "_make_room", published_meanwhile)
    with again.holding([p.digest]), pytest.raises(TierError):  # (a restore uses the copy)
        await again.admit(p.digest, p.size, CS, [disk])
    assert where(again, p) == [("disk", True)]
    assert again.locate(p.digest) is not None


async def test_partial_blobs_that_cannot_be_resumed_are_removed_at_load(env: Env) -> None:
    cache = env.open()
    mem, _disk = cache.tiers
    p, q = env.file("p", 300), env.file("q", 200)
    for x in (p, q):
        await cache.admit(x.digest, x.size, CS, [mem])
        mem.open_partial(x.digest, x.size, 1).close()
    env.close()
    db = sqlite3.connect(env.root / "index.db")
    with contextlib.closing(db):  # p's row no longer fits its file; q's has no chunk size
        db.execute("UPDATE blobs SET size=size+1 WHERE digest=?", (p.digest,))
        db.execute("UPDATE blobs SET chunk_size=0 WHERE digest=?", (q.digest,))
        db.commit()

    again = env.open()

    assert again.copies(p.digest) == again.copies(q.digest) == []
    assert list(mem.partial_dir.iterdir()) == []
    assert used(again) == {"mem": 0, "disk": 0}


async def test_enforce_budgets_after_a_lower_budget(env: Env) -> None:
    cache = env.open()
    files = [env.file(f"f{i}", 300) for i in range(3)]
    for f in files:
        await env.put(cache, f, [cache.tiers[0]])
    env.close()
    cache = env.open({"mem": 500, "disk": 2000})  # a reload with mem's budget lowered
    assert used(cache)["mem"] == 900
    await cache.enforce_budgets()
    assert used(cache) == {"mem": 300, "disk": 600}
    assert where(cache, files[2]) == [("mem", True)]
    assert where(cache, files[0]) == [("disk", True)]


# -- a tier never goes over budget, whatever happens ---------------------------------------------


SIZES = st.integers(min_value=8, max_value=700)
# tmpfs where there is one: a fsync there is free, and these tests run hundreds of them.
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


@pytest.fixture
def fast_tmp() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="hd-cache-", dir=SHM))
    yield root
    shutil.rmtree(root, ignore_errors=True)


class CacheMachine(RuleBasedStateMachine):
    """Random admits, fills, abandons, touches, holds, pins and removals over two tiers.

    After every step: each tier's usage is within its budget and equals the sum of the sizes
    the view holds there; every complete blob in the view is on disk with its size; a blob that
    was complete in a tier when it got pinned or held is still there.
    """

    partials = Bundle("partials")

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="hd-cache-", dir=SHM))
        self.env = Env(self.root, {"mem": 1000, "disk": 1500})
        self.loop = asyncio.new_event_loop()
        self.cache = self.env.open()
        self.n = 0
        self.holds: list[tuple[contextlib.ExitStack, bytes]] = []
        self.pins: dict[str, set[bytes]] = {}
        self.entries: dict[bytes, FileEntry] = {}
        self.homes: dict[bytes, set[str]] = {}  # tiers a blob was complete in when protected

    def teardown(self) -> None:
        for stack, _ in self.holds:
            stack.close()
        self.env.close()
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def protected(self) -> set[bytes]:
        return {h for _, h in self.holds} | {x for s in self.pins.values() for x in s}

    def complete_digests(self) -> list[bytes]:
        return sorted(d for d in self.entries if self.cache.locate(d) is not None)

    def tiers(self, which: int) -> list[Tier]:
        mem, disk = self.cache.tiers
        return [[mem, disk], [mem], [disk]][which]

    @rule(target=partials, size=SIZES, which=st.integers(0, 2))
    def admit(self, size: int, which: int) -> Any:
        self.n += 1
        e = self.env.file(f"blob{self.n}", size)
        self.entries[e.digest] = e
        self.env.clock.tick()
        try:
            t = self.run(self.cache.admit(e.digest, size, CS, self.tiers(which)))
        except TierError as err:
            refusal = err.message
        else:
            return (e, t)
        assert f"{size} bytes" in refusal
        return multiple()  # admitted nothing

    @rule(p=consumes(partials))
    def complete(self, p: tuple[FileEntry, Tier]) -> None:
        e, t = p
        if self.cache.partial(e.digest) is None:
            return
        st_ = write_blob(t, e, self.env.data[e.digest])
        self.cache.completed(e.digest, t, st_)

    @rule(p=consumes(partials))
    def abandon(self, p: tuple[FileEntry, Tier]) -> None:
        e, t = p
        t.remove_partial(e.digest)
        self.cache.abandon(e.digest, t)

    @precondition(lambda self: bool(self.complete_digests()))
    @rule(data=st.data())
    def touch(self, data: st.DataObject) -> None:
        self.env.clock.tick()
        self.cache.touch([data.draw(st.sampled_from(self.complete_digests()))])

    @precondition(lambda self: bool(self.complete_digests()))
    @rule(data=st.data())
    def hold(self, data: st.DataObject) -> None:
        d = data.draw(st.sampled_from(self.complete_digests()))
        stack = contextlib.ExitStack()
        stack.enter_context(self.cache.holding([d]))
        self.protect([d])
        self.holds.append((stack, d))

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.holds) - 1))
        stack, _ = self.holds.pop(i)
        stack.close()

    @precondition(lambda self: bool(self.complete_digests()))
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        ds = data.draw(
            st.lists(st.sampled_from(self.complete_digests()), min_size=1, max_size=3, unique=True)
        )
        files = [
            FileEntry(f"p{i}", 0o644, self.entries[d].size, self.entries[d].chunks, MTIME)
            for i, d in enumerate(ds)
        ]
        m = mf.build(chunk_size=CS, files=files, meta={"n": str(self.n)})
        self.n += 1
        self.cache.record_snapshot(m)
        self.cache.set_pinned(m.snapshot_id, True)
        self.protect(ds)
        self.pins[m.snapshot_id] = set(ds)

    def protect(self, ds: list[bytes]) -> None:
        for d in ds:
            if d not in self.protected():
                self.homes[d] = {b.tier.name for b in self.cache.copies(d) if b.complete}

    @precondition(lambda self: bool(self.pins))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.pins)))
        self.cache.set_pinned(sid, False)
        del self.pins[sid]

    @precondition(lambda self: bool(self.complete_digests()))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        d = data.draw(st.sampled_from(self.complete_digests()))
        if d in self.protected():
            return
        b = self.cache.locate(d)
        assert b is not None
        self.run(self.cache.remove(d, b.tier))

    @invariant()
    def within_budget_and_consistent(self) -> None:
        for u, t in zip(self.cache.usage(), self.cache.tiers, strict=True):
            assert 0 <= u.used <= t.budget, (u.name, u.used, t.budget)
            held_here = [b for d in self.cache.digests(t) for b in self.cache.copies(d)]
            assert u.used == sum(b.size for b in held_here if b.tier is t)
            for b in held_here:
                if b.tier is t and b.complete:
                    assert os.stat(b.path).st_size == b.size

    @invariant()
    def protected_blobs_stay(self) -> None:
        for d in self.protected():
            # Not evicted, not even demoted: every copy they had when protected is still there.
            # Only `remove` (skipped for them) or eviction (which must skip them) could move one.
            here = {b.tier.name for b in self.cache.copies(d) if b.complete}
            assert self.homes[d] <= here, (d.hex(), self.homes[d], here)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, derandomize=True
)


async def test_randomized_sequence_never_goes_over_budget(fast_tmp: Path) -> None:
    """The same property without Hypothesis' shrinking: a long seeded run with real awaits."""
    env = Env(fast_tmp, {"mem": 1000, "disk": 1500})
    rng = random.Random(1234)
    try:
        cache = env.open()
        live: list[FileEntry] = []
        held: list[contextlib.ExitStack] = []
        for step in range(150):
            op = rng.random()
            if op < 0.6 or not live:
                e = env.file(f"r{step}", rng.randint(1, 800))
                try:
                    await env.put(cache, e, rng.choice([cache.tiers, cache.tiers[1:]]))
                except TierError:
                    pass
                else:
                    live.append(e)
            elif op < 0.75:
                env.clock.tick()
                cache.touch([rng.choice(live).digest])
            elif op < 0.9:
                stack = contextlib.ExitStack()
                stack.enter_context(cache.holding([rng.choice(live).digest]))
                held.append(stack)
            elif held:
                held.pop(rng.randrange(len(held))).close()
            for u, t in zip(cache.usage(), cache.tiers, strict=True):
                assert u.used <= t.budget, (step, u)
        for stack in held:
            stack.close()
    finally:
        env.close()


# -- restart: load() reconciles the index with the disk ------------------------------------------


async def test_load_after_restart_restores_the_view(big_env: Env) -> None:
    env = big_env
    cache = env.open()
    mem, disk = cache.tiers
    a, b, c = env.file("a", 300), env.file("b", 1200), env.file("c", 100 + 2 * CS)
    await env.put(cache, a, [mem])
    await env.put(cache, b, [disk])
    await env.put(cache, c, [disk])
    m = mf.build(chunk_size=CS, files=[a, c])
    cache.record_snapshot(m)
    cache.set_pinned(m.snapshot_id, True)
    p = env.file("p", 200)
    await cache.admit(p.digest, p.size, CS, [mem])  # a fill interrupted by the restart
    pb = mem.open_partial(p.digest, p.size, 1)
    pb.close()
    before = view(cache)
    usage_before = used(cache)
    env.close()

    again = env.open()

    assert view(again) == before
    assert usage_before == {"mem": 500, "disk": 1200 + c.size}
    # The partial blob holds no bytes yet: charged nothing until a fill resumes it.
    assert used(again) == {"mem": 300, "disk": 1200 + c.size}
    assert again.snapshot(m.snapshot_id) is not None
    assert again.pinned_blobs() == {a.digest, c.digest}
    loc = again.chunk_location(c.chunks[2].id)
    assert loc is not None
    assert loc[0].tier.name == "disk"
    assert loc[1] == 2 * CS
    assert where(again, p) == [("mem", False)]
    for x in (a, b, c):
        got = again.locate(x.digest)
        assert got is not None
        assert again.unchanged(got)


async def test_a_blob_deleted_behind_the_index_is_dropped_at_load(env: Env) -> None:
    cache = env.open()
    mem, disk = cache.tiers
    a, b = env.file("a", 300), env.file("b", 300)
    await env.put(cache, a, [mem])
    await env.put(cache, b, [disk])
    env.close()
    mem.remove_blob(a.digest)  # someone cleaned /dev/shm while the daemon was down

    again = env.open()

    assert again.copies(a.digest) == []
    assert used(again) == {"mem": 0, "disk": 300}
    assert [(r.digest, r.tier) for r in again.index.blobs()] == [(b.digest, "disk")]


async def test_leftovers_the_index_does_not_know_are_handled_at_load(env: Env) -> None:
    cache = env.open()
    _mem, disk = cache.tiers
    a = env.file("a", 300)
    env.close()
    # A complete blob the index never heard of (the daemon died before recording it) is
    # adopted; a partial blob it never admitted cannot be resumed and is removed.
    await asyncio.to_thread(write_blob, disk, a, env.data[a.digest])
    stray = disk.open_partial(bytes(32), 100, 1)
    stray.close()

    again = env.open()

    assert where(again, a) == [("disk", True)]
    assert used(again) == {"mem": 0, "disk": 300}
    assert not stray.path.exists()
    assert not stray.have_path.exists()


async def test_a_blob_changed_while_the_daemon_was_down_is_not_unchanged(env: Env) -> None:
    cache = env.open()
    a = env.file("a", 300)
    await env.put(cache, a, [cache.tiers[0]])
    path = cache.tiers[0].blob_path(a.digest)
    env.close()
    # Root writes through the read-only bit of a hardlinked blob while hostd is stopped.
    old = os.stat(path)
    write_through(path, b"X", append=False)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000))

    again = env.open()

    b = again.locate(a.digest)
    assert b is not None
    assert not again.unchanged(b)


async def test_schema_mismatch_moves_the_index_aside_and_rebuilds(big_env: Env) -> None:
    env = big_env
    cache = env.open()
    mem, disk = cache.tiers
    a, b = env.file("a", 300), env.file("b", 100 + CS)
    await env.put(cache, a, [mem])
    await env.put(cache, b, [disk])
    m = mf.build(chunk_size=CS, files=[a, b])
    cache.record_snapshot(m)
    p = env.file("p", 200)
    await cache.admit(p.digest, p.size, CS, [mem])
    mem.open_partial(p.digest, p.size, 1).close()
    env.close()
    db = sqlite3.connect(env.root / "index.db")
    with contextlib.closing(db):
        db.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
        db.commit()

    again = env.open()

    assert again.index.rebuilt
    assert (env.root / "index.db.v0.old").exists()
    assert where(again, a) == [("mem", True)]
    assert where(again, b) == [("disk", True)]
    assert again.snapshot(m.snapshot_id) is not None  # from the manifests dir
    # Chunk sizes come back from the manifests, so blobs can be re-verified.
    for x in (a, b):
        got = again.locate(x.digest)
        assert got is not None
        assert got.chunk_size == CS
        assert blob_is_intact(got.path, x.digest, x.size, got.chunk_size) is None
    loc = again.chunk_location(b.chunks[1].id)
    assert loc is not None
    assert loc[1] == CS
    # A partial blob has no row to resume from: removed.
    assert again.copies(p.digest) == []
    assert not mem.partial_path(p.digest).exists()
    assert used(again) == {"mem": 300, "disk": b.size}
    rows = {(r.digest, r.tier) for r in again.index.blobs()}
    assert rows == {(a.digest, "mem"), (b.digest, "disk")}
    env.close()
    # The rebuilt index is of this version: the next start does not rebuild again.
    third = env.open()
    assert not third.index.rebuilt
    assert view(third) == view(again)


# -- unchanged() -----------------------------------------------------------------------------


async def test_unchanged_checks_size_mtime_and_ctime_which_no_one_can_set_back(env: Env) -> None:
    cache = env.open()
    a = env.file("a", 300)
    await env.put(cache, a)
    b = cache.locate(a.digest)
    assert b is not None
    assert cache.unchanged(b)
    info = os.stat(b.path)
    assert (b.size, b.mtime_ns, b.ctime_ns) == (300, info.st_mtime_ns, info.st_ctime_ns)
    # Only non-writers hold links to an unlent blob: they cannot set its times, and their
    # links and unlinks move the ctime, which must not cost a re-hash.
    os.link(b.path, env.root / "a-link")
    os.unlink(env.root / "a-link")
    assert cache.unchanged(b)
    os.utime(b.path, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
    assert not cache.unchanged(b)
    os.utime(b.path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert cache.unchanged(b)

    cache.lent([b])  # a writer holds a link: the ctime counts from now on
    assert not cache.unchanged(b), "the mtime is back, the ctime is not"
    assert await cache.vouch(b)  # re-hashed: intact, the new ctime recorded
    assert cache.unchanged(b)

    write_through(b.path, b"more", append=True)
    os.utime(b.path, ns=(info.st_atime_ns, info.st_mtime_ns))  # same mtime, other size
    assert not cache.unchanged(b)

    os.unlink(b.path)
    assert not cache.unchanged(b)


# -- trust: stat before hashing, lost index, lent blobs ------------------------------------------


def count_rehashes(cache: Cache) -> list[bytes]:
    """Make `cache` re-hash through a hasher that lists the digests it was asked for."""
    calls: list[bytes] = []

    def counting(path: Path, digest: bytes, size: int, chunk_size: int) -> Rehash:
        calls.append(digest)
        return rehash(path, digest, size, chunk_size)

    cache.hasher = counting
    return calls


def poison(path: Path) -> None:
    """The attack of issue 9 (5): root writes "EVIL" through a read-only blob (or a hardlink
    to it) and sets its mtime back to what it was."""
    old = os.stat(path)
    write_through(path, b"EVIL", append=False)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns) == (old.st_size, old.st_mtime_ns)


def blob_of_chunks(tmp_path: Path, n: int) -> tuple[Path, bytes, mf.FileEntry]:
    """A complete blob of `n` chunks in a fresh tier: its path, bytes and entry."""
    tier = Tier("t", tmp_path / "t", 1 << 20)
    tier.prepare()
    data = content("x", n * CS)
    e = entry_of("x", data)
    write_blob(tier, e, data)
    return tier.blob_path(e.digest), data, e


def test_rehash_records_the_stat_taken_before_the_hash(tmp_path: Path) -> None:
    path, data, e = blob_of_chunks(tmp_path, 3)
    writes: list[int] = []

    def rewrite_the_same_bytes(off: int) -> None:
        # On the first attempt only, after the last chunk is read: a write that leaves the
        # bytes as they were, but moves the ctime. The stat taken before the hash that is
        # vouched for is the one after this write.
        if off == 2 * CS and not writes:
            write_through(path, data[:4], append=False)
            writes.append(os.stat(path).st_ctime_ns)

    r = rehash(path, e.digest, e.size, CS, on_read=rewrite_the_same_bytes)

    assert r.why is None
    assert r.seen is not None
    assert r.seen.ctime_ns == writes[0] == os.stat(path).st_ctime_ns


def test_a_write_during_a_rehash_is_never_vouched_for(tmp_path: Path) -> None:
    path, data, e = blob_of_chunks(tmp_path, 2)
    done: list[bool] = []

    def evil_after_chunk_0_was_read(off: int) -> None:
        if off == CS and not done:  # chunk 0 was read intact; the hash of it will match
            poison(path)
            done.append(True)

    r = rehash(path, e.digest, e.size, CS, on_read=evil_after_chunk_0_was_read)
    # The first attempt hashed good bytes, but its stat moved: in doubt, so tried again.
    assert r == Rehash("content does not match its digest")

    def keeps_writing(off: int) -> None:
        write_through(path, data[:4], append=False)

    r = rehash(path, e.digest, e.size, CS, on_read=keeps_writing)
    assert r == Rehash(f"it changed while it was hashed, {REHASH_ATTEMPTS} times")


async def test_a_write_racing_a_vouch_from_another_thread_drops_the_blob(env: Env) -> None:
    """A write between the pre-hash fstat and the end of the hash, by a second thread gated on
    events: the hash of what was read matches, yet the blob is not recorded as good."""
    reading, written = threading.Event(), threading.Event()

    def paused(path: Path, digest: bytes, size: int, chunk_size: int) -> Rehash:
        def hook(off: int) -> None:
            if not reading.is_set():
                reading.set()  # chunk 0 was read, after the fstat
                assert written.wait(DEADLINE)

        return rehash(path, digest, size, chunk_size, on_read=hook)

    cache = env.open()
    cache.hasher = paused
    a = env.file("a", 300)
    await env.put(cache, a)
    b = cache.locate(a.digest)
    assert b is not None
    os.utime(b.path)  # some doubt, so the next use re-hashes

    async def writer() -> None:
        assert await asyncio.to_thread(reading.wait, DEADLINE)
        await asyncio.to_thread(poison, b.path)
        written.set()

    async with asyncio.timeout(DEADLINE), asyncio.TaskGroup() as tg:
        tg.create_task(writer())
        vouched = tg.create_task(cache.vouch(b))

    assert not vouched.result()
    assert cache.copies(a.digest) == []
    assert not b.path.exists()
    assert used(cache) == {"mem": 0, "disk": 0}


async def doubtful_blob(env: Env) -> tuple[Cache, list[bytes], FileEntry, Blob]:
    """A cache (its re-hashes counted) holding one blob whose stat has moved: in doubt."""
    cache = env.open()
    calls = count_rehashes(cache)
    a = env.file("a", 300)
    await env.put(cache, a)
    b = cache.locate(a.digest)
    assert b is not None
    os.utime(b.path)
    return cache, calls, a, b


async def test_concurrent_uses_of_a_doubtful_blob_share_one_rehash(env: Env) -> None:
    cache, calls, a, b = await doubtful_blob(env)

    got = await asyncio.gather(*(cache.vouch(b) for _ in range(5)))

    assert got == [True] * 5
    assert calls == [a.digest]
    assert cache.unchanged(b)


async def test_many_doubtful_blobs_are_rehashed_together_and_the_bad_one_dropped(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_many: blobs whose stat moved (lent, then their links removed) are re-hashed a
    batch a thread hop, each settled as vouch would; a poisoned one is dropped, an unmoved
    one costs no hash, and what happened to each is said in order."""
    monkeypatch.setattr(cache_mod, "REHASH_BATCH", 3)  # several batches of the five in doubt
    cache = env.open()
    files = [env.file(f"f{i}", 300 + i) for i in range(7)]
    for f in files:
        await env.put(cache, f)
    blobs = [cache.locate(f.digest) for f in files]
    assert all(b is not None for b in blobs)
    held = [b for b in blobs if b is not None]
    doubtful = held[:5]
    cache.lent(doubtful)  # a writer's link moves the ctime, and the ctime now counts
    for i, b in enumerate(doubtful):
        os.link(b.path, env.root / f"link{i}")
        os.unlink(env.root / f"link{i}")
    poison(held[2].path)
    await cache.remove(files[6].digest, held[6].tier)  # evicted meanwhile
    calls = count_rehashes(cache)
    hops: list[int] = []
    rehash_all = cache._rehash_all

    def counted(batch: list[Any]) -> list[Rehash]:
        hops.append(len(batch))
        return rehash_all(batch)

    monkeypatch.setattr(cache, "_rehash_all", counted)

    got = await cache.check_many(held, CS)

    assert got == [
        Verdict.INTACT,
        Verdict.INTACT,
        Verdict.BAD,
        Verdict.INTACT,
        Verdict.INTACT,
        Verdict.INTACT,  # unmoved: no hash
        Verdict.GONE,
    ]
    assert sorted(calls) == sorted(f.digest for f in files[:5])
    assert hops == [3, 2]
    assert cache.copies(files[2].digest) == []
    for b in held[:2] + held[3:6]:
        assert cache.unchanged(b)  # the new stats recorded
    rows = {r.digest: r for r in cache.index.blobs()}
    for b in held[:2] + held[3:5]:
        assert rows[b.digest].ctime_ns == os.stat(b.path).st_ctime_ns  # and written
    env.close()


async def test_check_many_joins_a_rehash_already_under_way(env: Env) -> None:
    cache, calls, a, b = await doubtful_blob(env)

    one, many, more = await asyncio.gather(
        cache.vouch(b), cache.check_many([b]), cache.check_many([b])
    )

    assert (one, many, more) == (True, [Verdict.INTACT], [Verdict.INTACT])
    assert calls == [a.digest]


async def test_after_a_lost_index_blobs_are_rehashed_before_first_use(env: Env) -> None:
    """A corrupted blob with a plausible mtime on disk is never served: blobs found with no
    row are unverified until hashed."""
    cache = env.open()
    mem, disk = cache.tiers
    good, bad = env.file("good", 300), env.file("bad", 300)
    await env.put(cache, good, [mem])
    await env.put(cache, bad, [disk])
    cache.record_snapshot(mf.build(chunk_size=CS, files=[good, bad]))
    env.close()
    poison(disk.blob_path(bad.digest))
    os.unlink(env.root / "index.db")  # lost; the manifests dir is kept

    again = env.open()

    assert again.index.rebuilt
    g, b = again.locate(good.digest), again.locate(bad.digest)
    assert g is not None
    assert b is not None
    assert (g.ctime_ns, b.ctime_ns) == (UNKNOWN_CTIME, UNKNOWN_CTIME)
    assert not again.unchanged(g)
    assert not again.unchanged(b)
    assert await again.vouch(g)
    assert again.unchanged(g)  # verified now, and recorded
    assert not await again.vouch(b)
    assert again.copies(bad.digest) == []
    assert not disk.blob_path(bad.digest).exists()


async def test_a_version_1_index_is_migrated_keeping_pins_and_rehashing_blobs(env: Env) -> None:
    cache = env.open()
    mem, _disk = cache.tiers
    a, b = env.file("a", 300), env.file("b", 300)
    await env.put(cache, a, [mem])
    await env.put(cache, b, [mem])
    m = mf.build(chunk_size=CS, files=[a, b])
    cache.record_snapshot(m)
    cache.set_pinned(m.snapshot_id, True)
    cache.index.put_ref("r", "c", m.snapshot_id, 1.0)
    env.close()
    db = sqlite3.connect(env.root / "index.db")
    with contextlib.closing(db):  # what a version-1 daemon left
        db.execute(
            "CREATE TABLE old AS SELECT digest, tier, size, chunk_size, complete, mtime_ns,"
            " last_used FROM blobs"
        )
        db.execute("DROP TABLE blobs")
        db.execute("ALTER TABLE old RENAME TO blobs")
        db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
        db.commit()
    poison(mem.blob_path(b.digest))  # its mtime is the one in the old row

    again = env.open()

    assert not again.index.rebuilt
    assert again.pinned_blobs() == {a.digest, b.digest}
    assert again.index.get_ref("r", "c") == m.snapshot_id
    assert not (env.root / "index.db.v1.old").exists()
    got_a, got_b = again.locate(a.digest), again.locate(b.digest)
    assert got_a is not None
    assert got_b is not None
    assert got_a.ctime_ns == got_b.ctime_ns == UNKNOWN_CTIME
    assert await again.vouch(got_a)
    assert not await again.vouch(got_b)
    assert again.copies(b.digest) == []
    env.close()
    third = env.open()
    assert third.locate(a.digest) is not None
    assert third.unchanged(third.locate(a.digest))  # type: ignore[arg-type]


async def test_a_blob_lent_to_a_writer_is_rehashed_before_every_later_use(env: Env) -> None:
    cache = env.open()
    a = env.file("a", 300)
    await env.put(cache, a)
    b = cache.locate(a.digest)
    assert b is not None
    restored = env.root / "restored"
    os.link(b.path, restored)  # what a link restore does

    cache.lent([b])

    assert b.lent
    assert [r.lent for r in cache.index.blobs()] == [True]
    assert not cache.unchanged(b)  # our own link moved the ctime: re-hash first
    assert await cache.vouch(b)
    assert cache.unchanged(b)
    assert b.lent, "a writer may still hold a link or a descriptor"
    # Another caller's link (not a writer) moves the ctime of a lent blob: re-hashed again.
    os.link(b.path, env.root / "other")
    assert not cache.unchanged(b)
    assert await cache.vouch(b)

    # The attack: "EVIL" through the link, mtime set back. Never served again.
    poison(restored)
    assert not await cache.vouch(b)
    assert cache.copies(a.digest) == []
    assert restored.read_bytes()[:4] == b"EVIL"  # the caller's own inode, no longer ours
    env.close()


async def test_links_to_non_writers_need_no_mark_and_their_rm_costs_no_rehash(
    env: Env,
) -> None:
    cache = env.open()
    calls = count_rehashes(cache)
    a = env.file("a", 300)
    await env.put(cache, a)
    b = cache.locate(a.digest)
    assert b is not None
    restored = env.root / "restored"
    os.link(b.path, restored)  # a link restore for a caller that cannot write the inode

    assert not b.lent
    assert cache.unchanged(b)  # the link moved only the ctime: no re-hash
    assert await cache.vouch(b)
    assert calls == []
    os.unlink(restored)  # the client's rm of its tree moves the ctime: no re-hash for it
    assert cache.unchanged(b)
    assert await cache.vouch(b)
    assert calls == []
    assert cache.locate(a.digest) is b
    env.close()
    again = env.open()
    got = again.locate(a.digest)
    assert got is not None
    assert again.unchanged(got)
    assert not got.lent


async def test_a_blob_unverified_since_an_index_loss_is_rehashed_whoever_links_it(
    env: Env,
) -> None:
    cache = env.open()
    a = env.file("a", 300)
    await env.put(cache, a)
    cache.record_snapshot(mf.build(chunk_size=CS, files=[a]))
    env.close()
    os.unlink(env.root / "index.db")
    again = env.open()
    got = again.locate(a.digest)
    assert got is not None
    os.link(got.path, env.root / "restored")

    assert got.ctime_ns == UNKNOWN_CTIME
    assert not again.unchanged(got)
    assert await again.vouch(got)  # re-hashed, then trusted
    assert again.unchanged(got)
    os.utime(got.path, ns=(0, 1))  # a record whose mtime no longer matches: re-hash again
    assert not again.unchanged(got)


async def test_a_poisoned_blob_is_not_demoted(env: Env) -> None:
    cache, a, b, blob = await env.one_of_two_in_mem()
    disk = cache.tiers[1]
    os.link(blob.path, env.root / "restored")
    cache.lent([blob])
    poison(env.root / "restored")
    os.unlink(env.root / "restored")  # the tree goes: evicting a frees its bytes again

    await env.put(cache, b)  # a leaves mem

    assert cache.locate(a.digest) is None, "deleted, not copied down with a fresh record"
    assert not disk.blob_path(a.digest).exists()
    assert list(disk.tmp_dir.iterdir()) == []
    assert used(cache) == {"mem": 600, "disk": 0}
    assert cache.evictions[("mem", "delete")] == 1


# -- snapshots: kept in the index, forgotten by gc when nothing names them -------------------------


async def test_gc_forgets_snapshots_no_ref_or_pin_names_and_then_their_blobs(env: Env) -> None:
    cache = env.open()
    mem, disk = cache.tiers
    a, b, c, d, e = (env.file(n, 150) for n in "abcde")
    for x in (a, b, c, d, e):
        await env.put(cache, x, [mem if x in (a, b) else disk])
    named = mf.build(chunk_size=CS, files=[a, b])
    pinned = mf.build(chunk_size=CS, files=[c])
    old = mf.build(chunk_size=CS, files=[b, d])  # shares b with `named`
    in_use = mf.build(chunk_size=CS, files=[e])  # restored by id, still being restored
    for m in (named, pinned, old, in_use):
        cache.record_snapshot(m)
    cache.index.put_ref("r", "k", named.snapshot_id, 1.0)
    cache.set_pinned(pinned.snapshot_id, True)

    with cache.holding(in_use.blobs()):
        report = await hostd.maintain.gc(cache, busy=set())

    assert report == {
        "forgot_snapshots": 1,
        "removed_blobs": 1,
        "removed_partials": 0,
        "freed_bytes": 150,
    }
    assert {s.id for s in cache.snapshots()} == {
        named.snapshot_id,
        pinned.snapshot_id,
        in_use.snapshot_id,
    }
    assert old.snapshot_id not in {r.id for r in cache.index.snapshots()}
    assert not (env.root / "manifests" / old.snapshot_id).exists()
    assert cache.locate(d.digest) is None  # only `old` named it
    assert not disk.blob_path(d.digest).exists()
    assert cache.index.chunk_locations(d.chunks[0].id) == []
    loc = cache.chunk_location(b.chunks[0].id)  # b's rows stay: `named` names it
    assert loc is not None
    assert loc[0].digest == b.digest
    for x in (a, b, c, e):
        assert cache.locate(x.digest) is not None

    # The restore is over, and the ref moved on: both go at the next gc.
    cache.index.put_ref("r", "k", pinned.snapshot_id, 2.0)
    again = await hostd.maintain.gc(cache, busy=set())
    assert (again["forgot_snapshots"], again["removed_blobs"]) == (2, 3)
    assert [s.id for s in cache.snapshots()] == [pinned.snapshot_id]
    assert [x.path for x in (a, b, c, d, e) if cache.locate(x.digest)] == ["c"]
    assert cache.index.chunk_locations(a.chunks[0].id) == []
    assert sorted(p.name for p in (env.root / "manifests").iterdir()) == [pinned.snapshot_id]
    env.close()
    # The forgetting is in the index: a restart does not bring them back.
    third = env.open()
    assert [s.id for s in third.snapshots()] == [pinned.snapshot_id]


async def test_a_snapshot_recorded_again_during_gc_keeps_its_rows(env: Env) -> None:
    """gc forgets a snapshot, and a restore by id records it again before gc's writer job
    drops its chunk rows and manifest file: the new record's job, queued after, writes
    them again."""
    cache = env.open()
    a = env.file("a", 150)
    await env.put(cache, a)
    m = mf.build(chunk_size=CS, files=[a])
    cache.record_snapshot(m)
    first, second = threading.Event(), threading.Event()
    forgotten = asyncio.Event()
    delete = cache.index.delete_snapshot

    def deleting(snapshot_id: str) -> None:
        delete(snapshot_id)
        forgotten.set()

    cache.index.delete_snapshot = deleting  # type: ignore[method-assign]
    cache.index.later(first.wait, DEADLINE)  # the writer waits: gc's jobs queue behind
    async with asyncio.timeout(DEADLINE):
        forgetting = asyncio.create_task(cache.forget_unnamed())
        await asyncio.sleep(0)  # it has queued its listing
        cache.index.later(second.wait, DEADLINE)
        first.set()
        await forgotten.wait()  # listed and forgotten; its rows not dropped yet
        assert cache.snapshot(m.snapshot_id) is None
        cache.record_snapshot(m)
        second.set()
        assert await forgetting == [m.snapshot_id]
        await asyncio.to_thread(cache.index.flush)
    assert cache.snapshot(m.snapshot_id) is not None
    assert cache.index.chunk_locations(a.chunks[0].id) == [(a.digest, 0)]
    assert (env.root / "manifests" / m.snapshot_id).exists()


async def test_manifests_are_decoded_on_demand_and_an_unreadable_one_is_forgotten(
    env: Env,
) -> None:
    cache = env.open()
    a, b = env.file("a", 150), env.file("b", 150)
    ma, mb = mf.build(chunk_size=CS, files=[a]), mf.build(chunk_size=CS, files=[b])
    cache.record_snapshot(ma)
    cache.record_snapshot(mb)
    cache.set_pinned(mb.snapshot_id, True)
    env.close()
    again = env.open()
    s = again.snapshot(ma.snapshot_id)
    assert s is not None
    assert (s.files, s.bytes, s.chunk_size, s.pinned) == (1, 150, CS, False)
    got = await again.load_manifest(ma.snapshot_id)
    assert got == ma
    assert s.manifest is got  # kept: decoded once
    assert await again.load_manifest("0" * 64) is None
    for m in (ma, mb):
        (env.root / "manifests" / m.snapshot_id).write_bytes(b"not a manifest")
    other = env.open()
    assert await other.load_manifest(ma.snapshot_id) is None
    assert other.snapshot(ma.snapshot_id) is None  # forgotten: its ref resolves it again
    assert await other.load_manifest(mb.snapshot_id) is None
    assert other.snapshot(mb.snapshot_id) is not None  # pinned: kept, pin and all
    assert other.pinned_blobs() == {b.digest}


async def test_a_version_2_index_is_migrated_and_its_snapshots_indexed_again(env: Env) -> None:
    cache = env.open()
    mem, _disk = cache.tiers
    a, b = env.file("a", 300), env.file("b", 300)
    await env.put(cache, a, [mem])
    await env.put(cache, b, [mem])
    m = mf.build(chunk_size=CS, files=[a, b])
    cache.record_snapshot(m)
    cache.set_pinned(m.snapshot_id, True)
    cache.index.put_ref("r", "c", m.snapshot_id, 1.0)
    env.close()
    db = sqlite3.connect(env.root / "index.db")
    with contextlib.closing(db):  # what a version-2 daemon left: manifests in the rows
        db.execute(
            "CREATE TABLE old(id TEXT PRIMARY KEY, manifest BLOB NOT NULL,"
            " last_used REAL NOT NULL, pinned INTEGER NOT NULL DEFAULT 0)"
        )
        db.execute("INSERT INTO old SELECT id, ?, last_used, pinned FROM snapshots", (m.encoded,))
        db.execute("DROP TABLE snapshots")
        db.execute("ALTER TABLE old RENAME TO snapshots")
        db.execute("DROP TABLE chunks")
        db.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
        db.commit()
    (env.root / "manifests" / m.snapshot_id).unlink()

    again = env.open()

    assert not again.index.rebuilt
    assert not (env.root / "index.db.v2.old").exists()
    assert again.pinned_blobs() == {a.digest, b.digest}
    assert again.index.get_ref("r", "c") == m.snapshot_id
    loc = again.chunk_location(b.chunks[0].id)
    assert loc is not None
    assert loc[0].digest == b.digest
    assert (env.root / "manifests" / m.snapshot_id).read_bytes() == m.encoded
    assert again.index.legacy_manifest(m.snapshot_id) == b""
    s = again.snapshot(m.snapshot_id)
    assert s is not None
    assert (s.files, s.bytes) == (2, 600)


def test_a_record_whose_chunk_size_no_column_holds_is_unsized_and_counted_so(
    tmp_path: Path,
) -> None:
    """Chunk sizes are held in 32 bits: one out of range (an index row could say anything;
    manifests stop at 256 MiB) is recorded as unknown, learnt from a manifest later, and
    counted among the unsized records until then, however it came in."""
    tb = TierBlobs(Tier("t", tmp_path / "t", 1 << 30))
    for i, cs in enumerate((1 << 40, -1, 0)):
        slot = tb.add(bytes([i]) * 32, Values(10, cs, True, 1, 1.0, 1, False, 10))
        assert tb.chunk_size[slot] == 0
    assert tb.unsized == 3
    tb.set_chunk_size(0, CS)
    tb.remove(1)
    assert tb.unsized == 1
    tb.remove(2)
    assert tb.unsized == 0
