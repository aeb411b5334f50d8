"""Demotion and verify under faults: a changed blob is not laundered by demotion, a
cancelled demotion leaves no charge behind, and verify does not judge a blob that moved
while it was being hashed."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cache import CS, Env, used, where, write_through

import hostd.maintain
from hostd.cache import Rehash, blob_is_intact, rehash
from hostd.core import manifest as mf
from hostd.restore import Progress

DEADLINE = 5.0


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, {"mem": 1000, "disk": 2000})
    yield e
    e.close()


async def test_a_changed_blob_is_not_demoted_as_if_it_were_intact(env: Env) -> None:
    cache, a, b, blob = await env.one_of_two_in_mem()
    # Root writes through a hardlinked blob's read-only bit (docs/ARCHITECTURE.md, "Data
    # path: restore").
    old = os.stat(blob.path)
    write_through(blob.path, b"X", append=False)
    os.utime(blob.path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000))
    assert not cache.unchanged(blob)

    await env.put(cache, b)  # a leaves mem

    # Whatever copy of a is left must hold a's bytes: a demotion must not give the changed
    # bytes a fresh size and mtime that make them look verified.
    moved = cache.locate(a.digest)
    if moved is not None:
        assert blob_is_intact(moved.path, a.digest, a.size, CS) is None
    assert used(cache) == {"mem": 600, "disk": 600 if moved is not None else 0}


async def test_cancelling_an_admission_while_it_demotes_returns_the_lower_tiers_charge(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = env.open()
    mem, disk = cache.tiers
    a, b = env.file("a", 600), env.file("b", 600)
    await env.put(cache, a)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    real = disk.copy_in

    def slow_copy_in(src: Path, digest: bytes, size: int, chunk_size: int) -> object:
        started.set()
        release.wait(DEADLINE)
        try:
            return real(src, digest, size, chunk_size)
        finally:
            finished.set()

    monkeypatch.setattr(disk, "copy_in", slow_copy_in)
    admission = asyncio.create_task(cache.admit(b.digest, b.size, CS, [mem]))
    assert await asyncio.to_thread(started.wait, DEADLINE)
    admission.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await admission
    assert await asyncio.to_thread(finished.wait, DEADLINE)

    known = {
        t.name: sum(c.size for d in cache.digests(t) for c in cache.copies(d) if c.tier is t)
        for t in cache.tiers
    }
    assert used(cache) == known
    # and the cache still works: the admission goes through once it is not cancelled
    assert await cache.admit(b.digest, b.size, CS, [mem]) is mem


async def test_verify_does_not_call_a_blob_bad_because_it_moved_while_being_hashed(
    env: Env,
) -> None:
    cache = env.open()
    mem, disk = cache.tiers
    a, b = env.file("a", 600), env.file("b", 600)
    await env.put(cache, a)
    cache.record_snapshot(mf.build(chunk_size=CS, files=[a, b]))
    started, release = threading.Event(), threading.Event()

    def slow_check(path: Path, digest: bytes, size: int, chunk_size: int) -> Rehash:
        started.set()
        release.wait(DEADLINE)
        return rehash(path, digest, size, chunk_size)

    cache.hasher = slow_check
    verifying = asyncio.create_task(hostd.maintain.verify(cache, Progress()))
    assert await asyncio.to_thread(started.wait, DEADLINE)
    await env.put(cache, b)  # a is demoted to disk while verify hashes its mem copy
    release.set()
    async with asyncio.timeout(DEADLINE):
        result = await verifying

    assert result["bad"] == []
    assert where(cache, a) == [("disk", True)]
    moved = cache.locate(a.digest, [disk])
    assert moved is not None
    assert blob_is_intact(moved.path, a.digest, a.size, CS) is None
    assert not mem.blob_path(a.digest).exists()
