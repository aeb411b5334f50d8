"""The cache's read leases (link_checks = "lease") around removals and refills: a lease is
never kept on an inode that is not the record's."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_cache import Env, env  # noqa: F401  (fixture)

from hostd.blobs import Blob
from hostd.cache import Cache
from hostd.core.manifest import FileEntry
from hostd.errors import BlobUnheld
from hostd.leases import SIGNAL, Leases
from hostd.tier import Tier


@pytest.fixture
def leases() -> Iterator[Leases]:
    old = signal.signal(SIGNAL, lambda *_: None)  # (the daemon's handler: a break must not kill)
    ls = Leases()
    try:
        yield ls
    finally:
        ls.close()
        signal.signal(SIGNAL, old)


def root_writes_through(path: str, leases: Leases) -> None:
    """A root process reaching a caller's linked tree: it writes through the link and puts
    the mtime back. Run apart, while this process gives up any lease the open breaks (as
    the daemon's scan does)."""
    code = (
        "import os, sys\n"
        "p = sys.argv[1]; st = os.stat(p)\n"
        "fd = os.open(p, os.O_WRONLY); os.pwrite(fd, b'EVIL', 0); os.close(fd)\n"
        "os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))\n"
    )
    w = subprocess.Popen([sys.executable, "-c", code, path])
    deadline = time.monotonic() + 20
    while w.poll() is None:
        leases.scan()
        time.sleep(0.01)
        assert time.monotonic() < deadline, "the writer is still held"
    assert w.returncode == 0


async def leased_cache(
    env: Env,  # noqa: F811
    leases: Leases,
    *sizes: int,
) -> tuple[Cache, Tier, list[FileEntry], list[Blob]]:
    """A cache whose links `leases` guard, with a blob in its mem tier for a file of each
    size: the cache, that tier, the files and their blobs."""
    cache = env.open()
    cache.guard_links(leases)
    mem = cache.tiers[0]
    files = [env.file(chr(ord("a") + i), n) for i, n in enumerate(sizes)]
    blobs = []
    for e in files:
        await env.put(cache, e, [mem])
        b = cache.locate(e.digest, [mem])
        assert b is not None
        blobs.append(b)
    return cache, mem, files, blobs


async def test_a_lease_a_rehash_takes_on_a_blob_being_removed_is_not_kept_for_its_refill(
    env: Env,  # noqa: F811
    leases: Leases,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A removal (gc, eviction, a verify's bad blob) drops the record, then unlinks the file
    on a thread. A re-hash of that blob whose thread runs in between (a verify listed it
    before; the executor was busy) takes its lease in `Cache._hash`, under the key
    (digest, tier), on the inode about to be unlinked, and nothing gives it up: `_drop` has
    run. When the blob is fetched again into the tier, `_put` finds no record to replace and
    releases nothing, so `holds(key)` says True of the new inode while the lease is on the
    old one; `Cache.lease` keeps that lease ("not new") and the new inode is linked out with
    no lease on it. A root process then writes through the link, puts the mtime back, and
    every later use vouches for its bytes (the ctime is not asked: `holds` says leased)."""
    cache, mem, (a,), (old,) = await leased_cache(env, leases, 900)
    real = asyncio.to_thread

    async def late(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if getattr(fn, "__name__", "").startswith("remove_blob"):
            await cache.rehash(old)  # a verify's re-hash, its thread run before the unlink's
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", late)
    await cache.remove(a.digest, mem)
    monkeypatch.setattr(asyncio, "to_thread", real)

    await env.put(cache, a, [mem])  # fetched again: a new inode
    new = cache.locate(a.digest, [mem])
    assert new is not None
    path = str(mem.blob_path(a.digest))
    assert cache.lease([new]) == 0  # "held": linked to a non-writer
    os.link(path, env.root / "callers-link")  # the restore's link (moves the ctime)
    root_writes_through(str(env.root / "callers-link"), leases)
    with open(path, "rb") as f:  # noqa: ASYNC230  (a few bytes of a local file)
        assert f.read(4) == b"EVIL"
    assert not cache.unchanged(new), "a write through a link went unseen: no lease was on it"
    assert not await cache.vouch(new)


def test_leases_held_after_many_removals_keep_no_removed_inode(
    env: Env,  # noqa: F811
    leases: Leases,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same race, counted: every lease a re-hash takes in that gap stays, a descriptor
    on an unlinked inode each (its space is never given back to the tier's filesystem)."""

    async def main() -> None:
        cache = env.open()
        cache.guard_links(leases)
        mem = cache.tiers[0]
        real = asyncio.to_thread
        files = [env.file(f"f{i}", 100 + i) for i in range(5)]
        for e in files:
            await env.put(cache, e, [mem])
            b = cache.locate(e.digest, [mem])
            assert b is not None

            async def late(fn: Any, /, *args: Any, b: Any = b, **kwargs: Any) -> Any:
                if getattr(fn, "__name__", "").startswith("remove_blob"):
                    await cache.rehash(b)
                return await real(fn, *args, **kwargs)

            monkeypatch.setattr(asyncio, "to_thread", late)
            await cache.remove(e.digest, mem)
            monkeypatch.setattr(asyncio, "to_thread", real)
        gone = [name for name in _open_files() if "/blobs/" in name and name.endswith(" (deleted)")]
        assert len(leases) == 0, len(leases)
        assert not gone, gone

    asyncio.run(main())


def _open_files() -> list[str]:
    """What this process's descriptors name."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # (the listing's own descriptor, closed since)
    return out


async def test_a_lease_a_rehash_took_vouches_for_no_ctime_before_its_hash_passed(
    env: Env,  # noqa: F811
    leases: Leases,
) -> None:
    """No lease holds on a blob linked out (the daemon restarted, say). A root process
    writes through the link and puts the mtime back; the next use re-hashes it, taking its
    lease first (Cache._hash). While that hash runs, another restore's cheap check must
    not take the lease for one that vouches: it took the moved ctime as a link's and said
    the written blob was intact (copies and links of it handed over)."""
    cache, mem, (a,), (b,) = await leased_cache(env, leases, 900)
    os.link(mem.blob_path(a.digest), env.root / "callers-link")
    assert await cache.vouch(b)  # (the link's ctime: re-hashed, the lease taken)
    leases.close()
    after = Leases()  # a restart: no lease holds
    cache.guard_links(after)
    root_writes_through(str(env.root / "callers-link"), after)

    hashing, go = threading.Event(), threading.Event()
    real = cache.hasher

    def held_up(*args: Any) -> Any:
        hashing.set()
        assert go.wait(20)
        return real(*args)

    cache.hasher = held_up
    use = asyncio.create_task(cache.vouch(b))
    try:
        assert await asyncio.to_thread(hashing.wait, 20)  # its lease is taken
        assert not cache.unchanged(b), "a lease taken before the hash vouched for a write"
    finally:
        go.set()
        assert not await use  # the hash finds the write: dropped
        after.close()


def test_a_lease_batch_that_fails_midway_keeps_no_lease_on_a_blob_dropped_meanwhile(
    env: Env,  # noqa: F811
    leases: Leases,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`Cache.lease` takes every new lease first (Leases.take_many), then checks each blob.
    The first that fails (changed since it was verified, here) raises; a blob after it that
    was dropped meanwhile (a removal, its file unlinked on a thread after the record goes,
    `_drop` having released nothing yet held) must not keep the lease the batch took on it:
    nothing else would give it up, and its descriptor keeps the removed inode."""

    async def main() -> None:
        cache, mem, (_, b), (ba, bb) = await leased_cache(env, leases, 300, 400)
        st = os.stat(ba.file)
        os.utime(ba.file, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # changed since verified
        real = leases.holding

        def holding(keys: Any) -> list[bool]:
            got = real(keys)
            cache._drop(b.digest, mem.name)  # (on the loop, meanwhile: the file still there)
            return got

        monkeypatch.setattr(leases, "holding", holding)
        with pytest.raises(BlobUnheld, match="changed since"):
            cache.lease([ba, bb])
        os.unlink(bb.file)  # the removal's thread
        gone = [name for name in _open_files() if "/blobs/" in name and name.endswith(" (deleted)")]
        assert not gone, gone
        assert len(leases) == 0, len(leases)

    asyncio.run(main())
