"""Large files' chunks in packs (`pack_size`): each file's chunks laid in packs of that file,
in file order and back to back; dedup against the ref's previous snapshot and within a
publish; compression decided per chunk as before; pack_size 0 keeping an object per chunk;
and the bytes of packs a publish holds bounded while the origin is slow.

Real parts throughout: daemons (tests/harness.py) on a file:// origin where a restore must
give the tree back, and a Publisher in process over a real file:// origin (held or failing
by a subclass) where the test watches the publish from inside. What lies at the origin is
read back from its directory, each chunk verified against its id.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from harness import Hostd, rmtree, short_tmp, tree_digest
from s3server import MotoS3

from hostd.asuser import Spawner, Storage
from hostd.cache import Cache
from hostd.caller import daemon_caller
from hostd.core import codec, compat
from hostd.core import manifest as mf
from hostd.core.retry import RetryPolicy
from hostd.errors import OriginError
from hostd.index import Index
from hostd.origin import Origin
from hostd.packs import PackBudget
from hostd.publish import INGEST_THREADS, Publisher, PublishRequest
from hostd.restore import Progress, Resolver
from hostd.tier import Tier

KiB = 1024
CS = 64 * KiB  # the smallest chunk size: many chunks, few bytes
PACK = 256 * KiB  # four raw chunks a pack
DEADLINE = 20.0

T = TypeVar("T")


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("lp")
    try:
        yield root
    finally:
        rmtree(root)


# -- trees and what lies at the origin ----------------------------------------------------------

# Large files (a chunk or more) by path: their size. Random bytes: stored raw, none equal.
LARGE = {
    "a.bin": 20 * CS + 100,  # 21 chunks: packs of 4, 4, 4, 4, 4, 1
    "b/c.bin": 9 * CS,  # 9 chunks: packs of 4, 4, 1
    "d.bin": 3 * CS + 1,  # 4 chunks in a pack shorter than PACK
    "e.bin": CS,  # one chunk, a chunk's size: large
}


def large_tree(root: Path, seed: int = 1, *, smalls: int = 5) -> Path:
    """The files of LARGE, and `smalls` small files (packed as before, apart)."""
    rng = random.Random(seed)
    for rel, size in LARGE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
    for i in range(smalls):
        (root / "small" / f"s{i}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "small" / f"s{i}.txt").write_bytes(rng.randbytes(rng.randint(10, 3000)))
    return root


def prose(kind: str, size: int) -> bytes:
    """`size` bytes of numbered lines zstd shrinks several times over, unlike any other
    `kind`'s."""
    line = b"%s line %d, much like the one before it\n"
    return b"".join(line % (kind.encode(), i) for i in range(size // 30 + 1))[:size]


def raw_packs(sizes: list[int], pack_size: int) -> int:
    """How many packs a file's raw chunks of `sizes` fill, each up to `pack_size`."""
    packs, filled = 0, 0
    for n in sizes:
        if not packs or filled + n > pack_size:
            packs, filled = packs + 1, 0
        filled += n
    return packs


def chunk_sizes(size: int) -> list[int]:
    return [min(CS, size - off) for off in range(0, size, CS)]


def objects(origin: Path, prefix: str) -> dict[str, Path]:
    """The objects under `prefix` at a file:// origin, by name."""
    return {p.name: p for p in (origin / prefix).rglob("*") if p.is_file()}


def manifest(origin: Path, snapshot: str) -> mf.Manifest:
    return mf.decode((origin / "manifests" / snapshot).read_bytes())


def stored(origin: Path, c: mf.Chunk) -> bytes:
    """A chunk's stored bytes, read from its pack or its own object at the origin."""
    if c.packed is None:
        return (origin / "chunks" / c.id.hex()[:2] / c.id.hex()).read_bytes()
    p = c.packed
    data = (origin / "packs" / p.pack.hex()[:2] / p.pack.hex()).read_bytes()
    assert len(data) == p.pack_size
    return data[p.offset : p.offset + p.length]


def read_back(origin: Path, m: mf.Manifest, src: Path) -> None:
    """Every file of `m` rebuilt from the origin's objects, each chunk verified against its
    id (codec.decode), equals the source's bytes."""
    for f in m.files:
        got = b"".join(bytes(codec.decode(c, stored(origin, c))) for c in f.chunks)
        assert got == (src / f.path).read_bytes(), f.path


def restores_cold(work: Path, origin: Path, ref: str, src: Path) -> None:
    """Another host, its cache cold, restores `ref` (copies) into what `src` holds."""
    with Hostd(work / "b", origin=origin.as_uri()) as b:
        out = b.restore(ref, work / "out", mode="copy")
        assert out["event"] == "result", out
    assert tree_digest(work / "out") == tree_digest(src)


def assert_packed_in_file_order(m: mf.Manifest, pack_size: int) -> set[bytes]:
    """Every large file's chunks lie in packs that hold that file's chunks alone, in file
    order and back to back: each pack begins with one of its chunks and ends with another,
    and no pack is larger than `pack_size`. The packs of large files."""
    owner: dict[bytes, str] = {}
    for f in m.files:
        if f.size < m.chunk_size:
            continue
        where = [c.packed for c in f.chunks]
        assert all(where), f"{f.path}: a chunk not in a pack"
        runs = [pack for pack, _ in itertools.groupby(p.pack for p in where if p)]
        assert len(runs) == len(set(runs)), f"{f.path} comes back to a pack it left"
        prev: mf.Packed | None = None
        for p in where:
            assert p is not None
            assert owner.setdefault(p.pack, f.path) == f.path, f"{f.path} shares a pack"
            assert p.pack_size <= pack_size
            if prev is not None and prev.pack == p.pack:
                assert p.offset == prev.offset + prev.length, f"{f.path}: a gap or a jump"
            else:
                assert p.offset == 0, f"{f.path}: a pack does not begin with its chunk"
                assert prev is None or prev.offset + prev.length == prev.pack_size
            prev = p
        assert prev is not None
        assert prev.offset + prev.length == prev.pack_size
    return set(owner)


# -- through the daemon: publish, republish, restore ------------------------------------------


def test_large_files_go_into_few_packs_in_file_order_and_restore(work: Path) -> None:
    src = large_tree(work / "src")
    origin = work / "origin"
    with Hostd(work / "a", origin=origin.as_uri(), chunk_size="64KiB", pack_size="256KiB") as a:
        pub = a.publish(src, "lp/tree")
    m = manifest(origin, pub["snapshot"])
    larges = assert_packed_in_file_order(m, PACK)
    assert objects(origin, "chunks") == {}  # no large file's chunk is an object of its own
    want = sum(raw_packs(chunk_sizes(size), PACK) for size in LARGE.values())
    assert len(larges) == want == 11
    packs = objects(origin, "packs")
    assert set(packs) == {p.hex() for p, _ in m.packs}
    assert pub["packs"] == len(packs) == want + 1  # and one of the small files
    chunks = sum(len(chunk_sizes(size)) for size in LARGE.values())
    assert pub["new_chunks"] == chunks + 5
    assert pub["stored_bytes"] == sum(p.stat().st_size for p in packs.values())
    read_back(origin, m, src)

    restores_cold(work, origin, "lp/tree", src)


def test_a_republish_stores_nothing_and_a_changed_region_only_its_chunks(work: Path) -> None:
    src = large_tree(work / "src")
    origin = work / "origin"
    with Hostd(work / "a", origin=origin.as_uri(), chunk_size="64KiB", pack_size="256KiB") as a:
        first = a.publish(src, "lp/again")
        before = objects(origin, "packs")
        same = a.publish(src, "lp/again")
        assert (same["new_chunks"], same["packs"], same["stored_bytes"]) == (0, 0, 0), same
        assert objects(origin, "packs") == before
        assert manifest(origin, same["snapshot"]).files == manifest(origin, first["snapshot"]).files

        # 100 bytes across the edge of chunks 4 and 5 of a.bin: those two are new
        target = src / "a.bin"
        data = bytearray(target.read_bytes())
        data[5 * CS - 50 : 5 * CS + 50] = b"x" * 100
        target.write_bytes(bytes(data))
        changed = a.publish(src, "lp/again")
    assert (changed["new_chunks"], changed["packs"]) == (2, 1), changed
    assert changed["stored_bytes"] == 2 * CS
    new = set(objects(origin, "packs")) - set(before)
    assert len(new) == 1
    old_m, m = manifest(origin, first["snapshot"]), manifest(origin, changed["snapshot"])
    (old_a,) = (f for f in old_m.files if f.path == "a.bin")
    (new_a,) = (f for f in m.files if f.path == "a.bin")
    for i, (was, now) in enumerate(zip(old_a.chunks, new_a.chunks, strict=True)):
        if i in (4, 5):  # back to back in the new pack, in order
            assert now.packed is not None
            assert now.packed.pack.hex() in new
            assert now.packed.offset == (i - 4) * CS
        else:  # pointed at where the first publish stored them
            assert now == was
    assert [f for f in m.files if f.path != "a.bin"] == [
        f for f in old_m.files if f.path != "a.bin"
    ]
    read_back(origin, m, src)

    restores_cold(work, origin, "lp/again", src)


def test_the_same_large_files_under_another_ref_cost_a_head_a_pack_not_their_upload(
    work: Path,
) -> None:
    """A variant of a model under a second ref (the same weights, its own small files):
    the packs of the large files it shares are found at the origin by their names and
    sizes, not uploaded again; a pack damaged at the origin since is uploaded again."""
    base = large_tree(work / "base")
    variant = work / "variant"
    variant.mkdir()
    for rel in ("a.bin", "b/c.bin", "d.bin"):  # e.bin differs, the small files too
        (variant / rel).parent.mkdir(parents=True, exist_ok=True)
        (variant / rel).write_bytes((base / rel).read_bytes())
    rng = random.Random(77)
    (variant / "e.bin").write_bytes(rng.randbytes(CS))
    (variant / "config.json").write_bytes(rng.randbytes(700))
    origin = work / "origin"
    with Hostd(work / "a", origin=origin.as_uri(), chunk_size="64KiB", pack_size="256KiB") as a:
        a.publish(base, "lp/base")
        packs = objects(origin, "packs")
        written = {name: p.stat().st_mtime_ns for name, p in packs.items()}
        pub = a.publish(variant, "lp/variant")
        # e.bin's pack and the small files' pack: the only uploads
        assert pub["packs"] == 2, pub
        assert pub["new_chunks"] == 2, pub
        assert pub["stored_bytes"] == CS + 700, pub
        assert {n: p.stat().st_mtime_ns for n, p in packs.items()} == written
        m = manifest(origin, pub["snapshot"])
        read_back(origin, m, variant)

        # One of the shared packs truncated at the origin: the next publish of the variant
        # (to a third ref) stores it whole again.
        shared = next(c.packed for f in m.files if f.path == "a.bin" for c in f.chunks)
        assert shared is not None
        damaged = packs[shared.pack.hex()]
        damaged.write_bytes(damaged.read_bytes()[:100])
        again = a.publish(variant, "lp/variant2")
    assert again["packs"] == 1, again
    assert again["stored_bytes"] == shared.pack_size, again
    assert damaged.stat().st_size == shared.pack_size
    read_back(origin, manifest(origin, again["snapshot"]), variant)

    restores_cold(work, origin, "lp/variant", variant)


def test_pack_size_0_keeps_an_object_per_large_chunk(work: Path) -> None:
    src = large_tree(work / "src")
    origin = work / "origin"
    with Hostd(work / "a", origin=origin.as_uri(), chunk_size="64KiB", pack_size=0) as a:
        pub = a.publish(src, "lp/objects")
    m = manifest(origin, pub["snapshot"])
    large = [c for f in m.files if f.size >= CS for c in f.chunks]
    assert all(c.packed is None for c in large)
    assert set(objects(origin, "chunks")) == {c.id.hex() for c in large}
    assert len(large) == sum(len(chunk_sizes(size)) for size in LARGE.values())
    assert pub["packs"] == len(objects(origin, "packs")) == 1  # the small files'
    read_back(origin, m, src)

    restores_cold(work, origin, "lp/objects", src)


def test_compressible_large_chunks_are_stored_compressed_in_packs(work: Path) -> None:
    """With compress = "always" every large chunk is tried: those zstd shrinks enough are
    stored as zstd frames in the pack, the others raw, as with objects of their own."""
    src = work / "src"
    src.mkdir()
    rng = random.Random(5)
    (src / "log.txt").write_bytes(prose("log", 12 * CS + 5000))
    # chunks 0, 2 and 4 compress (each unlike any other); 1, 3 and 5 are random
    mixed = b"".join(prose(f"m{i}", CS) if i % 2 == 0 else rng.randbytes(CS) for i in range(6))
    (src / "mixed.bin").write_bytes(mixed)
    origin = work / "origin"
    with Hostd(
        work / "a",
        origin=origin.as_uri(),
        chunk_size="64KiB",
        pack_size="256KiB",
        compress="always",
    ) as a:
        pub = a.publish(src, "lp/zstd")
    m = manifest(origin, pub["snapshot"])
    assert_packed_in_file_order(m, PACK)
    files = {f.path: f for f in m.files}
    log, mix = files["log.txt"].chunks, files["mixed.bin"].chunks
    assert all(c.codec == mf.CODEC_ZSTD for c in log)
    assert [c.codec for c in mix] == [mf.CODEC_ZSTD, mf.CODEC_RAW] * 3
    for c in (*log, *mix):
        assert c.packed is not None
        assert (c.packed.length < c.size) == (c.codec == mf.CODEC_ZSTD)
    # compressed, 13 chunks of the log take one pack, not four
    assert len({c.packed.pack for c in log if c.packed}) == 1
    assert pub["compressed_chunks"] == len(log) + 3
    assert pub["stored_bytes"] == sum(p.stat().st_size for p in objects(origin, "packs").values())
    read_back(origin, m, src)

    restores_cold(work, origin, "lp/zstd", src)


# -- in process: requests, dedup in one publish, the memory bound, failure ------------------


class WatchedOrigin(Origin):
    """A real file:// origin that counts chunk and pack requests, can hold pack uploads at
    a gate (a slow origin), and can fail the pack upload after `fail_after` of them."""

    def __init__(
        self, url: str, options: dict[str, str] | None = None, *, attempts: int = 1
    ) -> None:
        super().__init__(url, options or {}, retry=RetryPolicy(attempts, 0.0, 0.0))
        self.calls = {"has_chunk": 0, "put_chunk": 0, "head_pack": 0, "put_pack": 0}
        self.gate = asyncio.Event()
        self.gate.set()
        # run (in a thread) at the first pack HEAD, which every HEAD then waits for
        self.before_heads: Callable[[], None] | None = None
        self._heads_held: asyncio.Future[None] | None = None
        self.in_flight = 0  # pack uploads under way (held at the gate or not)
        self.most_in_flight = 0
        self.fail_after: int | None = None

    async def chunk_stored_size(self, cid: bytes) -> int | None:
        self.calls["has_chunk"] += 1
        return await super().chunk_stored_size(cid)

    async def pack_stored_size(self, pack: bytes) -> int | None:
        self.calls["head_pack"] += 1
        if self.before_heads is not None and self._heads_held is None:
            self._heads_held = asyncio.ensure_future(asyncio.to_thread(self.before_heads))
        if self._heads_held is not None:
            await asyncio.shield(self._heads_held)
        return await super().pack_stored_size(pack)

    async def put_chunk(self, cid: bytes, data: bytes) -> None:
        self.calls["put_chunk"] += 1
        await super().put_chunk(cid, data)

    async def put_pack(self, pack: bytes, data: bytes) -> None:
        self.calls["put_pack"] += 1
        if self.fail_after is not None and self.calls["put_pack"] > self.fail_after:
            raise OriginError(f"put pack {pack.hex()}: refused by the test")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            await super().put_pack(pack, data)
        finally:
            self.in_flight -= 1


class InProcess:
    """A Publisher over a fresh cache with one tier and a WatchedOrigin."""

    def __init__(
        self,
        root: Path,
        *,
        pack_size: int,
        compress: str = "never",
        origin: WatchedOrigin | None = None,
    ) -> None:
        self.root = root
        self.tier = Tier("mem", root / "mem", 1 << 30)
        self.cache = Cache(
            [self.tier], Index(root / "idx" / "i.db"), manifests_dir=root / "m", clock=time.time
        )
        self.cache.load()
        self.origin_dir = root / "origin"
        self.origin = origin or WatchedOrigin(self.origin_dir.as_uri())
        self.spawner = Spawner()
        self.pub = Publisher(
            self.cache,
            self.origin,
            chunk_size=CS,
            compress=compress,
            min_saving=0.1,
            upload_concurrency=8,
            pack_size=pack_size,
            resolver=Resolver(self.origin, self.cache, compat.default_kinds()),
            storage=Storage(
                [
                    ("tier 'mem'", root / "mem"),
                    ("index directory", root / "idx"),
                    ("origin", self.origin_dir),
                ]
            ),
            spawner=self.spawner,
        )

    def publish(self, src: Path, ref: str) -> asyncio.Task[dict[str, Any]]:
        req = PublishRequest(src, ref, caller=daemon_caller())
        return asyncio.create_task(self.pub.publish(req, Progress()))

    async def close(self) -> None:
        self.origin.gate.set()
        await asyncio.wait_for(asyncio.to_thread(self.pub.close), DEADLINE)
        self.cache.index.close()
        self.spawner.close()
        await self.origin.close()


async def until(what: Callable[[], T], message: str) -> T:
    """Poll `what` until it is true, within DEADLINE."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not (got := what()):
        assert asyncio.get_running_loop().time() < deadline, message
        await asyncio.sleep(0.005)
    return got


@pytest.mark.parametrize("pack_size", [0, PACK], ids=["chunk-objects", "packs"])
async def test_large_chunks_cost_a_head_and_a_put_a_pack_not_a_head_and_a_put_a_chunk(
    tmp_path: Path, pack_size: int
) -> None:
    src = large_tree(tmp_path / "src", smalls=0)
    run = InProcess(tmp_path, pack_size=pack_size)
    try:
        result = await asyncio.wait_for(run.publish(src, "lp/requests"), DEADLINE)
    finally:
        await run.close()
    chunks = sum(len(chunk_sizes(size)) for size in LARGE.values())
    packs = sum(raw_packs(chunk_sizes(size), PACK) for size in LARGE.values())
    if pack_size:
        assert run.origin.calls == {
            "has_chunk": 0,
            "put_chunk": 0,
            "head_pack": packs,
            "put_pack": packs,
        }
    else:
        assert run.origin.calls == {
            "has_chunk": chunks,
            "put_chunk": chunks,
            "head_pack": 0,
            "put_pack": 0,
        }
    assert result["packs"] == (packs if pack_size else 0)
    assert result["new_chunks"] == chunks
    read_back(run.origin_dir, manifest(run.origin_dir, result["snapshot"]), src)


async def test_equal_chunks_in_one_publish_are_stored_once(tmp_path: Path) -> None:
    """Two files with equal bytes (ingested at once on two threads), a file of one chunk
    repeated, and a small file equal to a large file's last chunk: each chunk is stored
    once, in whichever pack took it first, and every file points at it there."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(9)
    body = rng.randbytes(10 * CS + 500)
    (src / "x.bin").write_bytes(body)
    (src / "y.bin").write_bytes(body)
    (src / "zeros.bin").write_bytes(bytes(6 * CS))
    (src / "tail.txt").write_bytes(body[10 * CS :])  # x's last chunk, as a small file
    run = InProcess(tmp_path, pack_size=PACK)
    try:
        result = await asyncio.wait_for(run.publish(src, "lp/dedup"), DEADLINE)
    finally:
        await run.close()
    m = manifest(run.origin_dir, result["snapshot"])
    files = {f.path: f for f in m.files}
    assert files["x.bin"].chunks == files["y.bin"].chunks
    assert len(set(files["zeros.bin"].chunks)) == 1
    assert files["tail.txt"].chunks == files["x.bin"].chunks[-1:]
    assert result["new_chunks"] == 11 + 1  # x's, and the zero chunk
    assert result["stored_bytes"] == 10 * CS + 500 + CS
    packs = objects(run.origin_dir, "packs")
    assert sum(p.stat().st_size for p in packs.values()) == result["stored_bytes"]
    assert result["packs"] == len(packs)
    read_back(run.origin_dir, m, src)


def budget_tree(root: Path) -> Path:
    """Four files, each larger than a publish's whole budget of packs: 32 packs in all."""
    root.mkdir()
    rng = random.Random(11)
    for i in range(4):
        (root / f"f{i}.bin").write_bytes(rng.randbytes(8 * PACK))
    return root


async def stopped(job: asyncio.Task[Any]) -> None:
    """A publish a failed test leaves running is cancelled and awaited before the run
    closes: closed under it, it fails on the shut pool, and its never-retrieved error is
    logged (its traceback formatted) wherever the task is collected, in a later test."""
    if not job.done():
        job.cancel()
    await asyncio.wait({job}, timeout=DEADLINE)
    if job.done() and not job.cancelled():
        job.exception()  # (retrieved: the test reports its own failure)


async def held_at_the_budget(run: InProcess) -> PackBudget:
    """The budget of the one publish under way, once both ingest threads wait for room in
    it (the origin holding pack uploads)."""
    (publish,) = await until(lambda: list(run.pub.runs), "the publish never started")
    budget = publish.budget
    await until(lambda: budget.waiting == INGEST_THREADS, f"never full: {budget!r}")
    return budget


async def test_packs_held_stay_within_the_budget_while_the_origin_is_slow(
    tmp_path: Path,
) -> None:
    """Pack uploads held at the origin: the ingest threads fill packs up to the budget and
    wait there, reading no further, with several uploads under way; let go, the publish
    completes and the budget was never passed."""
    src = budget_tree(tmp_path / "src")
    run = InProcess(tmp_path, pack_size=PACK)
    run.origin.gate.clear()
    job = run.publish(src, "lp/slow")
    try:
        budget = await held_at_the_budget(run)
        assert budget.total == 4 * PACK
        read = sum(p.stat().st_size for p in run.tier.tmp_dir.iterdir())  # scratch blobs
        assert budget.total - INGEST_THREADS * CS < budget.held <= budget.total
        # what was read is what the packs hold, and a chunk in the hand of each thread
        assert budget.held <= read <= budget.held + INGEST_THREADS * CS
        # Sealed packs are uploading side by side: each is queued as it is sealed, but its
        # HEAD comes first, so on a loaded machine the threads can fill the budget before
        # any HEAD is answered and the PUTs reach the gate.
        await until(lambda: run.origin.in_flight >= 2, f"packs never put: {run.origin.calls}")
        assert budget.waiting == INGEST_THREADS  # (still waiting: nothing was given back)
        assert not job.done()

        run.origin.gate.set()
        result = await asyncio.wait_for(job, DEADLINE)
    finally:
        await stopped(job)
        await run.close()
    assert budget.peak <= budget.total
    assert budget.held == 0  # every pack given back
    assert result["packs"] == run.origin.calls["put_pack"] == 32
    assert run.origin.most_in_flight >= 2
    m = manifest(run.origin_dir, result["snapshot"])
    assert_packed_in_file_order(m, PACK)
    read_back(run.origin_dir, m, src)


async def test_two_publishes_of_the_same_files_at_once_put_each_pack_once(
    tmp_path: Path,
) -> None:
    """A model published under two refs at once in one daemon (variants built side by
    side): the second reaches packs the first is still putting, and waits for those puts
    instead of finding them missing at the origin and uploading them too."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(random.Random(3).randbytes(10 * CS))  # 3 packs
    run = InProcess(tmp_path, pack_size=PACK)
    run.origin.gate.clear()
    try:
        first = run.publish(src, "lp/one")
        # all of it read, its three packs held at the origin as they are put
        await until(lambda: run.origin.in_flight == 3, "the first publish's packs never went")
        put = run.origin.calls["put_pack"]
        second = run.publish(src, "lp/two")
        await until(
            lambda: run.pub.pack_joins or run.origin.calls["put_pack"] > put,
            "the second publish never reached a pack the first was putting",
        )
        assert run.origin.calls["put_pack"] == put  # it waits: it neither asks nor puts
        run.origin.gate.set()
        one, two = await asyncio.wait_for(asyncio.gather(first, second), DEADLINE)
    finally:
        await run.close()
    assert one["snapshot"] == two["snapshot"]
    assert run.origin.calls["put_pack"] == one["packs"] + two["packs"] == 3
    assert two["packs"] == two["stored_bytes"] == 0
    assert one["stored_bytes"] + two["stored_bytes"] == sum(
        p.stat().st_size for p in objects(run.origin_dir, "packs").values()
    )
    read_back(run.origin_dir, manifest(run.origin_dir, one["snapshot"]), src)


async def test_a_publish_cancelled_while_its_threads_wait_for_room_stops_them(
    tmp_path: Path,
) -> None:
    """Cancelled while both ingest threads wait for room in the budget: they are woken,
    give up and remove their scratch blobs; nothing is committed."""
    src = budget_tree(tmp_path / "src")
    run = InProcess(tmp_path, pack_size=PACK)
    run.origin.gate.clear()
    try:
        job = run.publish(src, "lp/cancelled")
        await held_at_the_budget(run)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(job, DEADLINE)
        assert run.pub.runs == set()
        # (a thread never woken would keep the pool from closing: close() times out)
        await asyncio.wait_for(asyncio.to_thread(run.pub.close), DEADLINE)
        assert list(run.tier.tmp_dir.iterdir()) == []
    finally:
        await run.close()
    assert not (run.origin_dir / "manifests").exists()
    assert not (run.origin_dir / "refs").exists()


async def test_a_failed_pack_upload_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    src = large_tree(tmp_path / "src")
    run = InProcess(tmp_path, pack_size=PACK)
    run.origin.fail_after = 3
    try:
        with pytest.raises(OriginError, match="refused by the test"):
            await asyncio.wait_for(run.publish(src, "lp/failed"), DEADLINE)
        assert run.pub.runs == set()
    finally:
        await run.close()  # the ingest threads are done: their scratch blobs gone
    assert not (run.origin_dir / "manifests").exists()
    assert not (run.origin_dir / "refs").exists()
    assert list(run.tier.tmp_dir.iterdir()) == []
    assert not (run.origin_dir / "history").exists()
    assert len(objects(run.origin_dir, "packs")) <= 3  # those let through, named by content


async def test_an_origin_gone_before_a_pack_is_looked_for_fails_the_publish_at_its_head(
    tmp_path: Path,
) -> None:
    """An S3 server that stops answering in the middle of a publish (it crashed, its host
    went): the pack's HEAD fails through its retries, and that fails the publish; the PUT
    is not tried after it with retries of its own, which would double the time a dead
    origin takes to fail each pack."""
    src = large_tree(tmp_path / "src")
    server = MotoS3().__enter__()
    bucket = server.new_bucket()
    origin = WatchedOrigin(f"s3://{bucket.bucket}", bucket.options, attempts=3)
    origin.before_heads = lambda: server.__exit__(None, None, None)  # the origin dies
    run = InProcess(tmp_path, pack_size=PACK, origin=origin)
    try:
        with pytest.raises(OriginError, match=r"head pack packs/.* failed after 3 attempts"):
            await asyncio.wait_for(run.publish(src, "lp/gone"), DEADLINE)
        assert run.origin.calls["put_pack"] == 0
    finally:
        await run.close()
        server.__exit__(None, None, None)


def test_a_pack_damaged_at_its_size_is_named_where_a_restore_refuses_it(work: Path) -> None:
    """A pack damaged in place at its size is not seen by a publish (its HEAD says it is
    there), so the way to mend it is to delete that object: the restore that refuses its
    chunks names it."""
    src = large_tree(work / "src")
    origin = work / "origin"
    with Hostd(work / "a", origin=origin.as_uri(), chunk_size="64KiB", pack_size="256KiB") as a:
        pub = a.publish(src, "lp/damaged")
    m = manifest(origin, pub["snapshot"])
    shared = next(c.packed for f in m.files if f.path == "a.bin" for c in f.chunks)
    assert shared is not None
    damaged = objects(origin, "packs")[shared.pack.hex()]
    damaged.write_bytes(bytes(b ^ 0xFF for b in damaged.read_bytes()))  # (its size kept)
    key = f"packs/{shared.pack.hex()[:2]}/{shared.pack.hex()}"
    with Hostd(work / "b", origin=origin.as_uri()) as b:
        out = b.restore("lp/damaged", work / "out", mode="copy")
    assert out["event"] == "error", out
    assert out["error"] == "chunk_corrupt", out
    assert key in out["message"], out
    assert not (work / "out").exists()
