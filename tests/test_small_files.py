"""Small files and format 2, end to end: packs at the origin, mtimes kept in every restore
mode, and snapshots an older hostd published (format 1) still restoring.

Real daemons (tests/harness.py) on a file:// origin; a user's checks: the tree that comes
back (bytes, exec bits, mtimes to the nanosecond), what lies at the origin, and how many
requests a cold restore made.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Hostd, rmtree, short_tmp, tree_digest
from prometheus_client.parser import text_string_to_metric_families

from hostd.core import manifest as mf
from hostd.core.ids import chunk_id, compat_digest
from hostd.core.retry import RetryPolicy
from hostd.origin import Origin

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
