"""Publish in process: cancellation half way through, with uploads held at the origin (of a
large file's chunks or packs, and of the packs of a tree of small files)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from hostd.asuser import Spawner, Storage
from hostd.cache import Cache
from hostd.caller import daemon_caller
from hostd.core import compat
from hostd.core.retry import RetryPolicy
from hostd.index import Index
from hostd.origin import Origin
from hostd.publish import Publisher, PublishRequest
from hostd.restore import Progress, Resolver
from hostd.tier import Tier

DEADLINE = 10.0


class HeldOrigin(Origin):
    """A real file:// origin whose chunk uploads wait for a gate (a stalled upload)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, {}, retry=RetryPolicy(2, 0.01, 0.02))
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def put_chunk(self, cid: bytes, data: bytes) -> None:
        self.waiting.set()
        await self.gate.wait()
        await super().put_chunk(cid, data)

    async def put_pack(self, pack: bytes, data: bytes) -> None:
        self.waiting.set()
        await self.gate.wait()
        await super().put_pack(pack, data)


def _held_publisher(
    tmp_path: Path, cs: int, compress: str, pack_size: int
) -> tuple[Tier, Cache, HeldOrigin, Spawner, Publisher]:
    """A Publisher over a fresh cache with one tier, whose origin holds uploads (HeldOrigin)."""
    tier = Tier("mem", tmp_path / "mem", 1 << 30)
    cache = Cache(
        [tier], Index(tmp_path / "idx" / "i.db"), manifests_dir=tmp_path / "m", clock=time.time
    )
    cache.load()
    origin = HeldOrigin(f"file://{tmp_path}/origin")
    spawner = Spawner()
    pub = Publisher(
        cache,
        origin,
        chunk_size=cs,
        compress=compress,
        min_saving=0.1,
        upload_concurrency=2,
        pack_size=pack_size,
        resolver=Resolver(origin, cache, compat.default_kinds()),
        storage=Storage(
            [
                ("tier 'mem'", tmp_path / "mem"),
                ("index directory", tmp_path / "idx"),
                ("origin", tmp_path / "origin"),
            ]
        ),
        spawner=spawner,
    )
    return tier, cache, origin, spawner, pub


@pytest.mark.parametrize("pack_size", [0, 256 * 1024], ids=["chunk-objects", "packs"])
async def test_cancelled_publish_stops_its_ingest_and_leaves_nothing(
    tmp_path: Path, pack_size: int
) -> None:
    """A large file's chunks held at the origin, as objects of their own or in packs: the
    ingest thread waits (for the queue, or for room in the budget of packs) and gives up."""
    src = tmp_path / "src"
    src.mkdir()
    cs = 64 * 1024
    # far more chunks than the queue holds, and packs than the budget does
    (src / "big.bin").write_bytes(os.urandom(300 * cs))
    tier, cache, origin, spawner, pub = _held_publisher(tmp_path, cs, "never", pack_size)
    try:
        job = asyncio.create_task(
            pub.publish(PublishRequest(src, "x/y", caller=daemon_caller()), Progress())
        )
        async with asyncio.timeout(DEADLINE):
            await origin.waiting.wait()  # uploads are held; ingest fills the queue and waits
        job.cancel()
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(asyncio.CancelledError):
                await job
        # the ingest thread gives up its wait and removes its scratch blob
        await asyncio.wait_for(asyncio.to_thread(pub.close), DEADLINE)
        assert list(tier.tmp_dir.iterdir()) == []
        assert [u.used for u in cache.usage()] == [0]
        assert not (tmp_path / "origin" / "manifests").exists()
    finally:
        origin.gate.set()
        cache.index.close()
        spawner.close()


def _open_under(root: Path) -> list[str]:
    """What this process has open under `root`."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (listdir's own)
            continue
        if target.startswith(f"{root}/"):
            out.append(target)
    return out


async def test_cancelled_publish_of_small_files_closes_every_descriptor(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rng = random.Random(3)
    for i in range(3000):  # far more batches than are read ahead, and packs than are queued
        p = src / f"d{i // 100:02d}" / f"f{i:04d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(512, 2048)))
    # Small files' packs are the same whatever pack_size says (it is large files' alone).
    tier, cache, origin, spawner, pub = _held_publisher(tmp_path, 64 * 1024, "auto", 256 * 1024)
    progress = Progress()
    try:
        job = asyncio.create_task(
            pub.publish(PublishRequest(src, "x/small", caller=daemon_caller()), progress)
        )
        async with asyncio.timeout(DEADLINE):
            await origin.waiting.wait()  # the first pack's upload is held; batches go on
        job.cancel()
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(asyncio.CancelledError):
                await job
        await asyncio.wait_for(asyncio.to_thread(pub.close), DEADLINE)
        assert _open_under(src) == []  # opened, queued, read: every batch's closed
        assert progress.done_files < 3000
        assert list(tier.tmp_dir.iterdir()) == []
        assert not (tmp_path / "origin" / "manifests").exists()
    finally:
        origin.gate.set()
        cache.index.close()
        spawner.close()


# -- a source rewritten while it is read ------------------------------------------------


def _ingest(src: Path, chunk_size: int, handoff: Any) -> Any:
    """publish.ingest of the whole of `src`, uncached, raw, each chunk handed to `handoff`."""
    from hostd.publish import ingest

    return ingest(
        lambda: os.open(src, os.O_RDONLY | os.O_CLOEXEC),
        str(src),
        src.stat().st_size,
        chunk_size,
        tier=None,
        scratch=None,
        compress="never",
        min_saving=0.1,
        handoff=handoff,
    )


MTIME = 1_600_000_000_000_000_000


def _all_a(src: Path, chunk_size: int) -> Path:
    """`src`: four chunks of version A, of mtime MTIME."""
    src.write_bytes(b"A" * (4 * chunk_size))
    os.utime(src, ns=(MTIME, MTIME))
    return src


def _rewrite(src: Path, at: int, data: bytes) -> None:
    """Write `data` into `src` at `at`, in place, and put its mtime back (rsync --inplace -t)."""
    with open(src, "r+b") as f:
        f.seek(at)
        f.write(data)
    os.utime(src, ns=(MTIME, MTIME))


def test_a_file_rewritten_in_place_with_its_mtime_put_back_is_refused(tmp_path: Path) -> None:
    """rsync --inplace -t, or a write and a touch -d: the size and the mtime are as they
    were, so a check of those passed a file whose first chunk was one version and the rest
    another, published as if it had ever been. The ctime moved, and nobody can move it back."""
    from hostd.errors import UsageError

    cs = 64 * 1024
    src = _all_a(tmp_path / "weights.bin", cs)
    seen: list[bytes] = []

    def rewritten(chunk: object, data: memoryview) -> None:
        seen.append(bytes(data[:1]))
        if len(seen) == 1:  # once the first chunk is read: the rest becomes version B
            _rewrite(src, cs, b"B" * (3 * cs))

    with pytest.raises(UsageError, match="changed while it was being published"):
        _ingest(src, cs, rewritten)
    assert seen == [b"A", b"B", b"B", b"B"]  # (the mix it would have published)


def test_a_file_rewritten_while_another_name_of_it_is_made_is_refused(tmp_path: Path) -> None:
    """The rewrite above, with a hard link to the file made meanwhile (another tool, an
    excluded name): the link count moved with the ctime, which a link moves too, so the
    stats cannot tell. The file is read again: it hashes otherwise, and is refused (it was
    published torn, half A and half B, with the source's own mtime)."""
    from hostd.errors import UsageError

    cs = 64 * 1024
    src = _all_a(tmp_path / "weights.bin", cs)
    seen: list[bytes] = []

    def rewritten(chunk: object, data: memoryview) -> None:
        seen.append(bytes(data[:1]))
        if len(seen) == 2:  # half read: the rest becomes version B, and a link is made
            _rewrite(src, 0, b"B" * (4 * cs))
            os.link(src, tmp_path / "another-name")

    with pytest.raises(UsageError, match="changed while it was being published"):
        _ingest(src, cs, rewritten)
    assert seen == [b"A", b"A", b"B", b"B"]


def test_a_file_whose_mtime_a_snapshot_cannot_record_is_refused_by_name(tmp_path: Path) -> None:
    """An mtime after 2262 (ext4 holds them to 2446) is past a signed 64-bit count of
    nanoseconds: publish said "internal error" and left a blob no record named."""
    from hostd.errors import UsageError
    from hostd.publish import _source

    far = (1 << 63) + 10**18
    with pytest.raises(UsageError, match=r"'x/f': its mtime .* outside what a snapshot records"):
        _source({"path": "x/f", "mode": 0o644, "size": 1, "id": [1, 2], "via": None,
                 "mtime": far, "ctime": 0})  # fmt: skip


async def test_a_scanned_file_whose_mtime_a_snapshot_cannot_record_is_refused_by_name(
    tmp_path: Path,
) -> None:
    """The helper's scan carries mtimes as signed 64-bit numbers: a file set after 2262
    (tmpfs and ext4 hold such times) is refused naming it, before anything is stored."""
    from hostd.errors import UsageError

    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "a").write_bytes(b"a")
    (src / "x" / "f").write_bytes(b"f")
    far = (1 << 63) + 10**18
    os.utime(src / "x" / "f", ns=(far, far))
    _, cache, origin, spawner, pub = _held_publisher(tmp_path, 64 * 1024, "auto", 0)
    origin.gate.set()
    try:
        with pytest.raises(UsageError, match=r"'x/f': its mtime .* outside what a snapshot"):
            await pub.publish(PublishRequest(src, "x/far", caller=daemon_caller()), Progress())
        stored = [*(tmp_path / "origin").rglob("*"), *(tmp_path / "mem").rglob("*")]
        assert [p for p in stored if p.is_file()] == []
    finally:
        await asyncio.to_thread(pub.close)
        cache.index.close()
        spawner.close()


async def test_a_big_publish_and_a_big_decode_give_their_phases_garbage_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish of memory.TRIM_FILES files or more trims the heap after its scan, every
    TRIM_FILES small files placed while more batches come, before it makes its entries and
    before it builds its manifest, and a decode of its manifest once it is done (each
    phase's garbage would stay resident under the next one's peak); a small one never pays
    for a trim."""
    from hostd import memory

    trims: list[int] = []
    real = memory.trim_heap

    def trim() -> int:
        trims.append(1)
        return real()

    monkeypatch.setattr(memory, "TRIM_FILES", 40)
    monkeypatch.setattr(memory, "trim_heap", trim)
    _, cache, origin, spawner, pub = _held_publisher(tmp_path, 64 * 1024, "auto", 0)
    origin.gate.set()
    try:
        # (a batch of small files is SMALL_BATCH_FILES: 512; 1,100 files are three)
        for n, ref, during in ((39, "x/small", 0), (40, "x/big", 0), (1100, "x/bigger", 2)):
            src = tmp_path / ref
            src.mkdir(parents=True)
            for i in range(n):
                (src / f"f{i:04d}").write_bytes(ref.encode() + i.to_bytes(2, "big"))
            trims.clear()
            got = await pub.publish(PublishRequest(src, ref, caller=daemon_caller()), Progress())
            assert got["files"] == n
            assert len(trims) == (3 + during if n >= 40 else 0)
            trims.clear()
            # (its file: a big manifest's is written by the index's writer thread, after)
            written = cache.snaps.manifests_dir / got["snapshot"]
            async with asyncio.timeout(DEADLINE):
                while not written.exists():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            m = await asyncio.to_thread(cache.snaps._read, got["snapshot"])
            assert len(m.files) == n
            assert len(trims) == (1 if n >= 40 else 0)
    finally:
        await asyncio.to_thread(pub.close)
        cache.index.close()
        spawner.close()


def test_the_helpers_columns_take_any_ctime_and_refuse_a_size_no_file_has() -> None:
    """A ctime is only compared (a file read again between two stats when it differs),
    never recorded: one past 2262 (FUSE, NFS, a clock set so) is held at the signed 64-bit
    limit; as it was, it stopped the helper (an array's OverflowError) and the publish said
    the helper stopped answering. A negative size is refused, naming the file."""
    import types

    from hostd.fsops import MAX_NS, Refused, _FileColumns

    def stat(**over: int) -> Any:
        st = os.stat(__file__)
        return types.SimpleNamespace(
            **{k: getattr(st, k) for k in dir(st) if k.startswith("st_")} | over
        )

    cols = _FileColumns()
    cols.add("far", stat(st_ctime_ns=(1 << 63) + 5))
    cols.add("early", stat(st_ctime_ns=-(1 << 63) - 5))
    assert list(cols.numbers["ctime"]) == [MAX_NS, -(1 << 63)]
    with pytest.raises(Refused, match="'neg': its filesystem says its size is -1"):
        cols.add("neg", stat(st_size=-1))
    assert cols.paths == ["far", "early"]


def test_a_file_reached_through_a_symlink_is_checked_as_a_scanned_one() -> None:
    """A file a symlink out of the tree leads to comes as JSON fields: malformed, or a mode
    no file has, it is the helper's error at once (not an internal one, nor a refusal of
    the manifest once every file was read and stored)."""
    from hostd.errors import HostdError
    from hostd.publish import Files, _source

    good = {"path": "l", "mode": 0o644, "size": 1, "id": [1, 2], "via": "/x/f", "mtime": 5}
    good |= {"ctime": (1 << 63) + 5}  # (held at the limit, as a scanned file's)
    assert _source(good).ctime == (1 << 63) - 1
    for bad in ({**good, "id": [1]}, {**good, "mode": "x"}, {"path": "l"}):
        with pytest.raises(HostdError, match="helper answered a symlinked file"):
            _source(bad)
    with pytest.raises(HostdError, match="helper answered 'l' with a field out of range"):
        Files().append(_source({**good, "mode": 0o4755}))


async def test_a_large_file_that_shrinks_after_the_scan_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file cut short between the scan and its read (compress=auto samples it first)
    said "internal error" (an EOFError), not what happened."""
    from hostd import publish
    from hostd.errors import UsageError

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 * 64 * 1024))
    scan = publish.scan_tree

    def scan_then_shrink(*args: Any, **kwargs: Any) -> Any:
        tree = scan(*args, **kwargs)
        os.truncate(src / "big", 10)
        return tree

    monkeypatch.setattr(publish, "scan_tree", scan_then_shrink)
    _, cache, origin, spawner, pub = _held_publisher(tmp_path, 64 * 1024, "auto", 0)
    origin.gate.set()
    try:
        with pytest.raises(UsageError, match="'big' shrank while it was being published"):
            await pub.publish(PublishRequest(src, "x/s", caller=daemon_caller()), Progress())
    finally:
        await asyncio.to_thread(pub.close)
        cache.index.close()
        spawner.close()


def test_a_scans_file_columns_are_checked_before_they_are_taken(tmp_path: Path) -> None:
    """A scan answers its files as columns (fsops.FILE_COLUMNS: the paths a list, each number
    column the base64 of an array): columns of other lengths or types are an error of the
    helper's, not files taken with fields shifted or of the wrong kind."""
    from array import array

    from hostd.errors import HostdError
    from hostd.fsops import NUMBER_COLUMNS, encode_numbers
    from hostd.publish import SourceFile, _sources

    def cols(**over: Any) -> dict[str, Any]:
        numbers = {"mode": [0o644, 0o755], "size": [1, 2], "mtime": [5, -6], "ctime": [7, 8]}
        numbers |= {"dev": [1, 1], "ino": [3, (1 << 64) - 1]}
        c: dict[str, Any] = {"path": ["a", "x/f"]}
        c |= {k: encode_numbers(array(NUMBER_COLUMNS[k], v)) for k, v in numbers.items()}
        return {**c, **over}

    assert list(_sources(cols())) == [
        SourceFile("a", 0o644, 1, (1, 3), None, 5, 7),
        SourceFile("x/f", 0o755, 2, (1, (1 << 64) - 1), None, -6, 8),
    ]
    bads: list[dict[str, Any]] = [
        cols(size=encode_numbers(array("Q", [1]))),
        cols(ino=[3, 4]),
        cols(mode=encode_numbers(array("Q", [0o644, 0o1000]))),
        cols(ctime="not base64!"),
        cols(dev=encode_numbers(array("Q", [1, 1]))[:-4]),  # not whole numbers
        cols(path=["a", 7]),
        {"path": []},
        ["a"],  # type: ignore[list-item]
    ]
    for bad in bads:
        with pytest.raises(HostdError, match="helper answered a scan"):
            _sources(bad)


def test_a_scans_files_sort_by_path_with_their_fields_and_symlinked_files(tmp_path: Path) -> None:
    """The scan's columns are sorted together: each path keeps its own numbers, and a file
    taken through a symlink out of the tree keeps where it was reached from."""
    from hostd.publish import Files, SourceFile

    files = Files()
    wanted = [
        SourceFile("b/z", 0o644, 10, (1, 30), None, 100, 1000),
        SourceFile("a.txt", 0o600, 11, (1, 31), None, 101, 1001),
        SourceFile("a/b", 0o755, 12, (2, 32), None, 102, 1002),
        SourceFile("link", 0o644, 13, (2, 33), "/elsewhere/file", 103, 1003),
        SourceFile("0", 0o644, 14, (2, 34), None, -104, 1004),
    ]
    for f in wanted:
        files.append(f)
    files.sort()
    assert list(files) == sorted(wanted, key=lambda f: f.path)
    assert files[3] == wanted[0]  # (0, a.txt, a/b, b/z: "." before "/")
    files.clear()
    assert list(files) == []
    assert not files.via


def test_a_file_linked_elsewhere_while_it_is_read_is_not_taken_for_changed(
    tmp_path: Path,
) -> None:
    """A link or an unlink of another name of the file moves its ctime too (a tree restored
    by link shares its inodes with the cache and other trees): with the link count changed,
    the size and mtime alone say whether it was written."""
    cs = 64 * 1024
    src = tmp_path / "weights.bin"
    src.write_bytes(b"A" * (4 * cs))
    calls: list[int] = []

    def linked(chunk: object, data: memoryview) -> None:
        calls.append(1)
        if len(calls) == 1:
            os.link(src, tmp_path / "another-name")

    got = _ingest(src, cs, linked)
    assert len(got.ids) == 4
