"""Small files and format 2, end to end: packs at the origin, mtimes kept in every restore
mode, compression chosen per file, and snapshots an older hostd published (format 1) still
restoring.

Real daemons (tests/harness.py) on a file:// origin; a user's checks: the tree that comes
back (bytes, exec bits, mtimes to the nanosecond), what lies at the origin, and how many
requests a cold restore made. Then the stages a batch of small files goes through, on
their own: the codec chosen from a sample, a file changing while it is read, and
descriptors handed to a stage that never runs.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from harness import Hostd, rmtree, short_tmp, tree_digest
from prometheus_client.parser import text_string_to_metric_families

from hostd import publish
from hostd.core import codec
from hostd.core import manifest as mf
from hostd.core.ids import chunk_id, compat_digest
from hostd.core.retry import RetryPolicy
from hostd.errors import UsageError
from hostd.origin import Origin
from hostd.publish import SourceFile, read_small

KiB = 1024
CHUNK = 256 * KiB  # small packs, so a small tree makes several


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("sf")
    try:
        yield root
    finally:
        rmtree(root)


def small_tree(root: Path, n: int = 300, seed: int = 7) -> Path:
    """`n` files of 1-16 KiB in a few directories, some executable, each with its own past
    mtime (one before 1970), two with equal bytes but different mtimes, one empty file."""
    rng = random.Random(seed)
    for i in range(n):
        p = root / f"d{i % 7}" / f"f{i:05d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(1 * KiB, 16 * KiB)))
        if i % 5 == 0:
            p.chmod(0o755)
        else:
            p.chmod(0o444)  # read-only: a blob can be linked for it
        t = 1_500_000_000_000_000_000 + rng.randrange(10**17)
        os.utime(p, ns=(t, t))
    twin_a, twin_b = root / "twin-a.txt", root / "twin-b.txt"
    for p, t in ((twin_a, 1_600_000_000_000_000_001), (twin_b, 1_600_000_000_999_999_999)):
        p.write_bytes(b"the same bytes in two files\n" * 10)
        p.chmod(0o444)
        os.utime(p, ns=(t, t))
    old = root / "before-1970.txt"
    old.write_bytes(b"old")
    old.chmod(0o444)
    os.utime(old, ns=(-86_400_000_000_123, -86_400_000_000_123))
    empty = root / "empty"
    empty.write_bytes(b"")
    os.utime(empty, ns=(1_234_567_890_123_456_789, 1_234_567_890_123_456_789))
    return root


def origin_keys(origin: Path, prefix: str) -> list[Path]:
    return [p for p in (origin / prefix).rglob("*") if p.is_file()]


def origin_gets(h: Hostd) -> float:
    for fam in text_string_to_metric_families(h.metrics()):
        if fam.name == "hostd_origin_requests":
            return sum(s.value for s in fam.samples if s.name.endswith("_total"))
    raise AssertionError("no hostd_origin_requests in /metrics")


def test_small_files_go_into_packs_and_restore_cold_with_few_requests(work: Path) -> None:
    src = small_tree(work / "src")
    expected = tree_digest(src)
    origin = work / "origin"
    with Hostd(work / "a", origin=origin.as_uri(), chunk_size="256KiB") as a:
        pub = a.publish(src, "sf/tree")
    assert pub["packs"] >= 2, pub
    packs = origin_keys(origin, "packs")
    assert len(packs) == pub["packs"]
    assert origin_keys(origin, "chunks") == []  # every file is smaller than a chunk
    assert all(p.stat().st_size <= CHUNK for p in packs)
    # The manifest places every file's chunk in one of those packs.
    (manifest,) = origin_keys(origin, "manifests")
    m = mf.decode(manifest.read_bytes())
    assert m.format == 2
    assert {p.hex() for p, _ in m.packs} == {p.name for p in packs}
    assert all(c.packed is not None for f in m.files for c in f.chunks)

    with Hostd(work / "b", origin=origin.as_uri()) as b:
        before = origin_gets(b)
        out = b.restore("sf/tree", work / "cold", mode="copy")
        assert out["event"] == "result", out
        assert tree_digest(work / "cold") == expected
        # One ranged read per pack (plus the ref and the manifest), not one per file.
        assert origin_gets(b) - before <= len(packs) + 4, out


def test_mtimes_are_exact_in_every_mode_and_links_never_retime_a_blob(work: Path) -> None:
    src = small_tree(work / "src", n=40)
    expected = tree_digest(src)
    with Hostd(work / "a", access={"link_to_writers": True}) as a:
        a.publish(src, "sf/times")
        for mode in ("link", "copy", "auto"):
            out = a.restore("sf/times", work / mode, mode=mode)
            assert out["event"] == "result", out
            assert tree_digest(work / mode) == expected, mode
        # Two files of equal bytes share one blob, which carries one mtime: the other file
        # is copied (and counted), never the shared inode re-timed under the first.
        link = a.restore("sf/times", work / "link2", mode="link")
        assert link["linked"] > 0, link
        assert link["copied_for_mtime"] >= 1, link
        twins = [work / "link2" / "twin-a.txt", work / "link2" / "twin-b.txt"]
        assert twins[0].stat().st_ino != twins[1].stat().st_ino
        assert tree_digest(work / "link") == expected  # the first link restore is unchanged


def test_files_sharing_a_blob_link_to_the_mtime_most_of_them_have(work: Path) -> None:
    """Three files with equal bytes, the first (in path order) with its own mtime: a cold
    restore fills their one blob with the other two's mtime, so a link restore links those
    two and copies only the first."""
    src = work / "src"
    src.mkdir()
    for name, t in (("a.txt", 1_600_000_000_000_000_001), ("b.txt", 1_700_000_000_000_000_002)):
        for p in (src / name, src / f"{name}.2"):
            p.write_bytes(b"one blob for three files\n" * 40)
            p.chmod(0o444)
            os.utime(p, ns=(t, t))
    (src / "a.txt.2").unlink()  # a.txt alone has the first mtime; b.txt and b.txt.2 share
    origin = work / "origin"
    with Hostd(work / "a", origin=origin.as_uri()) as a:
        a.publish(src, "sf/majority")
    with Hostd(work / "b", origin=origin.as_uri(), access={"link_to_writers": True}) as b:
        out = b.restore("sf/majority", work / "out", mode="link")
        assert out["event"] == "result", out
        assert (out["linked"], out["copied_for_mtime"]) == (2, 1), out
        got = work / "out"
        assert (got / "b.txt").stat().st_ino == (got / "b.txt.2").stat().st_ino
        assert tree_digest(got) == tree_digest(src)


def test_executables_link_to_exec_blobs_however_the_blob_was_installed(work: Path) -> None:
    """A blob installed for a file that is r-x for everyone is 0555, so a link restore links
    executables (read-only, exec bits kept) rather than copying them: blobs stored by a
    publish (a small file, a file of several chunks), filled cold (whole, chunk by chunk),
    and found at start (the index keeps no mode: the scan's stat gives it). A mode neither
    0444 nor 0555 shows (0744) is a counted copy, with its own mode."""
    src = work / "src"
    rng = random.Random(3)
    files = {"bin/tool": (4 * KiB, 0o755), "lib/big.so": (3 * CHUNK + 5, 0o755)}
    files |= {"data.txt": (5 * KiB, 0o444), "mine.sh": (KiB, 0o744)}
    for name, (size, perm) in files.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
        p.chmod(perm)
    origin = work / "origin"

    def linked(out: dict[str, Any], got: Path) -> None:
        assert out["event"] == "result", out
        assert (out["linked"], out["copied_for_mode"]) == (3, 1), out
        for name, (_, perm) in files.items():
            st = (got / name).stat()
            want = (1, perm) if perm == 0o744 else (2, perm & 0o555)
            assert (st.st_nlink, st.st_mode & 0o777) == want, name
        assert tree_digest(got) == tree_digest(src)

    config: dict[str, Any] = {"access": {"link_to_writers": True}, "chunk_size": "256KiB"}
    with Hostd(work / "a", origin=origin.as_uri(), **config) as a:
        a.publish(src, "sf/exec")
        linked(a.restore("sf/exec", work / "published", mode="link"), work / "published")
    with Hostd(work / "b", origin=origin.as_uri(), **config) as b:
        linked(b.restore("sf/exec", work / "cold", mode="link"), work / "cold")
    for t in ("cold", "published"):
        rmtree(work / t)  # (their links would keep the blobs "linked out" at the next start)
    with Hostd(work / "b", origin=origin.as_uri(), **config) as b:
        linked(b.restore("sf/exec", work / "restarted", mode="link"), work / "restarted")


def test_a_blob_is_linked_only_for_files_its_mode_shows(work: Path) -> None:
    """Three files of equal bytes and mtime, two 0755 and one 0644: the blob is filled 0555
    (the mode most of them want), linked for the two, and the 0644 file is a counted copy
    with no exec bit. A blob whose mode changed behind hostd (root's chmod) is checked again
    before use, and never linked for a file whose exec bits it would misstate."""
    src = work / "src"
    src.mkdir()
    data = b"#!/bin/sh\necho same\n" * 50
    for name, perm in (("a.sh", 0o755), ("b.txt", 0o644), ("c.sh", 0o755)):
        (src / name).write_bytes(data)
        (src / name).chmod(perm)
        os.utime(src / name, ns=(1_600_000_000_000_000_007,) * 2)
    origin = work / "origin"
    with Hostd(work / "a", origin=origin.as_uri()) as a:
        a.publish(src, "sf/modes")
    with Hostd(work / "b", origin=origin.as_uri(), access={"link_to_writers": True}) as b:
        out = b.restore("sf/modes", work / "one", mode="link")
        assert (out["linked"], out["copied_for_mode"]) == (2, 1), out
        got = work / "one"
        assert (got / "a.sh").stat().st_ino == (got / "c.sh").stat().st_ino
        assert (got / "a.sh").stat().st_mode & 0o777 == 0o555
        assert ((got / "b.txt").stat().st_mode & 0o777, (got / "b.txt").stat().st_nlink) == (
            0o644,
            1,
        )
        assert tree_digest(got) == tree_digest(src)
        (blob,) = [p for p in (work / "b").rglob("blobs/*/*") if p.read_bytes() == data]
        os.chmod(blob, 0o444)  # behind hostd's back: now it would show b.txt, not a.sh
        out = b.restore("sf/modes", work / "two", mode="link")
        assert (out["linked"], out["copied_for_mode"]) == (1, 2), out
        got = work / "two"
        assert (got / "b.txt").stat().st_mode & 0o777 == 0o444
        assert {(got / n).stat().st_mode & 0o777 for n in ("a.sh", "c.sh")} == {0o755}
        assert tree_digest(got) == tree_digest(src)
        # A mode hostd never gives a blob (a chmod through a link, by a caller that may
        # write the cache) links no file: not as 0444, not as 0555.
        for odd in (0o4555, 0o755, 0o445):
            os.chmod(blob, odd)
            out = b.restore("sf/modes", work / oct(odd), mode="link")
            assert (out["linked"], out["copied_for_mode"]) == (0, 3), out
            got = work / oct(odd)
            want = {"a.sh": 0o755, "b.txt": 0o644, "c.sh": 0o755}
            assert {n: (got / n).stat().st_mode & 0o7777 for n in want} == want, oct(odd)


def test_a_publish_never_replaces_a_blob_the_tier_holds(work: Path) -> None:
    """The same bytes published 0644, then 0755 (a small file, one of several chunks): the
    second publish leaves the blob's inode as it was. A restore that checked that inode
    links it by name; had the publish put its own 0555 copy there, the 0644 file would have
    come back executable. And a link restore of either tree, while the other is published
    over and over, never shows a file's exec bits wrong nor fails."""
    rng = random.Random(5)
    files = {f"d{i % 4}/f{i:03d}": rng.randbytes(rng.randint(1, 8) * KiB) for i in range(120)}
    files["big.bin"] = rng.randbytes(2 * CHUNK + 3)
    trees = {}
    for perm in (0o644, 0o755):
        root = work / oct(perm)
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
            (root / name).chmod(perm)
            os.utime(root / name, ns=(1_600_000_000_000_000_000,) * 2)
        trees[perm] = root
    config: dict[str, Any] = {"access": {"link_to_writers": True}, "chunk_size": "256KiB"}
    with Hostd(work / "d", **config) as d:
        d.publish(trees[0o644], "sf/plain")
        blobs = {p.name: p.stat() for p in (work / "d").rglob("blobs/*/*")}
        assert len(blobs) == len(files)
        d.publish(trees[0o755], "sf/exec")
        after = {p.name: p.stat() for p in (work / "d").rglob("blobs/*/*")}
        assert {n: (s.st_ino, s.st_mode & 0o7777) for n, s in after.items()} == {
            n: (s.st_ino, 0o444) for n, s in blobs.items()
        }
        stop = threading.Event()
        published: list[dict[str, Any]] = []

        def publisher() -> None:
            while not stop.is_set():
                for perm in (0o755, 0o644):
                    published.append(d.publish(trees[perm], f"sf/again-{perm:o}"))

        t = threading.Thread(target=publisher)
        t.start()
        try:
            for i in range(4):
                for ref, perm in (("sf/plain", 0o644), ("sf/exec", 0o755)):
                    got = work / f"out-{i}-{perm:o}"
                    out = d.restore(ref, got, mode="link")
                    assert out["event"] == "result", out
                    seen = {(got / n).stat().st_mode & 0o111 for n in files}
                    assert seen == {perm & 0o111}, (ref, out)
                    rmtree(got)
        finally:
            stop.set()
            t.join()
        assert published, "the publisher never ran beside the restores"


def test_a_republish_stores_only_what_changed(work: Path) -> None:
    src = small_tree(work / "src")
    origin = work / "origin"
    with Hostd(work / "a", origin=origin.as_uri(), chunk_size="256KiB") as a:
        first = a.publish(src, "sf/again")
        changed = src / "d1" / "f00001.bin"
        changed.chmod(0o644)
        changed.write_bytes(b"new bytes")
        second = a.publish(src, "sf/again")
        assert second["new_chunks"] == 1, second
        assert second["packs"] == 1, second
        assert len(origin_keys(origin, "packs")) == first["packs"] + 1
        with Hostd(work / "b", origin=origin.as_uri()) as b:
            out = b.restore("sf/again", work / "out")
            assert out["event"] == "result", out
            assert tree_digest(work / "out") == tree_digest(src)


def _publish_format_1(origin_url: str, files: dict[str, bytes], ref: str) -> str:
    """What an older hostd left at the origin: one object per chunk, a format 1 manifest
    (no mtimes, no packs), the ref under the compat key of format "1"."""

    async def go() -> str:
        origin = Origin(origin_url, {}, retry=RetryPolicy(attempts=1, base=0.0, cap=0.0))
        entries = []
        for path, data in files.items():
            cid = chunk_id(data)
            await origin.put_chunk(cid, data)
            entries.append(mf.FileEntry(path, 0o644, len(data), (mf.Chunk(cid, len(data)),)))
        m = mf.build(chunk_size=1 << 20, files=entries, compat={"format": "1"}, format=1)
        await origin.put_manifest(m.snapshot_id, m.encoded)
        await origin.put_ref(ref, compat_digest({"format": "1"}), m.snapshot_id)
        await origin.close()
        return m.snapshot_id

    return asyncio.run(go())


def test_a_format_1_snapshot_still_restores(work: Path) -> None:
    origin = work / "origin"
    files = {"a.txt": b"from an older hostd\n", "sub/b.bin": random.Random(3).randbytes(5000)}
    sid = _publish_format_1(origin.as_uri(), files, "sf/old")
    with Hostd(work / "a", origin=origin.as_uri(), access={"link_to_writers": True}) as a:
        for mode in ("copy", "link"):
            out = a.restore("sf/old", work / mode, mode=mode)
            assert out["event"] == "result", out
            assert out["snapshot"] == sid
            root = work / mode
            got = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
            assert got == files
        # A publish now writes format 2 under its own compat key; the old one stays.
        new = work / "new"
        new.mkdir()
        (new / "c.txt").write_text("new")
        pub = a.publish(new, "sf/old")
        assert pub["compat"]["format"] == "2"
        out = a.restore("sf/old", work / "newest")
        assert out["snapshot"] == pub["snapshot"]  # the newer format is tried first


def test_small_files_that_compress_are_stored_zstd_and_random_ones_raw(work: Path) -> None:
    src = work / "src"
    src.mkdir()
    rng = random.Random(5)
    text = [
        b"".join(b"def f%d(x): return x + %d\n" % (i, j) for j in range(40 + i)) for i in range(9)
    ]
    for i, data in enumerate(text):
        (src / f"t{i}.py").write_bytes(data)
    for i in range(30):
        (src / f"r{i}.bin").write_bytes(rng.randbytes(rng.randint(KiB, 16 * KiB)))
    origin = work / "origin"
    with Hostd(work / "a", origin=origin.as_uri(), chunk_size="256KiB") as a:
        pub = a.publish(src, "sf/zstd")
        assert pub["compressed_chunks"] == len(text), pub
        assert pub["stored_bytes"] < pub["bytes"] - sum(map(len, text)) // 2, pub
    (manifest,) = origin_keys(origin, "manifests")
    m = mf.decode(manifest.read_bytes())
    assert {f.path for f in m.files if f.chunks[0].codec == mf.CODEC_ZSTD} == {
        f"t{i}.py" for i in range(len(text))
    }
    with Hostd(work / "b", origin=origin.as_uri()) as b:
        out = b.restore("sf/zstd", work / "cold", mode="copy")
        assert out["event"] == "result", out
        assert tree_digest(work / "cold") == tree_digest(src)


# -- the stages of a batch, on their own ------------------------------------------------------

RNG = random.Random(11)
TEXT = b"".join(b"%d: a line of a compile cache's source\n" % i for i in range(400))  # ~16 KiB


@pytest.mark.parametrize(
    "data",
    [
        RNG.randbytes(16 * KiB),
        RNG.randbytes(700),  # all of it is the sample
        TEXT,
        TEXT[:600],
        bytes(12 * KiB),
        RNG.randbytes(8 * KiB) + TEXT[: 8 * KiB],  # compressible where the sample ends
        TEXT[: 8 * KiB] + RNG.randbytes(8 * KiB),
        RNG.randbytes(15 * KiB) + bytes(KiB),  # its sample compresses, the whole saves <10%
        RNG.randbytes(KiB // 2) + TEXT[:KiB],
        TEXT * 64,  # 1.6 MiB: a 64th of it each from start, middle and end
        base64.b64encode(RNG.randbytes(12 * KiB)),  # no repeats: only coding shows
        RNG.randbytes(6 * KiB).hex().encode(),
    ],
    ids=[
        "random",
        "random-tiny",
        "text",
        "text-tiny",
        "zeros",
        "random-then-text",
        "text-then-random",
        "mostly-random",
        "tiny-mixed",
        "text-1.6MiB",
        "base64",
        "hex",
    ],
)
def test_a_small_files_codec_is_what_a_whole_file_trial_chooses(data: bytes) -> None:
    kind, stored = codec.choose_small(data, 0.10)
    whole_kind, whole = codec.choose(data, codec.compress(data), 0.10)
    assert (kind, stored) == (whole_kind, bytes(whole))
    assert codec.decode(mf.Chunk(chunk_id(data), len(data), kind), stored) == data


def test_random_bytes_are_tried_on_a_sample_not_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[tuple[str, int]] = []
    trial, compress = codec._trial, codec.compress

    def sampled(data: bytes) -> int:
        tried.append(("sample", len(data)))
        return trial(data)

    def whole(data: bytes | memoryview) -> bytes:
        tried.append(("whole", len(data)))
        return compress(data)

    monkeypatch.setattr(codec, "_trial", sampled)
    monkeypatch.setattr(codec, "compress", whole)
    for size in (700, 16 * KiB, 1024 * KiB):
        data = RNG.randbytes(size)
        assert codec.choose_small(data, 0.10) == (mf.CODEC_RAW, data)
        assert tried == [("sample", min(size, 3 * max(codec.SMALL_WINDOW, size // 64)))]
        tried.clear()
    # one whose sample compresses is tried whole, and stored as that trial left it
    assert codec.choose_small(TEXT, 0.10) == (mf.CODEC_ZSTD, compress(TEXT))
    assert tried == [("sample", 3 * codec.SMALL_WINDOW), ("whole", len(TEXT))]


def _batch(root: Path, contents: dict[str, bytes]) -> tuple[list[int], list[SourceFile]]:
    """The descriptors of a batch and its files as the scan saw them."""
    fds, files = [], []
    for name, data in contents.items():
        p = root / name
        if not p.exists():
            p.write_bytes(data)
        st = p.stat()
        fds.append(os.open(p, os.O_RDONLY | os.O_CLOEXEC))
        files.append(
            SourceFile(
                name, 0o644, len(data), (st.st_dev, st.st_ino), None, st.st_mtime_ns, st.st_ctime_ns
            )
        )
    return fds, files


def _closed(fds: list[int]) -> bool:
    return all(_is_closed(fd) for fd in fds)


def _is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


def test_a_batch_is_read_under_the_mtimes_the_scan_saw(tmp_path: Path) -> None:
    contents = {"a": b"alpha" * 100, "b": RNG.randbytes(3000), "c": TEXT}
    fds, files = _batch(tmp_path, contents)
    got = read_small(fds, files, compress="auto", min_saving=0.1)
    assert _closed(fds)
    assert [r[4] for r in got.files] == [f.mtime for f in files]
    assert got.data == list(contents.values())
    assert [r[0] for r in got.files] == [chunk_id(d) for d in contents.values()]
    assert [r[2] for r in got.files] == [mf.CODEC_ZSTD, mf.CODEC_RAW, mf.CODEC_ZSTD]


def test_a_file_rewritten_after_the_scan_is_read_again_between_two_stats(tmp_path: Path) -> None:
    fds, files = _batch(tmp_path, {"a": b"x" * 100})
    (tmp_path / "a").write_bytes(b"y" * 100)
    os.utime(tmp_path / "a", ns=(5, 5))  # same size, another mtime than the scan saw
    got = read_small(fds, files, compress="never", min_saving=0.1)
    assert got.data == [b"y" * 100]
    assert got.files[0][4] == 5  # the mtime its bytes were read under


def test_a_file_that_changes_while_it_is_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fds, files = _batch(tmp_path, {"ok": b"fine", "busy": b"b" * 100})
    real = os.pread
    writes = iter(range(1, 100))

    def pread(fd: int, n: int, offset: int) -> bytes:
        if os.fstat(fd).st_ino == files[1].ident[1]:  # someone writes it as it is read
            t = next(writes)
            os.utime(tmp_path / "busy", ns=(t, t))
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    with pytest.raises(UsageError, match="'busy' changed while it was being published"):
        read_small(fds, files, compress="auto", min_saving=0.1)
    assert _closed(fds)


def test_a_file_that_shrank_is_refused(tmp_path: Path) -> None:
    fds, files = _batch(tmp_path, {"a": b"a" * 100})
    os.truncate(tmp_path / "a", 40)
    with pytest.raises(UsageError, match="'a' shrank while it was being published"):
        read_small(fds, files, compress="auto", min_saving=0.1)
    assert _closed(fds)


async def test_descriptors_handed_to_a_stage_that_never_runs_are_closed(tmp_path: Path) -> None:
    pool = ThreadPoolExecutor(1)
    busy = threading.Event()
    try:
        pool.submit(busy.wait)  # the stage's one thread is taken: the batch waits its turn
        fds, files = _batch(tmp_path, {"a": b"a", "b": b"b"})
        job = asyncio.create_task(
            publish._run_closing_fds(
                pool, lambda: read_small(fds, files, compress="auto", min_saving=0.1), fds
            )
        )
        await asyncio.sleep(0)  # it is queued
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert _closed(fds)
        # and when the pool shuts down under a queued batch
        fds, files = _batch(tmp_path, {"a": b"a", "b": b"b"})
        job = asyncio.create_task(
            publish._run_closing_fds(
                pool, lambda: read_small(fds, files, compress="auto", min_saving=0.1), fds
            )
        )
        await asyncio.sleep(0)
        pool.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(asyncio.CancelledError):
            await job
        assert _closed(fds)
    finally:
        busy.set()
        pool.shutdown(wait=True)
